"""XLA:CPU kernels for the U-Net: the same layers and values as the stock Flax ones, faster on CPU.

`ddpm.models.build_model` builds the U-Net with `LAYERS` (instead of the stock
`unet.Layers()`) when JAX runs on CPU and `config.model.cpu_kernels` is on; `compiler_options`
gives the matching XLA:CPU options. The parameter trees and values are those of the stock
layers, so checkpoints move freely between platforms and settings. Everything here exists
because XLA:CPU ran some forms of the same computation much slower (measured on a 2-core
machine, see docs/performance.md); none of it is used on GPU or TPU.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm.models import unet

Array = jax.Array
Dtype = unet.Dtype


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018) of NHWC inputs, with a learned per-channel affine.

  The parameters ('scale' = 1, 'bias' = 0, [C] float32) and the values are those of
  flax.linen.GroupNorm: mean and biased variance E[x^2] - E[x]^2 (clipped at 0) over H, W and
  the C / G channels of each group, in float32 also for bfloat16 inputs; epsilon inside the
  square root. The statistics are per-channel sums over H x W (contiguous reductions) added up
  per group, and the normalisation is one multiply-add per element with per-(example, channel)
  coefficients; XLA:CPU ran flax's version (reductions over strided [H W, C / G] blocks) 2-5x
  slower (16x32x32x64 forward: 4.8 ms vs 0.8 ms).
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C] in `dtype`."""
    if x.ndim != 4:
      raise ValueError(f"GroupNorm expects NHWC inputs, got shape {x.shape}")
    b, height, width, c = x.shape
    groups = self.num_groups
    if groups < 1 or c % groups:
      raise ValueError(f"num_groups={groups} must be >= 1 and divide the {c} channels")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return _group_norm_affine(x, scale, bias, groups, self.epsilon).astype(self.dtype)


def _group_stats(x, groups, eps):
  """x: [B, H, W, C] -> (mean, 1 / sqrt(var + eps)), each [B, C] (per group, repeated)."""
  b, height, width, c = x.shape
  per_group = c // groups
  count = height * width * per_group
  xf = x.astype(jnp.float32)
  mean = jnp.sum(xf, axis=(1, 2)).reshape(b, groups, per_group).sum(-1) / count   # [B, G]
  mean_sq = jnp.sum(jnp.square(xf), axis=(1, 2)).reshape(b, groups, per_group).sum(-1) / count
  inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps)
  return jnp.repeat(mean, per_group, axis=1), jnp.repeat(inv, per_group, axis=1)


def _group_sum(a, groups):
  """[B, C] -> per-group sums repeated over the group's channels, [B, C]."""
  b, c = a.shape
  return jnp.repeat(a.reshape(b, groups, c // groups).sum(-1), c // groups, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_affine(x, scale, bias, groups, eps):
  """GroupNorm with affine: [B, H, W, C] -> float32 [B, H, W, C]."""
  mean, inv = _group_stats(x, groups, eps)
  mul = inv * scale
  return x.astype(jnp.float32) * mul[:, None, None, :] + (bias - mean * mul)[:, None, None, :]


def _group_norm_affine_fwd(x, scale, bias, groups, eps):
  mean, inv = _group_stats(x, groups, eps)
  mul = inv * scale
  y = x.astype(jnp.float32) * mul[:, None, None, :] + (bias - mean * mul)[:, None, None, :]
  return y, (x, scale, mean, inv)


def _group_norm_affine_bwd(groups, eps, res, dy):
  # With xh = (x - mean) inv and g = dy scale, the input gradient is
  #   dx = inv (g - E[g] - xh E[g xh])   (expectations over a group's H, W and channels),
  # written as dx = dy * inv * scale + x * p + q with per-(example, channel) p, q: one pass of
  # per-channel sums of dy and dy * x, one elementwise pass (autodiff of the forward made more).
  x, scale, mean, inv = res
  b, height, width, c = x.shape
  count = height * width * (c // groups)
  xf = x.astype(jnp.float32)
  s1 = jnp.sum(dy, axis=(1, 2))              # [B, C]: sum of dy
  s2 = jnp.sum(dy * xf, axis=(1, 2))         # [B, C]: sum of dy x
  dxh_sum = s2 - mean * s1                   # sum of dy (x - mean), per channel
  e_g = _group_sum(scale * s1, groups) / count                  # E[g]
  e_gxh = _group_sum(scale * inv * dxh_sum, groups) / count     # E[g xh]
  p = -inv * inv * e_gxh
  q = -inv * e_g - p * mean
  dx = dy * (inv * scale)[:, None, None, :] + xf * p[:, None, None, :] + q[:, None, None, :]
  dscale = jnp.sum(inv * dxh_sum, axis=0)
  dbias = jnp.sum(s1, axis=0)
  return dx.astype(x.dtype), dscale, dbias


_group_norm_affine.defvjp(_group_norm_affine_fwd, _group_norm_affine_bwd)


# ---- convolution with a loop-safe gradient on CPU ------------------------------------------
# XLA:CPU rewrites convolutions into the form its fast kernels (Eigen / XNNPACK) take only in the
# top-level computation, not inside while loops (jax issue #12868). The gradients JAX derives
# for a conv (w.r.t. the kernel: batch and feature roles swapped, the 32x32 output as the window)
# are not in that form, so inside a lax.scan (the train step's steps_per_dispatch loop) they fell
# back to naive loops: a bench32 train step took ~66 s instead of ~2 s. On CPU the backward pass
# below writes both gradients as NHWC x HWIO convolutions with explicit transposes, a form the
# fast kernels take anywhere; other platforms keep JAX's own gradient (cuDNN / TPU recognise it).
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_plain(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DIMS)


def _conv_grads_canonical(x, w, g, strides, pads):
  """(dx, dw) of y = conv(x, w) with only NHWC x HWIO convolutions. x: [B, H, W, I],
  w: [KH, KW, I, O], g = dL/dy: [B, Ho, Wo, O]."""
  k = w.shape[:2]
  size = x.shape[1:3]
  out = g.shape[1:3]
  # dx[i] = sum_k gd[i + lo - k] w[k] with gd = g dilated by the stride: a correlation of gd with
  # the flipped, in/out-swapped kernel, padded K - 1 - lo before (and the rest after).
  dx_pads = [(k[d] - 1 - pads[d][0], size[d] - 1 - (out[d] - 1) * strides[d] + pads[d][0])
             for d in range(2)]
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = jax.lax.conv_general_dilated(g, w_t, (1, 1), dx_pads, lhs_dilation=strides,
                                    dimension_numbers=_DIMS)
  # dw[a, b, i, o] = sum_{n, h, v} x_pad[n, h s + a, v s + b, i] g[n, h, v, o]: a convolution of
  # x^T [I, H, W, B] (I as the batch, B as the features) with g^T [Ho, Wo, B, O] as the kernel.
  dw_pads = [(pads[d][0], k[d] + (out[d] - 1) * strides[d] - size[d] - pads[d][0])
             for d in range(2)]
  dw = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
                                    dw_pads, rhs_dilation=strides, dimension_numbers=_DIMS)
  return dx, dw.transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_loop_safe(x, w, strides, pads):
  return _conv_plain(x, w, strides, pads)


def _conv_loop_safe_fwd(x, w, strides, pads):
  return _conv_plain(x, w, strides, pads), (x, w)


def _conv_loop_safe_bwd(strides, pads, res, g):
  x, w = res

  def jax_grads(x, w, g):
    return jax.vjp(lambda a, b: _conv_plain(a, b, strides, pads), x, w)[1](g)

  def cpu_grads(x, w, g):
    return _conv_grads_canonical(x, w, g, strides, pads)

  return jax.lax.platform_dependent(x, w, g, cpu=cpu_grads, default=jax_grads)


_conv_loop_safe.defvjp(_conv_loop_safe_fwd, _conv_loop_safe_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for nn.Conv (NHWC x HWIO 2-D convolutions, no dilation, no
  groups) with the loop-safe CPU gradient described above. Same values as the lax op."""
  if lhs.ndim != 4 or any(d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation)) \
      or feature_group_count != 1 or precision is not None:
    raise ValueError("conv_general_dilated here supports 2-D NHWC convolutions without "
                     f"dilation, groups or precision, got input shape {lhs.shape}, lhs_dilation="
                     f"{lhs_dilation}, rhs_dilation={rhs_dilation}, feature_group_count="
                     f"{feature_group_count}, precision={precision}")
  dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if dims != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS):
    raise ValueError(f"expected NHWC x HWIO dimension numbers, got {dimension_numbers}")
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_loop_safe(lhs, rhs, strides, pads)


# ---- dense layers: a weight gradient without a fused transpose on CPU -------------------------
# The weight gradient of y = x W is dW = x^T g (g = dL/dy). XLA:CPU lays that dot out with g
# transposed and fuses the transpose into g's producer (a GroupNorm backward, the split of an
# up-path skip concatenation), which then writes its output in transposed order: one
# [16384, 64] gradient of configs/bench32.py took 21 ms instead of about 1. An optimisation
# barrier on g in the backward pass keeps the producer in its own layout (bench32's U-Net
# gradient 5-7% faster, bitwise the same values). Other platforms keep the plain formulas.
def _dense_grads(x, w, g, barrier: bool):
  """(dx, dw) of y = x @ w. x: [..., K], w: [K, O], g: [..., O]."""
  if barrier:
    g = jax.lax.optimization_barrier(g)
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
  return dx, dw


@jax.custom_vjp
def _dense_dot(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_dot_fwd(x, w):
  return _dense_dot(x, w), (x, w)


def _dense_dot_bwd(res, g):
  x, w = res
  return jax.lax.platform_dependent(
      x, w, g, cpu=functools.partial(_dense_grads, barrier=True),
      default=functools.partial(_dense_grads, barrier=False))


_dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense ([..., K] x [K, O], no batch dimensions) with the CPU
  weight gradient described above. Same values as the lax op."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch
      or rhs_batch or rhs.ndim != 2 or precision is not None
      or preferred_element_type is not None):
    raise ValueError("dense_dot_general supports [..., K] x [K, O] products without batch "
                     f"dimensions, precision or preferred_element_type, got shapes {lhs.shape} "
                     f"x {rhs.shape}, dimension_numbers={dimension_numbers}, precision="
                     f"{precision}, preferred_element_type={preferred_element_type}")
  return _dense_dot(lhs, rhs)


# ---- XLA:CPU library choice ------------------------------------------------------------------
# XLA:CPU hands convolutions, dots, reductions and elementwise fusions to YNNPACK by default. On
# the 2-core AVX-512 machine this project was tuned on, YNNPACK ran the U-Net's 64-channel 3x3
# convolutions on ONE thread (16x32x32x64 -> 64: 94 GFLOP/s, Eigen 180 GFLOP/s) and its dots and
# elementwise fusions no faster than XLA's own; its reductions (GroupNorm statistics, bias
# gradients) were faster. With only reductions on YNNPACK, configs/bench32.py's U-Net gradient
# took 1.14 s instead of 1.40 s and its forward pass 0.33 s instead of 0.45 s.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


# The U-Net's layers with the kernels above (see unet.Layers): same parameters, same values.
LAYERS = unet.Layers(conv_general_dilated=conv_general_dilated, dot_general=dense_dot_general,
                     group_norm=GroupNorm)
