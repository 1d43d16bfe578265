"""Checkpoints (Orbax) that survive corruption and preemption.

One checkpoint per step, in `directory/<step>/`, with up to three Orbax items:
  'state': a pytree of arrays (step, params, ema_params, opt_state, rng, sampler state, ...),
           written with `PyTreeSave` and restored into the structure, dtypes and shardings of a
           target (typed PRNG key arrays and raw `jax.random.key_data` both round-trip bitwise);
  'data':  the input iterator's JSON state (absent when there is none);
  'meta':  JSON: a checksum of every array of 'state' and the run's config (when given).
  `restore_latest(..., partial=True)` reads only the subtrees of 'state' the target names (e.g.
  {'ema_params': ...} for sampling and evaluation: the optimizer state is not read).

Usage (every process calls every function; Orbax coordinates multi-host writes):
  mngr = create_manager(workdir + "/checkpoints", max_to_keep=3, async_save=True)
  restored = restore_latest(mngr, abstract_or_concrete_state)  # (state, data_state, step) or None
  ema = restore_latest(mngr, {"ema_params": abstract_ema}, partial=True)[0]["ema_params"]
  save(mngr, step, state, data_state=iterator_state)
  wait(mngr)                                                     # before exiting

Robustness:
  * `save` refuses non-finite states (nothing is written), so a diverged run never overwrites
    its last good checkpoint with NaNs.
  * `restore_latest` walks from the newest step down: a checkpoint that fails to restore (missing
    or truncated file, an array whose checksum differs from the one written at save -- bytes
    damaged without changing the file size --, or non-finite values) is logged and the previous
    one is used. The training run (which passes `set_aside_unreadable=True`) moves it aside to
    `<step>.corrupt-<time>` (kept for inspection) so that it can write that step again; readers
    (sampling, evaluation) move nothing. If every checkpoint fails, it raises
    `CheckpointRestoreError` naming the directory and each step's error.
  * Interrupted saves leave `<step>.orbax-checkpoint-tmp-*` directories: Orbax never lists them
    as steps, and a writing manager deletes them when created.
  * `PreemptionHandler` turns SIGTERM/SIGINT into a flag polled at step boundaries; with several
    processes every process stops at the same step (JAX's preemption sync point).
"""
import errno
import hashlib
import json
import os
import re
import signal
import threading
import time
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm.errors import UserError

STATE_ITEM = "state"
DATA_ITEM = "data"
META_ITEM = "meta"
# Step directories are plain integers ('1000'), Orbax's standard naming.
_NAME_FORMAT = ocp.path.step.standard_name_format()
_CORRUPT_MARK = ".corrupt-"


class CheckpointRestoreError(UserError, RuntimeError):
  """Checkpoints exist but none of them could be restored."""


class NoCheckpointError(UserError, FileNotFoundError):
  """A reader (sampling, evaluation) found no checkpoint to read."""


class CheckpointWriteError(UserError, OSError):
  """A checkpoint could not be written for lack of space; older ones are intact."""


class NonFiniteStateError(FloatingPointError):
  """The state to be saved holds NaN or Inf values; nothing was written."""

  def __init__(self, message: str, leaves: Sequence[str] = ()):
    super().__init__(message)
    self.leaves = list(leaves)  # key paths of the non-finite leaves


# ---------------------------------------------------------------------------------------------
# Manager.


def _as_path(directory) -> epath.Path:
  path = epath.Path(directory)
  # Orbax wants absolute paths; a relative local one is taken relative to the working directory.
  if "://" not in str(directory) and not path.is_absolute():
    path = epath.Path(os.path.abspath(os.fspath(directory)))
  return path


def create_manager(directory, max_to_keep: Optional[int] = 3, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An Orbax `CheckpointManager` for the items 'state' and 'data' in `directory`.

  Args:
    directory: checkpoint root (local path or a URL Orbax understands, e.g. gs://...); created
      if missing. The training loop passes workdir/checkpoints.
    max_to_keep: number of newest checkpoints kept (older ones are deleted after each save);
      None keeps all.
    async_save: write in a background thread; `save` returns once the arrays are copied to host.
    read_only: for readers of another run's checkpoints (sampling, evaluation while training
      runs): never writes, deletes or moves anything, so an in-flight save of the training run
      (a '<step>.orbax-checkpoint-tmp-*' directory) is left alone.
  Returns:
    The manager, to pass to `save`, `restore_latest` and `wait`.
  """
  if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(
      max_to_keep, (int, np.integer)) or max_to_keep < 1):
    raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if (max_to_keep is None or read_only) else int(max_to_keep),
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=bool(async_save),
      create=not read_only,
      read_only=bool(read_only),
      # Interrupted saves leave '<step>.orbax-checkpoint-tmp-*' directories; they are never
      # restored, so the writer reclaims their space when it (re)starts (in the background,
      # awaited by the first save).
      cleanup_tmp_directories=not read_only,
      step_name_format=_NAME_FORMAT,
  )
  handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(),
              DATA_ITEM: ocp.JsonCheckpointHandler(),
              META_ITEM: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_as_path(directory), options=options, item_handlers=handlers)


def wait(mngr: ocp.CheckpointManager) -> None:
  """Blocks until pending asynchronous saves are written (call before exiting).

  Raises:
    CheckpointWriteError: the device is full (names the failed and the last intact step).
  """
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_disk_full(mngr, None, e)
    raise


def _is_disk_full(error: BaseException) -> bool:
  text = str(error)
  return (getattr(error, "errno", None) == errno.ENOSPC or "RESOURCE_EXHAUSTED" in text
          or "No space left on device" in text)


def _raise_if_disk_full(mngr, step: Optional[int], error: BaseException) -> None:
  """An asynchronous write fails late (TensorStore: RESOURCE_EXHAUSTED, in the next save or
  wait): name the step whose write failed (from the temporary directory in the message)."""
  if not _is_disk_full(error):
    return
  found = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", str(error))
  failed = int(found.group(1)) if found else step
  intact = latest_step(mngr.directory)
  raise CheckpointWriteError(
      f"no space left on device while writing checkpoint {failed} in {mngr.directory}; "
      + (f"checkpoints up to {intact} are intact" if intact is not None else
         "no checkpoint was written before")) from error


def latest_step(directory) -> Optional[int]:
  """Newest finalized checkpoint step in `directory` (None if none), without restoring.

  Finalized means Orbax committed it (atomic rename of its temporary directory), so interrupted
  saves are not counted. The files inside are not read: `restore_latest` may still fall back to
  an older step if this one turns out to be corrupt.
  """
  path = _as_path(directory)
  if not path.exists():
    return None
  metadata = ocp.path.step.latest_step_metadata(path, _NAME_FORMAT)
  return None if metadata is None else int(metadata.step)


# ---------------------------------------------------------------------------------------------
# Saving.


def _key_path_str(path) -> str:
  return "state" + jax.tree_util.keystr(path)


def _leaf_name(path) -> str:
  """'ema_params/conv/kernel': the same name for a dict key and a dataclass field, so a
  checksum recorded for a TrainState also matches a partial target (e.g. a dict of EMA params)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


# Checksums: two sums of the array's 32-bit words mod 2^32, each word weighted by a function of
# its index (one odd weight, so any change of a single word changes the first sum). Sums do not
# depend on the order of summation, so the value is the same for any sharding and device count,
# and it is computed where the array lives (no copy to the host; multi-host arrays too).
_MULT = np.uint32(0x9E3779B9)


def _device_words(x):
  """jax array -> its bits as uint32 [N] (arrays of 8/16-bit types zero-extended)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits == 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32).reshape(-1)


def _host_words(x) -> np.ndarray:
  """numpy array -> its bits as uint32 [N], as `_device_words` (64-bit types as word pairs)."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  if x.dtype.itemsize >= 4:
    return x.reshape(-1).view(np.uint32)
  return x.reshape(-1).view(np.dtype(f"uint{x.dtype.itemsize * 8}")).astype(np.uint32)


def _sums(words, xp):
  i = xp.arange(words.shape[0], dtype=xp.uint32)
  h1 = xp.sum(words * (i * xp.uint32(2) + xp.uint32(1)), dtype=xp.uint32)
  h2 = xp.sum((words ^ (i * _MULT)) * xp.uint32(0x85EBCA6B), dtype=xp.uint32)
  return h1, h2


@jax.jit
def _inspect_on_device(leaves):
  """([L] bool: finite, [L, 2] uint32: checksums) of jax arrays (one fused pass)."""
  finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
            for x in leaves]
  sums = [jnp.stack(_sums(_device_words(x), jnp)) for x in leaves]
  return jnp.stack(finite), jnp.stack(sums)


def _inspect(state) -> Tuple[list, dict]:
  """(key paths of floating leaves holding NaN/Inf, {leaf name: checksum hex}) of a pytree."""
  bad, sums = [], {}
  on_devices = {}  # device set -> [(path, array)]: one jitted pass per set of devices
  with np.errstate(over="ignore"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      if isinstance(leaf, jax.Array):
        on_devices.setdefault(frozenset(leaf.sharding.device_set), []).append((path, leaf))
        continue
      a = np.asarray(leaf)
      if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
        bad.append(_key_path_str(path))
      if a.dtype != object:
        sums[_leaf_name(path)] = "%s:%08x%08x" % (a.dtype, *(int(h) for h in
                                                     _sums(_host_words(a), np)))
  for group in on_devices.values():
    # The results are replicated, so every process can read them, also for multi-host arrays.
    finite, group_sums = map(np.asarray, _inspect_on_device([leaf for _, leaf in group]))
    for (p, leaf), ok, (h1, h2) in zip(group, finite, group_sums):
      if not ok:
        bad.append(_key_path_str(p))
      sums[_leaf_name(p)] = "%s:%08x%08x" % (leaf.dtype, int(h1), int(h2))
  return bad, sums


def nonfinite_leaves(state) -> list:
  """Key paths (e.g. "state['params']['w']") of floating leaves holding NaN or Inf."""
  return _inspect(state)[0]


def checksums(state) -> dict:
  """{leaf name ('params/conv/kernel'): 'float32:<16 hex digits>'}: each array's dtype and a
  checksum of its bits."""
  return _inspect(state)[1]


def _mismatches(recorded: dict, actual: dict) -> list:
  """Names of the leaves present in both, restored with the dtype they were saved with (a
  target may ask Orbax for another), whose checksums differ."""
  return [name for name, value in actual.items()
          if name in recorded and recorded[name] != value
          and recorded[name].split(":")[0] == value.split(":")[0]]


def _check_same_on_all_processes(data_state, step: int, directory) -> None:
  """Orbax's JsonSave writes process 0's dict only: the others' must be equal to it."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).digest()[:8]
  gathered = multihost_utils.process_allgather(np.frombuffer(digest, np.int32))
  if not np.all(gathered == gathered[0]):
    raise ValueError(f"cannot save step {step} to {directory}: data_state differs between "
                     "processes, but only process 0's is written; give every process the same "
                     "dict (e.g. gather the per-process states into one)")


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: Optional[dict] = None,
         force: bool = False, config: Optional[dict] = None) -> bool:
  """Saves `state` (and the input pipeline's `data_state`) as checkpoint `step`.

  Args:
    mngr: from `create_manager`.
    step: the training step, an int >= 0 (the directory name).
    state: pytree of jax/numpy arrays and Python scalars.
    data_state: JSON-serialisable dict (e.g. a grain iterator's state), or None. Orbax writes
      process 0's copy only, so with several processes it must be the same on all of them
      (checked).
    force: save even if the manager's save policy would skip this step.
    config: the run's config as a JSON-serialisable dict, recorded in the 'meta' item.
  Returns:
    Whether a checkpoint was written (False if `step` is already saved: it is not overwritten;
    False too for a read-only manager, which Orbax never lets write).
  Raises:
    NonFiniteStateError: a floating leaf holds NaN/Inf (names the leaves; nothing written).
    ValueError: `step` is not a non-negative int, or `data_state` is not JSON-serialisable or
      differs between processes.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
  step = int(step)
  bad, sums = _inspect(state)
  if bad:
    raise NonFiniteStateError(f"refusing to save step {step} to {mngr.directory}: non-finite "
                              f"values in {_list(bad, 5)}; nothing was written", bad)
  if data_state is not None:
    try:
      json.dumps(data_state)
    except (TypeError, ValueError) as e:
      raise ValueError(f"data_state must be JSON-serialisable (it is saved with Orbax JsonSave), "
                       f"got {type(data_state).__name__}: {e}") from e
    _check_same_on_all_processes(data_state, step, mngr.directory)
  if step in mngr.all_steps():
    logging.info("Checkpoint step %d already exists in %s: not overwriting it.", step,
                 mngr.directory)
    return False
  items = {STATE_ITEM: ocp.args.PyTreeSave(state),
           META_ITEM: ocp.args.JsonSave({"checksums": sums, "config": config})}
  if data_state is not None:
    items[DATA_ITEM] = ocp.args.JsonSave(data_state)
  try:
    saved = mngr.save(step, args=ocp.args.Composite(**items), force=force)
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_disk_full(mngr, step, e)
    raise
  if saved:
    logging.info("Saving checkpoint step %d to %s.", step, mngr.directory)
  return bool(saved)


# ---------------------------------------------------------------------------------------------
# Restoring.


def _restore_target(abstract_state):
  """The `PyTreeRestore` target: ShapeDtypeStructs (with sharding) for arrays."""
  def leaf(x):
    if isinstance(x, jax.Array):
      # A concrete array: restore into its shape, dtype (also PRNG key types) and sharding.
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, abstract_state)


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` holds on every process (restores read per-process shards)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(flags))


def _quarantine(mngr: ocp.CheckpointManager, steps: Sequence[int]) -> None:
  """Moves broken step directories aside (kept for inspection) so the steps can be re-saved."""
  if jax.process_index() == 0:
    for step in steps:
      src = ocp.path.step.build_step_path(mngr.directory, _NAME_FORMAT, step)
      dst = src.parent / f"{src.name}{_CORRUPT_MARK}{int(time.time())}"
      if src.exists():
        src.rename(dst)
        logging.warning("Moved unreadable checkpoint %s to %s.", src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ddpm_checkpointing_quarantine")
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, partial: bool = False,
                   set_aside_unreadable: bool = False
                   ) -> Optional[Tuple[Any, Optional[dict], int]]:
  """Restores the newest checkpoint that can be read, falling back past broken ones.

  Args:
    mngr: from `create_manager`.
    abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or a
      concrete state; arrays are restored with its structure, dtypes and shardings (numpy leaves
      come back as numpy arrays).
    partial: the target names only some subtrees of the saved state, as a dict keyed by the
      saved field names (e.g. {'ema_params': abstract_ema_params}); only those are read from
      disk (Orbax partial restore) and returned in that dict.
    set_aside_unreadable: move checkpoints newer than the restored one that failed to restore
      to `<step>.corrupt-<time>` (for the training run, which must be able to save those steps
      again); False leaves the directory untouched (readers of another run's checkpoints).
  Returns:
    (state, data_state, step) of the newest readable checkpoint (data_state None if none was
    saved), or None if `mngr.directory` holds no checkpoint at all.
  Raises:
    CheckpointRestoreError: checkpoints exist but none can be restored into `abstract_state`
      (names the directory and every step's error, e.g. a structure mismatch).
  """
  mngr.wait_until_finished()  # a save of this manager still in flight is not listed yet
  mngr.reload()  # another process (or a previous run) may have written steps since creation
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  target = _restore_target(abstract_state)
  state_args = ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=partial)
  failures = []
  for step in steps:
    step_dir = ocp.path.step.build_step_path(mngr.directory, _NAME_FORMAT, step)
    items = {STATE_ITEM: state_args}
    has_data = (step_dir / DATA_ITEM).exists()
    if has_data:
      items[DATA_ITEM] = ocp.args.JsonRestore()
    has_meta = (step_dir / META_ITEM).exists()  # absent in checkpoints of older versions
    if has_meta:
      items[META_ITEM] = ocp.args.JsonRestore()
    error = None
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
      _verify(restored[STATE_ITEM], restored[META_ITEM]["checksums"] if has_meta else None)
    except Exception as e:  # pylint: disable=broad-except
      # Orbax/TensorStore raise many types (ValueError, FileNotFoundError, JSONDecodeError,
      # plain Exception) for missing or truncated files; every one of them means "unreadable".
      error = e
    if not _all_processes_agree(error is None):
      reason = (f"{type(error).__name__}: {error}" if error is not None else
                "failed to restore on another process")
      logging.warning("Checkpoint %s cannot be restored (%s); trying the previous one.",
                      step_dir, _shorten(reason))
      failures.append((step, reason))
      continue
    if failures:
      if set_aside_unreadable:
        _quarantine(mngr, [s for s, _ in failures])
      logging.warning("Restored checkpoint step %d from %s after skipping unreadable step(s) %s.",
                      step, mngr.directory, ", ".join(str(s) for s, _ in failures))
    data_state = restored[DATA_ITEM] if has_data else None
    return restored[STATE_ITEM], data_state, int(step)
  details = "; ".join(f"step {s}: {_shorten(r)}" for s, r in failures)
  raise CheckpointRestoreError(
      f"none of the {len(steps)} checkpoint(s) in {mngr.directory} could be restored into the "
      f"given state structure. {details}")


class ChecksumError(ValueError):
  """A restored array differs from the one that was saved, or holds NaN/Inf."""


def _verify(state, recorded: Optional[dict]) -> None:
  """Raises ChecksumError if `state` has non-finite values or arrays whose checksums differ
  from `recorded` (leaf name -> checksum; None: nothing recorded, only finiteness checked)."""
  bad, sums = _inspect(state)
  if recorded is not None:
    damaged = _mismatches(recorded, sums)
    if damaged:
      raise ChecksumError(f"checksum mismatch in {_list(damaged)}: its bytes differ from what "
                          "was saved")
  if bad:
    raise ChecksumError(f"non-finite values in {_list(bad)}")


def _list(names: Sequence[str], limit: int = 3) -> str:
  return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                     else "")


def _shorten(text: str, limit: int = 600) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------
# Preemption.


class PreemptionHandler:
  """SIGTERM/SIGINT -> "save and exit at the next step boundary".

  Use as a context manager around the training loop and call `requested(step)` once per step
  boundary, on every process, with the same steps:
    with PreemptionHandler() as preemption:
      while ...:
        ...
        if preemption.requested(step):
          save(...); break

  Single process: the handlers set a flag that `requested` returns.
  Several processes: all of them must stop at the same step, or the collective save hangs.
    * If jax.distributed runs JAX's preemption service (the default), SIGTERM is left to JAX's
      own notifier, which propagates the notice to all processes; SIGINT is forwarded to it as a
      SIGTERM. `requested(step)` is `multihost_utils.reached_preemption_sync_point(step)`: every
      process gets True at the same step, without a device synchronisation.
    * Otherwise, at every step the processes all-gather their flags and stop if any
      process received a signal.
  A second SIGINT while a stop is pending raises KeyboardInterrupt (the usual Ctrl-C twice).
  Closing restores the previous handlers. Handlers can only be installed from the main thread.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous = {}
    self._received = None
    self._installed = False
    self._multiprocess = False
    self._use_jax_service = False
    self._reported = False

  @property
  def signal_received(self) -> Optional[int]:
    """The number of the (first) signal this process received, or None."""
    return self._received

  def install(self) -> "PreemptionHandler":
    if self._installed:
      raise RuntimeError("PreemptionHandler is already installed")
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler must be installed from the main thread (Python "
                         "only delivers signals there)")
    self._multiprocess = jax.process_count() > 1
    # jax.distributed.initialize starts JAX's preemption sync manager (which then owns SIGTERM)
    # when this flag is set, as it is by default.
    self._use_jax_service = self._multiprocess and bool(jax.config.jax_enable_preemption_service)
    for sig in self._signals:
      if self._use_jax_service and sig == signal.SIGTERM:
        continue  # JAX's C++ notifier handles SIGTERM; a Python handler would replace it.
      self._previous[sig] = signal.signal(sig, self._on_signal)
    self._installed = True
    if self._multiprocess:
      logging.info("Preemption: %s.", "JAX preemption sync point (SIGINT forwarded as SIGTERM)"
                   if self._use_jax_service else
                   "all-process flag agreement at every step")
    return self

  def close(self) -> None:
    """Restores the handlers that were installed before."""
    for sig, previous in self._previous.items():
      # None means a handler not installed from Python: the best available is the default.
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
    self._installed = False

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.close()

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self._received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the final save.
    if self._received is None:
      self._received = signum
    if self._use_jax_service:
      # Hand the notice to JAX's preemption sync manager, which agrees on a stop step.
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: Optional[int] = None) -> bool:
    """Whether to save and stop now. Call at every step boundary, on every process.

    Args:
      step: the current step; required when there are several processes (all processes must
        call with the same steps, in the same order).
    """
    if not self._multiprocess:
      stop = self._received is not None
    else:
      if step is None:
        raise ValueError("PreemptionHandler.requested needs the step when jax.process_count() "
                         "> 1, so that all processes stop at the same step")
      if self._use_jax_service:
        stop = multihost_utils.reached_preemption_sync_point(int(step))
      else:
        stop = not _all_processes_agree(self._received is None)
    if stop and not self._reported:
      self._reported = True
      name = (signal.Signals(self._received).name if self._received is not None else
              "notice from JAX's preemption service")
      logging.warning("Preemption requested (%s)%s.", name,
                      "" if step is None else f" at step {step}")
    return stop
