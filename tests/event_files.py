"""Reads TensorBoard event files back, for tests (tensorboardX has no reader).

An event file is a sequence of TFRecords, ``uint64 length | uint32
masked_crc(length) | data | uint32 masked_crc(data)`` (little endian), each
holding a serialised ``Event``. The CRCs are checked with tensorboardX's own
`masked_crc32c`, the events parsed with its generated protobuf classes.
"""

import pathlib
import struct

from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.record_writer import masked_crc32c


def _records(path: pathlib.Path) -> list[bytes]:
  data, pos, payloads = path.read_bytes(), 0, []
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    end = pos + 12 + length + 4
    if end > len(data):
      break  # a record a kill cut short ends the file, as in TensorBoard
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(
        header), f"{path}: length CRC at byte {pos}"
    payload = data[pos + 12:end - 4]
    assert struct.unpack("<I", data[end - 4:end])[0] == masked_crc32c(
        payload), f"{path}: data CRC at byte {pos}"
    payloads.append(payload)
    pos = end
  return payloads


def read_events(path) -> list[event_pb2.Event]:
  """The events of a file, or of every event file of a directory in name
  (= time) order, as TensorBoard reads them."""
  path = pathlib.Path(path)
  files = (sorted(p for p in path.iterdir() if "tfevents" in p.name)
           if path.is_dir() else [path])
  return [event_pb2.Event.FromString(payload) for file in files
          for payload in _records(file)]


def purged(events: list[event_pb2.Event]) -> list[event_pb2.Event]:
  """What TensorBoard's Python loader keeps: a SessionLog START at step P
  (a restart) drops the events read before it with a step >= P."""
  kept = []
  for event in events:
    if event.session_log.status == event_pb2.SessionLog.START:
      kept = [e for e in kept if e.step < event.step]
    kept.append(event)
  return kept


def preempted(events: list[event_pb2.Event]) -> dict[str, list[int]]:
  """Steps per tag as TensorBoard's Rust data server keeps them: a point at
  step s drops the same tag's points at steps >= s."""
  series: dict[str, list[int]] = {}
  for event in events:
    for value in event.summary.value:
      steps = series.setdefault(value.tag, [])
      steps[:] = [s for s in steps if s < event.step] + [event.step]
  return series


def scalars(event: event_pb2.Event) -> dict[str, float]:
  return {v.tag: v.simple_value for v in event.summary.value
          if v.HasField("simple_value")}


def images(event: event_pb2.Event) -> dict[str, summary_pb2.Summary.Image]:
  return {v.tag: v.image for v in event.summary.value if v.HasField("image")}
