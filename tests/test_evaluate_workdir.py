"""evaluate.py --workdir on a converted LDM with a synthetic validation set."""

import json

import ml_collections as mlc
import numpy as np
import pytest

import convert_torch_ckpt
import evaluate
from segldm_jax.config import run_config
from segldm_jax.data import labels as labels_lib
from segldm_jax.eval import workdir_eval


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fixtures_dir):
  wd = tmp_path_factory.mktemp("converted") / "wd"
  assert convert_torch_ckpt.main([
      str(fixtures_dir / "ldm_tiny.ckpt"), "--config",
      str(fixtures_dir / "ldm_tiny.yaml"), "--out", str(wd)]) == 0
  config = json.loads((wd / "config.json").read_text())
  # The fixture LDM: 5 classes, 32 px; held-out synthetic scenes to score.
  config["data"] = {"source": "synthetic", "num_classes": 5,
                    "image_size": 32, "num_records": 16, "seed": 0}
  (wd / "config.json").write_text(json.dumps(config))
  return wd


def test_workdir_eval_writes_every_figure(workdir, capsys):
  assert evaluate.main(["--workdir", str(workdir), "--num_images", "4",
                        "--steps", "4", "--diversity_masks", "2",
                        "--diversity_samples", "2", "--batch_size", "8"]) == 0
  result = json.loads((workdir / "eval_step0" / "eval.json").read_text())
  for key in ("fid", "kid", "kid_std", "lpips_diversity", "miou",
              "miou_real"):
    assert np.isfinite(result[key]), key
  assert result["miou_real"] == 1.0  # the exact segmenter on real scenes
  assert result["num_real"] == result["num_fake"] == 4
  protocol = result["protocol"]
  assert protocol["validation"] == {"source": "synthetic", "seed": 1000003,
                                    "num_classes": 5}
  assert (protocol["sampler"], protocol["steps"], protocol["resolution"]) == (
      "ddim", 4, 32)
  assert protocol["inception_sha256"].startswith("7ff4a85c")
  assert len(protocol["lpips_sha256"]) == 64
  assert protocol["segmenter"] == {"name": "synthetic"}
  picture = workdir / "eval_step0" / "eval.png"
  assert picture.stat().st_size > 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["fid"] == (
      result["fid"])
  assert len(list((workdir / workdir_eval.CACHE_DIR).glob("*.npy"))) == 1
  # What train.py logs every train.eval_every steps.
  assert workdir_eval.scalars(result) == {
      f"eval/{k}": result[k] for k in ("fid", "kid", "miou",
                                        "lpips_diversity")}


def test_folder_data_without_validation_split_names_the_keys(workdir):
  config = run_config.load(workdir)
  with config.unlocked():
    config.data.source = "folder"
  with pytest.raises(workdir_eval.ConfigError) as info:
    workdir_eval.validation_data_config(config)
  assert "--config.data.val_image_dir and --config.data.val_mask_dir" in str(
      info.value)


def test_protocol_names_the_validation_split_not_the_training_one(workdir):
  # eval.json once recorded data.image_dir (the training photos) here.
  config = run_config.load(workdir)
  with config.unlocked():
    config.data.update(source="folder", root="/data", image_dir="train/im",
                       mask_dir="train/lab", val_image_dir="val/im",
                       val_mask_dir="/abs/val_lab")
  assert workdir_eval.describe_validation(config) == {
      "source": "folder", "image_dir": "/data/val/im",
      "mask_dir": "/abs/val_lab", "num_classes": 5}
  with config.unlocked():
    config.data.update(source="tfds", tfds_name="ade20k",
                       tfds_split="train", tfds_val_split="validation")
  assert workdir_eval.describe_validation(config) == {
      "source": "tfds", "tfds_name": "ade20k", "tfds_split": "validation",
      "num_classes": 5}


def test_ade20k_data_is_scored_in_the_segmenters_ids(fixtures_dir):
  # The ade20k variant trains on stored 1..150 as classes 0..149; the
  # segmenter predicts ADE20K ids. Once compared as they were: off by one.
  ref = np.load(fixtures_dir / "ade20k_segmenter_reference.npz")
  data = {"source": "folder", "dataset": "ade20k", "num_classes": 150,
          "ignore_label": 0, "remap": "ade20k"}
  config = mlc.ConfigDict({"data": data, "eval": {"segmenter": ""}})
  assert workdir_eval.segmenter_kind(config) == "ade20k"  # by data
  spec = labels_lib.LabelSpec.create(150, ignore_label=0, remap="ade20k")
  classes = spec.to_ids(ref["labels"][:2], "fixture")  # as training reads
  photos = ref["images_513"][:2]
  scores = workdir_eval._segment_scores(  # pylint: disable=protected-access
      "ade20k", photos, photos, workdir_eval.ade20k_ids(config.data)[classes],
      150, "litert")
  # LiteRT gives the reference labels exactly.
  assert scores == {"miou": 1.0, "miou_real": 1.0, "segmenter": "ade20k"}
  with pytest.raises(workdir_eval.ConfigError) as info:
    workdir_eval.ade20k_ids(mlc.ConfigDict({"num_classes": 182, "remap": ""}))
  assert str(info.value) == (
      "eval.segmenter=ade20k scores ADE20K labels (ids 0..150), but the data "
      "has 182 classes up to id 181: use it on ADE20K data only")


def test_validation_folder_without_pairs_is_one_line(workdir, tmp_path,
                                                     capsys):
  config = json.loads((workdir / "config.json").read_text())
  images, masks = tmp_path / "val_images", tmp_path / "val_masks"
  images.mkdir()
  masks.mkdir()
  (images / "a.jpg").write_bytes(b"")  # an image without a mask
  (masks / "b.png").write_bytes(b"")
  config["data"].update(source="folder", image_dir="unused",
                        mask_dir="unused", val_image_dir=str(images),
                        val_mask_dir=str(masks))
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(config))
  assert evaluate.main(["--workdir", str(wd)]) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: unpaired files (pairs match by relative path "
                        f"without extension): images without a mask in "
                        f"{masks}: 1 ({images / 'a.jpg'})")
