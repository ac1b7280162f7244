"""Masks people paint, sampled the way users do (issue: the user's real path).

A "converted" 182-class workdir (the `tiny` recipe's networks with random
weights, saved the way convert_torch_ckpt.py saves a checkpoint: model
config only, no dataset) stands in for the released semantic-synthesis
model; the pictures are noise, the mechanics are what is tested.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from PIL import ImageFilter

from configs import seg_f4
import sample
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.data import masks as masks_lib
from segldm_jax.data import palette
from segldm_jax.data.base import DataError
from segldm_jax.models import build

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKY, SEA, GRASS, TREE = 156, 154, 123, 168  # COCO-Stuff ids


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  c = seg_f4.get_config("tiny")
  c.data.source, c.first_stage.allow_random_init = "synthetic", True
  run_config.resolve(c)
  ldm = build.build_model(c.model)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"unet": build.init_params(ldm.unet, k1),
            "cond_stage": build.init_params(ldm.cond_stage, k2)}
  wd = tmp_path_factory.mktemp("converted182")
  node = c.model.params.first_stage_config.to_dict()
  store.save_model_dir(wd / workdir_files.FIRST_STAGE_DIR, node,
                             jax.device_get(build.init_params(ldm.first_stage,
                                                              k3)))
  store.save_converted_workdir(
      wd, {"model": c.model.to_dict(),
           "first_stage": {"checkpoint": workdir_files.FIRST_STAGE_DIR}},
      0, jax.device_get(params), None, {"global_step": 0})
  return wd


def _landscape(h: int, w: int) -> np.ndarray:
  """Sky over sea, a grass shore and a tree: COCO-Stuff ids (h, w)."""
  ids = np.full((h, w), SKY, np.uint8)
  ids[h // 2:] = SEA
  ids[3 * h // 4:, : w // 2] = GRASS
  ids[h // 4: 3 * h // 4, w // 8: w // 4] = TREE
  return ids


def _painted(ids: np.ndarray, scale: int) -> np.ndarray:
  """The label map coloured with the palette, then enlarged with bilinear
  filtering: edges blend into colours no class has."""
  colours, _ = palette.named("coco-stuff")
  rgb = Image.fromarray(colours[ids])
  h, w = ids.shape
  return np.asarray(rgb.resize((w * scale, h * scale), Image.BILINEAR))


def test_painted_mask_snaps_to_its_classes(tmp_path):
  ids = _landscape(16, 32)
  rgb = _painted(ids, 4)
  colours, _ = palette.named("coco-stuff")
  blended = ~(rgb[..., None, :] == colours).all(-1).any(-1)
  assert blended.sum() > 100  # the bilinear edges really are off-palette
  spec = masks_lib.painted_spec(182, "coco-stuff", 30.0)
  path = _save(rgb, tmp_path / "painted.png")
  _, (got,) = masks_lib.read_masks(path, None, spec)
  want = np.asarray(Image.fromarray(ids).resize((128, 64), Image.NEAREST))
  # Every pixel is one of the painted classes; away from the edges (2 px,
  # where the blend could be either neighbour) it is exactly the painted one.
  assert set(np.unique(got)) == {SKY, SEA, GRASS, TREE}
  near_edge = Image.fromarray(blended.astype(np.uint8)).filter(
      ImageFilter.MaxFilter(5))
  inner = ~np.asarray(near_edge).astype(bool)
  np.testing.assert_array_equal(got[inner], want[inner])


def _save(array: np.ndarray, path: pathlib.Path) -> pathlib.Path:
  Image.fromarray(array).save(path)
  return path


def test_painted_2_to_1_mask_gives_2_to_1_samples(workdir, tmp_path, capsys):
  mask = _save(_painted(_landscape(16, 32), 2), tmp_path / "shore.png")
  out = tmp_path / "out"
  assert sample.main(["--workdir", str(workdir), "--masks", str(mask),
                      "--palette", "coco-stuff", "--sampler", "ddim",
                      "--steps", "2", "--out", str(out)]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["size"] == [32, 64] and summary["large"] == "direct"
  image = np.asarray(Image.open(out / "shore_0.png"))
  assert image.shape == (32, 64, 3)  # 2:1, as painted
  grid = np.asarray(Image.open(out / "grid.png"))  # mask over sample, 2 px pad
  assert grid.shape == (2 * (32 + 2) + 2, 64 + 4, 3)


def test_off_palette_blob_is_one_line_counting_its_pixels(workdir, tmp_path,
                                                          capsys):
  rgb = _painted(_landscape(16, 32), 2).copy()
  rgb[4:14, 20:30] = 255  # 100 unpainted pixels: white is near no class
  mask = _save(rgb, tmp_path / "blob.png")
  args = ["--workdir", str(workdir), "--masks", str(mask), "--palette",
          "coco-stuff", "--steps", "2", "--out", str(tmp_path / "o")]
  assert sample.main(args) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert err.startswith(f"error: {mask}: 100 pixels are no palette colour "
                        "(within palette_tolerance=30) and no blend of the "
                        "regions beside them, the first at (y=4, x=20): "
                        "(255, 255, 255); ")
  # ... or "don't care", on request.
  assert sample.main([*args, "--unknown_colours", "ignore"]) == 0


SFLCKR_MAPS = sorted((ROOT / "tests" / "data" / "sflckr" / "segmentations"
                      ).glob("*/*.png"))


def _sflckr_at(path: pathlib.Path, width: int = 128, height: int = 64
               ) -> np.ndarray:
  """A photo's COCO-Stuff label map (DeepLab's, full of one-pixel details
  at this size) as ids."""
  with Image.open(path) as labels:
    return np.asarray(labels.resize((width, height), Image.NEAREST))


def _neighbourhood_classes_hold(got: np.ndarray, ids: np.ndarray, scale: int,
                                radius: int) -> np.ndarray:
  """(H*scale, W*scale) bool: each pixel's class is one of the source ids
  within `radius` source pixels of where it came from."""
  h, w = ids.shape
  yy, xx = np.arange(h * scale) // scale, np.arange(w * scale) // scale
  ok = np.zeros(got.shape, bool)
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      ok |= got == ids[np.clip(yy + dy, 0, h - 1)][:, np.clip(xx + dx, 0,
                                                             w - 1)]
  return ok


@pytest.mark.parametrize("path", SFLCKR_MAPS, ids=lambda p: p.parent.name +
                         "/" + p.stem[:8])
def test_a_detailed_map_resized_bilinear_reads_as_its_classes(path, tmp_path):
  """Issue 26, item 7: every one of these maps was refused before (20 to
  298 pixels "farther than the tolerance") though each pixel is a blend of
  regions beside it."""
  ids = _sflckr_at(path)
  rgb = _painted(ids, 2)  # 256x128, one-pixel features become blends
  spec = masks_lib.painted_spec(182, "coco-stuff", 30.0)
  _, (got,) = masks_lib.read_masks(_save(rgb, tmp_path / "map.png"), None,
                                   spec)
  # Each pixel is a class of the map within 2 source pixels (the reader's
  # window, 2 output pixels, and the blend's reach).
  assert _neighbourhood_classes_hold(got, ids, 2, 2).all()
  # Away from edges (the nearest-neighbour enlargement is uniform 3x3
  # around the pixel) it is the map's own class.
  near = np.repeat(np.repeat(ids, 2, 0), 2, 1)
  padded = np.pad(near, 1, mode="edge")
  inner = np.ones(near.shape, bool)
  for dy in range(3):
    for dx in range(3):
      inner &= padded[dy:dy + near.shape[0], dx:dx + near.shape[1]] == near
  assert inner.mean() > 0.8
  assert (got == near)[inner].mean() >= 0.99
  assert (got == near).mean() >= 0.95  # edges included


def test_resized_detailed_map_samples_and_a_magenta_blob_is_one_line(
    workdir, tmp_path, capsys):
  ids = _sflckr_at(SFLCKR_MAPS[0])
  mask = _save(_painted(ids, 2), tmp_path / "detailed.png")
  args = ["--workdir", str(workdir), "--palette", "coco-stuff", "--sampler",
          "ddim", "--steps", "2", "--out", str(tmp_path / "out")]
  assert sample.main(["--masks", str(mask), *args]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["size"] == [128, 256] and summary["samples"] == 1
  rgb = _painted(ids, 2).copy()
  rgb[40:50, 100:110] = (255, 0, 255)  # a colour no class has, 100 pixels
  blob = _save(rgb, tmp_path / "blob.png")
  assert sample.main(["--masks", str(blob), *args]) == 1
  err = capsys.readouterr().err
  assert err == (f"error: {blob}: 100 pixels are no palette colour (within "
                 "palette_tolerance=30) and no blend of the regions beside "
                 "them, the first at (y=40, x=100): (255, 0, 255); paint with "
                 "the palette's colours, raise the tolerance, or let them be "
                 "\"don't care\" (unknown_colours=ignore)\n")


def test_a_flat_band_between_two_regions_takes_the_nearer_class():
  """The flatness test alone would take a uniform band for a painted
  region; it lies on the segment between the two regions' colours, so it is
  their blend, whatever its width (here 3 pixels, far from every colour)."""
  colours = np.array([[0, 0, 0], [200, 0, 0], [0, 0, 200], [250, 250, 0]],
                     np.uint8)
  rgb = np.zeros((8, 13, 3), np.uint8)
  rgb[:, :5] = colours[1]
  rgb[:, 5:8] = (60, 0, 140)   # 0.3 red + 0.7 blue: 85 from either
  rgb[:, 8:] = colours[2]
  index, known = palette.read_painted(rgb, colours, 30.0)
  assert known.all()
  # the band's middle, with both regions in its window, is nearer blue; its
  # first column sees only red within 2 pixels and takes red from beside it
  np.testing.assert_array_equal(index[0], [1] * 6 + [2] * 7)
  # A flat area of a colour no pair nearby explains stays unknown.
  rgb[2:7, 5:8] = (250, 0, 250)
  index, known = palette.read_painted(rgb, colours, 30.0)
  assert (~known).sum() == 15 and not known[2:7, 5:8].any()


def test_a_mask_of_another_size_names_the_nearest_valid_sizes(
    workdir, tmp_path, capsys):
  ids = np.full((30, 50), SKY, np.uint8)
  mask = _save(ids, tmp_path / "odd.png")
  assert sample.main(["--workdir", str(workdir), "--masks", str(mask)]) == 1
  assert capsys.readouterr().err == (
      "error: odd is 30x50 (height x width); sides must be multiples of 16 "
      "(the first stage's factor x the UNet's and the mask's halvings): use "
      "--height 16 --width 48 or --height 32 --width 64\n")
  with pytest.raises(DataError, match="--size 40 is not a multiple of 16"):
    masks_lib.target_size((30, 50), 16, size=40)
  assert masks_lib.target_size((30, 50), 16, height=32) == (32, 48)
  assert masks_lib.target_size((30, 60), 16, size=32) == (32, 64)


def test_legend_lists_every_class(tmp_path, capsys):
  out = tmp_path / "legend.png"
  assert sample.main(["--legend", "ade20k", "--out", str(out)]) == 0
  assert json.loads(capsys.readouterr().out) == {
      "legend": "ade20k", "classes": 150, "out": str(out)}
  sheet = np.asarray(Image.open(out))
  colours, names = palette.named("ade20k")
  assert names[6] == "road" and names[48] == "skyscraper"
  for rgb in colours[[6, 48, 149]]:  # each swatch is on the sheet
    assert (sheet == rgb).all(-1).any(), rgb
  assert sample.main(["--legend", "pascal"]) == 1
  assert "unknown label set 'pascal'" in capsys.readouterr().err


def test_load_and_sample_from_outside_the_repo(workdir, tmp_path):
  # `pip install -e .` (make does it): the package imports from anywhere.
  script = (
      "import json, sys, numpy as np, segldm_jax\n"
      "model = segldm_jax.load(sys.argv[1])\n"
      "masks = np.full((2, 32, 64), 156, np.uint8)\n"
      "images = model.sample(masks, num_samples=2, steps=2, sampler='ddim')\n"
      "print(json.dumps({'file': segldm_jax.__file__,\n"
      "                  'shape': images.shape, 'dtype': str(images.dtype),\n"
      "                  'classes': model.num_classes}))\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", script, str(workdir)],
                     cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert pathlib.Path(got["file"]).parent == ROOT / "segldm_jax"
  assert got == {**got, "shape": [2, 2, 32, 64, 3], "dtype": "uint8",
                 "classes": 182}
