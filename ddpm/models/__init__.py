"""Model construction from a config: training, sampling and evaluation all call `build_model`,
and compile every program that runs the model with `compiler_options`."""
import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from ddpm import diffusion
from ddpm.models import cpu_ops
from ddpm.models.unet import STOCK_LAYERS, Layers, UNet, timestep_embedding

__all__ = ["UNet", "Layers", "build_model", "compiler_options", "count_params",
           "timestep_embedding", "COMPUTE_DTYPES", "MODEL_NAMES"]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_NAMES = ("unet",)


def build_model(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net described by a config shaped like ddpm/default_config.py.

  Image channels come from config.data.channels, labels from config.data.num_classes, the
  learned variance from config.diffusion.model_var_type ('learned' / 'learned_range'), the
  computation dtype from config.training.compute_dtype and everything else from config.model.
  On CPU with config.model.cpu_kernels on, the layers use the XLA:CPU kernels of
  `ddpm.models.cpu_ops` (same parameters and values); elsewhere they are stock Flax.
  """
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(f"config.model.name: unknown model {m.name!r} (available: "
                     f"{', '.join(map(repr, MODEL_NAMES))})")
  dtype_name = config.training.compute_dtype
  if dtype_name not in COMPUTE_DTYPES:
    raise ValueError(f"config.training.compute_dtype: {dtype_name!r} is not one of "
                     f"{', '.join(map(repr, COMPUTE_DTYPES))}")
  return UNet(
      ch=m.ch,
      out_ch=config.data.channels,
      ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions),
      dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv,
      num_heads=m.num_heads,
      num_head_channels=m.num_head_channels,
      use_scale_shift_norm=m.use_scale_shift_norm,
      resblock_updown=m.resblock_updown,
      learn_sigma=config.diffusion.model_var_type in diffusion.LEARNED_VAR_TYPES,
      num_classes=config.data.num_classes,
      norm_groups=m.norm_groups,
      dtype=COMPUTE_DTYPES[dtype_name],
      remat=m.remat,
      layers=_layers(config, jax.default_backend()),
      # improved-diffusion's rescale_timesteps: every T looks like 1000 steps to the network.
      timestep_scale=1000.0 / config.diffusion.num_timesteps if m.rescale_timesteps else 1.0,
      timestep_embedding_kind=m.timestep_embedding,
      norm_eps=m.norm_eps,
      downsample_padding=m.downsample_padding,
  )


def _uses_cpu_kernels(config: Optional[ml_collections.ConfigDict], platform: str) -> bool:
  return platform == "cpu" and (config is None or config.model.cpu_kernels)


def _layers(config, platform: str) -> Layers:
  return cpu_ops.LAYERS if _uses_cpu_kernels(config, platform) else STOCK_LAYERS


def compiler_options(mesh: Optional[jax.sharding.Mesh] = None,
                     config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """XLA options for `jax.jit(..., compiler_options=...)` of any program that runs the model.

  The train step, the samplers, bits/dim and FID sampling all compile with these. Args: `mesh`
  (None: the default backend) gives the platform; `config` the run's config (None: the
  defaults). The XLA:CPU options of `cpu_ops` on CPU with config.model.cpu_kernels on, none
  elsewhere.
  """
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  return dict(cpu_ops.COMPILER_OPTIONS) if _uses_cpu_kernels(config, device.platform) else {}


def count_params(model: UNet, image_size: int, channels: int) -> int:
  """Number of parameters of `model` on [image_size, image_size, channels] images.

  Uses jax.eval_shape: nothing is allocated or computed, so this is cheap for any model size.
  """
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
