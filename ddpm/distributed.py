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
