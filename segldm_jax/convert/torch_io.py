"""Reads `torch.save` checkpoints into numpy without importing torch.

Only the zip format (torch >= 1.6; `.ckpt`, `.pt`, `.pth`) is supported. The
pickle inside is run by a restricted unpickler: it rebuilds tensors and plain
containers with functions of this module and never imports or calls anything
named in the file. Known-harmless metadata classes (Lightning callbacks,
OmegaConf configs, `argparse.Namespace`, ...) come back as inert
`ForeignObject` placeholders; every other global is refused.

Tensors come back as read-only numpy arrays that are views of a memory map of
the file (torch stores zip entries uncompressed), so loading costs no more
memory than the pages actually read. Copy an array (`np.array(a)`) if you need
it writable or want to close the file.

Every zip entry the reader uses is checked against its CRC-32, the storages
too: streamed over the map in chunks whose pages are let go of at once, so a
flipped bit on disk or in a download is refused in one line naming the entry
and its tensor, never loaded.

  sd = load_state_dict("model.ckpt")     # {"model.diffusion_model...": ndarray}
  ckpt = load_checkpoint("model.ckpt")   # the whole unpickled object
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from segldm_jax import errors
from segldm_jax import formatting

# ISA-L's CRC-32: the same checksum, several times zlib's speed (BENCHMARKS.md,
# "CRC-32 of torch zips").
try:
  from isal.isal_zlib import crc32 as _crc32  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  _crc32 = zlib.crc32

__all__ = [
    "CheckpointError",
    "ForeignObject",
    "NumpyDtype",
    "flatten_module",
    "load_checkpoint",
    "load_state_dict",
    "load_torchscript",
]

# Storage class names torch writes (module `torch`, or `torch.cuda` for tensors
# saved from a GPU by torch < 1.13) -> element dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_UNTYPED_STORAGE_NAMES = ("UntypedStorage", "_UntypedStorage")

# `torch.<dtype>` globals (pickled by name) used by `_rebuild_tensor_v3`.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
_ALLOWED_DTYPES = frozenset(_STORAGE_DTYPES.values()) | frozenset(
    _TORCH_DTYPES.values())

# Module prefixes whose globals are metadata only: they become inert
# placeholders (never imported, never called).
_PLACEHOLDER_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric",
                        "omegaconf", "typing")
_PLACEHOLDER_GLOBALS = frozenset({
    "argparse.Namespace",
    # numpy arrays inside metadata: kept as raw (inert) reduce/BUILD records.
    "numpy.ndarray",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
})

# Python 2 names that protocol-2 pickles use; the default find_class maps
# them, but overriding find_class bypasses that mapping.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_LEGACY_MAGIC = (0x1950a86a20f9469cfc6c).to_bytes(10, "little")
_MAX_PICKLE_BYTES = 1 << 30  # data.pkl of a state_dict is KBs to a few MB.
_MAX_TENSOR_NUMEL = 1 << 40  # Guards stride-0 views against absurd sizes.
_MAX_NDIM = 64
_CRC_CHUNK = 8 << 20  # Bytes checksummed at a time, then let go of.


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint cannot be read; the message is one line naming the file."""


class _Problem(Exception):
  """Internal: what is wrong, without the file name (added at the top)."""


def _printable(text: Any, limit: int = 200) -> str:
  """What the file says, kept short in our one-line messages."""
  return formatting.printable(text, limit)


def _short_repr(obj: Any) -> str:
  """Repr that cannot recurse: containers are summarised by type."""
  if isinstance(obj, (str, bytes, int, float, bool, type(None))):
    return _printable(repr(obj), 60)
  return type(obj).__name__


# ----------------------------------------------------------------------------
# Inert stand-ins for what the pickle may name.
# ----------------------------------------------------------------------------


class ForeignObject:
  """Inert record of an object whose class the checkpoint names.

  Used for harmless metadata (Lightning callbacks, OmegaConf nodes, ...). The
  real class is never imported: one subclass per global records its name in
  `foreign_module` / `foreign_name`, and instances keep what the pickle gave
  them (`args`, `kwargs`, `state`, `items` from SETITEMS, `list_items`).
  """

  foreign_module = ""
  foreign_name = ""

  def __new__(cls, *args: Any, **kwargs: Any) -> "ForeignObject":
    # NEWOBJ calls cls.__new__ without __init__, REDUCE calls cls(...): both
    # end up here, so record the arguments here.
    self = object.__new__(cls)
    self.args = args
    self.kwargs = kwargs
    self.state = None
    self.items = {}
    self.list_items = []
    return self

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    del args, kwargs  # Recorded by __new__.

  def __setstate__(self, state: Any) -> None:
    # Defining it keeps pickle's BUILD from calling setattr on our attributes.
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.items[key] = value

  def append(self, value: Any) -> None:
    self.list_items.append(value)

  def extend(self, values: Any) -> None:
    self.list_items.extend(values)

  @classmethod
  def qualified_name(cls) -> str:
    return f"{cls.foreign_module}.{cls.foreign_name}"

  def __repr__(self) -> str:
    return f"<ForeignObject {_printable(self.qualified_name())}>"


class _Frozen:
  """Base for internal markers: immutable, so a BUILD opcode cannot alter
  e.g. the dtype a storage class stands for."""

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise _Problem(f"pickle tries to modify internal object {self!r}")


class _NamedDtype(_Frozen):
  """A torch global that names a dtype: `torch.<name>`."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype) -> None:
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", dtype)

  def __repr__(self) -> str:
    return f"<torch.{self.name}>"


class _StorageType(_NamedDtype):
  """Stands for `torch.FloatStorage` & co. in a persistent id."""

  __slots__ = ()


class _TorchDtype(_NamedDtype):
  """Stands for a `torch.float32`-style dtype global."""

  __slots__ = ()


class _TorchClass(_Frozen):
  """Stands for `torch.Tensor` / `torch.nn.Parameter` (a tensor's type)."""

  __slots__ = ("name",)

  def __init__(self, name: str) -> None:
    object.__setattr__(self, "name", name)

  def __repr__(self) -> str:
    return f"<{self.name}>"


class _Storage(_Frozen):
  """One storage record: `elems` is a 1-D view of its `numel` elements
  (already in native byte order); `big_endian` says how the file stores it."""

  __slots__ = ("key", "dtype", "numel", "elems", "big_endian")

  def __init__(self, key: str, dtype: np.dtype, numel: int,
               elems: np.ndarray, big_endian: bool) -> None:
    object.__setattr__(self, "key", key)
    object.__setattr__(self, "dtype", dtype)
    object.__setattr__(self, "numel", numel)
    object.__setattr__(self, "elems", elems)
    object.__setattr__(self, "big_endian", big_endian)

  def __repr__(self) -> str:
    return f"<storage {self.key!r} {self.dtype} x{self.numel}>"


class NumpyDtype:
  """Safe stand-in for a pickled `numpy.dtype` (numeric kinds only).

  numpy's own `dtype.__setstate__` would be handed file contents (and can
  mutate the shared built-in dtype objects), so the state is parsed here.
  """

  _SPEC = re.compile(r"[<>=|]?[biufc]\d{1,2}")

  def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
    del align, copy  # Irrelevant for the plain numeric dtypes allowed here.
    if not (isinstance(spec, str) and self._SPEC.fullmatch(spec)):
      raise _Problem(
          f"pickle holds numpy dtype {_short_repr(spec)}; only plain numeric "
          "dtypes are supported")
    try:
      self.dtype = np.dtype(spec)
    except TypeError as err:
      raise _Problem(f"bad numpy dtype {_short_repr(spec)}") from err

  def __setstate__(self, state: Any) -> None:
    # numpy's state: (version, byteorder, subarray, names, fields, ...).
    if (isinstance(state, tuple) and len(state) >= 2 and
        state[1] in ("<", ">", "=", "|")):
      if state[1] in "<>":
        self.dtype = self.dtype.newbyteorder(state[1])
      return
    raise _Problem(f"bad numpy dtype state {_short_repr(state)}")

  def __repr__(self) -> str:
    return f"NumpyDtype({self.dtype.str!r})"


def _numpy_scalar(dtype: Any, data: Any = None) -> np.generic:
  """Safe `numpy.core.multiarray.scalar`: decodes the raw bytes ourselves."""
  if not isinstance(dtype, NumpyDtype):
    raise _Problem(f"numpy scalar with dtype {_short_repr(dtype)}")
  if isinstance(data, str):  # Protocol 0/1 pickles pass latin-1 text.
    data = data.encode("latin-1")
  if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
    raise _Problem(f"numpy scalar of {dtype.dtype} with bad data "
                   f"{_short_repr(data)}")
  return np.frombuffer(data, dtype=dtype.dtype)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
  """Safe `_codecs.encode`, which protocol 2 uses to pickle bytes."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Problem("pickle calls _codecs.encode with unexpected arguments")
  return text.encode("latin-1")


def _safe_bytes_factory(kind: type) -> Callable[..., Any]:
  """`bytes` / `bytearray` minus the `bytes(n)` form (a huge allocation)."""

  def make(source: Any = b"", encoding: Any = None) -> Any:
    if isinstance(source, str) and encoding in ("latin1", "latin-1"):
      return kind(source, "latin-1")
    if isinstance(source, (bytes, bytearray, list)) and encoding is None:
      return kind(source)
    raise _Problem(f"pickle calls {kind.__name__} with unexpected arguments")

  return make


def _safe_container_factory(kind: type) -> Callable[..., Any]:
  """Container constructors that refuse to iterate tensors: iterating a
  stride-0 view of 2**40 elements would hang."""

  def make(*args: Any, **kwargs: Any) -> Any:
    if any(isinstance(a, np.ndarray) for a in (*args, *kwargs.values())):
      raise _Problem(
          f"pickle builds a {kind.__name__} from a tensor; refusing")
    return kind(*args, **kwargs)

  make.__name__ = kind.__name__
  return make


def _torch_device(kind: Any, index: Any = None) -> str:
  """`torch.device(...)` as a plain string like 'cuda:0'."""
  if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
    raise _Problem("pickle calls torch.device with unexpected arguments")
  return kind if index is None else f"{kind}:{index}"


_SAFE_BUILTINS: dict[str, Any] = {
    "set": _safe_container_factory(set),
    "frozenset": _safe_container_factory(frozenset),
    "list": _safe_container_factory(list),
    "tuple": _safe_container_factory(tuple),
    "dict": _safe_container_factory(dict),
    "bytes": _safe_bytes_factory(bytes),
    "bytearray": _safe_bytes_factory(bytearray),
    "complex": complex,
    "slice": slice,
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
}
_ORDERED_DICT = _safe_container_factory(collections.OrderedDict)

# ----------------------------------------------------------------------------
# Tensor reconstruction.
# ----------------------------------------------------------------------------


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or len(value) > _MAX_NDIM:
    raise _Problem(f"tensor {what} is {_short_repr(value)}, not a tuple")
  for v in value:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise _Problem(f"tensor {what} {_printable(value)} has a bad entry")
  return tuple(value)


def _make_tensor(storage: Any, elems: np.ndarray, offset: Any, size: Any,
                 stride: Any) -> np.ndarray:
  """View `elems` (1-D) as a tensor, checking it stays inside the storage."""
  if elems.dtype not in _ALLOWED_DTYPES:  # Never e.g. object: bytes != refs.
    raise _Problem(f"storage {storage.key!r} has dtype {elems.dtype}")
  if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
    raise _Problem(f"tensor on storage {storage.key!r} has storage_offset "
                   f"{_short_repr(offset)}")
  size = _int_tuple(size, "size")
  stride = _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise _Problem(f"tensor on storage {storage.key!r} has size {size} but "
                   f"stride {stride}")
  numel = math.prod(size)
  if numel == 0:
    return elems[:0].reshape(size)
  if numel > _MAX_TENSOR_NUMEL:
    raise _Problem(f"tensor on storage {storage.key!r} declares {numel} "
                   "elements; refusing absurd size")
  end = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
  if end > elems.size:
    raise _Problem(
        f"tensor of size {size}, stride {stride}, offset {offset} reaches "
        f"element {end - 1} of storage {storage.key!r}, which has only "
        f"{elems.size} elements; the file is corrupt")
  expected, contiguous = 1, True
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      contiguous = False
    expected *= n
  if contiguous:
    return elems[offset:offset + numel].reshape(size)
  itemsize = elems.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      elems[offset:], shape=size, strides=tuple(s * itemsize for s in stride),
      writeable=False)


def _check_storage(storage: Any) -> _Storage:
  if not isinstance(storage, _Storage):
    raise _Problem(f"tensor is built on {_short_repr(storage)}, not a storage")
  return storage


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any,
                       stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
  """Our `torch._utils._rebuild_tensor_v2`: a typed storage view."""
  del requires_grad, backward_hooks, metadata  # Autograd-only information.
  storage = _check_storage(storage)
  return _make_tensor(storage, storage.elems, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any,
                       stride: Any, requires_grad: Any, backward_hooks: Any,
                       dtype: Any, metadata: Any = None) -> np.ndarray:
  """Our `torch._utils._rebuild_tensor_v3`: untyped storage + a dtype."""
  del requires_grad, backward_hooks, metadata
  storage = _check_storage(storage)
  if not isinstance(dtype, _TorchDtype):
    raise _Problem(f"tensor dtype is {_short_repr(dtype)}, not a torch dtype")
  raw = storage.elems.view(np.uint8)
  usable = raw.size - raw.size % dtype.dtype.itemsize
  elems = raw[:usable].view(dtype.dtype)
  if storage.big_endian and dtype.dtype.itemsize > 1:
    elems = _from_big_endian(elems)
  return _make_tensor(storage, elems, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False,
                       backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
  """Our `torch._utils._rebuild_parameter[_with_state]`: the data itself."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise _Problem(f"parameter wraps {_short_repr(data)}, not a tensor")
  return data


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type(func: Any, new_type: Any, args: Any,
                       state: Any = None) -> np.ndarray:
  """Our `torch._tensor._rebuild_from_type[_v2]` (tensor subclasses or
  tensors with Python attributes): rebuilds the plain tensor, drops the rest."""
  del state
  # Identity, not `in`: `==` on a tensor argument would compare elements.
  if (not any(func is r for r in _REBUILDERS) or
      not isinstance(new_type, _TorchClass)):
    raise _Problem(f"tensor rebuilt by {_short_repr(func)} as "
                   f"{_short_repr(new_type)}; refusing")
  if not isinstance(args, tuple):
    raise _Problem("tensor rebuild arguments are not a tuple")
  return func(*args)


_TORCH_FUNCTIONS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type": _rebuild_from_type,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": _safe_container_factory(tuple),
    "torch.device": _torch_device,
    "torch.Tensor": _TorchClass("torch.Tensor"),
    "torch._tensor.Tensor": _TorchClass("torch.Tensor"),
    "torch.nn.parameter.Parameter": _TorchClass("torch.nn.Parameter"),
    "torch.nn.parameter.Buffer": _TorchClass("torch.nn.Buffer"),
}
_OTHER_FUNCTIONS: dict[str, Any] = {
    "collections.OrderedDict": _ORDERED_DICT,
    "numpy.dtype": NumpyDtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "_codecs.encode": _codecs_encode,
}

# ----------------------------------------------------------------------------
# The archive and the unpickler.
# ----------------------------------------------------------------------------


class _Archive:
  """The zip file: finds entries and maps storages without copying."""

  def __init__(self, zf: zipfile.ZipFile, mm: mmap.mmap | bytes, prefix: str,
               big_endian: bool) -> None:
    self._zf = zf
    self._mm = mm
    self._prefix = prefix
    self._big_endian = big_endian
    self._raw: dict[str, np.ndarray] = {}
    self._storages: dict[tuple[str, np.dtype], _Storage] = {}
    # key -> (entry name, its CRC-32, its offset in the file if mapped)
    self._crcs: dict[str, tuple[str, int, int | None]] = {}

  def _raw_bytes(self, key: str) -> np.ndarray:
    """The bytes of entry `data/<key>` as a uint8 array (a map, if STORED);
    checked against the entry's CRC-32 by `verify`, once unpickled."""
    if key in self._raw:
      return self._raw[key]
    name = f"{self._prefix}data/{key}"
    try:
      info = self._zf.getinfo(name)
    except KeyError:
      raise _Problem(
          f"storage {key!r} points to missing zip entry {name!r}; the file is "
          "incomplete or corrupt, re-download or re-save it") from None
    if info.compress_type == zipfile.ZIP_STORED:
      start = self._data_offset(info)
      if start + info.file_size > len(self._mm):
        raise _Problem(f"zip entry {name!r} runs past the end of the file; "
                       "the file is truncated, re-download it")
      raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.file_size,
                          offset=start)
      offset = start
    else:
      # Not written by torch, but legal zip: read (and decompress) it. Its
      # CRC is checked by `verify` like a stored entry's, so that a mismatch
      # names the tensor.
      try:
        with self._zf.open(name) as entry:
          entry._expected_crc = None  # pylint: disable=protected-access
          raw = np.frombuffer(entry.read(), dtype=np.uint8)
        offset = None
      except (zipfile.BadZipFile, zlib.error, OSError, EOFError,
              NotImplementedError, RuntimeError) as err:  # RuntimeError:
        # an encrypted entry; NotImplementedError: unknown compression.
        raise _Problem(f"zip entry {name!r} is corrupt ({_printable(err)}); "
                       "re-download or re-save the checkpoint") from None
    self._raw[key] = raw
    self._crcs[key] = (name, info.CRC, offset)
    return raw

  def _release(self, offset: int | None, start: int, stop: int) -> None:
    """Drops the mapped pages of file bytes [offset + start, offset + stop)
    from this process's memory (the page cache keeps them), so checksumming
    leaves no more of the file resident than before. `offset` None: the
    entry is not in the map (decompressed), nothing to drop."""
    if offset is None or isinstance(self._mm, bytes):
      return
    lo = (offset + start) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(offset + stop, len(self._mm))
    try:
      self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError, AttributeError):  # not on every system
      pass

  def verify(self, obj: Any) -> None:
    """Checks every storage entry read against its CRC-32, streamed.

    A mismatch names the entry and the first tensor of `obj` that views it.
    """
    for key, raw in self._raw.items():
      name, expected, offset = self._crcs[key]
      view = memoryview(raw)  # the map itself: no copy, pages read in turn
      crc = 0
      for start in range(0, raw.size, _CRC_CHUNK):
        crc = _crc32(view[start:start + _CRC_CHUNK], crc)
        self._release(offset, start, start + _CRC_CHUNK)
      if crc != expected:
        tensor = _tensor_on(obj, self._spans(key))
        held = f" (tensor {_printable(tensor, 120)!r})" if tensor else ""
        raise _Problem(
            f"zip entry {name!r}{held} fails its CRC-32 check (stored "
            f"{expected:08x}, read {crc:08x}): the file is corrupt, "
            "re-download or re-save it")

  def _spans(self, key: str) -> list[tuple[int, int]]:
    """Address ranges holding storage `key`'s elements (the mapped entry,
    and the native copies of a big-endian file)."""
    arrays = [self._raw[key]] + [s.elems for (k, _), s in self._storages.items()
                                 if k == key]
    return [(a.__array_interface__["data"][0],
             a.__array_interface__["data"][0] + a.nbytes) for a in arrays]

  def _data_offset(self, info: zipfile.ZipInfo) -> int:
    """Start of an entry's data: after its local header (whose extra field
    differs from the central directory's, e.g. torch's alignment padding)."""
    header = self._mm[info.header_offset:info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
      raise _Problem(f"bad local zip header for {info.filename!r}; the file is "
                     "corrupt, re-download it")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
    cached = self._storages.get((key, dtype))
    if cached is not None:
      if cached.numel != numel:
        raise _Problem(f"storage {key!r} is declared with {cached.numel} and "
                       f"{numel} elements")
      return cached
    raw = self._raw_bytes(key)
    nbytes = numel * dtype.itemsize
    if nbytes > raw.size:
      raise _Problem(
          f"storage {key!r} declares {numel} {dtype} elements ({nbytes} "
          f"bytes) but its zip entry holds {raw.size} bytes; the file is "
          "corrupt or truncated")
    elems = raw[:nbytes].view(dtype)
    if self._big_endian and dtype.itemsize > 1:
      elems = _from_big_endian(elems)
    storage = _Storage(key, dtype, numel, elems, self._big_endian)
    self._storages[(key, dtype)] = storage
    return storage


def _tensor_on(obj: Any, spans: list[tuple[int, int]]) -> str | None:
  """Where in `obj` the first tensor inside `spans` sits: its state_dict
  key, or a '/'-joined path outside the state_dict; None if none does.
  Each container is visited once (pickles may share or nest them)."""
  seen: set[int] = set()
  stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, ())]
  while stack:
    node, path = stack.pop()
    if isinstance(node, np.ndarray):
      if node.size:
        address = node.__array_interface__["data"][0]
        if any(lo <= address < hi for lo, hi in spans):
          if path[:1] == ("state_dict",) and len(path) > 1:
            path = path[1:]
          return "/".join(str(p) for p in path)
      continue
    if id(node) in seen:
      continue
    seen.add(id(node))
    if isinstance(node, Mapping):
      children = list(node.items())
    elif isinstance(node, (list, tuple)):
      children = list(enumerate(node))
    elif isinstance(node, ForeignObject):
      children = [("args", node.args), ("kwargs", node.kwargs),
                  ("state", node.state), ("items", node.items),
                  ("list_items", node.list_items)]
    else:
      continue
    stack.extend((v, path + (k,)) for k, v in reversed(children))
  return None


def _from_big_endian(elems: np.ndarray) -> np.ndarray:
  """Native copy of big-endian data (torch on s390x); not lazy."""
  dtype = elems.dtype
  if dtype.kind in "biufc":  # numpy knows how to swap these, complex too.
    return elems.view(dtype.newbyteorder(">")).astype(dtype)
  # ml_dtypes (bfloat16, float8): swap as unsigned ints of the same width.
  uint = np.dtype(f"u{dtype.itemsize}")
  return elems.view(uint.newbyteorder(">")).astype(uint).view(dtype)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals to this module's stand-ins; refuses everything else."""

  def __init__(self, data: bytes, archive: _Archive) -> None:
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._placeholders: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    module = _PY2_MODULES.get(module, module)
    qualified = f"{module}.{name}"
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module in ("torch", "torch.storage") and name in _UNTYPED_STORAGE_NAMES:
      return _StorageType(name, np.dtype(np.uint8))
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name, _TORCH_DTYPES[name])
    if qualified in _TORCH_FUNCTIONS:
      return _TORCH_FUNCTIONS[qualified]
    if qualified in _OTHER_FUNCTIONS:
      return _OTHER_FUNCTIONS[qualified]
    if module == "builtins" and name in _SAFE_BUILTINS:
      return _SAFE_BUILTINS[name]
    if (module.split(".")[0] in _PLACEHOLDER_MODULES or
        qualified in _PLACEHOLDER_GLOBALS):
      return self._placeholder(module, name)
    if module.startswith("torch._utils") and name.startswith("_rebuild_"):
      raise _Problem(
          f"pickle rebuilds a tensor with '{_printable(qualified)}' (quantized, "
          "sparse, meta or other non-dense tensor), which this reader does not "
          "support; convert those tensors to dense CPU tensors and re-save")
    raise _Problem(
        f"pickle refers to '{_printable(qualified)}', which is not a tensor or "
        "plain container; refusing to load (nothing was executed)")

  def _placeholder(self, module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    cls = self._placeholders.get(qualified)
    if cls is None:
      cls = type("ForeignObject", (ForeignObject,), {
          "foreign_module": module,
          "foreign_name": name,
          "__module__": __name__,
      })
      self._placeholders[qualified] = cls
    return cls

  def persistent_load(self, pid: Any) -> _Storage:
    # torch writes ('storage', storage_type, key, location, numel).
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise _Problem(f"unexpected persistent id {_short_repr(pid)} in pickle")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise _Problem(
          f"storage record names {_short_repr(storage_type)}, not a storage "
          "type")
    if not (isinstance(key, str) and re.fullmatch(r"[\w.-]{1,64}", key)):
      raise _Problem(f"bad storage key {_short_repr(key)}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
      raise _Problem(f"storage {key!r} has bad size {_short_repr(numel)}")
    return self._archive.storage(key, storage_type.dtype, numel)


# ----------------------------------------------------------------------------
# Opening the file.
# ----------------------------------------------------------------------------


def _not_a_zip(head: bytes) -> _Problem:
  """Says what a non-zip file looks like."""
  if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]:
    return _Problem(
        "legacy (non-zip) torch.save format; re-save it with torch>=1.6: "
        "torch.save(torch.load(p), 'new.ckpt')")
  if head[257:262] == b"ustar":
    return _Problem(
        "a tar archive (the pre-1.0 torch.save tar format?), not a zip "
        "checkpoint; re-save it with torch>=1.6")
  if len(head) >= 9 and head[8:9] == b"{":
    return _Problem(
        "looks like a safetensors file; this reader handles torch.save zip "
        "checkpoints only (use safetensors.numpy.load_file)")
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return _Problem(
        "a bare pickle, not a torch.save zip checkpoint; re-save the weights "
        "with torch.save (torch>=1.6)")
  return _Problem(
      f"not a PyTorch checkpoint (starts with {head[:8]!r}, a torch.save zip "
      "starts with b'PK'); check the path")


def _find_prefix(zf: zipfile.ZipFile) -> str:
  """The archive's top folder ('archive/' or, from torch 2, the file stem)."""
  names = zf.namelist()
  pickles = [n for n in names if n == "data.pkl" or
             (n.endswith("/data.pkl") and n.count("/") == 1)]
  if len(pickles) == 1:
    return pickles[0][:-len("data.pkl")]
  if len(pickles) > 1:
    raise _Problem(f"zip holds several data.pkl entries ({pickles[:4]}); not a "
                   "single torch.save checkpoint")
  if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
    raise _Problem("a TorchScript archive (torch.jit.save), not a torch.save "
                   "checkpoint; save the model's state_dict with torch.save")
  shown = ", ".join(_printable(n, 60) for n in names[:5])
  raise _Problem(
      f"zip archive without <folder>/data.pkl, so not a torch.save checkpoint "
      f"(entries: {shown or 'none'}{', ...' if len(names) > 5 else ''})")


def _load(path: str | os.PathLike[str],
          unpickler_cls: type | None = None) -> Any:
  try:
    file = open(path, "rb")
  except FileNotFoundError:
    raise _Problem("no such file") from None
  except IsADirectoryError:
    raise _Problem("is a directory, not a checkpoint file") from None
  except OSError as err:
    raise _Problem(f"cannot open ({_printable(err)})") from None
  with file:
    head = file.read(512)
    if not head:
      raise _Problem("empty file, not a checkpoint; re-download or re-save it")
    if not head.startswith(b"PK"):
      raise _not_a_zip(head)
    file.seek(0)
    try:
      zf = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
      raise _Problem(
          f"truncated or not a zip archive ({_printable(err)}); re-download "
          "or re-save the checkpoint") from None
    with zf:
      prefix = _find_prefix(zf)
      pkl_info = zf.getinfo(prefix + "data.pkl")
      if pkl_info.file_size > _MAX_PICKLE_BYTES:
        raise _Problem(f"data.pkl declares {pkl_info.file_size} bytes; "
                       "refusing absurd size")
      # zipfile would allocate what a size field claims before reading.
      file_len = os.fstat(file.fileno()).st_size
      for info in (pkl_info, zf.NameToInfo.get(prefix + "byteorder")):
        if info is not None and (info.compress_size > file_len or (
            info.compress_type == zipfile.ZIP_STORED and
            info.file_size > file_len)):
          raise _Problem(
              f"zip entry {_printable(info.filename)!r} declares "
              f"{max(info.compress_size, info.file_size)} bytes, more than the "
              f"file's {file_len}; the file is truncated or corrupt, "
              "re-download it")
      try:
        data = zf.read(pkl_info)
        byteorder = (zf.read(prefix + "byteorder").strip()
                     if prefix + "byteorder" in zf.NameToInfo else b"little")
      except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
              NotImplementedError, RuntimeError) as err:
        # NotImplementedError: unknown compression; RuntimeError: encrypted.
        raise _Problem(f"corrupt zip entry ({_printable(err)}); re-download or "
                       "re-save the checkpoint") from None
      if byteorder not in (b"little", b"big"):
        raise _Problem(f"unknown byteorder record {byteorder[:20]!r}")
      # One read-only map of the whole file; arrays are views of it and keep
      # it alive after the file is closed (mmap holds its own descriptor).
      try:
        mm = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
      except (OSError, ValueError):  # Some filesystems cannot map: read.
        file.seek(0)
        mm = file.read()
      archive = _Archive(zf, mm, prefix, byteorder == b"big")
      unpickler = (unpickler_cls or _RestrictedUnpickler)(data, archive)
      try:
        obj = unpickler.load()
      except _Problem:
        raise
      except RecursionError:
        raise _Problem("pickle nests too deeply") from None
      except Exception as err:  # pylint: disable=broad-except
        # Anything else the file's bytes provoke (bad opcodes, wrong argument
        # types, a corrupt compressed entry, ...) is a corrupt checkpoint.
        raise _Problem(
            f"corrupt or unsupported pickle in data.pkl ({formatting.describe_error(err, 120)})"
        ) from err
      archive.verify(obj)
      return obj


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
  """Loads a torch.save zip checkpoint; tensors become read-only numpy views.

  Args:
    path: a `.ckpt` / `.pt` / `.pth` file written by `torch.save` (torch>=1.6).

  Returns:
    The unpickled object: dicts, lists, tuples, OrderedDicts, scalars, numpy
    arrays for tensors, and `ForeignObject` placeholders for metadata objects.

  Raises:
    CheckpointError: the file is missing, not a zip checkpoint, corrupt, or
      its pickle names anything beyond tensors and plain containers.
  """
  label = _printable(os.fspath(path), 300)
  try:
    return _load(path)
  except _Problem as problem:
    raise CheckpointError(f"{label}: {problem}") from problem.__cause__
  except Exception as err:  # pylint: disable=broad-except
    # Whatever else a hostile file provokes (in zipfile, mmap, ...) is still
    # a refused file, in one line, never a traceback.
    raise CheckpointError(
        f"{label}: unreadable checkpoint ({formatting.describe_error(err, 120)})") from err


def _is_flat_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Loads a checkpoint's state_dict as {name: read-only numpy array}.

  Takes `ckpt["state_dict"]` (Lightning checkpoints), or the object itself if
  it is a flat mapping of names to tensors (`torch.save(model.state_dict())`).

  Raises:
    CheckpointError: as `load_checkpoint`, or the file holds no state_dict.
  """
  label = _printable(os.fspath(path), 300)
  obj = load_checkpoint(path)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    state_dict = obj["state_dict"]
    if not isinstance(state_dict, Mapping):
      raise CheckpointError(
          f"{label}: 'state_dict' entry is a {type(state_dict).__name__}, not "
          "a mapping of names to tensors")
    for key, value in state_dict.items():
      if not (isinstance(key, str) and isinstance(value, np.ndarray)):
        raise CheckpointError(
            f"{label}: state_dict entry {_short_repr(key)} is a "
            f"{type(value).__name__}, not a tensor; use load_checkpoint() and "
            "pick the tensors yourself")
    return dict(state_dict)
  if _is_flat_state_dict(obj) and obj:
    return dict(obj)
  if isinstance(obj, Mapping):
    keys = [_short_repr(k) for k in list(obj)[:12]]
    more = ", ..." if len(obj) > 12 else ""
    raise CheckpointError(
        f"{label}: no 'state_dict' entry and not a flat name->tensor mapping; "
        f"top-level keys: [{', '.join(keys)}{more}]; use load_checkpoint() and "
        "pick the entry holding the weights")
  raise CheckpointError(
      f"{label}: holds a {type(obj).__name__}, not a state_dict; use "
      "load_checkpoint() to inspect it")


# ----------------------------------------------------------------------------
# TorchScript archives (torch.jit.save): the weights of the module tree.
# ----------------------------------------------------------------------------


def _jit_build_list(kind: str) -> Callable[..., list]:
  """`torch.jit._pickle.build_<kind>list`: the list itself (a copy)."""

  def build(values: Any) -> list:
    if not isinstance(values, list):
      raise _Problem(f"torch.jit._pickle.build_{kind}list of "
                     f"{_short_repr(values)}")
    return list(values)

  return build


def _jit_restore_type_tag(value: Any, type_str: Any) -> Any:
  """`torch.jit._pickle.restore_type_tag`: the type tag only types a
  container for the TorchScript interpreter; the value is what we keep."""
  del type_str
  return value


_JIT_FUNCTIONS: dict[str, Any] = {
    "torch.jit._pickle.build_intlist": _jit_build_list("int"),
    "torch.jit._pickle.build_doublelist": _jit_build_list("double"),
    "torch.jit._pickle.build_boollist": _jit_build_list("bool"),
    "torch.jit._pickle.build_genericlist": _jit_build_list("generic"),
    "torch.jit._pickle.restore_type_tag": _jit_restore_type_tag,
}


class _TorchScriptUnpickler(_RestrictedUnpickler):
  """Also accepts the globals of a TorchScript `data.pkl`: `__torch__.*`
  module classes become inert placeholders (their code under `code/` is
  never read), `torch.jit._pickle.build_*` rebuild plain lists."""

  def find_class(self, module: str, name: str) -> Any:
    qualified = f"{module}.{name}"
    if qualified in _JIT_FUNCTIONS:
      return _JIT_FUNCTIONS[qualified]
    if module == "__torch__" or module.startswith("__torch__."):
      return self._placeholder(module, name)
    return super().find_class(module, name)


def load_torchscript(path: str | os.PathLike[str]) -> ForeignObject:
  """Loads the module tree of a `torch.jit.save` archive, without its code.

  Args:
    path: a TorchScript zip (e.g. `out_jit_module/data.pkl` plus `code/`).

  Returns:
    The top module as a `ForeignObject`: its `state` is the module's attribute
    dict (submodules as `ForeignObject`s, tensors as read-only numpy arrays,
    ints, lists). `flatten_module` turns it into {dotted name: value}.

  Raises:
    CheckpointError: as `load_checkpoint` (refusal by name of any global that
      is not a tensor, a plain container, a list builder or a module class).
  """
  label = _printable(os.fspath(path), 300)
  try:
    obj = _load(path, _TorchScriptUnpickler)
  except _Problem as problem:
    raise CheckpointError(f"{label}: {problem}") from problem.__cause__
  except Exception as err:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{label}: unreadable TorchScript archive ({formatting.describe_error(err, 120)})") from err
  if not (isinstance(obj, ForeignObject) and
          obj.foreign_module.startswith("__torch__")):
    raise CheckpointError(
        f"{label}: holds a {type(obj).__name__}, not a TorchScript module")
  return obj


def flatten_module(module: ForeignObject, prefix: str = "") -> dict[str, Any]:
  """A TorchScript module tree as {'net.layers.conv.weight': value, ...}.

  Leaves are the attributes that are not submodules (tensors, ints, lists,
  bools); the `training` / `_is_full_backward_hook` bookkeeping is dropped.
  """
  if not isinstance(module.state, dict):
    raise CheckpointError(f"module {prefix or '<root>'} "
                          f"({module.qualified_name()}) has no attribute dict")
  out: dict[str, Any] = {}
  for key, value in module.state.items():
    if key in ("training", "_is_full_backward_hook"):
      continue
    name = f"{prefix}{key}"
    if isinstance(value, ForeignObject):
      out.update(flatten_module(value, name + "."))
    else:
      out[name] = value
  return out
