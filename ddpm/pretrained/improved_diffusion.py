"""openai/improved-diffusion's `UNetModel` state dicts -> the Flax params of our U-Net.

improved-diffusion (Nichol & Dhariwal 2021) names its tensors after its torch modules:
`time_embed.{0,2}` (the timestep MLP), `input_blocks.N` (the first conv, then per level the
residual blocks, each optionally followed by attention, and a downsampling block between
levels), `middle_block.{0,1,2}`, `output_blocks.N` (per level num_res_blocks + 1 residual blocks,
attention, and an upsampling conv at the end of every level but the last) and `out.{0,2}` (the
output norm and conv). `to_params` walks our U-Net's modules in the same order and converts
each tensor: convolutions OIHW -> HWIO, Linear and 1x1 convolutions [out, in] -> [in, out],
GroupNorm weight -> scale, and the fused `qkv` 1x1 convolution into our q, k and v layers
(its 3C output channels are ordered per head: [q_h, k_h, v_h] for head h = 0 .. heads-1).

The configs that express improved-diffusion's UNetModel exactly are configs/cifar10_improved.py
and configs/imagenet64_improved.py (with its rescaled timesteps, ADM timestep embedding, torch
GroupNorm epsilon and symmetric downsampling padding). The number of attention heads is not
visible in a state dict (it only orders the qkv channels): it comes from config.model.num_heads.
"""
import collections
import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import models
from ddpm.errors import UserError

# Keys every improved-diffusion UNetModel state dict has (and no diffusers / TF checkpoint does).
_MARKER_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


def is_improved_diffusion(state_dict: Mapping[str, np.ndarray]) -> bool:
  """Whether the tensor names are those of improved-diffusion's UNetModel."""
  return all(k in state_dict for k in _MARKER_KEYS) and any(
      k.startswith("middle_block.") for k in state_dict)


def _heads(config, channels: int) -> int:
  m = config.model
  return channels // m.num_head_channels if m.num_head_channels > 0 else m.num_heads


# ---- per-layer conversions: (peer tensor names and shapes) <-> (our leaves) --------------------
# Each kind maps one of our Flax modules to one torch module (prefix) and converts its tensors.
# `peer_shapes` gives the torch shapes our module implies (for the mismatch messages).

def _conv_shapes(ours):
  kh, kw, i, o = ours["kernel"]
  return {"weight": (o, i, kh, kw), "bias": (o,)}


def _conv(t, ours, config):
  del ours, config
  return {"kernel": np.transpose(t["weight"], (2, 3, 1, 0)), "bias": t["bias"]}


def _dense_shapes(ours):
  i, o = ours["kernel"]
  return {"weight": (o, i), "bias": (o,)}


def _dense(t, ours, config):
  # Linear [out, in] and 1x1 convolutions [out, in, 1(, 1)] alike.
  del ours, config
  w = t["weight"]
  return {"kernel": w.reshape(w.shape[0], w.shape[1]).T, "bias": t["bias"]}


def _nin_shapes(ours):  # a 1x1 Conv2d (the residual blocks' skip_connection)
  i, o = ours["kernel"]
  return {"weight": (o, i, 1, 1), "bias": (o,)}


def _proj_shapes(ours):  # a 1x1 Conv1d (the attention output projection)
  i, o = ours["kernel"]
  return {"weight": (o, i, 1), "bias": (o,)}


def _norm_shapes(ours):
  return {"weight": ours["scale"], "bias": ours["bias"]}


def _norm(t, ours, config):
  del ours, config
  return {"scale": t["weight"], "bias": t["bias"]}


def _qkv_shapes(ours):
  c = ours["q"]["kernel"][0]
  return {"weight": (3 * c, c, 1), "bias": (3 * c,)}


def _qkv(t, ours, config):
  # improved-diffusion reshapes the qkv output [B, 3C, T] to [B * heads, 3C / heads, T] and then
  # splits each head's channels into q, k, v: output channel h * 3d + j * d + e (j = q, k, v)
  # is channel h * d + e of our q / k / v layer (whose output is split into heads as [heads, d]).
  c = ours["q"]["kernel"][0]
  heads = _heads(config, c)
  w = t["weight"].reshape(heads, 3, c // heads, c)
  b = t["bias"].reshape(heads, 3, c // heads)
  return {name: {"kernel": w[:, j].reshape(c, c).T, "bias": b[:, j].reshape(c)}
          for j, name in enumerate(("q", "k", "v"))}


_KINDS = {
    "conv": (_conv_shapes, _conv),
    "dense": (_dense_shapes, _dense),
    "nin": (_nin_shapes, _dense),
    "proj": (_proj_shapes, _dense),
    "norm": (_norm_shapes, _norm),
    "qkv": (_qkv_shapes, _qkv),
}


def _check_expressible(config):
  """Refuses configs whose U-Net improved-diffusion's UNetModel has no counterpart of."""
  if config.model.resblock_updown:
    raise UserError("config.model.resblock_updown=True: improved-diffusion's UNetModel resamples "
                    "with Downsample / Upsample layers; set it to False")
  if config.data.num_classes > 0:
    raise UserError(f"config.data.num_classes={config.data.num_classes}: importing improved-"
                    "diffusion's class-conditional models is not supported (its label table has "
                    "no null label); use an unconditional config")


def _plan(tree, config):
  """[(our module path, peer prefix, kind)] in improved-diffusion's module order.

  tree: our parameter shapes (nested dicts of shape tuples).
  """
  m = config.model
  plan = []

  def res_block(ours, peer):
    plan.extend([((ours, "norm1"), f"{peer}.in_layers.0", "norm"),
                 ((ours, "conv1"), f"{peer}.in_layers.2", "conv"),
                 ((ours, "temb_proj"), f"{peer}.emb_layers.1", "dense"),
                 ((ours, "norm2"), f"{peer}.out_layers.0", "norm"),
                 ((ours, "conv2"), f"{peer}.out_layers.3", "conv")])
    if "nin_shortcut" in tree[ours]:
      plan.append(((ours, "nin_shortcut"), f"{peer}.skip_connection", "nin"))

  def attention(ours, peer):
    plan.extend([((ours, "norm"), f"{peer}.norm", "norm"),
                 ((ours,), f"{peer}.qkv", "qkv"),
                 ((ours, "proj_out"), f"{peer}.proj_out", "proj")])

  plan.append((("temb_dense0",), "time_embed.0", "dense"))
  plan.append((("temb_dense1",), "time_embed.2", "dense"))
  plan.append((("conv_in",), "input_blocks.0.0", "conv"))
  levels = len(m.ch_mult)
  index = 1
  for level in range(levels):
    for block in range(m.num_res_blocks):
      res_block(f"down_{level}_block_{block}", f"input_blocks.{index}.0")
      if f"down_{level}_attn_{block}" in tree:
        attention(f"down_{level}_attn_{block}", f"input_blocks.{index}.1")
      index += 1
    if level != levels - 1:
      if m.resamp_with_conv:
        plan.append(((f"down_{level}_downsample", "conv"), f"input_blocks.{index}.0.op", "conv"))
      index += 1
  res_block("mid_block_1", "middle_block.0")
  attention("mid_attn_1", "middle_block.1")
  res_block("mid_block_2", "middle_block.2")
  index = 0
  for level in reversed(range(levels)):
    for block in range(m.num_res_blocks + 1):
      res_block(f"up_{level}_block_{block}", f"output_blocks.{index}.0")
      layer = 1
      if f"up_{level}_attn_{block}" in tree:
        attention(f"up_{level}_attn_{block}", f"output_blocks.{index}.1")
        layer = 2
      if level and block == m.num_res_blocks and m.resamp_with_conv:
        plan.append(((f"up_{level}_upsample", "conv"), f"output_blocks.{index}.{layer}.conv",
                     "conv"))
      index += 1
  plan.append((("norm_out",), "out.0", "norm"))
  plan.append((("conv_out",), "out.2", "conv"))
  return plan


# ---- what a state dict says about the config (for the error messages) ------------------------

def _checkpoint_hparams(state_dict, config):
  """{config key: value} of the hyper-parameters a state dict determines (as far as it does)."""
  sd = state_dict
  hp = {}
  if "input_blocks.0.0.weight" in sd:
    hp["data.channels"] = sd["input_blocks.0.0.weight"].shape[1]
  ch = sd["time_embed.0.weight"].shape[1] if "time_embed.0.weight" in sd else None
  if ch is not None:
    hp["model.ch"] = ch
  if "out.2.weight" in sd and "data.channels" in hp:
    learned = sd["out.2.weight"].shape[0] == 2 * hp["data.channels"]
    if learned != (config.diffusion.model_var_type in ("learned", "learned_range")):
      hp["diffusion.model_var_type"] = (
          f"{sd['out.2.weight'].shape[0]} output channels: "
          + ("a learned variance ('learned_range')" if learned else "no learned variance"))
  first = "input_blocks.1.0"
  if f"{first}.emb_layers.1.weight" in sd and f"{first}.in_layers.2.weight" in sd:
    emb_out, out = (sd[f"{first}.{n}.weight"].shape[0] for n in ("emb_layers.1", "in_layers.2"))
    hp["model.use_scale_shift_norm"] = bool(emb_out == 2 * out)
  # Input blocks by index: residual blocks (with or without attention) and downsamplers (with a
  # conv 'op', or average pooling: an index without tensors).
  names = collections.defaultdict(set)
  for key in sd:
    match = re.match(r"input_blocks\.(\d+)\.(.*)", key)
    if match:
      names[int(match.group(1))].add(match.group(2))
  if not names:
    return hp
  levels, down_conv = [[]], []
  for i in range(1, max(names) + 1):
    if "0.in_layers.2.weight" in names[i]:
      levels[-1].append((sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0],
                         "1.qkv.weight" in names[i]))
    else:
      down_conv.append("0.op.weight" in names[i])
      levels.append([])
  if len(levels) > 1:
    hp["model.resamp_with_conv"] = all(down_conv)
  if ch and all(levels) and all(c % ch == 0 for level in levels for c, _ in level):
    hp["model.ch_mult"] = tuple(level[0][0] // ch for level in levels)
  if len({len(level) for level in levels}) == 1:
    hp["model.num_res_blocks"] = len(levels[0])
  size = config.data.image_size
  hp["model.attn_resolutions"] = tuple(
      size // 2 ** i for i, level in enumerate(levels) if any(a for _, a in level))
  return hp


def _config_value(config, key):
  section, name = key.split(".")
  value = config[section][name]
  if key == "model.ch_mult":
    return tuple(value)
  if key == "model.attn_resolutions":  # compared as a set, in decreasing resolution
    return tuple(sorted(set(value), reverse=True))
  return value


def _likely_cause(state_dict, config):
  """'; likely config.X: ...' for the first hyper-parameter the state dict and the config
  disagree on, or '' when there is none."""
  for key, value in _checkpoint_hparams(state_dict, config).items():
    if key == "diffusion.model_var_type":
      return (f"; likely config.diffusion.model_var_type: the checkpoint's model has {value}, "
              f"the config's is {config.diffusion.model_var_type!r}")
    ours = _config_value(config, key)
    if key == "model.attn_resolutions":
      value = tuple(sorted(set(value), reverse=True))
    if value != ours:
      return f"; likely config.{key}: the checkpoint has {value}, the config {ours}"
  return ""


def _shapes_tree(config):
  """Our parameter shapes for `config`: nested dicts of shape tuples (no computation)."""
  model = models.build_model(config)
  size, channels = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  return jax.tree.map(lambda s: tuple(s.shape), params)


_SECTIONS = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out")


def _module_order(key):
  """Sort key of a tensor name in improved-diffusion's module order: (section, block, layer)."""
  parts = key.split(".")
  section = _SECTIONS.index(parts[0]) if parts[0] in _SECTIONS else len(_SECTIONS)
  numbers = [int(p) if p.isdigit() else -1 for p in (parts[1:3] + ["", ""])[:2]]
  return (section, *numbers)


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def to_params(state_dict: Mapping[str, np.ndarray], config) -> dict:
  """The Flax params of `ddpm.models.build_model(config)` from an improved-diffusion state dict.

  Args:
    state_dict: improved-diffusion UNetModel tensor name -> numpy array (torch layouts: convs
      [out, in, kh, kw], Linear [out, in]), e.g. a `model.state_dict()` or a released `.pt`.
    config: a config (configs/cifar10_improved.py, configs/imagenet64_improved.py or a variant)
      whose U-Net has the checkpoint's shape; config.model.num_heads must be the checkpoint's.
  Returns:
    nested dict of float32 numpy arrays with the structure and shapes of the model's params.
  Raises:
    UserError naming the first missing, unexpected or mis-shaped tensor and the config key that
    most likely differs.
  """
  _check_expressible(config)
  tree = _shapes_tree(config)
  plan = _plan(tree, config)
  # Every problem, ordered as improved-diffusion's modules are (section, block, layer): the first
  # one is reported, e.g. a missing input_blocks.3.0.op (a downsampler where the checkpoint has a
  # 4th residual block) rather than a later consequence of it.
  problems, planned = [], set()
  for path, prefix, kind in plan:
    for name, shape in _KINDS[kind][0](_get(tree, path)).items():
      key = f"{prefix}.{name}"
      planned.add(key)
      if key not in state_dict:
        problems.append((_module_order(key), 0, len(problems),
                         f"missing tensor {key} (shape {tuple(shape)}), which the config's "
                         "U-Net needs"))
      elif tuple(np.shape(state_dict[key])) != tuple(shape):
        problems.append((_module_order(key), 0, len(problems),
                         f"tensor {key} has shape {tuple(np.shape(state_dict[key]))}, the "
                         f"config's U-Net needs {tuple(shape)}"))
  for key in state_dict:
    if key not in planned:
      problems.append((_module_order(key), 1, len(problems),
                       f"unexpected tensor {key} (shape {tuple(np.shape(state_dict[key]))}), "
                       "which the config's U-Net has no place for"))
  if problems:
    raise UserError(f"improved-diffusion checkpoint: {min(problems)[3]}"
                    f"{_likely_cause(state_dict, config)}")
  params = {}
  for path, prefix, kind in plan:
    ours = _get(tree, path)
    tensors = {name: np.asarray(state_dict[f"{prefix}.{name}"], np.float32)
               for name in _KINDS[kind][0](ours)}
    node = params
    for name in path:
      node = node.setdefault(name, {})
    node.update(_KINDS[kind][1](tensors, ours, config))  # qkv fills q, k, v beside norm
  # Every leaf of ours must have been filled, with its shape (a check of the plan itself).
  flat = lambda t: {jax.tree_util.keystr(p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(
                        x, (tuple, np.ndarray)))[0]}
  got, want = flat(jax.tree.map(lambda a: tuple(a.shape), params)), flat(tree)
  if got != want:
    wrong = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    raise AssertionError(f"improved-diffusion mapping: parameters {wrong[:3]} ... differ")
  return params
