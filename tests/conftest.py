"""Test set-up: 8 simulated CPU devices for every test, so SPMD code is exercised as on a pod.

Must run before jax is imported anywhere; single-device behaviour is tested with a 1-device mesh.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# XLA compiles slowly on 2 cores: tests that build the same computation again (a resumed run, a
# second train_and_evaluate) reuse it from a per-session persistent compilation cache.
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ddpm_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import signal  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def sigterm_at_step(monkeypatch):
  """arm(step) makes the training loop receive a real SIGTERM when it checks for preemption
  at `step` (the handler the loop installed gets it); arm returns a function that disarms it."""
  from ddpm import checkpointing
  original = checkpointing.PreemptionHandler.requested

  def arm(at_step):
    def requested(self, step=None):
      if step == at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      return original(self, step)

    monkeypatch.setattr(checkpointing.PreemptionHandler, "requested", requested)
    return lambda: monkeypatch.setattr(checkpointing.PreemptionHandler, "requested", original)

  return arm


_HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from ddpm import locking\n"
         "with locking.workdir_lock(sys.argv[1], lease=sys.argv[2] == 'lease', "
         "ttl=float(sys.argv[3])):\n"
         "  print('locked', flush=True); time.sleep(600)\n")


@pytest.fixture
def lock_holder():
  """hold(workdir, kind='flock'|'lease', ttl) starts another process that holds the workdir's
  lock and returns it (a Popen) once it does; the processes are killed after the test."""
  import subprocess
  procs = []

  def hold(workdir, kind="flock", ttl=120.0):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=ROOT), str(workdir), kind,
                             str(ttl)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    procs.append(proc)
    assert proc.stdout.readline().strip() == "locked"
    return proc

  yield hold
  for proc in procs:
    proc.kill()
    proc.wait()


def clear_gcs_clients():
  """gcsfs reads STORAGE_EMULATOR_HOST when a filesystem is made, and fsspec and etils cache the
  filesystems: drop them so the next gs:// access uses the current environment."""
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  try:
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass
