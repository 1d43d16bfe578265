"""Tests of ddpm/locking.py: one holder per workdir, dead holders never block, leases expire."""
import json
import os
import signal
import time

import pytest

from ddpm import locking

def test_second_holder_is_refused_naming_the_first(tmp_path, lock_holder):
  proc = lock_holder(tmp_path)
  try:
    with pytest.raises(locking.WorkdirLockedError) as err:
      with locking.workdir_lock(tmp_path):
        pass
    msg = str(err.value)
    assert f"pid {proc.pid}" in msg and f"host {os.uname().nodename}" in msg
    assert "started 20" in msg and str(tmp_path / "lock") in msg
    assert "\n" not in msg
  finally:
    proc.kill()
    proc.wait()


def test_killed_holder_does_not_block(tmp_path, lock_holder):
  proc = lock_holder(tmp_path)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  with locking.workdir_lock(tmp_path):
    info = json.loads((tmp_path / "lock").read_text())
    assert info["pid"] == os.getpid()
  with locking.workdir_lock(tmp_path):  # released at the end of the block
    pass


def test_lease_heartbeat_expiry_and_release(tmp_path, lock_holder):
  ttl = 0.6
  proc = lock_holder(tmp_path, "lease", ttl)
  try:
    first = json.loads((tmp_path / "lock").read_text())
    time.sleep(ttl)  # longer than the renewal period ttl / 3
    renewed = json.loads((tmp_path / "lock").read_text())
    assert renewed["renewed"] > first["renewed"] and renewed["token"] == first["token"]
    with pytest.raises(locking.WorkdirLockedError, match=f"pid {proc.pid}.*lease expires"):
      with locking.workdir_lock(tmp_path, lease=True, ttl=ttl):
        pass
  finally:
    proc.kill()  # dies without releasing: the lease stays until it expires
    proc.wait()
  time.sleep(ttl)
  with locking.workdir_lock(tmp_path, lease=True, ttl=ttl):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / "lock").exists()  # released


def test_only_object_store_urls_use_leases():
  assert locking.is_local("/tmp/x") and locking.is_local("runs/x")
  assert not locking.is_local("gs://bucket/run") and not locking.is_local("s3://b/r")
