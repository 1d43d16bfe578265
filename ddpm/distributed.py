"""Multi-process start-up: one place that decides whether to call jax.distributed.initialize."""
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
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)",
               coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


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


# ---------------------------------------------------------------------------------------------
# CPU hosts: how many JAX devices
# ---------------------------------------------------------------------------------------------
# XLA:CPU splits each op of a step over the host's cores; the U-Net's many small ops (GroupNorm,
# narrow or low-resolution convolutions) scale poorly that way. One JAX device per core, with the
# batch split across them by the same shard_map code that spans a pod, ran configs/bench32.py's
# reverse step about 1.3x faster on 2 cores (see the README's performance section).
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
  cores = len(os.sched_getaffinity(0)) if cores is None else cores
  fits = [n for n in range(1, max(cores, 1) + 1)
          if all(b % (n * num_processes) == 0 for b in batch_sizes)]
  return max(fits) if fits else 1


def configure_cpu_devices(setting: str, batch_sizes, num_processes: int = 1) -> Optional[int]:
  """Sets the number of CPU devices before JAX starts its backends (call it first).

  Does nothing, returning None, when XLA_FLAGS already sets FORCE_FLAG (tests, explicit
  set-ups) or when 'auto' runs on a machine with an accelerator plugin (its devices do the
  work; JAX_PLATFORMS=cpu counts as a CPU run). Returns the count it set.
  """
  if FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  cpu_run = os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin()
  if setting == "auto" and not cpu_run:
    return None
  n = choose_cpu_devices(setting, batch_sizes, num_processes)
  jax.config.update("jax_num_cpu_devices", n)
  return n
