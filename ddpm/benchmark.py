"""`launch.py --mode=benchmark`: compile times, train-step and sampler speed, memory and MFU.

`run_benchmark(config, workdir)` builds exactly what training builds (`experiment.setup`,
`train.make_train_step`, `sampling.make_sampler_from_config`), feeds the train step one fixed
synthetic batch (no dataset is read), and measures
  * compile_train_s / compile_sample_s: tracing + lowering + XLA compilation of the train step
    and of the whole reverse loop (one lax.scan, compiled once);
  * train_step_s: median wall time of one optimizer step after warm-up, every dispatch waited
    for with block_until_ready (a dispatch runs training.steps_per_dispatch steps);
  * train_flops_per_step: FLOPs of one step from XLA's cost analysis of the compiled program
    (all devices; XLA counts a convolution's multiply-adds with the zero padding left out, and
    elementwise work too), and train_model_flops_per_step: the convolution and matmul FLOPs
    alone, counted from the step's jaxpr as PyTorch's FlopCounterMode counts them (2 per
    multiply-add over the whole window, padding included);
  * mfu: train_flops_per_step / train_step_s / peak FLOP/s of all devices. The peak comes from
    `PEAK_FLOPS` (vendor numbers, dense, per JAX device) for GPUs and TPUs, and on CPU from a
    jitted square matmul in the compute dtype timed here (`measure_cpu_peak_flops`);
  * sample_step_s: one reverse step (one model evaluation) at the training batch size, from a
    timed run of benchmark.sample_steps steps of the configured sampler (0: the full sampler);
  * peak_host_mem_mb (resource.getrusage) and device_peak_mem_mb (device.memory_stats(); null
    where the backend has none, e.g. CPU).
Everything goes to stdout as a table and to workdir/benchmark.json.
"""
import contextlib
import functools
import math
import os
import platform
import resource
import statistics
import time
from typing import Any, Dict, Optional

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm import config_validation
from ddpm import distributed
from ddpm import experiment
from ddpm import sampling
from ddpm import train
from ddpm import workdir as workdir_lib

TFLOPS = 1e12

# Peak dense FLOP/s per chip from the vendors' data sheets (no structured sparsity), and how
# many JAX devices one chip shows up as. Keys are matched, in this order, as lower-case
# substrings of `device.device_kind`.
#   NVIDIA A100 Tensor Core GPU data sheet: FP32 19.5, TF32 156, BF16 312 TFLOPS (SXM and PCIe).
#   NVIDIA H100 Tensor Core GPU data sheet: SXM FP32 67, TF32 989 / 2, BF16 1979 / 2; PCIe FP32
#     51, TF32 756 / 2, BF16 1513 / 2 TFLOPS (the sheet's tensor-core numbers are "with
#     sparsity", twice the dense rate).
#   NVIDIA V100 data sheet: SXM2 FP32 15.7, PCIe FP32 14 TFLOPS (its tensor cores do FP16, not
#     BF16: no bf16 entry).
#   Google Cloud TPU documentation (cloud.google.com/tpu/docs/v3, v4, v5e, v5p): peak bf16 per
#     chip v3 123 (2 TensorCores = 2 JAX devices), v4 275 (megacore: 1 device), v5e 197,
#     v5p 459 TFLOPS. float32 matmuls run on the same MXUs (in several bf16 passes), so the bf16
#     peak is the TPU's peak for both compute dtypes.
PEAK_FLOPS = (
    ("h100 pcie", dict(float32=51 * TFLOPS, tensorfloat32=378 * TFLOPS,
                       bfloat16=756.5 * TFLOPS), 1),
    ("h100", dict(float32=67 * TFLOPS, tensorfloat32=494.5 * TFLOPS,
                  bfloat16=989.5 * TFLOPS), 1),
    ("a100", dict(float32=19.5 * TFLOPS, tensorfloat32=156 * TFLOPS,
                  bfloat16=312 * TFLOPS), 1),
    ("v100-pcie", dict(float32=14 * TFLOPS), 1),
    ("v100", dict(float32=15.7 * TFLOPS), 1),
    ("tpu v5 lite", dict(bfloat16=197 * TFLOPS, float32=197 * TFLOPS), 1),
    ("tpu v5e", dict(bfloat16=197 * TFLOPS, float32=197 * TFLOPS), 1),
    ("tpu v5", dict(bfloat16=459 * TFLOPS, float32=459 * TFLOPS), 1),  # v5p: "TPU v5" / "v5p"
    ("tpu v4", dict(bfloat16=275 * TFLOPS, float32=275 * TFLOPS), 1),
    ("tpu v3", dict(bfloat16=123 * TFLOPS, float32=123 * TFLOPS), 2),
)

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------------------------
def table_peak_flops(device_kind: str, compute_dtype: str) -> Optional[float]:
  """Vendor peak FLOP/s of ONE JAX device of `device_kind` for `compute_dtype`, or None.

  float32 on A100/H100 counts at the TF32 rate unless jax_default_matmul_precision asks for
  full float32 ('highest' / 'float32'): XLA's default precision uses TF32 tensor cores there.
  """
  kind = device_kind.lower()
  for key, peaks, devices_per_chip in PEAK_FLOPS:
    if key in kind:
      name = compute_dtype
      if name == "float32" and "tensorfloat32" in peaks and (
          jax.config.jax_default_matmul_precision not in ("highest", "float32")):
        name = "tensorfloat32"
      peak = peaks.get(name)
      return None if peak is None else peak / devices_per_chip
  return None


def measure_cpu_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5,
                           device=None) -> float:
  """Best FLOP/s of a jitted [n, n] x [n, n] matmul in `dtype` on `device` (2 n^3 FLOPs).

  XLA:CPU runs one matmul on all the host's cores, so this is the host's attainable peak.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  if n < 1 or repeats < 1:
    raise ValueError(f"n and repeats must be >= 1, got n={n}, repeats={repeats}")
  device = jax.devices("cpu")[0] if device is None else device
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
          for _ in range(2))
  # float32 accumulation, as the model's matmuls do: XLA:CPU's bfloat16 kernels (YNNPACK) ran a
  # bfloat16-output matmul at about half their float32-accumulating speed.
  matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  matmul = matmul.lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops(config, compute_dtype: str):
  """(peak FLOP/s of all devices, where the number comes from)."""
  override = config.benchmark.peak_flops
  n_dev = jax.device_count()
  if override > 0:
    return override * n_dev, "config.benchmark.peak_flops"
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    # Simulated CPU devices share the host's cores: the host peak is the peak of them all.
    per_host = measure_cpu_peak_flops(compute_dtype, n=config.benchmark.cpu_matmul_size)
    return per_host * jax.process_count(), (
        f"measured: {compute_dtype} {config.benchmark.cpu_matmul_size}^2 matmul on the host")
  per_device = table_peak_flops(device.device_kind, compute_dtype)
  if per_device is None:
    return None, f"unknown: no peak for {device.device_kind!r} (set config.benchmark.peak_flops)"
  return per_device * n_dev, f"vendor peak of {device.device_kind} ({compute_dtype})"


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------
def _while_cost_counts_trip_count() -> bool:
  """Whether XLA's cost analysis multiplies a loop body by its trip count (it did not in
  jax 0.10: the body counts once). Checked on a 4-step scan of a small matmul."""
  a = jnp.ones((64, 64), jnp.float32)
  one = _cost_flops(jax.jit(jnp.matmul).lower(a, a).compile())
  scanned = jax.jit(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=4)[0])
  four = _cost_flops(scanned.lower(a).compile())
  return four > 2 * one


def _cost_flops(compiled) -> float:
  """'flops' of `compiled.cost_analysis()` (a dict, or a list of per-module dicts)."""
  analysis = compiled.cost_analysis()
  if analysis is None:
    raise RuntimeError("XLA's cost analysis is unavailable on this backend")
  if isinstance(analysis, dict):
    analysis = [analysis]
  return float(sum(a.get("flops", 0.0) for a in analysis))


def _platform_branch(branches, platforms):
  """The branch of a `lax.platform_dependent` cond that runs on this backend."""
  platform = jax.local_devices()[0].platform
  names = {platform, "cuda", "rocm"} if platform == "gpu" else {platform}
  default = None
  for branch, names_of_branch in zip(branches, platforms):
    if names_of_branch is None:
      default = branch
    elif names & set(names_of_branch):
      return branch
  if default is None:
    raise ValueError(f"no branch of a platform_dependent cond for platform {platform!r}")
  return default


def model_flops(jaxpr) -> float:
  """FLOPs of the convolutions and matmuls of a (Closed)Jaxpr: 2 per multiply-add.

  Recurses into sub-jaxprs: scan bodies count `length` times, the body of a shard_map counts
  once per device of its manual mesh axes, a cond counts its costliest branch (a
  `lax.platform_dependent` one the branch of this backend) and a while loop its body once (its
  trip count is unknown).
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
      window = math.prod(rhs.shape[d] for d in spec[2:])
      # A transposed convolution (lhs_dilation d) multiplies all but 1 / prod(d) of its window
      # by the zeros the dilation inserts: those are not work (PyTorch counts it so too).
      zeros = math.prod(params["lhs_dilation"] or (1,))
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * rhs.shape[spec[1]] * window / zeros
    elif name == "dot_general":
      (contract, _), _ = params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[d] for d in contract)
    elif name == "cond":
      branches = params["branches"]
      platforms = params.get("branches_platforms")
      if platforms:  # lax.platform_dependent: only this platform's branch runs
        branches = [_platform_branch(branches, platforms)]
      total += max(model_flops(b) for b in branches)
    elif name == "while":
      total += model_flops(params["body_jaxpr"]) + model_flops(params["cond_jaxpr"])
    elif name == "scan":
      total += params["length"] * model_flops(params["jaxpr"])
    elif name in ("custom_vjp_call", "custom_jvp_call"):
      total += model_flops(params["call_jaxpr"])
    else:
      inner = sum(model_flops(v) for v in params.values()
                  if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)))
      if name == "shard_map":
        mesh = params["mesh"]
        axes = params.get("manual_axes", mesh.axis_names)
        inner *= math.prod(mesh.shape[a] for a in axes)
      total += inner
  return total


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def host_cpu() -> str:
  """The host's CPU model ('model name' of /proc/cpuinfo on Linux) and the cores this process may
  use: CPU results depend on both (e.g. AMX or not), so benchmark.json records them."""
  name = platform.processor() or platform.machine() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name}, {distributed.host_cores()} cores"


def peak_host_mem_mb() -> float:
  """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB, macOS in B)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (2 ** 20 if platform.system() == "Darwin" else 2 ** 10)


def device_peak_mem_mb() -> Optional[float]:
  """Largest peak_bytes_in_use over the local devices in MiB, None where unsupported (CPU)."""
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 2 ** 20 if peaks else None


@contextlib.contextmanager
def _compile_timer():
  """Sums JAX's tracing, lowering and XLA compilation durations inside the block."""
  total = [0.0]

  def listener(event, duration, **_):
    if event in _COMPILE_EVENTS:
      total[0] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield total
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _global_array(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def synthetic_batch(config, mesh) -> Dict[str, jax.Array]:
  """One train batch, dict(image [k, B, H, W, C] uniform in [-1, 1], label [k, B] int32),
  sharded like the input pipeline's: NamedSharding(mesh, P(None, 'data'))."""
  k, B = config.training.steps_per_dispatch, config.training.batch_size
  size, channels = config.data.image_size, config.data.channels
  local_b = B // jax.process_count()
  rng = np.random.default_rng(config.seed + jax.process_index())
  image = rng.uniform(-1.0, 1.0, (k, local_b, size, size, channels)).astype(np.float32)
  label = rng.integers(0, max(config.data.num_classes, 1), (k, local_b)).astype(np.int32)
  sharding = NamedSharding(mesh, P(None, "data"))
  return dict(image=_global_array(image, sharding, (k, B, size, size, channels)),
              label=_global_array(label, sharding, (k, B)))


def _check_settings(b):
  for key in ("warmup_steps", "train_steps", "sample_steps", "sample_repeats",
              "cpu_matmul_size"):
    minimum = 0 if key in ("warmup_steps", "sample_steps") else 1
    if b[key] < minimum:
      raise ValueError(f"config.benchmark.{key} must be >= {minimum}, got {b[key]}")
  if b.peak_flops < 0:
    raise ValueError(f"config.benchmark.peak_flops must be >= 0, got {b.peak_flops}")


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def benchmark_train(config, mesh, model, diffusion, sampler, init_fn) -> Dict[str, Any]:
  """Compiles and times the train step on a synthetic batch; returns (results, final state)."""
  b, k = config.benchmark, config.training.steps_per_dispatch
  # Timings do not depend on the parameter values; the non-partitionable threefry compiles
  # the initialiser's random draws ~3x faster on CPU (18 s -> 6 s for configs/tiny.py).
  with jax.threefry_partitionable(False):
    state = init_fn(experiment.initial_rng(config))
  batch = synthetic_batch(config, mesh)
  train_step = train.make_train_step(config, model, diffusion, sampler, mesh)

  start = time.perf_counter()
  traced = train_step.trace(state, batch)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - start

  # Cost analysis is of the per-device program; a scan body counts once (see
  # _while_cost_counts_trip_count), i.e. one optimizer step out of the k of a dispatch.
  xla_flops = _cost_flops(compiled) * jax.device_count()
  per_step_xla = xla_flops / k if (k > 1 and _while_cost_counts_trip_count()) else xla_flops
  per_step_model = model_flops(traced.jaxpr) / k

  for _ in range(b.warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics) if b.warmup_steps else state)
  times = []
  for _ in range(b.train_steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / k)
  loss = float(np.asarray(jax.device_get(metrics["loss"])).reshape(-1)[-1])
  if not math.isfinite(loss):
    raise FloatingPointError(f"the benchmark's train step gave a non-finite loss {loss}")
  step_s = statistics.median(times)
  results = dict(
      compile_train_s=compile_s,
      train_step_s=step_s,
      train_step_s_all=times,
      train_images_per_s=config.training.batch_size / step_s,
      train_flops_per_step=per_step_xla,
      train_model_flops_per_step=per_step_model,
      train_flops_per_s=per_step_xla / step_s,
      train_model_flops_per_s=per_step_model / step_s,
      train_loss=loss,
  )
  return results, state


def benchmark_sampler(config, diffusion, model, mesh, params) -> Dict[str, Any]:
  """Compiles and times the configured sampler at the training batch size."""
  b = config.benchmark
  full_steps = config.sampling.num_steps or config.diffusion.num_timesteps
  timed = config.copy_and_resolve_references()
  if 0 < b.sample_steps < full_steps:
    timed.sampling.num_steps = b.sample_steps
  batch = config.training.batch_size
  apply_fn = sampling.apply_fn_from_model(model)
  run = sampling.make_sampler_from_config(timed, diffusion, apply_fn, mesh=mesh,
                                          batch_size=batch)
  full_nfe = sampling.num_function_evals(config.sampling.method, full_steps)
  y = None
  if config.data.num_classes > 0:
    labels = np.arange(batch // jax.process_count()) % config.data.num_classes
    y = labels.astype(np.int32)
    if jax.process_count() > 1:
      y = _global_array(y, NamedSharding(mesh, P("data")), (batch,))
  key = jax.random.key(config.seed)

  with _compile_timer() as compile_s:
    start = time.perf_counter()
    jax.block_until_ready(run(params, key, y=y))
    first_s = time.perf_counter() - start
  times = []
  for i in range(b.sample_repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(run(params, jax.random.fold_in(key, i + 1), y=y))
    times.append(time.perf_counter() - start)
  x0 = np.asarray(jax.device_get(out[0] if isinstance(out, tuple) else out)) if (
      jax.process_count() == 1) else None
  if x0 is not None and not np.all(np.isfinite(x0)):
    raise FloatingPointError("the benchmark's sampler produced non-finite samples")
  run_s = statistics.median(times)
  step_s = run_s / run.num_function_evals
  return dict(
      compile_sample_s=compile_s[0],
      sample_first_call_s=first_s,
      sample_method=config.sampling.method,
      sample_batch=batch,
      sample_nfe_timed=run.num_function_evals,
      sample_run_s=run_s,
      sample_step_s=step_s,
      sample_full_nfe=full_nfe,
      sample_full_s=step_s * full_nfe,
      sample_s_per_image=step_s * full_nfe / batch,
  )


def run_benchmark(config, workdir: str) -> Dict[str, Any]:
  """Runs the benchmark of `config` and writes workdir/benchmark.json (process 0).

  Returns the dict written (see the module docstring for the keys).
  """
  config_validation.validate_config(config, num_devices=jax.device_count())
  _check_settings(config.benchmark)
  workdir_lib.makedirs(workdir)
  mesh, model, diffusion, sampler, init_fn = experiment.setup(config)
  n_params = sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(init_fn, experiment.initial_rng(config)).params))
  device = jax.local_devices()[0]
  results: Dict[str, Any] = dict(
      jax_version=jax.__version__,
      platform=device.platform,
      device_kind=device.device_kind,
      num_devices=jax.device_count(),
      num_processes=jax.process_count(),
      host_cpu=host_cpu(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      params=int(n_params),
      image_size=config.data.image_size,
      channels=config.data.channels,
      batch_size=config.training.batch_size,
      steps_per_dispatch=config.training.steps_per_dispatch,
      compute_dtype=config.training.compute_dtype,
  )
  logging.info("Benchmark: %s parameters, batch %d, %d x %s device(s).", f"{n_params:,}",
               config.training.batch_size, jax.device_count(), device.device_kind)

  train_results, state = benchmark_train(config, mesh, model, diffusion, sampler, init_fn)
  results.update(train_results)
  results.update(benchmark_sampler(config, diffusion, model, mesh, state.ema_params))

  peak, source = peak_flops(config, config.training.compute_dtype)
  results["peak_flops_per_s"] = peak
  results["peak_flops_source"] = source
  results["mfu"] = results["train_flops_per_s"] / peak if peak else None
  results["model_mfu"] = results["train_model_flops_per_s"] / peak if peak else None
  results["peak_host_mem_mb"] = peak_host_mem_mb()
  results["device_peak_mem_mb"] = device_peak_mem_mb()

  if jax.process_index() == 0:
    print(format_table(results), flush=True)
    path = workdir_lib.write_json(workdir_lib.path(workdir, "benchmark.json"), results)
    logging.info("Wrote %s", path)
  return results


def _si(value: Optional[float], unit: str) -> str:
  """1.23e11, 'FLOP' -> '123.0 GFLOP'; None -> 'n/a'."""
  if value is None:
    return "n/a"
  for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= factor:
      return f"{value / factor:.1f} {prefix}{unit}"
  return f"{value:.1f} {unit}"


def format_table(r: Dict[str, Any]) -> str:
  """A readable summary of `run_benchmark`'s results."""
  rows = [
      ("model", f"{r['params']:,} parameters, {r['image_size']}x{r['image_size']}x"
                f"{r['channels']}, batch {r['batch_size']}, {r['compute_dtype']}"),
      ("devices", f"{r['num_devices']} x {r['device_kind']} ({r['platform']}), "
                  f"{r['num_processes']} process(es)"),
      ("host", r["host_cpu"]),
      ("compile: train step", f"{r['compile_train_s']:.1f} s"),
      ("compile: sampler", f"{r['compile_sample_s']:.1f} s"),
      ("train step", f"{r['train_step_s'] * 1e3:.1f} ms (median of {len(r['train_step_s_all'])})"),
      ("train images/s", f"{r['train_images_per_s']:.1f}"),
      ("train FLOPs/step (XLA)", _si(r["train_flops_per_step"], "FLOP")),
      ("train FLOPs/step (conv+matmul)", _si(r["train_model_flops_per_step"], "FLOP")),
      ("train FLOP/s (XLA)", _si(r["train_flops_per_s"], "FLOP/s")),
      ("train FLOP/s (conv+matmul)", _si(r["train_model_flops_per_s"], "FLOP/s")),
      ("peak FLOP/s", f"{_si(r['peak_flops_per_s'], 'FLOP/s')} ({r['peak_flops_source']})"),
      ("MFU", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"),
      ("sampler step", f"{r['sample_step_s'] * 1e3:.1f} ms ({r['sample_method']}, batch "
                       f"{r['sample_batch']}, {r['sample_nfe_timed']} steps timed)"),
      ("full sampling", f"{r['sample_full_s']:.1f} s for {r['sample_batch']} images "
                        f"({r['sample_full_nfe']} steps), {r['sample_s_per_image']:.2f} s/image"),
      ("peak host memory", f"{r['peak_host_mem_mb']:.0f} MiB"),
      ("peak device memory", "n/a" if r["device_peak_mem_mb"] is None else
       f"{r['device_peak_mem_mb']:.0f} MiB"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = ["Benchmark", "-" * (width + 40)]
  lines += [f"{k:<{width}}  {v}" for k, v in rows]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Comparison with the PyTorch reference (scripts/bench_peer.py, scripts/compare_peer.sh)
# ---------------------------------------------------------------------------------------------
def peer_ratios(ours: Dict[str, Any], peer: Dict[str, Any]) -> Dict[str, float]:
  """Ratios of our benchmark.json (`run_benchmark`) to the peer's JSON (scripts/bench_peer.py).

  Both count model FLOPs alike (convolutions and matmuls, 2 per multiply-add, a train step
  3 x the forward), so `train_model_flops_per_s` is the architecture-neutral training speed;
  `sample_speedup` compares the wall time of the full reverse process at the same batch and
  number of steps (> 1: ours is faster). Raises ValueError when the two runs are not
  comparable (other batch size, image size or number of sampling steps).
  """
  for ours_key, peer_key in (("batch_size", "batch"), ("image_size", "image_size"),
                             ("sample_full_nfe", "timesteps")):
    if ours[ours_key] != peer[peer_key]:
      raise ValueError(f"not comparable: our {ours_key}={ours[ours_key]} but the peer's "
                       f"{peer_key}={peer[peer_key]}")
  return dict(
      train_model_flops_per_s_ratio=ours["train_model_flops_per_s"] / peer["train_model_flops_per_s"],
      train_images_per_s_ratio=ours["train_images_per_s"] / peer["train_images_per_s"],
      sample_speedup=peer["sample_full_s"] / ours["sample_full_s"],
      sample_step_speedup=peer["sample_step_s"] / ours["sample_step_s"],
      model_flops_per_image_ratio=(ours["train_model_flops_per_step"] / ours["batch_size"]) / (
          peer["train_model_flops_per_step"] / peer["batch"]),
  )


def format_peer_comparison(ours: Dict[str, Any], peer: Dict[str, Any]) -> str:
  """A Markdown table of `peer_ratios` with the raw numbers of both runs."""
  r = peer_ratios(ours, peer)
  rows = [
      ("parameters", f"{ours['params']:,}", f"{peer['params']:,}", ""),
      ("model FLOPs per image (forward)", _si(ours["train_model_flops_per_step"] / 3 /
                                             ours["batch_size"], "FLOP"),
       _si(peer["fwd_flops_per_image"], "FLOP"), f"{r['model_flops_per_image_ratio']:.2f}x"),
      ("train step", f"{ours['train_step_s']:.3f} s", f"{peer['train_step_s']:.3f} s", ""),
      ("train images/s", f"{ours['train_images_per_s']:.1f}", f"{peer['train_images_per_s']:.1f}",
       f"{r['train_images_per_s_ratio']:.2f}x"),
      ("train model FLOP/s", _si(ours["train_model_flops_per_s"], "FLOP/s"),
       _si(peer["train_model_flops_per_s"], "FLOP/s"), f"{r['train_model_flops_per_s_ratio']:.2f}x"),
      ("reverse step", f"{ours['sample_step_s'] * 1e3:.0f} ms", f"{peer['sample_step_s'] * 1e3:.0f} ms",
       f"{r['sample_step_speedup']:.2f}x speed-up"),
      (f"full sampling, {ours['sample_full_nfe']} steps", f"{ours['sample_full_s']:.0f} s",
       f"{peer['sample_full_s']:.0f} s", f"{r['sample_speedup']:.2f}x speed-up"),
  ]
  devices = f"{ours['num_devices']} {ours['platform']} device" + (
      "s" if ours["num_devices"] > 1 else "")
  lines = [f"| batch {ours['batch_size']}, {ours['image_size']}x{ours['image_size']} | ddpm-jax "
           f"({ours['compute_dtype']}, {devices}) | denoising-diffusion-pytorch | ours / peer |",
           "|---|---|---|---|"]
  lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
  return "\n".join(lines)
