"""Training metrics on disk: ``metrics.jsonl`` and TensorBoard event files.

A run's workdir gets two views of the same numbers, neither needing a
TensorFlow / TensorBoard install:

    WORKDIR/metrics.jsonl      one JSON object per log step:
                               {"step": 100, "loss": 0.12, "lr": 8e-06, ...}
    WORKDIR/tensorboard/       events.out.tfevents.<time>.<host>, one file
                               per writer (a resumed run adds a file)

Event files are TFRecord files of serialised ``tensorflow.Event`` protos,
written here with a tiny hand-rolled protobuf encoder. Field numbers, from
tensorflow/core/util/event.proto and tensorflow/core/framework/summary.proto:

    Event   {double wall_time = 1; int64 step = 2;
             oneof {string file_version = 3; Summary summary = 5; ...}}
    Summary {repeated Value value = 1}
    Value   {string tag = 1;
             oneof {float simple_value = 2; Image image = 4; ...}}
    Image   {int32 height = 1; int32 width = 2; int32 colorspace = 3;
             bytes encoded_image_string = 4}

A TFRecord is ``uint64 len | uint32 masked_crc(len) | data |
uint32 masked_crc(data)`` (little endian), with the CRC-32C (Castagnoli)
masked as ``rotr(crc, 15) + 0xa282ead8``.

Resuming: `MetricWriter.truncate_after(step)` drops every JSONL line and
event record with a step above the restored checkpoint's, so a killed and
resumed run leaves the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import socket
import struct
import time
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
FILE_VERSION = "brain.Event:2"

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Summary.Image.colorspace by channel count (summary.proto): grey, grey+alpha,
# RGB, RGBA.
_COLORSPACE = {1: 1, 2: 2, 3: 3, 4: 4}
_PIL_MODE = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


# ----------------------------------------------------------------- CRC-32C

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected.


def _make_table() -> np.ndarray:
  crc = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(_CRC32C_POLY), crc >> 1)
  return crc.astype(np.uint32)


_TABLE_NP = _make_table()
_TABLE = _TABLE_NP.tolist()
# Bytes per lane of the vectorised CRC, and the size below which the plain
# byte loop is faster than numpy's per-call overhead (measured on CPython
# 3.11: ~5 ms/MiB vectorised vs ~100 ms/MiB looped).
_LANE_BYTES = 128
_VECTOR_MIN_BYTES = 16384
_BYTE_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)


def _crc_loop(register: int, data: bytes | memoryview) -> int:
  table = _TABLE
  for byte in data:
    register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
  return register


def _gf2_apply(matrix: np.ndarray, words: np.ndarray) -> np.ndarray:
  """Applies a 32x32 GF(2) matrix (its 32 column images) to uint32 words."""
  out = np.zeros_like(words)
  for k in range(4):
    # XOR of the 8 columns picked by each possible byte value.
    table = np.bitwise_xor.reduce(_BYTE_BITS * matrix[8 * k:8 * k + 8],
                                  axis=1).astype(np.uint32)
    out ^= table[(words >> np.uint32(8 * k)) & np.uint32(0xFF)]
  return out


def _zeros_operator(num_bytes: int) -> np.ndarray:
  """Matrix of feeding `num_bytes` zero bytes through the raw CRC register.

  The register update r -> T[r & 0xff] ^ (r >> 8) is linear over GF(2), so
  n zero bytes are a fixed matrix, built by square-and-multiply.
  """
  unit = np.uint32(1) << np.arange(32, dtype=np.uint32)
  result = unit.copy()  # identity
  power = _TABLE_NP[unit & np.uint32(0xFF)] ^ (unit >> np.uint32(8))
  while num_bytes:
    if num_bytes & 1:
      result = _gf2_apply(power, result)
    power = _gf2_apply(power, power)
    num_bytes >>= 1
  return result


def _crc_vector(register: int, data: bytes) -> int:
  """The raw register after `data`, many lanes at once with numpy.

  A pure-Python byte loop runs at ~10 MB/s, too slow for PNG summaries and
  for verifying large event files. So the data is cut into 2**k lanes whose
  registers advance side by side (lane 0 from `register`, the others from
  0); neighbours are then merged pairwise with
  crc(a + b) = Z^len(b) crc(a) ^ crc_from_0(b), Z being one zero byte.
  """
  lanes = 1 << ((len(data) // _LANE_BYTES).bit_length() - 1)
  width = len(data) // lanes
  main = lanes * width
  # (width, lanes): row j holds byte j of every lane, contiguous.
  block = np.frombuffer(data, np.uint8, main).reshape(lanes, width).T
  block = block.astype(np.uint32, order="C")
  regs = np.zeros(lanes, np.uint32)
  regs[0] = register
  for row in block:
    regs = _TABLE_NP[(regs ^ row) & np.uint32(0xFF)] ^ (regs >> np.uint32(8))
  shift = _zeros_operator(width)
  while len(regs) > 1:
    regs = _gf2_apply(shift, regs[0::2]) ^ regs[1::2]
    shift = _gf2_apply(shift, shift)  # lanes are now twice as long
  return _crc_loop(int(regs[0]), memoryview(data)[main:])


def crc32c(data: bytes, crc: int = 0) -> int:
  """CRC-32C (Castagnoli) of `data`, continuing from a previous `crc`."""
  data = bytes(data)
  register = crc ^ 0xFFFFFFFF
  if len(data) < _VECTOR_MIN_BYTES:
    register = _crc_loop(register, data)
  else:
    register = _crc_vector(register, data)
  return register ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15, add a constant (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# ---------------------------------------------------- protobuf wire format

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64/int32 go out as 10-byte two's cpl.
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _pb_varint(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(value)


def _pb_double(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", value)


def _pb_float(field: int, value: float) -> bytes:
  return _key(field, _FIXED32) + struct.pack("<f", value)


def _pb_bytes(field: int, value: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(value)) + value


def _encode_event(step: int, wall_time: float, *,
                  file_version: str | None = None,
                  values: list[bytes] | None = None) -> bytes:
  """Serialises an Event; `values` are already-encoded Summary.Value."""
  out = _pb_double(1, wall_time) + _pb_varint(2, step)
  if file_version is not None:
    out += _pb_bytes(3, file_version.encode())
  if values is not None:
    out += _pb_bytes(5, b"".join(_pb_bytes(1, v) for v in values))
  return out


class _DecodeError(ValueError):
  pass


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """Yields (field, wire_type, value) of one message; value raw per type."""
  pos, end = 0, len(buf)

  def varint() -> int:
    nonlocal pos
    result = shift = 0
    while True:
      if pos >= end:
        raise _DecodeError("truncated varint")
      byte = buf[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      if not byte & 0x80:
        return result
      shift += 7
      if shift > 63:
        raise _DecodeError("varint longer than 10 bytes")

  while pos < end:
    key = varint()
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      value: Any = varint()
    elif wire_type in (_FIXED64, _FIXED32):
      size = 8 if wire_type == _FIXED64 else 4
      if pos + size > end:
        raise _DecodeError(f"truncated fixed field {field}")
      value = buf[pos:pos + size]
      pos += size
    elif wire_type == _LEN:
      size = varint()
      if pos + size > end:
        raise _DecodeError(f"truncated length-delimited field {field}")
      value = buf[pos:pos + size]
      pos += size
    else:
      raise _DecodeError(f"unsupported wire type {wire_type} (field {field})")
    yield field, wire_type, value


def _expect(field: int, wire_type: int, expected: int) -> None:
  if wire_type != expected:
    raise _DecodeError(f"field {field} has wire type {wire_type}, "
                       f"expected {expected}")


def _signed64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _decode_image(buf: bytes) -> dict[str, Any]:
  image: dict[str, Any] = {"height": 0, "width": 0, "colorspace": 0,
                           "encoded": b""}
  names = {1: "height", 2: "width", 3: "colorspace"}
  for field, wire_type, value in _fields(buf):
    if field in names:
      _expect(field, wire_type, _VARINT)
      image[names[field]] = _signed64(value)
    elif field == 4:
      _expect(field, wire_type, _LEN)
      image["encoded"] = bytes(value)
  return image


def _decode_event(buf: bytes) -> dict[str, Any]:
  """Event proto -> dict (fields this module writes; the rest skipped)."""
  event: dict[str, Any] = {"step": 0, "wall_time": 0.0, "scalars": {},
                           "images": {}}
  for field, wire_type, value in _fields(buf):
    if field == 1:
      _expect(field, wire_type, _FIXED64)
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif field == 2:
      _expect(field, wire_type, _VARINT)
      event["step"] = _signed64(value)
    elif field == 3:
      _expect(field, wire_type, _LEN)
      event["file_version"] = bytes(value).decode()
    elif field == 5:
      _expect(field, wire_type, _LEN)
      for v_field, v_wire, v_buf in _fields(value):
        if v_field != 1:
          continue
        _expect(v_field, v_wire, _LEN)
        tag, simple, image = "", None, None
        for f, w, x in _fields(v_buf):
          if f == 1:
            _expect(f, w, _LEN)
            tag = bytes(x).decode()
          elif f == 2:
            _expect(f, w, _FIXED32)
            simple = struct.unpack("<f", x)[0]
          elif f == 4:
            _expect(f, w, _LEN)
            image = _decode_image(x)
        if simple is not None:
          event["scalars"][tag] = simple
        if image is not None:
          event["images"][tag] = image
  return event


# ------------------------------------------------------------ event files

class EventFileError(ValueError):
  """An event file is corrupt or truncated; names the file and offset."""


def _records(path: pathlib.Path, data: bytes) -> Iterator[tuple[int, bytes]]:
  """Yields (offset, payload) of each TFRecord, verifying both CRCs."""
  pos = 0
  while pos < len(data):
    where = f"{path}: record at byte offset {pos}"
    if pos + 12 > len(data):
      raise EventFileError(f"{where}: truncated header "
                           f"({len(data) - pos} of 12 bytes)")
    header = data[pos:pos + 8]
    (stored,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if stored != masked_crc32c(header):
      raise EventFileError(
          f"{where}: length CRC mismatch (stored {stored:#010x}, computed "
          f"{masked_crc32c(header):#010x}); the file is corrupt")
    (length,) = struct.unpack("<Q", header)
    end = pos + 12 + length + 4
    if end > len(data):
      raise EventFileError(f"{where}: truncated record ({length} data bytes "
                           f"announced, file ends at {len(data)})")
    payload = data[pos + 12:pos + 12 + length]
    (stored,) = struct.unpack("<I", data[end - 4:end])
    if stored != masked_crc32c(payload):
      raise EventFileError(
          f"{where}: data CRC mismatch (stored {stored:#010x}, computed "
          f"{masked_crc32c(payload):#010x}); the file is corrupt")
    yield pos, payload
    pos = end


def _event_files(path: pathlib.Path) -> list[pathlib.Path]:
  # Name order is time order: the names start with a zero-padded timestamp.
  # ".tmp" files are rewrites that a kill interrupted (see `_replace`).
  return sorted(p for p in path.iterdir() if "tfevents" in p.name
                and not p.name.endswith(".tmp") and p.is_file())


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Parses an event file (or every event file of a directory, in order).

  Both CRCs of every record are checked. Each event becomes
  ``{"step": int, "wall_time": float, "scalars": {tag: float},
  "images": {tag: {"height", "width", "colorspace", "encoded"}}}`` plus
  ``"file_version"`` on a file's first record. Scalars are float32 values.

  Raises:
    EventFileError: on a CRC mismatch, a truncated record or an undecodable
      Event, naming the file and the record's byte offset.
  """
  path = pathlib.Path(path)
  files = _event_files(path) if path.is_dir() else [path]
  events = []
  for file in files:
    for offset, payload in _records(file, file.read_bytes()):
      try:
        events.append(_decode_event(payload))
      except (_DecodeError, UnicodeDecodeError) as e:
        raise EventFileError(f"{file}: record at byte offset {offset}: "
                             f"bad Event proto: {e}") from e
  return events


# -------------------------------------------------------------------- JSONL

def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads `metrics.jsonl`; "nan" / "inf" / "-inf" values become floats.

  A last line without its newline is a write cut short by a kill and is
  skipped; any other malformed line raises ValueError.
  """
  path = pathlib.Path(path)
  records = []
  for number, line, complete in _jsonl_lines(path.read_text()):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if not complete:
        break
      raise ValueError(f"{path}:{number}: not a JSON line: {e}") from e
    records.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v
                    for k, v in record.items()})
  return records


def _jsonl_lines(text: str) -> Iterator[tuple[int, str, bool]]:
  """(1-based number, line, ends with newline) for each non-empty line."""
  lines = text.split("\n")
  for i, line in enumerate(lines):
    if line.strip():
      yield i + 1, line, i < len(lines) - 1


def _json_scalar(key: str, value: Any) -> bool | int | float | str:
  """Python / numpy / jax scalar -> JSON value; non-finite as a string."""
  if isinstance(value, (bool, int)):
    return value
  if isinstance(value, float):
    number = float(value)  # np.float64 is a float subclass
  else:
    array = np.asarray(value)  # also fetches a jax array from the device
    if array.dtype.kind in "cOSU":  # numpy would happily parse "1.5"
      raise TypeError(f"metric {key!r} is not a real number: {value!r}")
    if array.size != 1:
      raise ValueError(f"metric {key!r} is not a scalar: shape {array.shape}")
    array = array.reshape(())
    if array.dtype.kind == "b":
      return bool(array)
    if array.dtype.kind in "iu":
      return int(array)
    try:
      if array.dtype.kind == "f" and array.dtype.itemsize == 8:
        number = float(array)
      else:
        # float32 / float16 / bfloat16: the shortest decimal that gives the
        # same float32 back, so the file reads 0.12 rather than 0.119999997.
        number = float(str(np.float32(array)))
    except (TypeError, ValueError) as e:
      raise TypeError(f"metric {key!r} is not a number: {value!r}") from e
  if math.isnan(number):
    return "nan"
  if math.isinf(number):
    return "inf" if number > 0 else "-inf"
  return number


# ------------------------------------------------------------------ writer

def _check_tag(tag: Any) -> None:
  if not isinstance(tag, str) or not tag:
    raise TypeError(f"metric names must be non-empty strings, got {tag!r}")


class MetricWriter:
  """Writes scalars to `metrics.jsonl` + TensorBoard, images to TensorBoard.

  Every write goes to the OS at once (one unbuffered write per record), so a
  killed run loses nothing it logged. With `enabled=False` (processes other
  than 0 of a multi-host run) every method is a no-op and nothing is created.
  """

  def __init__(self, workdir: str | os.PathLike[str], *,
               enabled: bool = True) -> None:
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self.jsonl_path = self.workdir / JSONL_FILE
    self.events_dir = self.workdir / TENSORBOARD_DIR
    self.events_path: pathlib.Path | None = None
    self._jsonl: io.FileIO | None = None
    self._events: io.FileIO | None = None
    self._closed = False
    if not enabled:
      return
    self.events_dir.mkdir(parents=True, exist_ok=True)
    self._drop_torn_jsonl_tail()
    self._jsonl = open(self.jsonl_path, "ab", buffering=0)
    self.events_path, self._events = self._new_event_file()
    self._write(self._events, _frame(_encode_event(
        0, time.time(), file_version=FILE_VERSION)))

  def _new_event_file(self) -> tuple[pathlib.Path, io.FileIO]:
    base = (f"events.out.tfevents.{int(time.time()):010d}."
            f"{socket.gethostname()}")
    # A restart within the same second must not clobber the older file.
    for suffix in [""] + [f".{i}" for i in range(1, 1000)]:
      path = self.events_dir / (base + suffix)
      try:
        return path, open(path, "xb", buffering=0)
      except FileExistsError:
        continue
    raise FileExistsError(f"no free event file name for {base} in "
                          f"{self.events_dir}")

  def _drop_torn_jsonl_tail(self) -> None:
    # A kill in the middle of a line leaves text without its newline; the
    # next line appended would be glued to it.
    if not self.jsonl_path.exists():
      return
    data = self.jsonl_path.read_bytes()
    if data and not data.endswith(b"\n"):
      with open(self.jsonl_path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)

  @staticmethod
  def _write(file: io.FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:  # FileIO.write may write less than asked.
      view = view[file.write(view):]

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError("MetricWriter is closed")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One JSON line and one event with a simple_value per key."""
    if not self.enabled or not scalars:
      return
    self._check_open()
    if "step" in scalars:
      raise ValueError("'step' is reserved for the step argument")
    step = int(step)
    record: dict[str, Any] = {"step": step}
    values = []
    for key, value in scalars.items():
      _check_tag(key)
      record[key] = json_value = _json_scalar(key, value)
      number = (_NON_FINITE[json_value] if isinstance(json_value, str)
                else float(json_value))
      values.append(_pb_bytes(1, key.encode()) + _pb_float(2, number))
    line = json.dumps(record, allow_nan=False) + "\n"
    self._write(self._jsonl, line.encode())
    self._write(self._events, _frame(_encode_event(step, time.time(),
                                                   values=values)))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """One event with a PNG image summary per tag (uint8 HxW[xC] arrays)."""
    if not self.enabled or not images:
      return
    self._check_open()
    values = []
    for tag, image in images.items():
      _check_tag(tag)
      array = np.asarray(image)
      if array.ndim == 2:
        array = array[..., None]
      if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (
          _COLORSPACE):
        raise ValueError(f"image {tag!r} must be uint8 HxW or HxWxC with C in "
                         f"1..4, got {array.dtype} {array.shape}")
      height, width, channels = array.shape
      png = io.BytesIO()
      Image.fromarray(array[..., 0] if channels == 1 else array,
                      _PIL_MODE[channels]).save(png, format="PNG")
      proto = (_pb_varint(1, height) + _pb_varint(2, width)
               + _pb_varint(3, _COLORSPACE[channels])
               + _pb_bytes(4, png.getvalue()))
      values.append(_pb_bytes(1, tag.encode()) + _pb_bytes(4, proto))
    self._write(self._events, _frame(_encode_event(int(step), time.time(),
                                                   values=values)))

  def truncate_after(self, step: int) -> None:
    """Drops JSONL lines and event records with a step above `step`.

    Called once on resume with the restored checkpoint's step, before the
    first write: what the killed run logged past its last checkpoint is
    logged again by the resumed run. Event records are filtered by their
    step; file_version records are kept.
    """
    if not self.enabled:
      return
    self._check_open()
    step = int(step)
    self._jsonl.close()
    kept = []
    for number, line, _ in _jsonl_lines(self.jsonl_path.read_text()):
      try:
        record_step = json.loads(line)["step"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{self.jsonl_path}:{number}: not a metrics line: "
                         f"{e}") from e
      if record_step <= step:
        kept.append(line + "\n")
    _replace(self.jsonl_path, "".join(kept).encode())
    self._jsonl = open(self.jsonl_path, "ab", buffering=0)

    self._events.close()
    for path in _event_files(self.events_dir):
      _truncate_event_file(path, step)
    self._events = open(self.events_path, "ab", buffering=0)

  def flush(self) -> None:
    """Forces both files to stable storage (writes already reach the OS)."""
    if not self.enabled or self._closed:
      return
    for file in (self._jsonl, self._events):
      os.fsync(file.fileno())

  def close(self) -> None:
    """Closes both files; later writes raise, a second close does nothing."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    for file in (self._jsonl, self._events):
      file.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _replace(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` atomically (a kill leaves old or new file)."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _truncate_event_file(path: pathlib.Path, step: int) -> None:
  """Rewrites an event file without the records whose step exceeds `step`.

  A corrupt or torn record (a run killed mid-write) ends the file: the
  records before it are kept, as TensorBoard would show them.
  """
  data = path.read_bytes()
  kept, end, dropped = [], 0, False
  try:
    for offset, payload in _records(path, data):
      end = offset + len(payload) + 16
      if _decode_event(payload)["step"] <= step:
        kept.append(data[offset:end])
      else:
        dropped = True
  except (EventFileError, _DecodeError, UnicodeDecodeError) as e:
    logging.warning("Dropping the unreadable rest of %s: %s", path, e)
    dropped = True
  if dropped or end != len(data):
    _replace(path, b"".join(kept))
