"""Writes `torch.save` zip checkpoints from numpy, without torch.

The pickle is emitted opcode by opcode rather than by `pickle.Pickler`, so
what it can name is fixed here: `torch._utils._rebuild_tensor_v2`, the
`torch.*Storage` classes and `collections.OrderedDict`, nothing else. That is
what `torch.load(..., weights_only=True)` accepts, and what our own reader
(`torch_io`) rebuilds. Values may be dicts and OrderedDicts (a state_dict is
one), lists, tuples, str, int, float, bool, None and numpy arrays (written
as contiguous CPU tensors, one storage each).

The zip layout is torch's: `archive/data.pkl`, `archive/byteorder`,
`archive/data/<key>` (stored, each aligned to 64 bytes like torch >= 2
writes them, so `torch.load(mmap=True)` works) and `archive/version`.

  save("model.ckpt", {"state_dict": OrderedDict(w=np.ones((2, 3), np.float32))})
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# numpy dtype -> the storage class torch pickles for it.
STORAGE_CLASSES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
_ALIGN = 64  # torch's kFieldAlignment
_PREFIX = "archive"


class _Emitter:
  """Pickle protocol 2 opcodes for plain values; arrays become tensors whose
  bytes are collected in `storages` (key -> array)."""

  def __init__(self):
    self.out = bytearray(pickle.PROTO + b"\x02")
    self.storages: dict[str, np.ndarray] = {}

  def _global(self, module: str, name: str) -> None:
    self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")

  def _str(self, text: str) -> None:
    raw = text.encode("utf-8")
    self.out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw

  def _int(self, n: int) -> None:
    if 0 <= n < 256:
      self.out += pickle.BININT1 + bytes([n])
    elif -2**31 <= n < 2**31:
      self.out += pickle.BININT + struct.pack("<i", n)
    else:
      raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
      self.out += pickle.LONG1 + bytes([len(raw)]) + raw

  def _tuple(self, items) -> None:
    self.out += pickle.MARK
    for item in items:
      self.value(item)
    self.out += pickle.TUPLE

  def _ordered_dict(self, items) -> None:
    self._global("collections", "OrderedDict")
    self.out += pickle.EMPTY_TUPLE + pickle.REDUCE
    self._setitems(items)

  def _setitems(self, items) -> None:
    items = list(items)
    if items:
      self.out += pickle.MARK
      for key, value in items:
        self.value(key)
        self.value(value)
      self.out += pickle.SETITEMS

  def _tensor(self, array: np.ndarray) -> None:
    if array.dtype not in STORAGE_CLASSES:
      raise TypeError(f"no torch storage for dtype {array.dtype}")
    key = str(len(self.storages))
    self.storages[key] = array
    stride, step = [], 1
    for n in reversed(array.shape):
      stride.insert(0, step)
      step *= n
    self._global("torch._utils", "_rebuild_tensor_v2")
    self.out += pickle.MARK
    # The storage, as torch's persistent id: ('storage', class, key,
    # location, numel).
    self.out += pickle.MARK
    self._str("storage")
    self._global("torch", STORAGE_CLASSES[array.dtype])
    self._str(key)
    self._str("cpu")
    self._int(array.size)
    self.out += pickle.TUPLE + pickle.BINPERSID
    self._int(0)  # storage offset
    self._tuple(array.shape)
    self._tuple(stride)
    self.out += pickle.NEWFALSE  # requires_grad
    self._ordered_dict([])  # backward hooks
    self.out += pickle.TUPLE + pickle.REDUCE

  def value(self, obj: Any) -> None:
    if obj is None:
      self.out += pickle.NONE
    elif isinstance(obj, (bool, np.bool_)):
      self.out += pickle.NEWTRUE if obj else pickle.NEWFALSE
    elif isinstance(obj, (int, np.integer)):
      self._int(int(obj))
    elif isinstance(obj, (float, np.floating)):
      self.out += pickle.BINFLOAT + struct.pack(">d", float(obj))
    elif isinstance(obj, str):
      self._str(obj)
    elif isinstance(obj, np.ndarray):
      self._tensor(obj)
    elif isinstance(obj, collections.OrderedDict):
      self._ordered_dict(list(obj.items()))
    elif isinstance(obj, dict):
      self.out += pickle.EMPTY_DICT
      self._setitems(obj.items())
    elif isinstance(obj, tuple):
      self._tuple(obj)
    elif isinstance(obj, list):
      self.out += pickle.EMPTY_LIST
      if obj:
        self.out += pickle.MARK
        for item in obj:
          self.value(item)
        self.out += pickle.APPENDS
    else:
      raise TypeError(f"cannot write a {type(obj).__name__} into a torch "
                      "checkpoint (plain containers and arrays only)")


def dumps(obj: Any) -> tuple[bytes, dict[str, np.ndarray]]:
  """-> (data.pkl bytes, {storage key: array}) for `obj`."""
  emitter = _Emitter()
  emitter.value(obj)
  emitter.out += pickle.STOP
  return bytes(emitter.out), emitter.storages


def _little_endian_bytes(array: np.ndarray) -> memoryview:
  array = np.ascontiguousarray(array)
  if array.dtype.byteorder == ">" or (array.dtype.byteorder == "="
                                      and sys.byteorder == "big"):
    array = array.astype(array.dtype.newbyteorder("<"))
  return memoryview(array.reshape(-1).view(np.uint8))


def save(path: str | os.PathLike[str], obj: Any) -> pathlib.Path:
  """Writes `obj` to `path` in torch.save's zip format; returns the path.

  Raises:
    TypeError: `obj` holds something other than plain values and arrays.
    OSError: the file cannot be written.
  """
  path = pathlib.Path(path)
  data_pkl, storages = dumps(obj)
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED,
                                               allowZip64=True) as zf:

    def add(name: str, data) -> None:
      info = zipfile.ZipInfo(f"{_PREFIX}/{name}",
                             date_time=(1980, 1, 1, 0, 0, 0))
      info.file_size = len(data)
      zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
      # Pad the local header's extra field so the data starts on a multiple
      # of 64 bytes, as torch's writer does (its "FB" record).
      header = 30 + len(info.filename) + (20 if zip64 else 0)
      pad = -(f.tell() + header + 4) % _ALIGN
      info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
      with zf.open(info, "w", force_zip64=zip64) as entry:
        entry.write(data)

    add("data.pkl", data_pkl)
    add("byteorder", b"little")
    for key, array in storages.items():
      add(f"data/{key}", _little_endian_bytes(array))
    add("version", b"3\n")
  return path
