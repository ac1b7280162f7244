"""Bad data: every kind of bad record is named, scanned for, or skipped.

One folder dataset holds good pairs next to one record of each kind of bad
file; the scan (``check_source`` / ``train.py --check_data``), the default
error mode and the skip mode all run over it.
"""
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from segldm_jax.data import (BadRecordLog, DataError, FolderSource,
                             check_data, check_source, make_dataset)
from segldm_jax.data.base import SKIPPED
from segldm_jax.data.folder import read_image
from segldm_jax.data.pipeline import LoadOrSkip

ROOT = pathlib.Path(__file__).parents[1]
SFLCKR = pathlib.Path(__file__).parent / "data" / "sflckr"
H, W = 40, 48
NUM_CLASSES = 3
GOOD_VALUES = {"good0": 10, "good1": 20, "good2": 30}  # image fill per pair
AS_ROOT = os.geteuid() == 0  # root reads chmod 000 files


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _good_mask(i: int) -> np.ndarray:
  mask = np.full((H, W), i % NUM_CLASSES, np.uint8)
  mask[:4] = 255  # the ignore label: allowed
  return mask


def _build(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  """Writes the dataset; returns name -> (bad file, reason substring)."""
  images, masks = root / "images", root / "masks"
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  for i, (name, value) in enumerate(GOOD_VALUES.items()):
    _save(images / f"{name}.png", np.full((H, W, 3), value, np.uint8))
    _save(masks / f"{name}.png", _good_mask(i))
  for name in ("corrupt", "trunc_jpg", "trunc_png", "rgb_mask",
               "out_of_range", "unreadable"):
    _save(masks / f"{name}.png", _good_mask(0))
  bad = {}

  path = images / "corrupt.jpg"  # random bytes named like a JPEG
  path.write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
  bad["corrupt"] = (path, "cannot identify image file")

  for name, ext in (("trunc_jpg", ".jpg"), ("trunc_png", ".png")):
    path = _save(images / f"{name}{ext}", noise)
    _truncate(path)  # the header still opens: only a full decode fails
    bad[name] = (path, "image file is truncated")

  _save(images / "size.png", noise)
  path = _save(masks / "size.png", np.zeros((H + 1, W), np.uint8))
  bad["size"] = (path, f"is {W}x{H} but mask")

  _save(images / "rgb_mask.png", noise)
  path = _save(masks / "rgb_mask.png", np.zeros((H, W, 3), np.uint8))
  bad["rgb_mask"] = (path, "mask has mode RGB")

  _save(images / "out_of_range.png", noise)
  mask = _good_mask(0)
  mask[10, 10] = 7  # >= num_classes and not the ignore label
  path = _save(masks / "out_of_range.png", mask)
  bad["out_of_range"] = (path, "label value 7 is out of range")

  path = images / "unreadable.png"
  if AS_ROOT:  # a dangling link: unreadable even for root
    path.symlink_to(root / "gone.png")
    bad["unreadable"] = (path, "No such file or directory")
  else:
    _save(path, noise)
    path.chmod(0)
    bad["unreadable"] = (path, "Permission denied")

  # Not a record: makes building the source fail unless skip_unpaired.
  _save(images / "lonely.png", noise)
  return bad


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_data")
  return root, _build(root)


def _source(root: pathlib.Path) -> FolderSource:
  return FolderSource(root / "images", root / "masks",
                      num_classes=NUM_CLASSES, ignore_label=255,
                      skip_unpaired=True)


def _config(root: pathlib.Path, **kwargs) -> dict:
  return dict(source="folder", image_dir=str(root / "images"),
              mask_dir=str(root / "masks"), num_classes=NUM_CLASSES,
              ignore_label=255, **kwargs)


def test_truncated_files_fail_on_full_decode(tree):
  _, bad = tree
  assert not ImageFile.LOAD_TRUNCATED_IMAGES
  for name in ("trunc_jpg", "trunc_png"):
    path = bad[name][0]
    with Image.open(path) as image:  # the lazy open alone does not notice
      assert image.size == (W, H)
    with pytest.raises(DataError, match="truncated") as error:
      read_image(str(path))
    assert str(path) in str(error.value)


def test_scan_names_each_bad_file_and_what_is_wrong(tree):
  root, bad = tree
  source = _source(root)
  report = check_source(source, progress=False, num_threads=2)
  assert (report.num_records, report.num_checked, report.num_bad) == (10, 10, 7)
  assert not report.ok and report.error is None
  by_name = {source.keys[p.index]: p for p in report.problems}
  assert sorted(by_name) == sorted(bad)
  for name, (path, reason) in bad.items():
    line = by_name[name].describe()
    assert str(path) in line and reason in line, line
  summary = report.summary(max_shown=5)
  assert summary.startswith("data check FAILED: 10 of 10 records checked, "
                            "7 bad")
  assert str(bad["corrupt"][0]) in summary and "... and 2 more" in summary
  assert len(summary.splitlines()) == 1 + 5 + 1

  clean = check_source(FolderSource(SFLCKR / "images",
                                    SFLCKR / "segmentations",
                                    num_classes=182), progress=False)
  assert clean.ok and clean.num_checked == 5
  assert "data check OK: 5 of 5 records checked, 0 bad" in clean.summary()


def test_unpaired_file_and_empty_folder_fail_the_check(tree, tmp_path):
  root, _ = tree
  report = check_data(_config(root), progress=False)
  assert not report.ok and report.num_checked == 0
  assert "unpaired files" in report.error
  assert str(root / "images" / "lonely.png") in report.error
  assert "FAILED" in report.summary()
  assert check_data(_config(root, skip_unpaired=True),
                    progress=False).num_bad == 7

  for sub in ("images", "masks"):
    (tmp_path / sub).mkdir()
  report = check_data(_config(tmp_path), progress=False)
  assert not report.ok
  assert report.error.startswith("no image files (.jpg, .jpeg, .png, .webp, "
                                 f".bmp) found under {tmp_path / 'images'}")


def test_error_mode_raises_naming_the_first_bad_file(tree):
  root, bad = tree
  iterator = iter(make_dataset(_source(root), image_size=32, batch_size=1,
                               seed=0, train=False, shard_index=0,
                               shard_count=1))
  with pytest.raises(DataError, match="cannot identify image file") as error:
    next(iterator)  # "corrupt" sorts first
  assert str(bad["corrupt"][0]) in str(error.value)


def _epochs(root, n_batches, **kwargs):
  dataset = make_dataset(_source(root), image_size=32, batch_size=5, seed=1,
                         shard_index=0, shard_count=1, bad_records="skip",
                         **kwargs)
  iterator = iter(dataset)
  return [next(iterator) for _ in range(n_batches)]


def test_skip_mode_replaces_and_counts_each_bad_record(tree, caplog):
  root, bad = tree
  source = _source(root)
  bad_indices = sorted(source.keys.index(name) for name in bad)
  batches = _epochs(root, 4)  # 2 epochs of 10 records
  log = BadRecordLog(source)
  with caplog.at_level(logging.WARNING):
    first_epoch = [log(b) for b in batches[:2]]
    assert log.total == 7
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "segldm_jax.data.check"]
    assert len(warnings) == 7  # once per bad file
    for path, reason in bad.values():
      assert any(str(path) in w and reason in w for w in warnings), path
    for b in batches[2:]:
      log(b)
  assert log.total == 14  # counted again, but not warned about again
  assert len([r for r in caplog.records
              if r.name == "segldm_jax.data.check"]) == 7
  # Epoch 1 visits each record once: its flags are exactly the bad ones.
  flags = np.concatenate([b[SKIPPED] for b in batches[:2]])
  assert sorted(flags[flags >= 0].tolist()) == bad_indices
  for b in first_epoch:
    assert sorted(b) == ["image", "labels"]  # nothing extra for the devices
    assert b["image"].shape == (5, 32, 32, 3)
    # Every slot holds one of the good pairs (constant images).
    assert set(np.unique(b["image"]).tolist()) <= set(GOOD_VALUES.values())
    assert set(np.unique(b["labels"]).tolist()) <= {0, 1, 2, 255}
  # Deterministic, and resumable at any batch.
  again = _epochs(root, 4)
  resumed = _epochs(root, 1, start_batch=3)
  for want, have in zip(batches + batches[3:], again + resumed):
    for key in ("image", "labels", SKIPPED):
      np.testing.assert_array_equal(want[key], have[key])


def test_skip_mode_matches_error_mode_on_clean_data():
  source = FolderSource(SFLCKR / "images", SFLCKR / "segmentations",
                        num_classes=182)
  streams = []
  for mode in ("error", "skip"):
    iterator = iter(make_dataset(source, image_size=32, batch_size=2, seed=4,
                                 shard_index=0, shard_count=1,
                                 bad_records=mode))
    streams.append([next(iterator) for _ in range(3)])
  for plain, skip in zip(*streams):
    np.testing.assert_array_equal(plain["image"], skip["image"])
    np.testing.assert_array_equal(plain["labels"], skip["labels"])
    np.testing.assert_array_equal(skip[SKIPPED], -1)
  with pytest.raises(ValueError, match="bad_records must be one of"):
    make_dataset(source, image_size=32, batch_size=2, seed=0, shard_index=0,
                 shard_count=1, bad_records="ignore")


class _AllBad:
  """A source whose every record fails."""

  decoder = None

  def __len__(self):
    return 2

  def __getitem__(self, index):
    raise DataError(f"record {index} is bad")


def test_skip_mode_with_no_good_record_is_an_error():
  with pytest.raises(DataError, match="all 2 records are bad"):
    LoadOrSkip(_AllBad()).map(1)
  report = check_source(_AllBad(), progress=False)
  assert [p.describe() for p in report.problems] == [
      "record 0: record 0 is bad", "record 1: record 1 is bad"]


def test_train_check_data_flag(tree, tmp_path):
  root, bad = tree

  def check(*overrides):
    workdir = tmp_path / "never_created"
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config",
         str(ROOT / "configs/seg_f4.py:tiny"), "--workdir", str(workdir),
         "--check_data", "--config.data.ignore_label=255", *overrides],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=300)
    assert not workdir.exists()
    return r

  r = check(f"--config.data.image_dir={root / 'images'}",
            f"--config.data.mask_dir={root / 'masks'}",
            "--config.data.skip_unpaired=True", "--config.data.num_classes=3")
  assert r.returncode == 1, r.stderr[-2000:]
  assert "data check FAILED: 10 of 10 records checked, 7 bad" in r.stdout
  for path, reason in bad.values():
    assert str(path) in r.stdout and reason in r.stdout
  # sflckr: 182 classes, clean.
  r = check(f"--config.data.image_dir={SFLCKR / 'images'}",
            f"--config.data.mask_dir={SFLCKR / 'segmentations'}",
            "--config.data.num_classes=182")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "data check OK: 5 of 5 records checked, 0 bad" in r.stdout


def test_train_skip_mode_finishes_and_counts_in_metrics(tree, tmp_path):
  """A real (tiny) training run over the bad folder: it finishes, and
  metrics.jsonl counts every bad record each time the stream meets it."""
  import json  # pylint: disable=g-import-not-at-top
  root, bad = tree
  workdir = tmp_path / "run"
  r = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config",
       str(ROOT / "configs/seg_f4.py:tiny"), "--workdir", str(workdir),
       f"--config.data.image_dir={root / 'images'}",
       f"--config.data.mask_dir={root / 'masks'}",
       "--config.data.skip_unpaired=True", "--config.data.num_classes=3",
       "--config.data.ignore_label=255", "--config.data.bad_records=skip",
       "--config.model.params.cond_stage_config.params.in_channels=3",
       "--config.first_stage.allow_random_init=True",
       "--config.train.batch_size=5", "--config.train.steps=4",
       "--config.train.log_every=1", "--config.train.checkpoint_every=0"],
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
      capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  # 10 records, 7 bad, 2 batches per epoch: after 2 and 4 steps every bad
  # record has come up once and twice.
  assert [row["step"] for row in rows] == [1, 2, 3, 4]
  assert rows[1]["bad_records"] == 7 and rows[3]["bad_records"] == 14
  warned = [line for line in r.stderr.splitlines()
            if "skipping a bad record" in line]
  assert len(warned) == len(bad) == 7, warned
  assert json.loads(r.stdout.strip().splitlines()[-1])["checkpoint"] == 4
