"""Tests of ddpm/benchmark.py (launch.py --mode=benchmark)."""
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
from ddpm.models import cpu_ops

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
  # Gradient of the U-Net's conv (the CPU kernel's form, ddpm/models/cpu_ops.py): forward +
  # input gradient + kernel gradient, 3 x the forward.
  loss = lambda x, w: jnp.sum(cpu_ops.conv_general_dilated(x, w, (1, 1), "SAME",
                                                            dimension_numbers=DIMS))
  assert benchmark.model_flops(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)) == 3 * conv
  # Stride 2: the input gradient is a transposed convolution; the multiplications by the zeros
  # its dilation inserts are not counted, so the gradient is again 3 x the forward.
  loss2 = lambda x, w: jnp.sum(cpu_ops.conv_general_dilated(x, w, (2, 2), "SAME",
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
