"""ddpm/distributed.py: the CPU device count chosen before JAX starts (launch.py --cpu_devices)."""
import os
import subprocess
import sys

import pytest

from configs import digits
from ddpm import config_validation
from ddpm import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batches, processes, cores, want", [
    ((64, 64, 64), 1, 2, 2),      # the digits demo on 2 cores
    ((64, 24), 1, 6, 4),          # 6 does not divide 64, 4 divides both
    ((7,), 1, 8, 7),
    ((12,), 2, 8, 6),             # 2 processes x 6 devices = 12 shards
    ((5,), 2, 8, 1),              # nothing fits: one device
    ((64,), 1, 1, 1),
])
def test_auto_is_the_largest_count_every_batch_divides_into(batches, processes, cores, want):
  assert distributed.choose_cpu_devices("auto", batches, processes, cores=cores) == want


def test_explicit_counts_and_bad_settings():
  assert distributed.choose_cpu_devices("3", (7,), cores=2) == 3  # validation names the batch
  for bad in ("0", "-2", "two", ""):
    with pytest.raises(ValueError, match="--cpu_devices must be 'auto' or a positive number"):
      distributed.choose_cpu_devices(bad, (8,))


def test_unset_and_xla_flags_leave_the_device_count_alone(monkeypatch):
  assert distributed.configure_cpu_devices(None, (8,)) is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert distributed.configure_cpu_devices("2", (8,)) is None
  with pytest.raises(ValueError, match="got 'two'"):  # a bad setting is reported all the same
    distributed.configure_cpu_devices("two", (8,))


def test_batch_sizes_include_the_variants():
  c = digits.get_config()
  c.variants["big"] = {"training": {"batch_size": 96}}
  assert config_validation.batch_sizes(c) == (64, 64, 64, 96)


def _launch(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "launch.py", "--config=configs/tiny.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_launch_sets_the_device_count_before_jax_starts(tmp_path):
  # 3 devices do not divide tiny's batch of 8: the validation names the key and the count,
  # which shows the count reached JAX; nothing is compiled or written.
  out = _launch(f"--workdir={tmp_path}", "--cpu_devices=3")
  assert out.returncode != 0
  assert "training.batch_size" in out.stderr and "3 devices" in out.stderr
  assert "Traceback" not in out.stderr and not os.listdir(tmp_path)
  out = _launch(f"--workdir={tmp_path}", "--cpu_devices=many")
  assert out.returncode != 0 and "--cpu_devices must be 'auto'" in out.stderr
