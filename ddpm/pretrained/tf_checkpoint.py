"""The original DDPM TensorFlow checkpoints (hojonathanho/diffusion, `model.ckpt-*`) as our params.

Our parameter names mirror the TF variable scopes of diffusion_tf/models/unet.py, and the TF
layouts are ours (conv W [KH, KW, I, O], dense and NIN W [I, O]):
  model/conv_in/W                   conv_in/kernel
  model/temb/dense0/W               temb_dense0/kernel
  model/down_0/block_0/norm1/gamma  down_0_block_0/norm1/scale      (beta: bias)
  model/down_1/attn_0/q/W           down_1_attn_0/q/kernel
  model/down_0/downsample/conv/b    down_0_downsample/conv/bias
  model/mid/block_1, mid/attn_1, mid/block_2   mid_block_1, mid_attn_1, mid_block_2
  model/norm_out, model/conv_out    norm_out, conv_out
The checkpoints also hold the Adam slots and, per variable, its exponential moving average
('<name>/ExponentialMovingAverage'), which the paper's samples and numbers use: `load` takes the
EMA weights when present. Only `load` needs TensorFlow (tf.train.load_checkpoint);
`to_params` works on any {name: array} mapping.
"""
import re
from typing import Dict, Mapping

import numpy as np

from ddpm.errors import UserError
from ddpm.pretrained import mapping

SCOPE = "model"
EMA_SUFFIX = "/ExponentialMovingAverage"
_NOT_WEIGHTS = ("Adam", "Adam_1", "ExponentialMovingAverage")


def tf_name(path: mapping.Path) -> str:
  """Our parameter path -> the TF variable name, e.g. ('mid_attn_1', 'q', 'kernel') ->
  'model/mid/attn_1/q/W'."""
  top, *inner, leaf = path
  if top.startswith("temb_"):
    scopes = ["temb", top[len("temb_"):]]
  elif top.startswith("mid_"):
    scopes = ["mid", top[len("mid_"):]]
  else:
    match = re.fullmatch(r"((?:down|up)_\d+)_(.+)", top)
    scopes = [match.group(1), match.group(2)] if match else [top]
  module = (inner or scopes)[-1]
  if module.startswith("norm"):
    leaf = {"scale": "gamma", "bias": "beta"}[leaf]
  else:
    leaf = {"kernel": "W", "bias": "b"}[leaf]
  return "/".join([SCOPE, *scopes, *inner, leaf])


def _hint(name: str) -> str:
  if "/attn_" in name:
    return "model.attn_resolutions"
  if re.search(r"/(down|up)_\d+/block_[1-9]", name):
    return "model.num_res_blocks"
  if "/conv_in/" in name or "/temb/" in name:
    return "model.ch or data.channels"
  if "/conv_out/" in name:
    return "data.channels"
  return "model.ch_mult (or model.ch, model.num_res_blocks)"


def weight_names(names, ema: bool = True) -> Dict[str, str]:
  """{U-Net variable name: the stored variable holding its value} of a checkpoint's variable
  names: the 'model/...' variables (their EMA when `ema` and the checkpoint has one), without
  optimizer slots."""
  names = set(names)
  base = sorted(n for n in names
                if n.startswith(SCOPE + "/") and n.rsplit("/", 1)[-1] not in _NOT_WEIGHTS)
  use_ema = ema and any(n + EMA_SUFFIX in names for n in base)
  return {n: n + EMA_SUFFIX if use_ema and n + EMA_SUFFIX in names else n for n in base}


def to_params(variables: Mapping[str, np.ndarray], config, source: str = "checkpoint",
              ema: bool = True) -> dict:
  """Flax params of build_model(config) from a DDPM TF checkpoint's {variable name: array}."""
  stored = weight_names(variables, ema)
  names = mapping.match({k: np.shape(variables[v]) for k, v in stored.items()}, config, tf_name,
                        _hint, source, foreign_shape=lambda name, shape: tuple(shape))
  return mapping.nest({path: np.asarray(variables[stored[name]], np.float32)
                       for path, name in names.items()})


def load(prefix: str, config, ema: bool = True) -> dict:
  """Params from the TF checkpoint `prefix` (PREFIX.index + PREFIX.data-*); needs TensorFlow."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"{prefix} is a TensorFlow checkpoint: reading it needs TensorFlow "
                    "(pip install tensorflow), which ddpm-jax does not otherwise use") from None
  try:
    reader = tf.train.load_checkpoint(prefix)
    # Only the weights (or their EMA) are read, not the Adam slots.
    variables = {stored: reader.get_tensor(stored) for stored in
                 weight_names(reader.get_variable_to_shape_map(), ema).values()}
  except Exception as e:  # pylint: disable=broad-except
    # TF raises its own error types (DataLossError, NotFoundError, ...) for bad checkpoints.
    raise UserError(f"cannot read TF checkpoint {prefix}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}") from None
  return to_params(variables, config, source=prefix, ema=ema)
