"""Reads PyTorch `.pt` / `.pth` / `.bin` state dicts into numpy arrays, without PyTorch.

`torch.save` (PyTorch >= 1.6) writes a zip archive:
  <name>/data.pkl     a pickle of the object; every tensor is a call
                      torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) whose
                      storage is a persistent id ('storage', torch.<Type>Storage, key, location,
                      numel) naming the file below
  <name>/data/<key>   the raw bytes of each storage
  <name>/byteorder    'little' or 'big' (absent in older files: little)
The unpickler here resolves only the handful of globals such a file needs (the tensor and
parameter rebuild functions, the storage types, OrderedDict) and builds numpy arrays from the
storages, honouring offset, size, stride, dtype and byte order. Any other global (pickled code:
`os.system`, a model class, ...) is refused before it is called, so loading never runs code from
the file.
"""
import collections
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping

import ml_dtypes
import numpy as np

from ddpm.errors import UserError

# torch storage type -> numpy dtype (byte order applied when the archive is read).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _StorageType:
  """Stands for torch.<Type>Storage inside the pickle: only its dtype is used."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2 for numpy: a copy of the strided view of `storage`."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise _Malformed(f"tensor with size {size} but stride {stride}")
  if any(s < 0 for s in size + stride) or storage_offset < 0:
    raise _Malformed(f"tensor with negative size, stride or offset ({size}, {stride}, "
                     f"{storage_offset})")
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else -1
  if last >= storage.size:
    raise _Malformed(f"tensor of size {size}, stride {stride} at offset {storage_offset} reads "
                     f"past its storage of {storage.size} elements")
  if not all(size):
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)  # own the memory (and native byte order, see _load_storage)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  del requires_grad, backward_hooks, state
  return data


class _Malformed(Exception):
  """The pickle is not a state dict of plain tensors."""


class _Refused(Exception):
  def __init__(self, global_name: str):
    super().__init__(global_name)
    self.global_name = global_name


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Unpickles data.pkl of a torch zip archive; storages come from `load_storage(key, dtype)`."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise _Refused(f"{module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise _Malformed(f"unknown persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      self._storages[key] = self._load_storage(str(key), storage_type.dtype, int(numel))
    return self._storages[key]


def load(path: str) -> Any:
  """Unpickles the torch file at `path` with tensors as numpy arrays (nothing executed).

  Raises:
    UserError: missing, truncated or foreign file, a pre-1.6 (non-zip) torch file, or a pickle
      holding anything but tensors and containers (names the refused global).
  """
  if not os.path.isfile(path):
    raise UserError(f"no such file: {path}")
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    with open(path, "rb") as f:
      head = f.read(2)
    kind = ("a pre-1.6 PyTorch file (not a zip archive): re-save it with a recent torch.save"
            if head == b"\x80\x02" else "not a PyTorch zip archive (truncated or another format)")
    raise UserError(f"cannot read {path}: {kind}") from None
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise UserError(f"cannot read {path}: a zip archive but not a PyTorch file (expected one "
                      f"data.pkl, found {len(pickles)})")
    prefix = pickles[0][:-len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise UserError(f"cannot read {path}: unknown byteorder record {order!r}")

    def load_storage(key, dtype, numel):
      name = f"{prefix}data/{key}"
      if name not in names:
        raise _Malformed(f"storage {key} is missing from the archive")
      raw = archive.read(name)
      dtype = dtype.newbyteorder("<" if order == "little" else ">")
      if len(raw) < numel * dtype.itemsize:
        raise _Malformed(f"storage {key} holds {len(raw)} bytes, expected {numel} elements of "
                         f"{dtype.itemsize} bytes")
      return np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))

    try:
      with archive.open(pickles[0]) as f:
        return _Unpickler(f, load_storage).load()
    except _Refused as e:
      raise UserError(f"refusing to load {path}: its pickle references {e.global_name}, which "
                      "is not a tensor or a dict (the file may hold code; only state dicts are "
                      "read)") from None
    except _Malformed as e:
      raise UserError(f"cannot read {path}: {e}") from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, KeyError,
            TypeError, IndexError, AttributeError, OSError) as e:
      raise UserError(f"cannot read {path}: corrupt PyTorch file ({type(e).__name__}: "
                      f"{str(e)[:200]})") from None


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """`load(path)` checked to be a flat state dict {name: array}, e.g. model.state_dict()."""
  obj = load(path)
  if not isinstance(obj, Mapping):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = next((k for k, v in obj.items()
              if not isinstance(k, str) or not isinstance(v, np.ndarray)), None)
  if bad is not None:
    raise UserError(f"{path} is not a flat state dict of tensors: entry {bad!r} is a "
                    f"{type(obj[bad]).__name__}")
  return dict(obj)
