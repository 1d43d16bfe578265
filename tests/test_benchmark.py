"""Tests of ddpm/benchmark.py (launch.py --mode=benchmark) and of the U-Net's loop-safe conv
gradient (ddpm/models/unet.py), the CPU performance fix the benchmark found."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from ddpm import benchmark
from ddpm import distributed
from ddpm.models import unet

REQUIRED_KEYS = ("train_step_s", "train_images_per_s", "train_flops_per_step", "mfu",
                 "sample_step_s", "compile_train_s", "compile_sample_s", "peak_host_mem_mb")
POSITIVE_KEYS = REQUIRED_KEYS + (
    "train_model_flops_per_step", "train_flops_per_s", "peak_flops_per_s", "sample_full_s",
    "sample_s_per_image", "sample_run_s")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """run_benchmark on configs/tiny.py (8 simulated devices), few timed steps."""
  config = tiny.get_config()
  config.benchmark.warmup_steps = 1
  config.benchmark.train_steps = 2
  config.benchmark.sample_steps = 4
  config.benchmark.sample_repeats = 1
  config.benchmark.cpu_matmul_size = 1024
  workdir = str(tmp_path_factory.mktemp("bench"))
  results = benchmark.run_benchmark(config, workdir)
  return config, workdir, results


def test_writes_benchmark_json_with_finite_positive_numbers(tiny_run, capsys):
  config, workdir, results = tiny_run
  with open(os.path.join(workdir, "benchmark.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(results))
  for key in POSITIVE_KEYS:
    value = written[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
  assert 0 < written["mfu"] <= 1
  assert written["num_devices"] == jax.device_count() == 8
  assert written["device_peak_mem_mb"] is None  # CPU devices have no memory_stats()
  cores = len(os.sched_getaffinity(0))
  assert written["host_cpu"].endswith(f", {cores} cores") and len(written["host_cpu"]) > 9
  assert written["host_cpu"] in benchmark.format_table(written)  # the printed table names it
  assert len(written["train_step_s_all"]) == config.benchmark.train_steps


def test_derived_numbers_are_consistent(tiny_run):
  config, _, r = tiny_run
  assert r["train_images_per_s"] == pytest.approx(config.training.batch_size / r["train_step_s"])
  assert r["train_step_s"] == pytest.approx(float(np.median(r["train_step_s_all"])))
  assert r["mfu"] == pytest.approx(r["train_flops_per_step"] / r["train_step_s"]
                                   / r["peak_flops_per_s"])
  # 4 timed reverse steps of the T = 32 step DDPM sampler, per step and extrapolated to T.
  assert r["sample_nfe_timed"] == 4
  assert r["sample_full_nfe"] == config.diffusion.num_timesteps
  assert r["sample_step_s"] == pytest.approx(r["sample_run_s"] / 4)
  assert r["sample_s_per_image"] == pytest.approx(
      r["sample_step_s"] * config.diffusion.num_timesteps / config.training.batch_size)


def test_prints_a_table(tiny_run, tmp_path, capsys):
  text = benchmark.format_table(tiny_run[2])
  for label in ("train step", "MFU", "sampler step", "peak host memory"):
    assert label in text


def test_invalid_settings_name_the_key(tmp_path):
  config = tiny.get_config()
  config.benchmark.train_steps = 0
  with pytest.raises(ValueError, match="config.benchmark.train_steps"):
    benchmark.run_benchmark(config, str(tmp_path))


# ---- peak FLOP/s ------------------------------------------------------------------------------

def test_cpu_matmul_peak_is_physically_plausible():
  peak = benchmark.measure_cpu_peak_flops("float32", n=512, repeats=3)
  # Upper bound: every core at 5 GHz retiring two 16-lane fp32 FMAs (64 FLOPs) per cycle.
  bound = os.cpu_count() * 5e9 * 64
  assert 1e8 < peak < bound


def test_vendor_peak_table():
  tf = 1e12
  assert benchmark.table_peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312 * tf
  assert benchmark.table_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5 * tf
  assert benchmark.table_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756.5 * tf
  assert benchmark.table_peak_flops("Tesla V100-SXM2-16GB", "float32") == 15.7 * tf
  assert benchmark.table_peak_flops("Tesla V100-SXM2-16GB", "bfloat16") is None
  assert benchmark.table_peak_flops("TPU v3", "bfloat16") == 123 * tf / 2  # 2 cores per chip
  assert benchmark.table_peak_flops("TPU v4", "bfloat16") == 275 * tf
  assert benchmark.table_peak_flops("TPU v5 lite", "bfloat16") == 197 * tf
  assert benchmark.table_peak_flops("TPU v5p", "bfloat16") == 459 * tf
  assert benchmark.table_peak_flops("some new chip", "float32") is None


# ---- FLOP counting ------------------------------------------------------------------------------

def test_xla_cost_analysis_of_a_matmul_is_2mnk():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 48), jnp.float32)
  assert benchmark._cost_flops(jax.jit(jnp.matmul).lower(a, b).compile()) == 2 * 64 * 32 * 48


DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DIMS)


def test_model_flops_closed_forms():
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
  conv = 2 * 2 * 8 * 8 * 5 * 3 * 9
  assert benchmark.model_flops(jax.make_jaxpr(_conv)(x, w)) == conv
  # Gradient of the U-Net's conv: forward + input gradient + kernel gradient, 3 x the forward.
  loss = lambda x, w: jnp.sum(unet.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=DIMS))
  assert benchmark.model_flops(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)) == 3 * conv
  # Stride 2: the input gradient is a transposed convolution; the multiplications by the zeros
  # its dilation inserts are not counted, so the gradient is again 3 x the forward.
  loss2 = lambda x, w: jnp.sum(unet.conv_general_dilated(x, w, (2, 2), "SAME",
                                                          dimension_numbers=DIMS))
  conv2 = 2 * 2 * 4 * 4 * 5 * 3 * 9
  assert benchmark.model_flops(jax.make_jaxpr(lambda x, w: _conv(x, w, 2))(x, w)) == conv2
  assert benchmark.model_flops(jax.make_jaxpr(jax.grad(loss2, (0, 1)))(x, w)) == 3 * conv2
  a = jax.ShapeDtypeStruct((4, 6), jnp.float32)
  b = jax.ShapeDtypeStruct((6, 7), jnp.float32)
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=5)[1]
  assert benchmark.model_flops(jax.make_jaxpr(scanned)(a, b)) == 5 * 2 * 4 * 6 * 7
  # Under shard_map the per-device body counts once per device: the global count.
  mesh = distributed.make_data_mesh()
  sharded = jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
  a8 = jax.ShapeDtypeStruct((8 * 4, 6), jnp.float32)
  assert benchmark.model_flops(jax.make_jaxpr(sharded)(a8, b)) == 2 * 32 * 6 * 7


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
  ours = lambda x, w: unet.conv_general_dilated(x, w, (stride, stride), "SAME",
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
    unet.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DIMS)
  with pytest.raises(ValueError, match="NHWC"):
    unet.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


@pytest.mark.parametrize("shape,dtype", [((5, 6), jnp.float32), ((2, 3, 4, 6), jnp.float32),
                                         ((2, 3, 4, 6), jnp.bfloat16)])
def test_dense_gradient_equals_lax_gradient_also_inside_scan(shape, dtype):
  """unet.dense_dot_general (nn.Dense's product with the CPU weight-gradient barrier): value and
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
      y, vjp = jax.vjp(lambda x, w: unet.dense_dot_general(x, w, dims), x, w)
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
    unet.dense_dot_general(x, w, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  with pytest.raises(ValueError, match=r"\(3, 2\)"):
    unet.dense_dot_general(jnp.ones((3, 2)), w, (((0,), (0,)), ((), ())))


def test_xla_compiler_options_compile_and_keep_values():
  """The U-Net's XLA:CPU options are accepted by this jaxlib, keep convolutions off YNNPACK
  (Eigen runs them on all cores) and change no values."""
  assert unet.xla_compiler_options("gpu") == {} and unet.xla_compiler_options("tpu") == {}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
  plain = jax.jit(_conv).lower(x, w).compile()
  tuned = jax.jit(_conv, compiler_options=unet.xla_compiler_options("cpu")).lower(x, w).compile()
  assert "ynn_fusion" not in tuned.as_text()
  np.testing.assert_allclose(tuned(x, w), plain(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 16), 8), ((1, 3, 5, 6), 3), ((2, 2, 2, 4), 1)])
def test_group_norm_matches_float64_numpy_and_flax_params(shape, groups):
  """unet.GroupNorm (the fast formulation) against the definition in float64 numpy, with
  flax.linen.GroupNorm's parameter tree."""
  import flax.linen as nn
  rng = np.random.default_rng(0)
  x = (3.0 * rng.standard_normal(shape) + 1.5).astype(np.float32)
  norm = unet.GroupNorm(num_groups=groups, epsilon=1e-6)
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
  half = unet.GroupNorm(num_groups=groups, dtype=jnp.bfloat16).apply(
      {"params": params}, jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), want, rtol=0.05, atol=0.05)


def test_group_norm_gradient_equals_autodiff_of_flax_group_norm():
  """The hand-written GroupNorm backward pass against JAX's autodiff of flax.linen.GroupNorm."""
  import flax.linen as nn
  rng = np.random.default_rng(1)
  shape, groups = (2, 4, 6, 8), 4
  x = jnp.asarray(2.0 * rng.standard_normal(shape) + 0.7, jnp.float32)
  params = {"scale": jnp.asarray(1 + 0.3 * rng.standard_normal(8), jnp.float32),
            "bias": jnp.asarray(0.3 * rng.standard_normal(8), jnp.float32)}
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply({"params": p}, x) * dy)

  want = jax.grad(loss(nn.GroupNorm(num_groups=groups, epsilon=1e-6)), (0, 1))(params, x)
  got = jax.grad(loss(unet.GroupNorm(num_groups=groups)), (0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_peer_comparison_ratios_and_table(tiny_run):
  """The README's comparison: ratios of our run to a peer run, checked against hand-made
  numbers, and a clear error for runs that are not comparable."""
  config, _, ours = tiny_run
  fwd = ours["train_model_flops_per_step"] / 3 / ours["batch_size"]
  peer = dict(params=1000, batch=ours["batch_size"], image_size=ours["image_size"],
              timesteps=ours["sample_full_nfe"], fwd_flops_per_image=fwd / 2,
              train_step_s=ours["train_step_s"] / 4,
              train_model_flops_per_step=3 * fwd / 2 * ours["batch_size"],
              sample_step_s=3 * ours["sample_step_s"])
  peer["train_model_flops_per_s"] = peer["train_model_flops_per_step"] / peer["train_step_s"]
  peer["train_images_per_s"] = peer["batch"] / peer["train_step_s"]
  peer["sample_full_s"] = peer["sample_step_s"] * peer["timesteps"]
  r = benchmark.peer_ratios(ours, peer)
  # The peer does half the FLOPs per image in a quarter of the time: twice our FLOP/s.
  assert r["train_model_flops_per_s_ratio"] == pytest.approx(0.5)
  assert r["train_images_per_s_ratio"] == pytest.approx(0.25)
  assert r["model_flops_per_image_ratio"] == pytest.approx(2.0)
  assert r["sample_speedup"] == pytest.approx(3.0) and r["sample_step_speedup"] == pytest.approx(3.0)
  table = benchmark.format_peer_comparison(ours, peer)
  assert "3.00x speed-up" in table and "0.50x" in table
  assert f"({ours['compute_dtype']}, {ours['num_devices']} cpu devices)" in table
  with pytest.raises(ValueError, match="batch_size"):
    benchmark.peer_ratios(ours, dict(peer, batch=ours["batch_size"] + 1))
  with pytest.raises(ValueError, match="sample_full_nfe"):
    benchmark.peer_ratios(ours, dict(peer, timesteps=ours["sample_full_nfe"] + 1))


def test_bench_peer_refuses_more_reverse_steps_than_timesteps():
  """scripts/bench_peer.py checks its step counts before importing torch (absent here)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "scripts/bench_peer.py", "--sample-steps", "1000",
                        "--warmup", "1"], cwd=root, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2
  assert "--warmup + --sample-steps (1 + 1000)" in out.stderr and "Traceback" not in out.stderr
