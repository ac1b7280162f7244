"""Tests for segldm_jax.data.palette."""
import numpy as np
import pytest

from segldm_jax.data import IGNORE_ID
from segldm_jax.data import palette as palette_lib
from segldm_jax.data.palette import bit_palette, colorize, palette


def test_coco_stuff_palette_is_spades():
  colours = palette(182)
  assert colours.shape == (182, 3) and colours.dtype == np.uint8
  # Bit-interleaved colours of id + 1 (PASCAL VOC order) ...
  np.testing.assert_array_equal(colours[:4], [[128, 0, 0], [0, 128, 0],
                                              [128, 128, 0], [0, 0, 128]])
  # ... with SPADE's landscape colours: clouds, grass, sea, sky-other, tree.
  np.testing.assert_array_equal(
      colours[[105, 123, 154, 156, 168]],
      [[170, 170, 170], [29, 195, 49], [54, 62, 167], [95, 219, 255],
       [140, 104, 47]])
  assert len(np.unique(colours, axis=0)) == 182
  assert not (colours == 0).all(-1).any()  # black is reserved for ignore
  np.testing.assert_array_equal(palette(182, "coco_stuff"), colours)


def test_ade20k_palette_is_the_csail_color150():
  colours = palette(150)
  assert colours.shape == (150, 3)
  np.testing.assert_array_equal(colours[:3], [[120, 120, 120],
                                              [180, 120, 120], [6, 230, 230]])
  np.testing.assert_array_equal(colours[-2:], [[102, 255, 0], [92, 0, 255]])
  np.testing.assert_array_equal(colours[2], [6, 230, 230])  # sky
  np.testing.assert_array_equal(colours[4], [4, 200, 3])  # tree
  # Checksum of all 450 values (cross-checked against the DeepLab copy),
  # with skyscraper's (id 48) blue 140 -> 200: CSAIL gives it road's grey.
  assert int(colours.astype(np.int64).sum()) == 58427 + 60
  np.testing.assert_array_equal(colours[[6, 48]], [[140, 140, 140],
                                                   [140, 140, 200]])
  assert len(np.unique(colours, axis=0)) == 150  # every colour says one id
  with pytest.raises(ValueError, match="ade20k palette has 150"):
    palette(151, "ade20k")


def test_generic_palette_is_deterministic_and_distinct():
  for n in (1, 2, 8, 35, 255, 1000):
    colours = palette(n)
    assert colours.shape == (n, 3)
    assert len(np.unique(colours, axis=0)) == n
    assert not (colours == 0).all(-1).any()
    np.testing.assert_array_equal(colours, bit_palette(n))
  np.testing.assert_array_equal(palette(182, "generic")[:100], palette(100))
  with pytest.raises(ValueError, match="unknown palette"):
    palette(8, "viridis")


def test_colorize_draws_ignore_black_and_rejects_unknown_ids():
  colours = palette(182)
  labels = np.array([[[0, 156], [IGNORE_ID, 181]]] * 2, np.uint8)
  rgb = colorize(labels, colours)
  assert rgb.shape == (2, 2, 2, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, 0, 0], colours[0])
  np.testing.assert_array_equal(rgb[0, 0, 1], [95, 219, 255])
  np.testing.assert_array_equal(rgb[1, 1, 0], [0, 0, 0])
  np.testing.assert_array_equal(rgb[1, 1, 1], colours[181])
  with pytest.raises(ValueError, match="label 200 has no colour"):
    colorize(np.array([[200]]), colours)
  with pytest.raises(ValueError, match="label -1 has no colour"):
    colorize(np.array([[-1]]), colours)


def test_names_for_data_follow_the_label_set():
  assert palette_lib.names_for_data({"num_classes": 150})[:3] == (
      "wall", "building", "sky")
  assert palette_lib.names_for_data({"num_classes": 182})[156] == "sky-other"
  # 19 classes are Cityscapes only when the run says so; its colours too.
  city = {"num_classes": 19, "dataset": "cityscapes", "source": "folder"}
  assert palette_lib.names_for_data(city)[:2] == ("road", "sidewalk")
  assert palette_lib.for_data(city)[0].tolist() == [128, 64, 128]
  assert palette_lib.names_for_data({"num_classes": 19})[0] == "class 0"
  assert palette_lib.names_for_data({"num_classes": 150, "source": "synthetic"}
                                )[149] == "class 149"
