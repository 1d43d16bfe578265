"""State dicts of other codebases <-> the Flax params of `ddpm.models.build_model(config)`.

Every importer names, for each of our parameters, the tensor of the foreign state dict that
holds it; `to_params` then checks names and shapes (first missing, mis-shaped or unexpected
tensor, with the config key that most likely differs) and converts the layout:
  conv kernel   ours [KH, KW, I, O]  <-  torch [O, I, KH, KW]
  dense kernel  ours [I, O]          <-  torch Linear [O, I] or 1x1 Conv2d [O, I, 1, 1]
  everything else (biases, GroupNorm scale/bias, embeddings) unchanged.
"""
import functools
import json
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm import models
from ddpm.errors import UserError

Path = Tuple[str, ...]


def param_shapes(config) -> Dict[Path, Tuple[int, ...]]:
  """{('down_0_block_0', 'conv1', 'kernel'): shape, ...} of build_model(config), in the
  order Flax creates them (jax.eval_shape: nothing is computed; a full-size model still takes
  seconds to trace, so the result is kept per config)."""
  return dict(_param_shapes(config.to_json_best_effort(sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _param_shapes(config_json: str):
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = models.build_model(config)
  size, channels = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return tuple((tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in flat)


def torch_shape(our_shape: Sequence[int], conv_1x1: bool = False) -> Tuple[int, ...]:
  """The torch tensor shape that holds a parameter of `our_shape` (see the module doc)."""
  s = tuple(our_shape)
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  if len(s) == 2:
    return (s[1], s[0], 1, 1) if conv_1x1 else (s[1], s[0])
  return s


def from_torch(array: np.ndarray, our_ndim: int) -> np.ndarray:
  """A torch-layout tensor in our layout, float32."""
  a = np.asarray(array)
  if our_ndim == 4:
    a = a.transpose(2, 3, 1, 0)
  elif our_ndim == 2:
    a = a.reshape(a.shape[0], -1).T
  return np.ascontiguousarray(a, dtype=np.float32)


def to_torch(array: np.ndarray, conv_1x1: bool = False) -> np.ndarray:
  """One of our parameters in torch layout, float32 and contiguous (inverse of from_torch)."""
  a = np.asarray(array, dtype=np.float32)
  if a.ndim == 4:
    a = a.transpose(3, 2, 0, 1)
  elif a.ndim == 2:
    a = a.T
    if conv_1x1:
      a = a[:, :, None, None]
  return np.ascontiguousarray(a)


def nest(flat: Mapping[Path, np.ndarray]) -> dict:
  """{('a', 'b', 'kernel'): x} -> {'a': {'b': {'kernel': x}}}."""
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def flatten(params) -> Dict[Path, np.ndarray]:
  """Inverse of `nest` (host numpy arrays)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): np.asarray(leaf) for path, leaf in flat}


def match(shapes_by_name: Mapping[str, Sequence[int]], config, name_of: Callable[[Path], str],
          hint: Callable[[str], str], source: str,
          conv_1x1: Callable[[str], bool] = lambda name: False,
          foreign_shape: Optional[Callable[[str, Tuple[int, ...]], Tuple[int, ...]]] = None
          ) -> Dict[Path, str]:
  """{our parameter path: foreign tensor name} after checking every name and shape.

  Args:
    shapes_by_name: {foreign tensor name: its (torch-layout) shape}.
    config: the experiment config the params are for.
    name_of: our parameter path -> the foreign tensor name holding it.
    hint: foreign tensor name -> the config key(s) that most likely differ when that tensor is
      missing, unexpected or mis-shaped (for the error message).
    source: what the state dict came from (a path), for messages.
    conv_1x1: whether the foreign tensor of a dense kernel is a 1x1 convolution.
    foreign_shape: (foreign name, our shape) -> the foreign tensor's shape; default: torch
      layout (`torch_shape`).
  Raises:
    UserError: naming the first missing, then unexpected, then mis-shaped tensor.
  """
  shapes = param_shapes(config)
  names = {path: name_of(path) for path in shapes}
  for path, name in names.items():
    if name not in shapes_by_name:
      raise UserError(f"{source}: tensor {name} is missing (the config's {'/'.join(path)}); the "
                      f"config key that most likely differs: {hint(name)}")
  used = set(names.values())
  extra = next((n for n in shapes_by_name if n not in used), None)
  if extra is not None:
    raise UserError(f"{source}: unexpected tensor {extra} (shape {list(shapes_by_name[extra])}) "
                    f"that the config has no place for; the config key that most likely "
                    f"differs: {hint(extra)}")
  for path, name in names.items():
    want = (foreign_shape(name, shapes[path]) if foreign_shape is not None else
            torch_shape(shapes[path], conv_1x1(name)))
    got = tuple(shapes_by_name[name])
    if got != want:
      raise UserError(f"{source}: tensor {name} has shape {list(got)}, the config needs "
                      f"{list(want)}; the config key that most likely differs: {hint(name)}")
  return names


def _our_ndim(torch_ndim: int, conv_1x1: bool) -> int:
  return 2 if conv_1x1 and torch_ndim == 4 else torch_ndim


def to_params(state_dict: Mapping[str, np.ndarray], config, name_of: Callable[[Path], str],
              hint: Callable[[str], str], source: str,
              conv_1x1: Callable[[str], bool] = lambda name: False) -> dict:
  """Flax params of build_model(config) from a foreign state dict {name: torch-layout array};
  the arguments and errors are those of `match`."""
  names = match({k: np.shape(v) for k, v in state_dict.items()}, config, name_of, hint, source,
                conv_1x1)
  return nest({path: from_torch(state_dict[name],
                                _our_ndim(np.ndim(state_dict[name]), conv_1x1(name)))
               for path, name in names.items()})


def check_params(params, config, source: str) -> Dict[Path, np.ndarray]:
  """`flatten(params)` after checking it has exactly build_model(config)'s parameters."""
  flat = flatten(params)
  shapes = param_shapes(config)
  for path, shape in shapes.items():
    if path not in flat:
      raise UserError(f"{source}: parameter {'/'.join(path)} of the config's model is missing")
    if flat[path].shape != shape:
      raise UserError(f"{source}: parameter {'/'.join(path)} has shape {flat[path].shape}, the "
                      f"config's model needs {shape}")
  extra: Optional[Path] = next((p for p in flat if p not in shapes), None)
  if extra is not None:
    raise UserError(f"{source}: parameter {'/'.join(extra)} is not in the config's model")
  return {path: flat[path] for path in shapes}
