"""Tests of ddpm/models/cpu_ops.py: the XLA:CPU kernels of the U-Net's layers compute the values
and gradients of the stock ones."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ddpm import distributed
from ddpm import models
from ddpm.models import cpu_ops
from ddpm.models import unet

DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DIMS)


# ---- the U-Net's loop-safe convolution gradient -------------------------------------------------

@pytest.mark.parametrize("shape,kernel,stride", [
    ((2, 8, 8, 3), 3, 1), ((2, 8, 8, 4), 3, 2), ((1, 7, 9, 2), 3, 2), ((2, 6, 6, 3), 1, 1),
    ((1, 5, 5, 2), 3, 1)])
def test_conv_gradient_equals_lax_gradient_also_inside_scan(shape, kernel, stride):
  """Values and both gradients equal those of lax.conv_general_dilated (JAX's own transpose
  rules as the reference), computed inside lax.scan, where the CPU-specific path matters."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 5)), jnp.float32)
  ours = lambda x, w: cpu_ops.conv_general_dilated(x, w, (stride, stride), "SAME",
                                                dimension_numbers=DIMS)
  ref = lambda x, w: _conv(x, w, stride)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)

  @jax.jit
  def in_scan(x, w, g):
    def body(carry, _):
      y, vjp = jax.vjp(ours, x, w)
      return carry, (y,) + vjp(g)
    return jax.lax.scan(body, 0, None, length=1)[1]

  outs = [a[0] for a in in_scan(x, w, g)]
  for got, want in zip(outs, (y_ref,) + vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_rejects_unsupported_arguments():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match="rhs_dilation"):
    cpu_ops.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMS)
  with pytest.raises(ValueError, match="NHWC"):
    cpu_ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


@pytest.mark.parametrize("shape,dtype", [((5, 6), jnp.float32), ((2, 3, 4, 6), jnp.float32),
                                         ((2, 3, 4, 6), jnp.bfloat16)])
def test_dense_gradient_equals_lax_gradient_also_inside_scan(shape, dtype):
  """cpu_ops.dense_dot_general (nn.Dense's product with the CPU weight-gradient barrier): value and
  both gradients equal those of lax.dot_general, also inside lax.scan and in bfloat16."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  w = jnp.asarray(rng.standard_normal((shape[-1], 7)), dtype)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  y_ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.dot_general(x, w, dims), x, w)
  g = jnp.asarray(rng.standard_normal(y_ref.shape), dtype)

  @jax.jit
  def in_scan(x, w, g):
    def body(carry, _):
      y, vjp = jax.vjp(lambda x, w: cpu_ops.dense_dot_general(x, w, dims), x, w)
      return carry, (y,) + vjp(g)
    return jax.lax.scan(body, 0, None, length=1)[1]

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for got, want in zip([a[0] for a in in_scan(x, w, g)], (y_ref,) + vjp_ref(g)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_dense_rejects_unsupported_arguments():
  x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
  with pytest.raises(ValueError, match="precision"):
    cpu_ops.dense_dot_general(x, w, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  with pytest.raises(ValueError, match=r"\(3, 2\)"):
    cpu_ops.dense_dot_general(jnp.ones((3, 2)), w, (((0,), (0,)), ((), ())))


def test_compiler_options_compile_and_keep_values():
  """ddpm.models.compiler_options: the XLA:CPU options on CPU with the kernels on, none with them
  off or on another platform; this jaxlib accepts them, they keep convolutions off YNNPACK
  (Eigen runs them on all cores) and change no values."""
  config = default.get_config()
  mesh = distributed.make_data_mesh()
  assert models.compiler_options(mesh, config) == cpu_ops.COMPILER_OPTIONS
  assert models.compiler_options() == cpu_ops.COMPILER_OPTIONS  # default backend, defaults
  config.model.cpu_kernels = False
  assert models.compiler_options(mesh, config) == {}
  gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
  assert models.compiler_options(gpu_mesh, default.get_config()) == {}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
  plain = jax.jit(_conv).lower(x, w).compile()
  tuned = jax.jit(_conv, compiler_options=models.compiler_options()).lower(x, w).compile()
  assert "ynn_fusion" not in tuned.as_text()
  np.testing.assert_allclose(tuned(x, w), plain(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 16), 8), ((1, 3, 5, 6), 3), ((2, 2, 2, 4), 1)])
def test_group_norm_matches_float64_numpy_and_flax_params(shape, groups):
  """cpu_ops.GroupNorm (the fast formulation) against the definition in float64 numpy, with
  flax.linen.GroupNorm's parameter tree."""
  rng = np.random.default_rng(0)
  x = (3.0 * rng.standard_normal(shape) + 1.5).astype(np.float32)
  norm = cpu_ops.GroupNorm(num_groups=groups, epsilon=1e-6)
  params = norm.init(jax.random.key(0), jnp.asarray(x))["params"]
  reference_shapes = jax.eval_shape(nn.GroupNorm(num_groups=groups).init, jax.random.key(0),
                                    jnp.asarray(x))["params"]
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), reference_shapes)
  params = {"scale": jnp.asarray(1 + 0.2 * rng.standard_normal(shape[-1]), jnp.float32),
            "bias": jnp.asarray(0.2 * rng.standard_normal(shape[-1]), jnp.float32)}
  got = norm.apply({"params": params}, jnp.asarray(x))
  b, h, w, c = shape
  g = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
  mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(shape)
  want = want * np.asarray(params["scale"], np.float64) + np.asarray(params["bias"], np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  half = cpu_ops.GroupNorm(num_groups=groups, dtype=jnp.bfloat16).apply(
      {"params": params}, jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), want, rtol=0.05, atol=0.05)


def test_group_norm_gradient_equals_autodiff_of_flax_group_norm():
  """The hand-written GroupNorm backward pass against JAX's autodiff of flax.linen.GroupNorm."""
  rng = np.random.default_rng(1)
  shape, groups = (2, 4, 6, 8), 4
  x = jnp.asarray(2.0 * rng.standard_normal(shape) + 0.7, jnp.float32)
  params = {"scale": jnp.asarray(1 + 0.3 * rng.standard_normal(8), jnp.float32),
            "bias": jnp.asarray(0.3 * rng.standard_normal(8), jnp.float32)}
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply({"params": p}, x) * dy)

  want = jax.grad(loss(nn.GroupNorm(num_groups=groups, epsilon=1e-6)), (0, 1))(params, x)
  got = jax.grad(loss(cpu_ops.GroupNorm(num_groups=groups)), (0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny_pair():
  """build_model of a tiny config with the CPU kernels on and off, and shared inputs."""
  on = default.get_config()
  on.model.ch, on.model.ch_mult, on.model.attn_resolutions = 16, (1, 2), (4,)
  off = on.copy_and_resolve_references()
  off.model.cpu_kernels = False
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([3, 700], jnp.int32)
  return models.build_model(on), models.build_model(off), x, t


def test_build_model_switch_picks_layers_with_identical_parameters(tiny_pair):
  """config.model.cpu_kernels picks the layers on CPU; both give the same parameter tree and
  initial values, so checkpoints move between settings."""
  model_on, model_off, x, t = tiny_pair
  assert model_on.layers is cpu_ops.LAYERS and model_off.layers == unet.Layers()
  p_on = jax.jit(model_on.init)(jax.random.key(0), x, t)["params"]
  p_off = jax.jit(model_off.init)(jax.random.key(0), x, t)["params"]
  assert jax.tree.structure(p_on) == jax.tree.structure(p_off)
  for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
