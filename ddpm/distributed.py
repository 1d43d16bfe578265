"""Process start-up: whether to call jax.distributed.initialize, and how many CPU devices."""
import os
from typing import Optional

import jax
from absl import logging


def maybe_initialize(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     auto: bool = False) -> bool:
  """Initialises jax.distributed when the run spans several processes.

  Explicit flags (coordinator, process count and id) win; `auto=True` lets JAX detect the cluster
  (TPU pod slices, SLURM, Open MPI). On CPU the cross-process collectives use gloo.
  Returns whether jax.distributed was initialised.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not (explicit or auto):
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError("multi-process runs need all of --coordinator_address, --num_processes "
                     f"and --process_id (got {coordinator_address!r}, {num_processes!r}, "
                     f"{process_id!r})")
  if _cpu_run():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)",
               coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


# ---------------------------------------------------------------------------------------------
# CPU hosts: how many JAX devices
# ---------------------------------------------------------------------------------------------
# XLA:CPU splits each op of a step over the host's cores, and the U-Net's many small ops
# (GroupNorm, swish, narrow or low-resolution convolutions, attention) leave cores idle between
# the big convolutions. With one JAX device per core, the batch is split across them by the same
# shard_map code that spans a pod and the devices' programs fill each other's gaps. Measured on 2
# cores (README, "Performance"): configs/bench32.py's reverse step 11-15% faster on an Intel Xeon
# (Sapphire Rapids), no faster on an AMD EPYC; the train step not reliably faster on either
# (between 6% slower and 7% faster across runs on the Xeon). Hence opt-in.
FORCE_FLAG = "--xla_force_host_platform_device_count"


def choose_cpu_devices(setting: str, batch_sizes, num_processes: int = 1,
                       cores: Optional[int] = None) -> int:
  """JAX devices per CPU process for `setting` ('auto' or a positive number).

  'auto' is the largest n <= cores (the CPUs this process may run on) such that every batch size
  divides into n * num_processes shards; a number is taken as it is (the config validation then
  names any batch size it does not divide).
  """
  if setting != "auto":
    try:
      n = int(setting)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f"--cpu_devices must be 'auto' or a positive number, got {setting!r}")
    return n
  cores = host_cores() if cores is None else cores
  fits = [n for n in range(1, max(cores, 1) + 1)
          if all(b % (n * num_processes) == 0 for b in batch_sizes)]
  return max(fits) if fits else 1


def configure_cpu_devices(setting: Optional[str], batch_sizes,
                          num_processes: int = 1) -> Optional[int]:
  """Sets the number of CPU devices before JAX starts its backends (call it first).

  Does nothing, returning None, for setting None (JAX's default: one CPU device), when XLA_FLAGS
  already sets FORCE_FLAG (tests, explicit set-ups; a warning says the setting is ignored), or
  when the run has an accelerator (its devices do the work; JAX_PLATFORMS=cpu counts as a CPU
  run). Returns the count it set.
  """
  if setting is None:
    return None
  n = choose_cpu_devices(setting, batch_sizes, num_processes)  # checks the setting first
  if FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
    logging.warning("--cpu_devices=%s ignored: XLA_FLAGS sets %s.", setting, FORCE_FLAG)
    return None
  if not _cpu_run():
    return None
  jax.config.update("jax_num_cpu_devices", n)
  return n


def host_cores() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one, e.g. Linux)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _cpu_run() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed."""
  return os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin()


def _has_accelerator_plugin() -> bool:
  """True if a GPU/TPU jax plugin is installed (checked without initialising backends)."""
  import importlib.util
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin"))


def make_data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: every device of every process).

  Auto axis types give the classic shard_map behaviour (jax.make_mesh defaults to Explicit).
  """
  import numpy as np
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
