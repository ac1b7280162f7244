"""Training metrics on disk: ``metrics.jsonl`` and TensorBoard event files.

A run's workdir gets two views of the same numbers, neither needing a
TensorFlow install:

    WORKDIR/metrics.jsonl      one JSON object per log step:
                               {"step": 100, "loss": 0.12, "lr": 8e-06, ...}
    WORKDIR/tensorboard/       events.out.tfevents.<time>.<host>.<ns>, one
                               file per writer (a resumed run adds a file)

Event files are written by tensorboardX (protobuf, TFRecord framing and
CRC are its job).

Resuming: `MetricWriter.truncate_after(step)` drops the JSONL lines above the
restored checkpoint's step, so `metrics.jsonl` of a killed and resumed run is
byte for byte that of an uninterrupted one. Old event files are left as they
are; the new file starts with TensorBoard's own restart marker (see
`truncate_after`), which hides what the killed run logged past the step.

A job that counts steps of its own before the run's (the demo's first
stage, `SERIES`) logs through a writer of that series: its keys read
"first_stage/l1", ... in the same `metrics.jsonl`, its events go to
tensorboard/first_stage/ (a TensorBoard run of its own, so neither step axis
nor restart marker touches the other's), and each writer's
`truncate_after` drops its own series' lines only.

    {"step": 25, "first_stage/loss": 0.41, "first_stage/l1": 0.38, ...}
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterator, Mapping

import numpy as np

# tensorboardX's package __init__ tries `import torch` for its PyTorch
# helpers, which this module does not use; the product never loads torch
# (tests/test_no_torch.py), so torch is hidden while that __init__ runs (a
# None entry in sys.modules makes `import torch` raise ImportError).
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None
try:
  from tensorboardX import summary as tbx_summary
  from tensorboardX.event_file_writer import EventsWriter
  from tensorboardX.proto import event_pb2
  from tensorboardX.proto import summary_pb2
finally:
  if _HIDE_TORCH:
    del sys.modules["torch"]

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Jobs with a step count of their own, logged beside the run's records.
SERIES = ("first_stage",)

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


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


def series_of(record: Mapping[str, Any]) -> str:
  """The series a metrics.jsonl record belongs to: a name in `SERIES` when
  all its keys (but "step") carry that name's prefix, else "" (the run's)."""
  keys = [k for k in record if k != "step"]
  for name in SERIES:
    if keys and all(k.startswith(f"{name}/") for k in keys):
      return name
  return ""


class MetricWriter:
  """Writes scalars to `metrics.jsonl` + TensorBoard, images to TensorBoard.

  Every write reaches the OS at once (JSONL unbuffered, the event file
  flushed after each event), so a killed run loses nothing it logged. With
  `enabled=False` (processes other than 0 of a multi-host run) every method
  is a no-op and nothing is created. `series` (one of `SERIES`) writes that
  job's steps: keys prefixed "SERIES/", events in tensorboard/SERIES/.
  """

  def __init__(self, workdir: str | os.PathLike[str], *,
               enabled: bool = True, series: str = "") -> None:
    if series not in ("", *SERIES):
      raise ValueError(f"series {series!r}: one of {SERIES}, or '' (the run)")
    self.enabled = enabled
    self.series = series
    self._prefix = f"{series}/" if series else ""
    self.workdir = pathlib.Path(workdir)
    self.jsonl_path = self.workdir / JSONL_FILE
    self.events_dir = self.workdir / TENSORBOARD_DIR / series
    self.events_path: pathlib.Path | None = None
    self._jsonl: io.FileIO | None = None
    self._events: EventsWriter | None = None
    self._closed = False
    if not enabled:
      return
    self.events_dir.mkdir(parents=True, exist_ok=True)
    self._drop_torn_jsonl_tail()
    self._jsonl = open(self.jsonl_path, "ab", buffering=0)
    # EventsWriter, the synchronous writer under tensorboardX's SummaryWriter:
    # SummaryWriter queues events to a thread that flushes every `flush_secs`,
    # so a SIGKILL would lose steps before the checkpoint that the resumed
    # run does not log again.
    # It names the file by the second and opens it with "wb": a restart
    # within the same second would clobber the older file. The nanosecond
    # suffix keeps names unique and in time order, the order in which
    # TensorBoard reads a run's files.
    suffix = f".{time.time_ns()}"
    self._events = EventsWriter(str(self.events_dir / "events"), suffix)
    (self.events_path,) = self.events_dir.glob(f"events.out.tfevents.*{suffix}")

  def _drop_torn_jsonl_tail(self) -> None:
    # A kill in the middle of a line leaves text without its newline; the
    # next line appended would be glued to it.
    if not self.jsonl_path.exists():
      return
    data = self.jsonl_path.read_bytes()
    if data and not data.endswith(b"\n"):
      with open(self.jsonl_path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)

  def _write_jsonl(self, line: str) -> None:
    view = memoryview(line.encode())
    while view:  # FileIO.write may write less than asked.
      view = view[self._jsonl.write(view):]

  def _write_event(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self._events.write_event(event)
    self._events.flush()

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
      key = self._prefix + key
      record[key] = json_value = _json_scalar(key, value)
      number = (_NON_FINITE[json_value] if isinstance(json_value, str)
                else float(json_value))
      # Not tbx_summary.scalar, which logs a warning for each non-finite
      # value (already recorded as such in the JSON line).
      values.append(summary_pb2.Summary.Value(tag=key, simple_value=number))
    self._write_jsonl(json.dumps(record, allow_nan=False) + "\n")
    self._write_event(event_pb2.Event(
        step=step, summary=summary_pb2.Summary(value=values)))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """One event with a PNG per tag (uint8 HxW, HxWx1, HxWx3 or HxWx4).

    TensorBoard stores grey images as RGB (tensorboardX repeats the channel).
    """
    if not self.enabled or not images:
      return
    self._check_open()
    values = []
    for tag, image in images.items():
      _check_tag(tag)
      tag = self._prefix + tag
      array = np.asarray(image)
      if array.ndim == 2:
        array = array[..., None]
      if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (
          1, 3, 4):
        raise ValueError(f"image {tag!r} must be uint8 HxW or HxWxC with C in "
                         f"(1, 3, 4), got {array.dtype} {array.shape}")
      values.extend(tbx_summary.image(tag, array, dataformats="HWC").value)
    self._write_event(event_pb2.Event(
        step=int(step), summary=summary_pb2.Summary(value=values)))

  def truncate_after(self, step: int) -> None:
    """Forgets what was logged above `step`, in both views.

    Called once on resume with the restored checkpoint's step, before the
    first write: what the killed run logged past its last checkpoint is
    logged again by the resumed run. `metrics.jsonl` is rewritten without
    the lines above `step` (of this writer's series; the others' lines stay).

    Event files are not rewritten (that would take a TFRecord reader);
    instead the new file gets TensorBoard's restart marker, the event
    tensorboardX's `SummaryWriter(purge_step=step + 1)` writes: a
    SessionLog START at step + 1. TensorBoard's Python loader then drops
    every event it read before with a step >= step + 1; its Rust data server
    ignores the marker but drops a series' points from the step at which
    that series goes back (a restart), which the resumed run's first write
    of each tag does. Either way no step shows twice.
    """
    if not self.enabled:
      return
    self._check_open()
    step = int(step)
    self._jsonl.close()
    kept = []
    for number, line, _ in _jsonl_lines(self.jsonl_path.read_text()):
      try:
        record = json.loads(line)
        record_step = record["step"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{self.jsonl_path}:{number}: not a metrics line: "
                         f"{e}") from e
      if record_step <= step or series_of(record) != self.series:
        kept.append(line + "\n")
    _replace(self.jsonl_path, "".join(kept).encode())
    self._jsonl = open(self.jsonl_path, "ab", buffering=0)
    self._write_event(event_pb2.Event(
        step=step + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def flush(self) -> None:
    """Forces both files to stable storage (writes already reach the OS)."""
    if not self.enabled or self._closed:
      return
    os.fsync(self._jsonl.fileno())
    self._events.flush()

  def close(self) -> None:
    """Closes both files; later writes raise, a second close does nothing."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    self._jsonl.close()
    self._events.close()

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
