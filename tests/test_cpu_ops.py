"""Tests of ddpm/models/cpu_ops.py: the XLA:CPU kernels of the U-Net's layers compute the values
and gradients of the stock ones."""
import functools
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


def _assert_same_derivatives(ours, ref, args, tol, seed=0):
  """ours(*args) against ref(*args): values, the vjp of a random cotangent and the jvp of random
  tangents, with `ours` run inside lax.scan and jax.checkpoint (the train step's setting: XLA:CPU
  compiles loop bodies differently) and the reference run plainly."""
  rng = np.random.default_rng(seed)
  randn = lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)
  y_ref, vjp_ref = jax.vjp(ref, *args)
  g = randn(y_ref)
  tangents = tuple(randn(a) for a in args)
  want = (y_ref,) + vjp_ref(g) + (jax.jvp(ref, args, tangents)[1],)

  @jax.jit
  def in_scan(args, g, tangents):
    def body(carry, _):
      f = jax.checkpoint(ours)
      y, vjp = jax.vjp(f, *args)
      return carry, (y,) + vjp(g) + (jax.jvp(f, args, tangents)[1],)
    return jax.lax.scan(body, 0, None, length=1)[1]

  got = [a[0] for a in in_scan(args, g, tangents)]
  for name, a, b in zip(["value"] + [f"vjp {i}" for i in range(len(args))] + ["jvp"], got, want):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                               atol=tol, err_msg=name)


# ---- the loop-safe convolution ------------------------------------------------------------------

SYMMETRIC = ((1, 1), (1, 1))  # improved-diffusion's downsampling padding


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 8, 8, 3), 3, 1, "SAME"), ((2, 8, 8, 4), 3, 2, "SAME"), ((1, 7, 9, 2), 3, 2, "SAME"),
    ((2, 6, 6, 3), 1, 1, "SAME"), ((1, 5, 5, 2), 3, 1, "SAME"), ((2, 8, 8, 3), 3, 2, SYMMETRIC)])
def test_conv_derivatives_equal_lax_also_inside_scan(shape, kernel, stride, padding):
  """Values, both gradients and the forward-mode tangent equal lax.conv_general_dilated's (JAX's
  own rules as the reference), inside lax.scan, where the CPU-specific form matters."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 5)), jnp.float32)
  ours = lambda x, w: cpu_ops.conv_general_dilated(x, w, (stride, stride), padding,
                                                   dimension_numbers=DIMS)
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                  dimension_numbers=DIMS)
  _assert_same_derivatives(ours, ref, (x, w), tol=1e-5)


def test_conv_reverse_pass_has_only_nhwc_hwio_convolutions():
  """What makes the gradient loop-safe on XLA:CPU: every convolution of the reverse pass (JAX's
  transposes of the custom tangent) is an NHWC x HWIO -> NHWC one; JAX's own are not."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
  canonical = jax.lax.conv_dimension_numbers(x.shape, w.shape, DIMS)

  def conv_dims(conv):
    loss = lambda x, w: jnp.sum(conv(x, w, (2, 2), "SAME", dimension_numbers=DIMS))
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)
    return [e.params["dimension_numbers"] for e in jaxpr.eqns
            if e.primitive.name == "conv_general_dilated"]

  ours = conv_dims(cpu_ops.conv_general_dilated)
  assert len(ours) == 3 and all(d == canonical for d in ours)
  assert any(d != canonical for d in conv_dims(jax.lax.conv_general_dilated))


def test_conv_rejects_unsupported_arguments():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match="rhs_dilation"):
    cpu_ops.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMS)
  with pytest.raises(ValueError, match="NHWC"):
    cpu_ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


@pytest.mark.parametrize("shape,dtype", [((5, 6), jnp.float32), ((2, 3, 4, 6), jnp.float32),
                                         ((2, 3, 4, 6), jnp.bfloat16)])
def test_dense_derivatives_equal_lax_also_inside_scan(shape, dtype):
  """cpu_ops.dense_dot_general (nn.Dense's product with the weight-gradient barrier): value,
  both gradients and the tangent equal lax.dot_general's, inside lax.scan, also in bfloat16."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  w = jnp.asarray(rng.standard_normal((shape[-1], 7)), dtype)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  _assert_same_derivatives(lambda x, w: cpu_ops.dense_dot_general(x, w, dims),
                           lambda x, w: jax.lax.dot_general(x, w, dims), (x, w),
                           tol=1e-5 if dtype == jnp.float32 else 5e-2)


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_derivatives_equal_flax_also_inside_scan_and_remat(dtype):
  """cpu_ops.GroupNorm (its custom JVP, transposed by JAX for the gradient) under nn.remat and
  inside lax.scan against JAX's autodiff of flax.linen.GroupNorm: value, the gradients of input,
  scale and bias, and the tangent; float32 and bfloat16 inputs."""
  rng = np.random.default_rng(1)
  shape, groups = (2, 4, 6, 8), 4
  x = jnp.asarray(2.0 * rng.standard_normal(shape) + 0.7, dtype)
  scale = jnp.asarray(1 + 0.3 * rng.standard_normal(8), jnp.float32)
  bias = jnp.asarray(0.3 * rng.standard_normal(8), jnp.float32)

  def apply(module):
    return lambda x, scale, bias: module.apply({"params": {"scale": scale, "bias": bias}}, x)

  ours = apply(nn.remat(cpu_ops.GroupNorm)(num_groups=groups, dtype=dtype))
  ref = apply(nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype))
  _assert_same_derivatives(ours, ref, (x, scale, bias),
                           tol=2e-5 if dtype == jnp.float32 else 5e-2)


def test_hessian_vector_product_equals_stock():
  """Second order (forward over reverse, as in Hessian-vector products) through a conv, a
  GroupNorm and a dense layer: the kernels' rules differentiate like the stock ops."""
  rng = np.random.default_rng(2)
  randn = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  args = (randn(2, 6, 6, 3), randn(3, 3, 3, 8), 1 + 0.3 * randn(8), 0.3 * randn(8), randn(8, 5))
  tangents = tuple(randn(*a.shape) for a in args)
  dims = (((3,), (0,)), ((), ()))

  def loss(conv, norm, dot):
    def f(x, w, scale, bias, v):
      h = norm(num_groups=4).apply({"params": {"scale": scale, "bias": bias}},
                                   conv(x, w, (1, 1), "SAME", dimension_numbers=DIMS))
      return jnp.sum(jnp.tanh(dot(nn.swish(h), v, dims)) ** 2)
    grad = jax.grad(f, argnums=tuple(range(5)))
    return jax.jit(lambda: jax.jvp(grad, args, tangents)[1])()

  got = loss(cpu_ops.conv_general_dilated, cpu_ops.GroupNorm, cpu_ops.dense_dot_general)
  want = loss(jax.lax.conv_general_dilated, functools.partial(nn.GroupNorm, epsilon=1e-6),
              jax.lax.dot_general)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.abs(b).max()))


# ---- the U-Net built with and without the kernels ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair():
  """build_model of a tiny config with the CPU kernels on and off, inputs, the initial
  parameters and parameters perturbed away from them (the last layers start at ~0)."""
  on = default.get_config()
  on.model.ch, on.model.ch_mult, on.model.attn_resolutions = 8, (1, 2), (4,)
  off = on.copy_and_resolve_references()
  off.model.cpu_kernels = False
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([3, 700], jnp.int32)
  model_on, model_off = models.build_model(on), models.build_model(off)
  init = jax.jit(model_on.init)(jax.random.key(0), x, t)["params"]
  params = jax.tree.map(lambda a: a + 0.2 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                        init)
  return model_on, model_off, x, t, init, params


def test_build_model_switch_picks_layers_with_identical_parameters(tiny_pair):
  """config.model.cpu_kernels picks the layers on CPU; both give the same parameter tree and
  initial values, so checkpoints move between settings."""
  model_on, model_off, x, t, p_on, _ = tiny_pair
  assert model_on.layers is cpu_ops.LAYERS and model_off.layers == unet.Layers()
  p_off = jax.jit(model_off.init)(jax.random.key(0), x, t)["params"]
  assert jax.tree.structure(p_on) == jax.tree.structure(p_off)
  for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def model_derivatives(tiny_pair):
  """For each setting (on, off): the output, the gradient of <u, output> w.r.t. parameters and
  input, the jvp along a direction (dp, dx), jacfwd along (dp, 0) and (0, dx), and the central
  finite difference along (dp, dx)."""
  model_on, model_off, x, t, _, params = tiny_pair
  rng = np.random.default_rng(1)
  randn = lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)
  # Small directions: the model is steep, and the finite difference needs the quadratic term
  # well below float32 round-off.
  dp, dx = jax.tree.map(lambda a: 0.05 * randn(a), params), 0.05 * randn(x)
  u = randn(x)
  results = {}
  for name, model in (("on", model_on), ("off", model_off)):
    f = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x, t))
    along = lambda a, f=f: f(jax.tree.map(lambda p, d: p + a[0] * d, params, dp), x + a[1] * dx)
    eps = 1e-2
    results[name] = dict(
        y=f(params, x),
        grads=jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * u), (0, 1)))(params, x),
        jvp=jax.jit(lambda p, x: jax.jvp(f, (p, x), (dp, dx))[1])(params, x),
        jacfwd=jax.jit(jax.jacfwd(along))(jnp.zeros(2)),
        finite_difference=(along(jnp.full(2, eps)) - along(jnp.full(2, -eps))) / (2 * eps))
  return results, dp, dx, u


def test_outputs_and_gradients_equal_with_cpu_kernels_on_and_off(model_derivatives):
  results, _, _, _ = model_derivatives
  on, off = results["on"], results["off"]
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  for key in ("y", "grads", "jvp", "jacfwd"):
    # Relative to the largest entry: some gradients cancel to ~0 (round-off either way).
    a, b = flat(on[key]), flat(off[key])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=key)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_forward_mode_agrees_with_finite_differences_and_reverse_mode(model_derivatives,
                                                                        setting):
  """jax.jvp and jax.jacfwd through the U-Net (CPU kernels on and off): the tangent along
  (dp, dx) equals the central finite difference, jacfwd's two columns add up to it, and
  <u, J (dp, dx)> equals <J^T u, (dp, dx)> from jax.grad."""
  r = model_derivatives[0][setting]
  _, dp, dx, u = model_derivatives
  jvp = np.asarray(r["jvp"], np.float64)
  assert np.linalg.norm(jvp) > 1.0  # a real tangent, not ~0
  np.testing.assert_allclose(r["jacfwd"].sum(-1), jvp, rtol=1e-4, atol=1e-4 * np.abs(jvp).max())
  error = np.linalg.norm(np.asarray(r["finite_difference"], np.float64) - jvp)
  assert error < 1e-3 * np.linalg.norm(jvp), error / np.linalg.norm(jvp)
  grad_p, grad_x = r["grads"]
  vjp_side = sum(float(jnp.vdot(g, d))
                 for g, d in zip(jax.tree.leaves(grad_p), jax.tree.leaves(dp)))
  vjp_side += float(jnp.vdot(grad_x, dx))
  assert float(np.vdot(np.asarray(u, np.float64), jvp)) == pytest.approx(vjp_side, rel=1e-4)


def test_stock_model_has_no_custom_rules_or_calls(tiny_pair):
  """With the switch off (and on GPU / TPU) the model and its gradient are stock JAX: no custom
  JVP / VJP rules in the jaxpr and no custom calls or barriers in the lowered program."""
  model_on, model_off, x, t, _, params = tiny_pair

  def texts(model):
    f = lambda p, x: model.apply({"params": p}, x, t)
    value_and_grad = jax.value_and_grad(lambda p, x: jnp.sum(f(p, x) ** 2), (0, 1))
    return (str(jax.make_jaxpr(value_and_grad)(params, x)) + str(jax.make_jaxpr(f)(params, x)),
            jax.jit(value_and_grad).lower(params, x).as_text())

  jaxpr, lowered = texts(model_off)
  assert "custom_jvp" not in jaxpr and "custom_vjp" not in jaxpr
  assert "custom_call" not in lowered and "optimization_barrier" not in lowered
  jaxpr, lowered = texts(model_on)  # the test can tell: the kernels' rules and barriers show
  assert "custom_jvp" in jaxpr and "optimization_barrier" in lowered
