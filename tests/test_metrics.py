"""Tests for segldm_jax.metrics (JSONL + hand-written TensorBoard events)."""
import io
import json
import math
import pathlib
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from segldm_jax import metrics
from segldm_jax.metrics import MetricWriter, read_events, read_jsonl


def _image(seed: int, shape=(6, 5, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _record_offsets(path: pathlib.Path) -> list[int]:
  """Byte offsets of the TFRecords of an event file (framing only)."""
  data, offsets, pos = path.read_bytes(), [], 0
  while pos < len(data):
    offsets.append(pos)
    pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
  assert pos == len(data)
  return offsets


def test_crc32c_standard_vectors():
  assert metrics.crc32c(b"123456789") == 0xE3069283  # the check value
  assert metrics.crc32c(b"") == 0
  # RFC 3720 (iSCSI) appendix B.4.
  assert metrics.crc32c(bytes(32)) == 0x8A9136AA
  assert metrics.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert metrics.crc32c(bytes(range(32))) == 0x46DD794E
  # Continuing from a previous CRC equals one pass over the concatenation.
  assert metrics.crc32c(b"56789", metrics.crc32c(b"1234")) == 0xE3069283
  # The TFRecord mask: rotate right 15, add 0xa282ead8.
  crc = 0xE3069283
  assert metrics.masked_crc32c(b"123456789") == (
      ((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


@pytest.mark.parametrize("size", [16383, 16384, 16385, 100_003, 2**20 + 7])
def test_vectorised_crc32c_matches_the_byte_loop(size):
  data = np.random.default_rng(size).bytes(size)
  assert metrics.crc32c(data) == metrics._crc_loop(0xFFFFFFFF, data) ^ (
      0xFFFFFFFF)
  # A non-zero starting CRC goes through lane 0 of the vectorised path.
  assert metrics.crc32c(data, 0x12345678) == metrics._crc_loop(
      0x12345678 ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_scalars_and_images_round_trip_through_read_events(tmp_path):
  image, grey = _image(0), _image(1, (4, 7))
  t0 = time.time()
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(10, {"loss": 0.1234567, "lr": np.float32(8e-6),
                              "count": np.int64(3), "jax": jnp.float32(2.5),
                              "bad": float("nan"), "big": -math.inf})
    writer.write_images(10, {"samples": image, "mask": grey})
    writer.write_scalars(2**40, {"loss": 1e30})
    path = writer.events_path
  t1 = time.time()
  assert path.parent == tmp_path / "tensorboard"
  assert path.name.startswith("events.out.tfevents.")

  events = read_events(path)
  assert [e["step"] for e in events] == [0, 10, 10, 2**40]
  assert events[0]["file_version"] == "brain.Event:2"
  assert all(t0 <= e["wall_time"] <= t1 for e in events)
  scalars = events[1]["scalars"]
  assert list(scalars) == ["loss", "lr", "count", "jax", "bad", "big"]
  # simple_value is a proto float: exactly the float32 of what was logged.
  assert scalars["loss"] == np.float32(0.1234567)
  assert scalars["lr"] == np.float32(8e-6)
  assert scalars["count"] == 3.0 and scalars["jax"] == 2.5
  assert math.isnan(scalars["bad"]) and scalars["big"] == -math.inf
  assert events[3]["scalars"] == {"loss": np.float32(1e30)}

  images = events[2]["images"]
  assert events[2]["scalars"] == {} and list(images) == ["samples", "mask"]
  assert images["samples"]["height"] == 6 and images["samples"]["width"] == 5
  assert images["samples"]["colorspace"] == 3
  assert images["mask"]["colorspace"] == 1
  png = images["samples"]["encoded"]
  assert png.startswith(b"\x89PNG")
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                image)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(images["mask"]["encoded"]))), grey)
  # A directory reads as all its event files in order.
  from_dir = read_events(tmp_path / "tensorboard")
  assert [(e["step"], e["wall_time"]) for e in from_dir] == [
      (e["step"], e["wall_time"]) for e in events]


def test_events_parse_with_protobuf_using_tensorflow_field_numbers(tmp_path):
  """Decodes our bytes with the real protobuf runtime, not our own parser.

  The schema is event.proto / summary.proto of tensorflow/tensorflow
  (Event: wall_time 1, step 2, file_version 3, summary 5; Summary: value 1;
  Value: tag 1, simple_value 2, image 4; Image: height 1, width 2,
  colorspace 3, encoded_image_string 4).
  """
  descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
  from google.protobuf import descriptor_pool, message_factory
  fd = descriptor_pb2.FieldDescriptorProto
  schema = {
      "Image": [("height", 1, fd.TYPE_INT32, None),
                ("width", 2, fd.TYPE_INT32, None),
                ("colorspace", 3, fd.TYPE_INT32, None),
                ("encoded_image_string", 4, fd.TYPE_BYTES, None)],
      "Value": [("tag", 1, fd.TYPE_STRING, None),
                ("simple_value", 2, fd.TYPE_FLOAT, None),
                ("image", 4, fd.TYPE_MESSAGE, ".tb.Image")],
      "Summary": [("value", 1, fd.TYPE_MESSAGE, ".tb.Value")],
      "Event": [("wall_time", 1, fd.TYPE_DOUBLE, None),
                ("step", 2, fd.TYPE_INT64, None),
                ("file_version", 3, fd.TYPE_STRING, None),
                ("summary", 5, fd.TYPE_MESSAGE, ".tb.Summary")],
  }
  file_proto = descriptor_pb2.FileDescriptorProto(
      name="tb_event_test.proto", package="tb", syntax="proto3")
  for message, fields in schema.items():
    proto = file_proto.message_type.add(name=message)
    for name, number, kind, type_name in fields:
      proto.field.add(name=name, number=number, type=kind,
                      label=fd.LABEL_REPEATED if message == "Summary"
                      else fd.LABEL_OPTIONAL, type_name=type_name)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file_proto)
  event_cls = message_factory.GetMessageClass(
      pool.FindMessageTypeByName("tb.Event"))

  image = _image(2)
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(7, {"loss": 0.25, "lr": 1e-4})
    writer.write_images(7, {"samples": image})
    path = writer.events_path
  data = path.read_bytes()
  parsed = []
  for offset in _record_offsets(path):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    parsed.append(event_cls.FromString(data[offset + 12:offset + 12 + length]))
  assert parsed[0].file_version == "brain.Event:2"
  assert [e.step for e in parsed] == [0, 7, 7]
  values = parsed[1].summary.value
  assert [(v.tag, v.simple_value) for v in values] == [
      ("loss", 0.25), ("lr", np.float32(1e-4))]
  (value,) = parsed[2].summary.value
  assert value.tag == "samples"
  assert (value.image.height, value.image.width, value.image.colorspace) == (
      6, 5, 3)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string))),
      image)


def test_jsonl_lines(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(100, {"loss": 0.12, "loss32": np.float32(0.12),
                               "skipped": np.int32(0), "finite": np.bool_(True),
                               "images_per_sec": jnp.asarray(31.25)})
    writer.write_scalars(200, {"loss": float("nan"), "grad_norm": np.inf,
                               "low": np.float32(-np.inf)})
    writer.write_scalars(300, {})  # nothing to log: no line
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(400, {"step": 1})
    with pytest.raises(ValueError, match="not a scalar"):
      writer.write_scalars(400, {"loss": np.zeros(2)})
    with pytest.raises(TypeError, match="not a real number"):
      writer.write_scalars(400, {"loss": "1.5"})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  # float32 values are written as their shortest float32 decimal.
  assert lines == [
      '{"step": 100, "loss": 0.12, "loss32": 0.12, "skipped": 0, '
      '"finite": true, "images_per_sec": 31.25}',
      '{"step": 200, "loss": "nan", "grad_norm": "inf", "low": "-inf"}',
  ]
  assert [json.loads(line)["step"] for line in lines] == [100, 200]
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert records[0] == {"step": 100, "loss": 0.12, "loss32": 0.12,
                        "skipped": 0, "finite": True, "images_per_sec": 31.25}
  assert math.isnan(records[1]["loss"])
  assert records[1]["grad_norm"] == math.inf
  assert records[1]["low"] == -math.inf


def _run(workdir, steps, resume_from=None):
  with MetricWriter(workdir) as writer:
    if resume_from is not None:
      writer.truncate_after(resume_from)
    for step in steps:
      writer.write_scalars(step, {"loss": 1.0 / step, "lr": step * 1e-5})
      if step % 4 == 0:
        writer.write_images(step, {"samples": _image(step)})


def _curves(events):
  return [(e["step"], e["scalars"], sorted(e["images"])) for e in events
          if "file_version" not in e]


def test_truncate_after_makes_a_resumed_run_equal_an_uninterrupted_one(
    tmp_path):
  _run(tmp_path / "straight", range(1, 11))
  resumed = tmp_path / "resumed"
  _run(resumed, range(1, 9))  # checkpoint at 5, killed after logging 8
  # The kill tore the last JSON line and the last event record.
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "lo')
  (first_events,) = (resumed / "tensorboard").iterdir()
  with open(first_events, "ab") as f:
    f.write(struct.pack("<Q", 100) + b"\x00\x01")
  _run(resumed, range(6, 11), resume_from=5)

  assert ((resumed / "metrics.jsonl").read_bytes()
          == (tmp_path / "straight" / "metrics.jsonl").read_bytes())
  assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == list(
      range(1, 11))
  # Two event files (the restart's is a new one, even within the same
  # second), together holding the uninterrupted run's curves.
  assert len(list((resumed / "tensorboard").iterdir())) == 2
  assert _curves(read_events(resumed / "tensorboard")) == _curves(
      read_events(tmp_path / "straight" / "tensorboard"))
  assert [e["step"] for e in read_events(first_events)] == [0, 1, 2, 3, 4, 4,
                                                            5]


def test_read_jsonl_skips_only_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  assert read_jsonl(path) == [{"step": 1, "loss": 0.5}]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.5}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON line"):
    read_jsonl(path)


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricWriter(workdir, enabled=False) as writer:
    writer.truncate_after(3)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"samples": _image(0)})
    writer.flush()
  writer.close()
  assert not workdir.exists()


def test_closed_writer_refuses_writes(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  writer.close()
  writer.close()  # a second close is harmless
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(2, {"loss": 1.0})
  with MetricWriter(tmp_path / "other") as other:
    with pytest.raises(ValueError, match="uint8"):
      other.write_images(1, {"x": np.zeros((2, 2, 3))})


def test_corruption_names_the_file_and_offset(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_scalars(2, {"loss": 0.25})
    path = writer.events_path
  good = path.read_bytes()
  offsets = _record_offsets(path)
  assert len(offsets) == 3

  # One flipped bit in the payload of the second record.
  corrupt = bytearray(good)
  corrupt[offsets[1] + 20] ^= 0x04
  path.write_bytes(bytes(corrupt))
  with pytest.raises(metrics.EventFileError) as error:
    read_events(path)
  message = str(error.value)
  assert str(path) in message
  assert f"record at byte offset {offsets[1]}: data CRC mismatch" in message

  # A flipped bit in a length field is caught by the length's own CRC.
  corrupt = bytearray(good)
  corrupt[offsets[2]] ^= 0x01
  path.write_bytes(bytes(corrupt))
  with pytest.raises(metrics.EventFileError,
                     match=f"offset {offsets[2]}: length CRC mismatch"):
    read_events(path)

  path.write_bytes(good[:-3])
  with pytest.raises(metrics.EventFileError,
                     match=f"offset {offsets[2]}: truncated record"):
    read_events(path)
  path.write_bytes(good)
  assert [e["scalars"] for e in read_events(path)] == [{}, {"loss": 0.5},
                                                       {"loss": 0.25}]
