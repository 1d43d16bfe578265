"""XLA:CPU kernels for the U-Net: the stock layers' parameters and values, in faster forms on CPU.

`ddpm.models.build_model` builds the U-Net with `LAYERS` (instead of the stock `unet.Layers()`)
when JAX runs on CPU and `config.model.cpu_kernels` is on, and `ddpm.models.compiler_options`
adds `COMPILER_OPTIONS` there. Parameter trees and values are those of the stock layers, so
checkpoints move freely between platforms and settings. Nothing here runs on GPU or TPU.

Each kernel is a `jax.custom_jvp` whose tangent is written in a linear form chosen so that
JAX's automatic transpose of it (the reverse pass) is the form XLA:CPU runs fast. So forward
mode (jax.jvp, jax.jacfwd, Hessian-vector products) and reverse mode both work, and higher
derivatives are the derivatives of these rules. Timings below are from the 2-core machine this
project was tuned on (docs/performance.md).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ddpm.models import unet

Array = jax.Array


def _sum_of_terms(terms, like):
  """The sum of the tangent terms that are not symbolic zeros (zeros like `like` if none)."""
  return functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(like)


# ---- GroupNorm: per-channel sums and one multiply-add per element ---------------------------
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
  dtype: unet.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C] in `dtype`."""
    if x.ndim != 4:
      raise ValueError(f"GroupNorm expects NHWC inputs, got shape {x.shape}")
    c = x.shape[-1]
    groups = self.num_groups
    if groups < 1 or c % groups:
      raise ValueError(f"num_groups={groups} must be >= 1 and divide the {c} channels")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return _group_norm_affine(x, scale, bias, groups, self.epsilon).astype(self.dtype)


def _group_sum(a, groups):
  """[B, C] -> per-group sums repeated over the group's channels, [B, C]."""
  b, c = a.shape
  return jnp.repeat(a.reshape(b, groups, c // groups).sum(-1), c // groups, axis=1)


def _group_mean(x, groups):
  """[B, H, W, C] -> the mean over each group's H, W and channels, repeated per channel [B, C]."""
  _, height, width, c = x.shape
  return _group_sum(jnp.sum(x, axis=(1, 2)), groups) / (height * width * (c // groups))


def _affine(x, mul, add):
  """x * mul + add with per-(example, channel) mul, add: [B, H, W, C], [B, C], [B, C]."""
  return x * mul[:, None, None, :] + add[:, None, None, :]


def _group_norm_parts(x, scale, bias, groups, eps):
  xf = x.astype(jnp.float32)
  mean = _group_mean(xf, groups)
  inv = jax.lax.rsqrt(jnp.maximum(_group_mean(jnp.square(xf), groups) - mean ** 2, 0.0) + eps)
  mul = inv * scale
  return xf, mean, inv, mul, _affine(xf, mul, bias - mean * mul)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _group_norm_affine(x, scale, bias, groups, eps):
  """GroupNorm with affine: [B, H, W, C] -> float32 [B, H, W, C]."""
  return _group_norm_parts(x, scale, bias, groups, eps)[-1]


@_group_norm_affine.defjvp
def _group_norm_affine_jvp(groups, eps, primals, tangents):
  # y = (x - mean) inv scale + bias. Its tangent is again one multiply-add per element,
  #   dy = dx * inv scale + x * p + q,   p = dscale inv + scale dinv,
  #   q = dbias - mean p - inv scale dmean,   dinv = -inv^3 (E[x dx] - mean dmean),
  # with per-(example, channel) p, q built from the per-channel sums of dx and x dx (E over a
  # group). JAX's transpose of this form is the one-pass backward: per-channel sums of g and
  # g x, then dx = g * inv scale + x * p' + q' (autodiff of the forward made more passes).
  x, scale, bias = primals
  dx, dscale, dbias = tangents
  xf, mean, inv, mul, y = _group_norm_parts(x, scale, bias, groups, eps)
  dxf = dx.astype(jnp.float32)
  dmean = _group_mean(dxf, groups)
  dinv = -inv ** 3 * (_group_mean(xf * dxf, groups) - mean * dmean)
  p = dscale * inv + scale * dinv
  q = dbias - mean * p - mul * dmean
  return y, _affine(dxf, mul, q) + xf * p[:, None, None, :]


# ---- convolution with a loop-safe reverse pass ---------------------------------------------
# XLA:CPU rewrites convolutions into the form its fast kernels (Eigen / XNNPACK) take only in
# the top-level computation, not inside while loops (jax issue #12868). The gradients JAX
# derives for a conv (w.r.t. the kernel: batch and feature roles swapped, the 32x32 output as
# the window) are not in that form, so inside a lax.scan (the train step's steps_per_dispatch
# loop) they fell back to naive loops: a bench32 train step took ~66 s instead of ~2 s, one
# 16x32x32x64 3x3 conv gradient 4 s instead of 0.1 s. The tangent below is written so that its
# transposes are NHWC x HWIO convolutions with explicit transposes, a form the fast kernels take
# anywhere (the forward-mode tangent itself runs in whatever form; it is not the hot path).
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_plain(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DIMS)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_loop_safe(x, w, strides, pads):
  return _conv_plain(x, w, strides, pads)


def _conv_loop_safe_jvp(strides, pads, primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = _conv_plain(x, w, strides, pads)
  terms = []
  if not isinstance(dx, SymbolicZero):
    # conv(dx, w) with the kernel given as [KH, KW, O, I]: JAX's transpose w.r.t. dx is then a
    # correlation of g (dilated by the stride) with the flipped kernel as HWIO.
    terms.append(jax.lax.conv_general_dilated(dx, w.transpose(0, 1, 3, 2), strides, pads,
                                              dimension_numbers=("NHWC", "HWOI", "NHWC")))
  if not isinstance(dw, SymbolicZero):
    # conv(x, dw) with x as [I, H, W, B], dw as [I, KH, KW, O] and the output as [Ho, Wo, B, O]:
    # JAX's transpose w.r.t. dw is then x^T [I, H, W, B] (I as the batch, B as the features)
    # convolved with g^T [Ho, Wo, B, O] as an HWIO kernel, giving dw as [I, KH, KW, O].
    terms.append(jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dw.transpose(2, 0, 1, 3), strides, pads,
        dimension_numbers=("CHWN", "IHWO", "HWNC")).transpose(2, 0, 1, 3))
  return y, _sum_of_terms(terms, y)


_conv_loop_safe.defjvp(_conv_loop_safe_jvp, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for nn.Conv (NHWC x HWIO 2-D convolutions, no dilation, no
  groups) with the loop-safe reverse pass described above. Same values as the lax op."""
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


# ---- dense layers: a weight gradient without a fused transpose -----------------------------
# The weight gradient of y = x W is dW = x^T g (g = dL/dy). XLA:CPU lays that dot out with g
# transposed and fuses the transpose into g's producer (a GroupNorm backward, the split of an
# up-path skip concatenation), which then writes its output in transposed order: one
# [16384, 64] gradient of configs/bench32.py took 21 ms instead of about 1. An optimisation
# barrier on the tangent, whose transpose is a barrier on g before both products, keeps the
# producer in its own layout (bench32's U-Net gradient 5-7% faster, the same values).
def _dense_plain(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_jvp
def _dense_dot(x, w):
  return _dense_plain(x, w)


def _dense_dot_jvp(primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = _dense_plain(x, w)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_dense_plain(dx, w))
  if not isinstance(dw, SymbolicZero):
    terms.append(_dense_plain(x, dw))
  return y, jax.lax.optimization_barrier(_sum_of_terms(terms, y))


_dense_dot.defjvp(_dense_dot_jvp, symbolic_zeros=True)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense ([..., K] x [K, O], no batch dimensions) with the weight
  gradient described above. Same values as the lax op."""
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
