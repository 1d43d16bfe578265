"""The workdir: one path abstraction (etils.epath) for local folders and object stores.

Every file a run writes or reads under its workdir goes through here, so `--workdir` can be a
local folder, `gs://bucket/path` (Cloud Storage, through gcsfs; Orbax writes the checkpoints
through TensorStore) or `s3://bucket/path` (through s3fs, when installed):

  check_workdir(workdir)              at start, before anything compiles: fails with one line
  path(workdir, "eval", "x.json")     an epath.Path under the workdir
  write_bytes / write_text / write_json   whole-file writes a reader never sees half of
  read_json / read_metrics            the matching readers
  MetricsWriter(workdir, start_step)  metrics.jsonl + TensorBoard events, preemption-safe

Object stores have no directories, no rename and no append. So: nothing calls mkdir on a URL
(no local folder named 'gs:' either), a file is written as one object (an upload becomes visible
only when complete), and metrics.jsonl is rewritten whole every log period instead of appended.

Local emulator (tests, README): gcsfs reads STORAGE_EMULATOR_HOST, TensorStore (Orbax)
TENSORSTORE_GCS_HTTP_URL; both must point at the emulator, or the checkpoints would go to
Cloud Storage itself (checked here).
"""
import io
import json
import os
import uuid
from typing import Any, Dict, List, Optional

import numpy as np
from absl import logging
from etils import epath

from ddpm.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# The fsspec backend each URL scheme needs, and where it comes from.
_BACKENDS = {
    "gs": ("gcsfs", "it is in requirements.txt"),
    "s3": ("s3fs", "install it with the fsspec version of requirements.txt, "
                   "e.g. pip install s3fs==2026.7.0"),
}


def is_url(p) -> bool:
  """Whether `p` names an object-store location (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(p)


def path(workdir, *parts: str) -> epath.Path:
  """workdir/part/... as an epath.Path (local or URL)."""
  return epath.Path(workdir).joinpath(*parts)


# ---------------------------------------------------------------------------------------------
# Whole-file writes and reads.


def write_bytes(dest, data: bytes) -> str:
  """Writes `data` to `dest` so that a reader sees the old file or the new one, never a part.

  Locally: a temporary sibling renamed into place (parent directories are created). On object
  stores: one object upload (it becomes visible only when complete; nothing is created for
  the parents, which do not exist there). An existing file is replaced. Returns `dest` as str.
  """
  dest = epath.Path(dest)
  if is_url(dest):
    dest.write_bytes(data)
    return os.fspath(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
  try:
    tmp.write_bytes(data)
    tmp.replace(dest)
  finally:
    if tmp.exists():
      tmp.unlink()
  return os.fspath(dest)


def write_text(dest, text: str) -> str:
  return write_bytes(dest, text.encode("utf-8"))


def write_json(dest, obj: Any) -> str:
  return write_text(dest, json.dumps(obj, indent=2) + "\n")


def read_json(src) -> Any:
  return json.loads(epath.Path(src).read_text())


def load_npz(src):
  """np.load of an .npz file (local or URL), read whole into memory; use as a context manager."""
  return np.load(io.BytesIO(epath.Path(src).read_bytes()), allow_pickle=False)


def exists(p) -> bool:
  return epath.Path(p).exists()


def makedirs(p) -> None:
  """Creates a local directory (and parents); a no-op on object stores, which have none."""
  if not is_url(p):
    epath.Path(p).mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Start-up check.


def check_workdir(workdir: str, create: bool = True) -> None:
  """Fails with one line (UserError) if `workdir` cannot be written, before any work starts.

  Local: the folder is created if missing (with `create=False`, for modes that must leave no
  trace when their input turns out bad, its nearest existing parent must be writable); a path that is (or lies under) a file, or a folder
  that cannot be written, fails. URL: the scheme's backend must be installed, the bucket must
  exist and the credentials must allow writing (a probe object is written and deleted); no local
  folder is created. A local GCS emulator needs both STORAGE_EMULATOR_HOST and
  TENSORSTORE_GCS_HTTP_URL (same host and port).
  """
  if not workdir:
    raise UserError("--workdir is empty: pass a local folder or a gs:// / s3:// URL")
  if is_url(workdir):
    _check_url(os.fspath(workdir))
  else:
    _check_local(os.fspath(workdir), create)


def _check_local(workdir: str, create: bool) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} is a file, not a directory")
  if not create and not os.path.exists(workdir):
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise UserError(f"workdir {workdir} is not writable: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UserError(f"workdir {workdir} is not writable: cannot create it in {parent}")
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{uuid.uuid4().hex}")
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror or e} "
                    f"({e.filename or workdir})") from None


def _emulator_endpoint(value: str) -> str:
  """'http://127.0.0.1:9023/' -> '127.0.0.1:9023' (both variables may omit the scheme)."""
  return value.split("://", 1)[-1].rstrip("/")


def _check_gcs_emulator_env(workdir: str) -> None:
  gcsfs_host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  ts_url = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "")
  if not gcsfs_host and not ts_url:
    return
  if not gcsfs_host or not ts_url or _emulator_endpoint(gcsfs_host) != _emulator_endpoint(ts_url):
    raise UserError(
        f"workdir {workdir}: a GCS emulator needs STORAGE_EMULATOR_HOST (files, via gcsfs) and "
        f"TENSORSTORE_GCS_HTTP_URL (checkpoints, via Orbax/TensorStore) set to the same address, "
        f"got STORAGE_EMULATOR_HOST={gcsfs_host!r} and TENSORSTORE_GCS_HTTP_URL={ts_url!r}; "
        f"otherwise one of them goes to Cloud Storage itself")
  # gcsfs's zonal/hierarchical-bucket layer asks the gRPC Storage Control API for every
  # operation's bucket type; emulators serve only the JSON API, so it would log a warning per
  # file operation (and look for credentials each time). Without it gcsfs is the plain JSON-API
  # client. Read by gcsfs when it is imported (the first gs:// access, after this check).
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _check_url(workdir: str) -> None:
  scheme, rest = workdir.split("://", 1)
  bucket = rest.split("/", 1)[0]
  if not bucket:
    raise UserError(f"workdir {workdir} names no bucket (expected {scheme}://BUCKET/path)")
  if scheme not in _BACKENDS:
    raise UserError(f"workdir {workdir}: {scheme}:// is not supported (use a local folder, "
                    f"gs:// or s3://)")
  module, where = _BACKENDS[scheme]
  if scheme == "gs":
    _check_gcs_emulator_env(workdir)
  try:
    __import__(module)
  except ImportError:
    raise UserError(f"workdir {workdir}: {scheme}:// needs the {module} package ({where})"
                    ) from None
  root = epath.Path(f"{scheme}://{bucket}")
  try:
    if not root.exists():
      raise UserError(f"workdir {workdir}: bucket {scheme}://{bucket} does not exist (or these "
                      f"credentials cannot see it); create it first, in the region of the VMs")
    probe = path(workdir, f".write-probe-{uuid.uuid4().hex}")
    probe.write_bytes(b"")
    probe.unlink()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"workdir {workdir}: cannot write to bucket {scheme}://{bucket}: "
                    f"{_describe(e)}") from None


def _describe(error: Exception) -> str:
  """One line for a storage client's exception, with a hint for the usual causes."""
  code = getattr(error, "code", None) or getattr(error, "status", None)
  text = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, PermissionError) or code in (401, 403):
    return (f"access denied ({text}); check the credentials (GOOGLE_APPLICATION_CREDENTIALS, "
            f"`gcloud auth application-default login` or the VM's service account, resp. "
            f"AWS_* variables) and their write permission on the bucket")
  if isinstance(error, FileNotFoundError):
    return f"not found ({text}); does the bucket exist?"
  if isinstance(error, ConnectionError) or "connect" in text.lower():
    return f"cannot reach the storage service ({text})"
  return f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# Metrics.


def read_metrics(workdir) -> List[Dict[str, Any]]:
  """The rows of workdir/metrics.jsonl ([] if there is none). A line that is not JSON (the
  torn last line of an older appending writer) is skipped with a warning."""
  src = path(workdir, METRICS_FILE)
  if not src.exists():
    return []
  rows = []
  for i, line in enumerate(src.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      logging.warning("%s line %d is not JSON; skipped: %.80s", src, i + 1, line)
  return rows


def tensorboard_writer(workdir, purge_step: Optional[int] = None):
  """A tensorboardX SummaryWriter on workdir/tensorboard, or None (logged) where it cannot write.

  tensorboardX writes local folders itself and gs:// through google-cloud-storage (the event
  file is re-uploaded whole on every flush); s3:// needs boto3, which is not a requirement.
  purge_step: TensorBoard hides the events of earlier runs at steps >= purge_step (resumes).
  """
  logdir = os.fspath(path(workdir, TENSORBOARD_DIR))
  try:
    from tensorboardX import SummaryWriter
    return SummaryWriter(logdir, purge_step=purge_step)
  except ImportError as e:
    logging.warning("TensorBoard events are not written to %s (%s); metrics go to %s only.",
                    logdir, e, path(workdir, METRICS_FILE))
    return None


class MetricsWriter:
  """workdir/metrics.jsonl (one JSON object per log step) and TensorBoard events.

  Object stores cannot append, so every `write` rewrites metrics.jsonl whole (one object; a
  temporary file and a rename locally): the file is complete and readable at any time, also in
  the bucket while the run goes, and a preemption loses at most the rows not yet written.
  Resuming from a checkpoint at `start_step` drops the rows after it (they were logged past the
  checkpoint and are logged again), so no step appears twice; TensorBoard is told the same
  (purge_step). Writes only where `enabled` (process 0).
  """

  def __init__(self, workdir, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self._path = path(workdir, METRICS_FILE)
    self._lines: List[str] = []
    self._tb = None
    if not enabled:
      return
    rows = read_metrics(workdir)
    kept = [r for r in rows if r.get("step", 0) <= start_step]
    self._lines = [json.dumps(r) for r in kept]
    if len(kept) != len(rows):
      logging.info("%s: dropped %d row(s) logged after step %d, the checkpoint this run resumes "
                   "from.", self._path, len(rows) - len(kept), start_step)
      self._flush()
    self._tb = tensorboard_writer(workdir, purge_step=start_step + 1 if rows else None)

  def _flush(self):
    write_text(self._path, "".join(line + "\n" for line in self._lines))

  def write(self, step: int, scalars: Dict[str, float]):
    if not self.enabled:
      return
    self._lines.append(json.dumps({"step": int(step), **scalars}))
    self._flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def npz_bytes(**arrays) -> bytes:
  """np.savez of `arrays` into memory (to write with `write_bytes`)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()
