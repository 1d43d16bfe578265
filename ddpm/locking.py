"""An exclusive lock on a workdir, held by a training (or a sweep) for its whole lifetime.

Two trainings on one workdir would destroy each other (the second one's start-up deletes the
first one's in-flight checkpoint, both append to metrics.jsonl), so the second one stops at once
with one line naming the holder:

  with locking.workdir_lock(workdir):
    ...train...

The lock file `workdir/lock` holds the holder's host, pid and start time (JSON). A holder that
died (kill -9, machine lost) never blocks a restart:
  * Local and NFS-like filesystems: an OS lock (`fcntl.flock`) on the file; the kernel drops it
    when the holder's process ends, however it ends. The file itself stays (harmless).
  * Object stores (gs://, s3://, any path etils.epath does not map to the local filesystem): they
    have no locks, so the file is a lease: the holder renews it every `ttl / 3` seconds from a
    background thread and deletes it on release; a lease not renewed for `ttl` seconds has
    expired and may be taken over. Expiry compares the renewal time written by the holder's
    clock with the reader's clock, so the clocks must agree to well within `ttl`.
In multi-process runs process 0 takes the lock and tells the others whether it got it, so every
process stops with the same line. `--mode=sample/eval` take no lock: they only read checkpoints.
"""
import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from absl import logging
from etils import epath

from ddpm.errors import UserError

LOCK_FILE = "lock"
LEASE_TTL_S = 120.0
# Workdirs this process holds: taking the lock again (nested) is a no-op. A lock belongs to the
# process, so this is the one piece of module state.
_HELD = set()


class WorkdirLockedError(UserError):
  """Another live process holds the workdir's lock."""


def _holder_info() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _describe(info: Optional[dict]) -> str:
  if not info:
    return "holder unknown"
  return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
          f"{info.get('started', '?')}")


def _locked_message(workdir, path, info) -> str:
  return (f"workdir {workdir} is in use by another run ({_describe(info)}); wait for it to "
          f"finish or stop it (lock file {path})")


def is_local(path) -> bool:
  """Whether `path` lives on a filesystem the OS can lock (not an object store URL)."""
  return "://" not in os.fspath(path) or os.fspath(path).startswith("file://")


def _read_json(path: epath.Path) -> Optional[dict]:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None


@contextlib.contextmanager
def _flock(workdir: epath.Path) -> Iterator[None]:
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  path = workdir / LOCK_FILE
  fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise
      raise WorkdirLockedError(_locked_message(workdir, path, _read_json(path))) from None
    info = json.dumps(_holder_info()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    os.fsync(fd)
    yield
  finally:
    os.close(fd)  # closing the only descriptor releases the flock


@contextlib.contextmanager
def _lease(workdir: epath.Path, ttl: float) -> Iterator[None]:
  path = workdir / LOCK_FILE
  token = uuid.uuid4().hex
  current = _read_json(path)
  if current and time.time() < float(current.get("renewed", 0)) + ttl:
    raise WorkdirLockedError(_locked_message(workdir, path, current) +
                             f"; the lease expires {ttl:.0f} s after its last renewal if the "
                             "holder is dead")
  info = {**_holder_info(), "token": token}

  def write():
    path.write_text(json.dumps({**info, "renewed": time.time()}))

  write()
  # Object stores have no compare-and-swap here: the last writer wins. Two starters that both
  # found the lease free see who won by reading it back after a short pause.
  time.sleep(min(1.0, ttl / 10))
  winner = _read_json(path)
  if not winner or winner.get("token") != token:
    raise WorkdirLockedError(_locked_message(workdir, path, winner))
  stop = threading.Event()

  def heartbeat():
    while not stop.wait(ttl / 3):
      try:
        write()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not renew the workdir lease %s: %s", path, e)

  thread = threading.Thread(target=heartbeat, name="ddpm-workdir-lease", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    if (_read_json(path) or {}).get("token") == token:
      path.unlink(missing_ok=True)


@contextlib.contextmanager
def workdir_lock(workdir, lease: Optional[bool] = None,
                 ttl: float = LEASE_TTL_S) -> Iterator[None]:
  """Holds the exclusive lock of `workdir` (created if missing) for the `with` block.

  Args:
    workdir: local path or object-store URL (gs://...).
    lease: use a lease file instead of `flock`; default: a lease exactly for non-local paths.
    ttl: seconds after the last renewal at which a lease counts as abandoned.
  Raises:
    WorkdirLockedError: another live process holds it (names its host, pid and start time).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  key = os.path.realpath(workdir) if is_local(workdir) else os.fspath(workdir)
  if key in _HELD:  # this process holds it already (launch.py, then train_and_evaluate)
    yield
    return
  use_lease = (not is_local(workdir)) if lease is None else lease
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      try:
        stack.enter_context(_lease(workdir, ttl) if use_lease else _flock(workdir))
      except WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:
      import numpy as np  # pylint: disable=g-import-not-at-top
      got = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if error is None and not int(got):
        error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 "
                                   "could not lock it; see its message)")
    if error is not None:
      raise error
    _HELD.add(key)
    try:
      yield
    finally:
      _HELD.discard(key)
