"""Datasets by name: ADE20K, COCO-Stuff and Cityscapes as their owners ship
them (folders, suffixes, label ids), on tiny look-alike folders.

Each look-alike holds a few 64x64 records whose label maps use the real
conventions (ADE20K 0 = other, 1..150; COCO-Stuff 0..181, 255 unlabeled;
Cityscapes labelIds 0..33 beside the files gtFine ships that are not label
maps), so a wrong folder, suffix or id table shows as a wrong record here.
Each variant trains 3 steps through train.py, and so does the reference
recipe on plain folders (tests/data/sflckr), after coco_stuff: its 182-class
train step is the same program, read back from the compilation cache.
"""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import seg_f4
# train.py runs as tests/test_train_e2e.py runs it (one device, the
# session's compilation cache).
from test_train_e2e import env  # pylint: disable=unused-import
from segldm_jax import errors
from segldm_jax.config import run_config
from segldm_jax.data import check
from segldm_jax.data import DataError, FolderSource, IGNORE_ID, load_record
from segldm_jax.data import pipeline

ROOT = pathlib.Path(__file__).parents[1]
S = 64
# Four horizontal bands of stored label values per record, and the class ids
# they must become. Cityscapes: 7 road, 26 car, 0 unlabeled, 23 sky.
BANDS = {
    "ade20k": ((1, 150, 0, 75), (0, 149, IGNORE_ID, 74)),
    "coco_stuff": ((0, 181, 255, 105), (0, 181, IGNORE_ID, 105)),
    "cityscapes": ((7, 26, 0, 23), (0, 13, IGNORE_ID, 10)),
}
# Relative record names per split, as each dataset names its files.
RECORDS = {
    "ade20k": {"training": ["ADE_train_00000001", "ADE_train_00000002"],
               "validation": ["ADE_val_00000001"]},
    "coco_stuff": {"train2017": ["000000000009", "000000000025"],
                   "val2017": ["000000000139"]},
    "cityscapes": {"train": ["aachen/aachen_000000_000019",
                             "bochum/bochum_000000_000313"],
                   "val": ["frankfurt/frankfurt_000000_000294"]},
}


def _save(path, array, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kw)


def _bands(values, shift=0):
  labels = np.zeros((S, S), np.uint8)
  for k, v in enumerate(values):
    labels[16 * k:16 * (k + 1)] = v
  return np.roll(labels, shift, axis=1)


def _photo(seed):
  return np.random.default_rng(seed).integers(0, 256, (S, S, 3), np.uint8)


def _build(root, name):
  """The dataset's folders under `root`, with its own suffixes."""
  stored, _ = BANDS[name]
  for n, (split, rels) in enumerate(RECORDS[name].items()):
    for i, rel in enumerate(rels):
      labels = _bands(stored, shift=i)
      photo = _photo(10 * n + i)
      if name == "cityscapes":
        _save(root / "leftImg8bit" / split / f"{rel}_leftImg8bit.png", photo)
        gt = root / "gtFine" / split / f"{rel}_gtFine"
        _save(pathlib.Path(f"{gt}_labelIds.png"), labels)
        # What else gtFine ships beside each label map: not records.
        _save(pathlib.Path(f"{gt}_color.png"),
              np.zeros((S, S, 4), np.uint8))
        _save(pathlib.Path(f"{gt}_instanceIds.png"),
              labels.astype(np.uint16) * 1000)
        pathlib.Path(f"{gt}_polygons.json").write_text("{}")
      else:
        _save(root / "images" / split / f"{rel}.jpg", photo, quality=95)
        _save(root / "annotations" / split / f"{rel}.png", labels)
  if name == "ade20k":  # shipped beside the folders
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    (root / "sceneCategories.txt").write_text("ADE_train_00000001 bedroom\n")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  out = {}
  for name in BANDS:
    out[name] = tmp_path_factory.mktemp(name)
    _build(out[name], name)
  return out


def _data(name, root, **overrides):
  data = seg_f4.get_config(name).data
  data.root = str(root)
  data.update(overrides)
  return data


@pytest.mark.parametrize("name", list(BANDS))
def test_records_carry_the_train_ids(roots, name):
  data = _data(name, roots[name])
  _, ids = BANDS[name]
  for split, rels in zip(("train", "val"), RECORDS[name].values()):
    source = pipeline.make_source(data, split)
    assert isinstance(source, FolderSource) and len(source) == len(rels)
    assert source.keys == rels
    for i in range(len(rels)):
      record = load_record(source, i)
      np.testing.assert_array_equal(record["labels"], _bands(ids, shift=i))
      assert record["image"].shape == (S, S, 3)


@pytest.mark.parametrize("name", list(BANDS))
def test_check_data_passes_on_both_splits(roots, name):
  report = check.check_data(_data(name, roots[name]), progress=False,
                            num_threads=1)
  assert report.ok, report.summary()
  assert report.summary().startswith(
      "data check OK: 3 of 3 records checked, 0 bad (FolderSource(")
  assert "; val: FolderSource(" in report.source


def test_sample_py_dataset_masks_come_from_the_validation_split(roots):
  from segldm_jax.data import masks  # pylint: disable=g-import-not-at-top
  names, labels, source = masks.dataset_masks(
      _data("ade20k", roots["ade20k"]), size=S, count=4, seed=0)
  assert source.image_dir == str(roots["ade20k"] / "images/validation")
  assert names == ["mask0000"]  # the one validation record
  np.testing.assert_array_equal(labels[0], _bands(BANDS["ade20k"][1]))


def test_variants_keep_the_geometry_and_need_a_root():
  for name, (classes, layout) in {"ade20k": (150, "images/training"),
                                  "coco_stuff": (182, "images/train2017"),
                                  "cityscapes": (19, "leftImg8bit/train")
                                  }.items():
    config = seg_f4.get_config(name)
    config.first_stage.allow_random_init = True
    with pytest.raises(errors.ConfigError) as error:
      run_config.validate(config)
    assert str(error.value) == (
        f"data.dataset={name!r} reads {layout} and {config.data.mask_dir} "
        "under the dataset's root folder: pass --config.data.root=DIR")
    config.data.root = "/data"
    geometry = run_config.validate(config)
    assert (geometry.image, geometry.latent) == (256, 64)
    rescaler = config.model.params.cond_stage_config.params
    assert config.data.num_classes == rescaler.in_channels == classes
    assert seg_f4.get_config(f"{name},tiny").data.image_size == 32


def test_cityscapes_label_train_ids_are_selected_by_suffix(roots, tmp_path):
  root = tmp_path / "cityscapes"
  shutil.copytree(roots["cityscapes"], root)
  _, ids = BANDS["cityscapes"]
  # What cityscapesScripts' createTrainIdLabelImgs.py writes beside them.
  for i, rel in enumerate(RECORDS["cityscapes"]["train"]):
    _save(root / "gtFine" / "train" / f"{rel}_gtFine_labelTrainIds.png",
          _bands(ids, shift=i))
  suffix = "_gtFine_labelTrainIds.png"
  source = pipeline.make_source(_data("cityscapes", root, mask_suffix=suffix,
                                      remap=""))
  for i in range(len(source)):
    np.testing.assert_array_equal(load_record(source, i)["labels"],
                                  _bands(ids, shift=i))
  with pytest.raises(errors.ConfigError) as error:
    pipeline.make_source(_data("cityscapes", root, mask_suffix=suffix))
  assert str(error.value) == (
      "data.remap='cityscapes' maps labelIds, but data.mask_suffix="
      "'_gtFine_labelTrainIds.png' reads train ids already: pass "
      "--config.data.remap=")
  report = check.check_data(_data("cityscapes", root, mask_suffix=suffix),
                            progress=False)
  assert report.summary() == (
      "data check FAILED: cannot open the dataset "
      f"({root / 'leftImg8bit/train'})\n  {error.value}")


def test_wrong_suffix_or_unpaired_file_is_one_line_naming_it(roots, tmp_path):
  city = roots["cityscapes"]
  report = check.check_data(_data("cityscapes", city,
                                  image_suffix="_leftImg8bit.jpg"),
                            progress=False)
  first = city / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
  assert report.error == (
      f"no image files ending in '_leftImg8bit.jpg' found under "
      f"{city / 'leftImg8bit/train'} ({first} is there); check "
      "data.image_suffix")
  with pytest.raises(DataError) as error:
    pipeline.make_source(_data("cityscapes", city,
                               mask_suffix="_gtFine_labelTrainIds.png",
                               remap=""))
  assert "\n" not in str(error.value)
  assert str(error.value).startswith(
      "no mask files ending in '_gtFine_labelTrainIds.png' found under "
      f"{city / 'gtFine/train'} ({city / 'gtFine/train/aachen'}/aachen_")

  ade = tmp_path / "ade"
  shutil.copytree(roots["ade20k"], ade)
  lonely = ade / "images/training/ADE_train_00000003.jpg"
  _save(lonely, _photo(0))
  report = check.check_data(_data("ade20k", ade), progress=False)
  assert report.error == (
      "unpaired files (image REL.jpg pairs with mask REL.png): images "
      f"without a mask in {ade / 'annotations/training'}: 1 ({lonely}), e.g. "
      f"no {ade / 'annotations/training/ADE_train_00000003.png'}; pass "
      "skip_unpaired=True to skip them")
  os.remove(lonely)
  stray = ade / "annotations/validation/ADE_val_00000002.png"
  _save(stray, np.zeros((S, S), np.uint8))
  with pytest.raises(DataError) as error:
    pipeline.make_source(_data("ade20k", ade), "val")
  assert str(error.value) == (
      "unpaired files (image REL.jpg pairs with mask REL.png): masks without "
      f"an image in {ade / 'images/validation'}: 1 ({stray}), e.g. no "
      f"{ade / 'images/validation/ADE_val_00000002.jpg'}; pass "
      "skip_unpaired=True to skip them")


def test_builtin_remaps_and_a_mistyped_name():
  from segldm_jax.data import labels  # pylint: disable=g-import-not-at-top
  city = labels.load_remap("cityscapes")
  assert sorted(city) == list(range(34))
  assert [city[i] for i in (7, 8, 11, 26, 33, 0, 6, 29)] == [
      0, 1, 2, 13, 18, IGNORE_ID, IGNORE_ID, IGNORE_ID]
  assert sorted(v for v in city.values() if v != IGNORE_ID) == list(range(19))
  ade = labels.load_remap("ade20k")
  assert (ade[1], ade[150], len(ade)) == (0, 149, 150)
  with pytest.raises(DataError) as error:
    labels.load_remap("cityscape")
  assert str(error.value) == ("remap 'cityscape' is neither a built-in table "
                              "(ade20k, cityscapes) nor a JSON file")


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_tfds_per_pixel_classes_with_the_readme_keys(tmp_path):
  """The README's TFDS example: features named as in TFDS's
  `cityscapes/semantic_segmentation` (labelIds), splits train / validation."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  stored, ids = BANDS["cityscapes"]

  features = tfds.features.FeaturesDict({
      "image_left": tfds.features.Image(shape=(None, None, 3)),
      "segmentation_label": tfds.features.Image(shape=(None, None, 1))})
  with tfds.core.registered.skip_registration():

    class CityscapesLike(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features)

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(count)
                for split, count in (("train", 2), ("validation", 1))}

      def _generate_examples(self, count):
        return ((i, {"image_left": _png(_photo(i)),
                     "segmentation_label": _png(_bands(stored))})
                for i in range(count))

  data_dir = str(tmp_path / "tfds")
  CityscapesLike(data_dir=data_dir,
                 file_format="array_record").download_and_prepare()
  data = seg_f4.get_config("cityscapes").data
  data.update(source="tfds", tfds_name="cityscapes_like",
              tfds_data_dir=data_dir, tfds_split="train",
              tfds_val_split="validation", image_key="image_left",
              mask_key="segmentation_label")
  for split, count in (("train", 2), ("val", 1)):
    source = pipeline.make_source(data, split)
    assert len(source) == count
    for i in range(count):
      np.testing.assert_array_equal(source[i]["labels"], _bands(ids))
  assert check.check_data(data, progress=False).num_checked == 3
  # What a user reaching for ADE20K in TFDS is told.
  data.tfds_name = "scene_parse150"
  assert check.check_data(data, progress=False).error == (
      "TFDS scene_parse150's annotations are instance maps of 100 thing "
      "classes without stuff, not the 150-class ADE20K benchmark maps: train "
      "on ADEChallengeData2016 with configs/seg_f4.py:ade20k")


SFLCKR = pathlib.Path(__file__).parent / "data" / "sflckr"


def _start_train(workdir, env, config, *args):
  """train.py in the background; output to files beside the workdir (a full
  pipe would stall one run while we wait on another)."""
  with open(workdir.parent / "out", "w") as out, \
      open(workdir.parent / "err", "w") as err:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config",
         str(ROOT / f"configs/seg_f4.py:{config}"), "--workdir", str(workdir),
         "--config.first_stage.allow_random_init=True",
         "--config.train.steps=3", "--config.train.batch_size=1",
         "--config.train.checkpoint_every=3",
         "--config.train.sample_every=0", *args],
        env=env, stdout=out, stderr=err, text=True)


@pytest.fixture(scope="module")
def runs(roots, env, tmp_path_factory):
  """3 steps of each variant on its look-alike, the three train.py started
  at once: most of a run is compiling, one core each. Then the reference
  recipe on the sflckr folders: the same 182-class program as coco_stuff's,
  read back from the session's compilation cache."""
  procs = {}
  for name in BANDS:
    workdir = tmp_path_factory.mktemp(f"run_{name}") / "workdir"
    procs[name] = workdir, _start_train(workdir, env, f"{name},tiny",
                                        f"--config.data.root={roots[name]}")
  for _, proc in procs.values():
    proc.wait(timeout=900)
  workdir = tmp_path_factory.mktemp("run_sflckr") / "workdir"
  procs["sflckr"] = workdir, _start_train(
      workdir, env, "tiny", "--config.data.source=folder",
      f"--config.data.image_dir={SFLCKR / 'images'}",
      f"--config.data.mask_dir={SFLCKR / 'segmentations'}")
  procs["sflckr"][1].wait(timeout=900)
  return {name: (workdir, (workdir.parent / "out").read_text(),
                 (workdir.parent / "err").read_text())
          for name, (workdir, _) in procs.items()}


def _metrics(workdir):
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(BANDS))
def test_each_variant_trains_three_steps(runs, name):
  workdir, stdout, stderr = runs[name]
  assert stdout.strip(), stderr[-3000:]
  assert json.loads(stdout.strip().splitlines()[-1])["checkpoint"] == 3
  rows = _metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert all(np.isfinite(row["loss"]) for row in rows)
  saved = json.loads((workdir / "config.json").read_text())
  classes = {"ade20k": 150, "coco_stuff": 182, "cityscapes": 19}[name]
  assert saved["data"]["num_classes"] == classes
  assert saved["data"]["dataset"] == name
  assert (saved["model"]["params"]["cond_stage_config"]["params"]
          ["in_channels"]) == classes


def test_reference_recipe_trains_on_sflckr_folders(runs):
  """Plain image and mask folders, no dataset name (tests/data/sflckr)."""
  workdir, stdout, stderr = runs["sflckr"]
  assert stdout.strip(), stderr[-3000:]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [3]
  assert [row["step"] for row in _metrics(workdir)] == [1, 2, 3]
  config = json.loads((workdir / "config.json").read_text())
  rescaler = config["model"]["params"]["cond_stage_config"]["params"]
  assert rescaler["in_channels"] == 182 and rescaler["n_stages"] == 2
  assert "resuming" not in stderr
