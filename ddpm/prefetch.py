"""Device prefetch: training batches become global jax.Arrays on the mesh, built in a thread.

`prefetch_to_mesh(it, sharding, size, stack)` wraps any iterator of host batches that has
get_state()/set_state() (e.g. `input_pipeline.create_datasets(...).train_iter`): a background
thread stacks `stack` batches, turns them into global arrays with
`jax.make_array_from_process_local_data` (so host-to-device copies overlap the train step) and
keeps `size` of them ready; the state it reports is the consumer's position, so a checkpoint
never skips prefetched batches.
"""
import copy
import queue
import threading

import jax
import numpy as np


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


def _stacked_layout(sharding, stack: int) -> bool:
  """Whether batches are [k, B, ...] (True) or [B, ...] (False) for this sharding and stack.

  stack > 1 always stacks. With stack=1 the sharding decides: one that partitions axis 1
  (e.g. P(None, 'data')) asks for the stacked layout [1, B, ...] (a training step that scans
  over k steps also for k = 1); one that partitions axis 0 (P('data')) gets [B, ...]. Any other
  partitioning would split an image axis and is an error.
  """
  if not isinstance(sharding, jax.sharding.Sharding):
    raise TypeError(f"sharding must be a jax.sharding.Sharding, got {sharding!r}")
  spec = getattr(sharding, "spec", None)
  split = [] if spec is None else [i for i, axes in enumerate(spec) if axes is not None]
  stacked = stack > 1 or split == [1]
  if split and split != [1 if stacked else 0]:
    layout, want = ("[k, B, ...]", "P(None, 'data')") if stacked else ("[B, ...]", "P('data')")
    raise ValueError(f"prefetch_to_mesh(stack={stack}) yields {layout} batches, but the "
                     f"sharding {spec} partitions axes {split}; partition only the batch "
                     f"axis, e.g. {want}")
  return stacked


def _produce(it, sharding, stack: int, stacked: bool, out: queue.Queue,
             slots: threading.Semaphore, stop: threading.Event):
  """Background thread of DevicePrefetchIterator: puts (global arrays, state after them)."""
  try:
    while True:
      while not slots.acquire(timeout=0.05):
        if stop.is_set():
          return
      if stop.is_set():
        return
      batches = [next(it) for _ in range(stack)]
      local = jax.tree.map(lambda *xs: np.stack(xs), *batches) if stacked else batches[0]
      state = copy.deepcopy(it.get_state())
      # Transfer here, in the background, so host-to-device copies overlap the step.
      out.put((jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), local), state))
  except BaseException as e:  # pylint: disable=broad-except
    out.put((_Raised(e), None))  # StopIteration of a finite iterator included


class DevicePrefetchIterator:
  """Yields global jax.Arrays of (stacked) batches, `size` of them built ahead in a thread.

  get_state()/set_state() refer to the batches the consumer has taken, not those prefetched.
  """

  def __init__(self, it, sharding, size: int = 2, stack: int = 1):
    if size < 1:
      raise ValueError(f"prefetch size={size} must be >= 1 (data.prefetch)")
    if stack < 1:
      raise ValueError(f"stack={stack} must be >= 1 (training.steps_per_dispatch)")
    self._stacked = _stacked_layout(sharding, stack)
    self._it, self._sharding, self._size, self._stack = it, sharding, size, stack
    self._state = copy.deepcopy(it.get_state())
    self._thread = None
    self._start()

  def _start(self):
    self._queue = queue.Queue()
    # One slot per batch built ahead of the consumer: at most `size` exist at any time.
    self._slots = threading.Semaphore(self._size)
    self._stop = threading.Event()
    # The thread gets what it needs, not `self`, so a dropped iterator is garbage collected
    # (and __del__ stops the thread).
    self._thread = threading.Thread(
        target=_produce, name="prefetch_to_mesh", daemon=True,
        args=(self._it, self._sharding, self._stack, self._stacked, self._queue, self._slots,
              self._stop))
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      raise RuntimeError("prefetch_to_mesh iterator was closed")
    item, state = self._queue.get()
    if isinstance(item, _Raised):
      self._queue.put((item, None))  # keep raising on later calls too
      if isinstance(item.error, StopIteration):
        raise StopIteration
      raise item.error
    self._slots.release()
    self._state = state
    return item

  def get_state(self):
    return copy.deepcopy(self._state)

  def set_state(self, state):
    self.close()
    self._it.set_state(copy.deepcopy(state))
    self._state = copy.deepcopy(state)
    self._start()

  def close(self):
    """Stops the background thread and rewinds `it` to just after the batches consumed.

    Batches prefetched but not taken are dropped, so `it` can be read on (or wrapped again)
    without skipping any.
    """
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    self._it.set_state(copy.deepcopy(self._state))

  def __del__(self):
    if getattr(self, "_thread", None) is not None:
      self._stop.set()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def prefetch_to_mesh(it, sharding, size: int = 2, stack: int = 1) -> DevicePrefetchIterator:
  """Wraps a training iterator: global jax.Arrays on `sharding`, prefetched in a thread.

  Args:
    it: an iterator of dicts of np arrays [B_local, ...] with get_state()/set_state()
      (e.g. `create_datasets(...).train_iter`).
    sharding: the sharding of every array of a (stacked) batch: NamedSharding(mesh, P('data'))
      for [B, ...] batches, NamedSharding(mesh, P(None, 'data')) for stacked [k, B, ...]
      ones. Each process passes its local part; the global batch axis is the concatenation
      over processes (jax.make_array_from_process_local_data).
    size: batches built ahead of the consumer (data.prefetch).
    stack: k > 1 stacks k consecutive batches into [k, B, ...] (k optimizer steps per
      compiled call). With stack=1 the sharding picks the layout: P('data') gives [B, ...],
      P(None, 'data') gives [1, B, ...] (so a step that scans over k works for k = 1 too).
  Returns:
    an iterator with get_state()/set_state() referring to the batches taken by the consumer.
  """
  return DevicePrefetchIterator(it, sharding, size=size, stack=stack)
