"""Writes torch.save-style zip checkpoints without torch, for tests.

The pickle is produced the way torch does it (protocol 2, tensors reduced to
`torch._utils._rebuild_tensor_v2`, storages as persistent ids), but the torch
globals are written as bare GLOBAL opcodes, so torch is never imported.

  pkl, storages = dumps_torch({"state_dict": {"w": np.ones((2, 3))}})
  write_torch_zip(path, pkl, storages)
  # or simply: save_torch(path, obj)

`Tensor` / `Storage` express what plain arrays cannot: strides, storage
offsets, storages shared between tensors, and huge storages written in chunks.
`Global` and `Reduce` write arbitrary globals and reduce/BUILD records (e.g.
Lightning callback objects). `op_*` and `checkpoint_pickle_with` assemble raw
opcodes for hand-made data.pkl contents, e.g. malicious payloads.

Files written here load with real `torch.load(p, weights_only=True)` too
(checked by hand with torch 2.13: dtypes, strides, offsets, shared storage).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Iterable, Mapping, Union

import numpy as np

from segldm_jax.convert import torch_writer

# The product's writer knows every real dtype; tests also write complex
# tensors, which the reader must refuse.
STORAGE_NAMES = {
    **torch_writer.STORAGE_CLASSES,
    np.dtype(np.complex64): "ComplexFloatStorage",
    np.dtype(np.complex128): "ComplexDoubleStorage",
}

# A storage's bytes: one buffer, or an iterable of chunks (for big files).
StorageData = Union[bytes, bytearray, memoryview, Iterable[bytes]]


@dataclasses.dataclass(frozen=True)
class Global:
  """A global written by name (GLOBAL opcode); nothing is imported."""
  module: str
  name: str

  @classmethod
  def of(cls, qualified: str) -> "Global":
    module, _, name = qualified.rpartition(".")
    return cls(module, name)

  def __call__(self, *args: Any) -> Any:
    # pickle's save_reduce insists that the reduce function is callable.
    raise TypeError(f"{self} is a stand-in, never called")


@dataclasses.dataclass(eq=False)
class Reduce:
  """Pickled as `func(*args)` (REDUCE), then BUILD with `state` if given."""
  func: Any
  args: tuple = ()
  state: Any = None


@dataclasses.dataclass(eq=False)
class Storage:
  """A torch storage: `data` (1-D array), or `numel` elements of `dtype`
  whose bytes come from `chunks()` (so huge storages need no memory).

  `storage_name` / `declared_numel` override what the pickle says, to write
  corrupt records on purpose; `key` pins the zip entry name.
  """
  data: np.ndarray | None = None
  dtype: Any = None
  numel: int | None = None
  chunks: Callable[[], Iterable[bytes]] | None = None
  storage_name: str | None = None
  declared_numel: int | None = None
  key: str | None = None

  def __post_init__(self) -> None:
    if self.data is not None:
      self.data = np.ascontiguousarray(self.data).reshape(-1)
      self.dtype = self.data.dtype
      self.numel = self.data.size
    self.dtype = np.dtype(self.dtype)

  def payload(self) -> StorageData:
    if self.chunks is not None:
      return self.chunks()
    return self.data.tobytes()


@dataclasses.dataclass(eq=False)
class Tensor:
  """A view of `storage`: offset / size / stride in elements, like torch."""
  storage: Storage
  size: tuple[int, ...]
  stride: tuple[int, ...] | None = None
  offset: int = 0

  def __post_init__(self) -> None:
    self.size = tuple(self.size)
    if self.stride is None:
      self.stride = contiguous_stride(self.size)
    self.stride = tuple(self.stride)

  @classmethod
  def of(cls, array: np.ndarray) -> "Tensor":
    array = np.asarray(array)
    return cls(Storage(array), array.shape)


def contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
  stride, step = [], 1
  for n in reversed(size):
    stride.append(step)
    step *= n
  return tuple(reversed(stride))


REBUILD_TENSOR_V2 = Global("torch._utils", "_rebuild_tensor_v2")


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, which lets us write GLOBALs for names that do
  not exist here (the C pickler insists on importing them)."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file: io.BytesIO, protocol: int) -> None:
    super().__init__(file, protocol=protocol)
    self.storage_keys: dict[int, str] = {}
    self.storages: dict[str, StorageData] = {}

  def _save_marker_global(self, obj: Global) -> None:
    if self.proto >= 4:
      self.save(obj.module)
      self.save(obj.name)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[Global] = _save_marker_global

  def persistent_id(self, obj: Any) -> Any:
    if not isinstance(obj, Storage):
      return None
    key = self.storage_keys.get(id(obj))
    if key is None:
      key = obj.key if obj.key is not None else str(len(self.storage_keys))
      self.storage_keys[id(obj)] = key
      self.storages[key] = obj.payload()
    name = obj.storage_name or STORAGE_NAMES[obj.dtype]
    numel = obj.numel if obj.declared_numel is None else obj.declared_numel
    return ("storage", Global("torch", name), key, "cpu", numel)

  def reducer_override(self, obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
      obj = Tensor.of(obj)
    if isinstance(obj, Tensor):
      return (REBUILD_TENSOR_V2, (obj.storage, obj.offset, obj.size,
                                  obj.stride, False,
                                  collections.OrderedDict()))
    if isinstance(obj, Reduce):
      return (obj.func, tuple(obj.args), obj.state)
    return NotImplemented


def dumps_torch(obj: Any,
                protocol: int = 2) -> tuple[bytes, dict[str, StorageData]]:
  """Pickles `obj` like torch.save: numpy arrays / `Tensor`s become tensors.

  Returns:
    (data.pkl bytes, {storage key: bytes or chunk iterable}).
  """
  buf = io.BytesIO()
  pickler = _TorchPickler(buf, protocol)
  pickler.dump(obj)
  return buf.getvalue(), pickler.storages


def write_torch_zip(path: str | os.PathLike[str], obj_pickle_bytes: bytes,
                    storages: Mapping[str, StorageData], *,
                    prefix: str = "archive", byteorder: str | None = "little",
                    compress: bool = False, align: int = 64,
                    include_pickle: bool = True) -> None:
  """Writes the zip layout of torch.save (torch 2: data aligned to 64 bytes).

  Args:
    path: output file.
    obj_pickle_bytes: contents of `<prefix>/data.pkl`.
    storages: `<prefix>/data/<key>` contents; chunk iterables are streamed.
    prefix: top folder ('archive' before torch 2, the file stem after).
    byteorder: contents of `<prefix>/byteorder`; None leaves it out.
    compress: deflate entries (torch never does; exercises the fallback).
    align: data alignment of stored entries (0 or 1: none).
    include_pickle: False leaves out data.pkl (a broken file).
  """
  method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", method) as zf:

    def add(name: str, data: StorageData) -> None:
      info = zipfile.ZipInfo(f"{prefix}/{name}",
                             date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = method
      streamed = not isinstance(data, (bytes, bytearray, memoryview))
      if not streamed:
        info.file_size = len(data)
      # zipfile adds a 20-byte zip64 extra when streaming (size unknown).
      zip64 = streamed or info.file_size * 1.05 > zipfile.ZIP64_LIMIT
      if align > 1 and not compress:
        header = 30 + len(info.filename.encode("utf-8")) + (20 if zip64 else 0)
        pad = (-(f.tell() + header + 4)) % align
        # Padding in an extra field, like torch's writer ("FB" record).
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
      with zf.open(info, "w", force_zip64=zip64) as out:
        if streamed:
          for chunk in data:
            out.write(chunk)
        else:
          out.write(data)

    if include_pickle:
      add("data.pkl", obj_pickle_bytes)
    if byteorder is not None:
      add("byteorder", byteorder.encode())
    for key, data in storages.items():
      add(f"data/{key}", data)
    add("version", b"3\n")


def save_torch(path: str | os.PathLike[str], obj: Any, **kwargs: Any) -> None:
  """`dumps_torch` + `write_torch_zip`; kwargs go to the latter."""
  pkl, storages = dumps_torch(obj)
  write_torch_zip(path, pkl, storages, **kwargs)


# ---------------------------------------------------------------------------
# Raw pickle opcodes, for hand-made (e.g. malicious) data.pkl contents.
# ---------------------------------------------------------------------------


def op_str(text: str) -> bytes:
  """Pushes a str (BINUNICODE)."""
  raw = text.encode("utf-8")
  return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def op_global(qualified: str, stack: bool = False) -> bytes:
  """Pushes the global `module.name`: GLOBAL (protocol 2, what torch writes)
  or STACK_GLOBAL (protocol 4)."""
  module, _, name = qualified.rpartition(".")
  if stack:
    return op_str(module) + op_str(name) + pickle.STACK_GLOBAL
  return pickle.GLOBAL + f"{module}\n{name}\n".encode("utf-8")


def op_tuple(*items: bytes) -> bytes:
  """Pushes a tuple of the values the given opcodes push."""
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_call(func: bytes, *args: bytes) -> bytes:
  """Pushes `func(*args)` (REDUCE); func/args are opcode snippets."""
  return func + op_tuple(*args) + pickle.REDUCE


def checkpoint_pickle_with(value: bytes, protocol: int = 2) -> bytes:
  """data.pkl for `{'state_dict': {}, 'x': <value>}`; value is opcodes."""
  return b"".join([
      pickle.PROTO, bytes([protocol]), pickle.EMPTY_DICT,
      op_str("state_dict"), pickle.EMPTY_DICT, pickle.SETITEM,
      op_str("x"), value, pickle.SETITEM, pickle.STOP,
  ])
