"""Tests for segldm_jax.training.metrics: metrics.jsonl and tensorboardX event
files; and the log steps of the training loops (training.loop)."""
import io
import json
import math
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import event_files
from segldm_jax.training import loop
from segldm_jax.training.metrics import MetricWriter, read_jsonl


def _image(seed: int, shape=(6, 5, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png(image) -> np.ndarray:
  assert image.encoded_image_string.startswith(b"\x89PNG")
  return np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))


def test_scalars_and_images_read_back_from_the_event_file(tmp_path):
  image, grey, rgba = _image(0), _image(1, (4, 7)), _image(2, (3, 2, 4))
  t0 = time.time()
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(10, {"loss": 0.1234567, "lr": np.float32(8e-6),
                              "count": np.int64(3), "jax": jnp.float32(2.5),
                              "bad": float("nan"), "big": -math.inf})
    writer.write_images(10, {"samples": image, "mask": grey, "alpha": rgba})
    writer.write_scalars(2**40, {"loss": 1e30})
    path = writer.events_path
  t1 = time.time()
  assert path.parent == tmp_path / "tensorboard"
  assert path.name.startswith("events.out.tfevents.")

  events = event_files.read_events(path)
  assert [e.step for e in events] == [0, 10, 10, 2**40]
  assert events[0].file_version == "brain.Event:2"
  assert all(t0 <= e.wall_time <= t1 for e in events)
  scalars = event_files.scalars(events[1])
  assert list(scalars) == ["loss", "lr", "count", "jax", "bad", "big"]
  # simple_value is a proto float: exactly the float32 of what was logged.
  assert scalars["loss"] == np.float32(0.1234567)
  assert scalars["lr"] == np.float32(8e-6)
  assert scalars["count"] == 3.0 and scalars["jax"] == 2.5
  assert math.isnan(scalars["bad"]) and scalars["big"] == -math.inf
  assert event_files.scalars(events[3]) == {"loss": np.float32(1e30)}

  images = event_files.images(events[2])
  assert event_files.scalars(events[2]) == {}
  assert list(images) == ["samples", "mask", "alpha"]
  assert [(i.height, i.width, i.colorspace) for i in images.values()] == [
      (6, 5, 3), (4, 7, 3), (3, 2, 4)]  # grey is stored as RGB
  np.testing.assert_array_equal(_png(images["samples"]), image)
  np.testing.assert_array_equal(_png(images["mask"]),
                                np.repeat(grey[..., None], 3, axis=-1))
  np.testing.assert_array_equal(_png(images["alpha"]), rgba)
  # A directory reads as all its event files in order.
  assert event_files.read_events(tmp_path / "tensorboard") == events


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



def _run(workdir, steps, resume_from=0):
  # As train.py: truncate_after(start step) before the first write.
  with MetricWriter(workdir) as writer:
    writer.truncate_after(resume_from)
    for step in steps:
      writer.write_scalars(step, {"loss": 1.0 / step, "lr": step * 1e-5})
      if step % 4 == 0:
        writer.write_images(step, {"samples": _image(step)})


def _curves(events):
  return [(e.step, event_files.scalars(e), sorted(event_files.images(e)))
          for e in events if e.summary.value]


def test_a_resumed_run_shows_what_an_uninterrupted_one_does(tmp_path):
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
  # The old event file is left as it was; the restart's is a new one (even
  # within the same second) that opens with a restart marker at step 6.
  files = sorted((resumed / "tensorboard").iterdir())
  assert len(files) == 2 and files[0] == first_events
  assert [e.step for e in event_files.read_events(first_events)] == [
      0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
  restart = event_files.read_events(files[1])
  assert [e.step for e in restart] == [0, 6, 6, 7, 8, 8, 9, 10]
  assert restart[1].session_log.status == restart[1].session_log.START
  # Raw, steps 6-8 are there twice; as either TensorBoard loader keeps
  # them, once, with the curves of the uninterrupted run.
  events = event_files.read_events(resumed / "tensorboard")
  straight = event_files.read_events(tmp_path / "straight" / "tensorboard")
  assert [e.step for e in events if e.summary.value].count(7) == 2
  assert _curves(event_files.purged(events)) == _curves(straight)
  assert event_files.preempted(events) == event_files.preempted(straight) == {
      "loss": list(range(1, 11)), "lr": list(range(1, 11)),
      "samples": [4, 8]}


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


def test_a_series_of_its_own_shares_the_jsonl_but_not_its_lines(tmp_path):
  """The demo's first stage logs before the LDM, on a step axis of its own:
  "first_stage/..." keys in the same metrics.jsonl, its own TensorBoard run,
  and neither writer's truncation touches the other's lines."""
  def vq_run(steps):
    with MetricWriter(tmp_path, series="first_stage") as vq:
      vq.truncate_after(0)  # a fresh VQ: an earlier, killed one's lines go
      for step in steps:
        vq.write_scalars(step, {"l1": 1.0 / step})

  def ldm_run(steps, resume_from=0):
    with MetricWriter(tmp_path) as ldm:
      ldm.truncate_after(resume_from)
      for step in steps:
        ldm.write_scalars(step, {"loss": step / 10})
      if 2 in steps:
        ldm.write_scalars(2, {"eval/fid": 9.0})

  vq_run([1, 2])  # killed
  vq_run([1, 2, 3, 4])
  ldm_run([1, 2, 3])  # killed after step 3, checkpoint at 2
  ldm_run([3, 4], resume_from=2)
  assert read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "first_stage/l1": 1.0}, {"step": 2, "first_stage/l1": 0.5},
      {"step": 3, "first_stage/l1": 1 / 3}, {"step": 4, "first_stage/l1": 0.25},
      {"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2},
      {"step": 2, "eval/fid": 9.0}, {"step": 3, "loss": 0.3},
      {"step": 4, "loss": 0.4}]
  # Two TensorBoard runs: the LDM's restart marker (step 3) leaves the
  # first stage's curve whole, as either loader reads it.
  vq_events = event_files.read_events(tmp_path / "tensorboard" / "first_stage")
  assert event_files.preempted(vq_events) == {"first_stage/l1": [1, 2, 3, 4]}
  assert [e.step for e in event_files.purged(vq_events)
          if e.summary.value] == [1, 2, 3, 4]
  ldm_events = event_files.read_events(tmp_path / "tensorboard")
  assert event_files.preempted(ldm_events) == {"loss": [1, 2, 3, 4],
                                               "eval/fid": [2]}
  with pytest.raises(ValueError, match="series 'vq'"):
    MetricWriter(tmp_path, series="vq")


def test_both_loops_log_every_log_every_steps_and_the_last(tmp_path):
  """`loop.ProgressLog`, as the LDM's and the VQ's loops use it: a record
  at each multiple of log_every and at the last step, ending with the
  throughput and the extra counts; it truncates its series on start."""
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(5, {"loss": 9.0})  # a killed run's, past step 2
  writer = MetricWriter(tmp_path)
  log = loop.ProgressLog(writer, "test", total=8, initial=2, batch_size=4,
                         log_every=3, extra=lambda: {"bad_records": 0})
  logged = []
  for step in range(3, 9):
    log.advance()
    if log.due(step):
      logged.append(step)
      log.write(step, {"loss": step / 10, "lr": 1e-3}, loss=f"{step}")
  log.close()
  assert logged == [3, 6, 8]
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [3, 6, 8]
  assert [list(r) for r in records] == [
      ["step", "loss", "lr", "images_per_sec", "bad_records"]] * 3
  assert all(r["images_per_sec"] > 0 for r in records)
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(9, {"loss": 1.0})  # close() closed the writer too
  no_interval = loop.ProgressLog(MetricWriter(tmp_path, enabled=False), "t",
                                 total=4, initial=0, batch_size=1, log_every=0)
  assert [s for s in range(1, 5) if no_interval.due(s)] == [4]
  no_interval.close()
