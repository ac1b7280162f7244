"""Tests for the synthetic scenes and the mask-adherence scorer."""
import functools

import numpy as np
import pytest

from segldm_jax.data import IGNORE_ID
from segldm_jax.data.synthetic import (SyntheticSource, class_colours,
                                       colour_spacing)
from segldm_jax.eval.miou import (confusion_matrix, iou_per_class, mean_iou,
                                 segment_synthetic)


def _batch(source):
  records = [source[i] for i in range(len(source))]
  return (np.stack([r["image"] for r in records]),
          np.stack([r["labels"] for r in records]))


def _blur3_and_noise(images, sigma, seed=0):
  """3x3 box blur (edge-replicated) + Gaussian noise, back to uint8."""
  x = images.astype(np.float64)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1:3]
  blurred = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3)
                for dx in range(3)) / 9.0
  noisy = blurred + np.random.default_rng(seed).normal(0, sigma, x.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def test_records_are_deterministic_per_seed_and_index():
  a = SyntheticSource(6, 48, 182, seed=11)
  b = SyntheticSource(60, 48, 182, seed=11)  # record i ignores num_records
  c = SyntheticSource(6, 48, 182, seed=12)
  for i in range(6):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    np.testing.assert_array_equal(a[i]["labels"], b[i]["labels"])
    assert not np.array_equal(a[i]["image"], c[i]["image"])
  assert not np.array_equal(a[0]["labels"], a[1]["labels"])


@pytest.mark.parametrize("num_classes,size", [(2, 16), (8, 32), (182, 64),
                                              (255, (40, 72))])
def test_records_have_labels_in_range_and_textured_regions(num_classes, size):
  source = SyntheticSource(8, size, num_classes, seed=0)
  height, width = (size, size) if isinstance(size, int) else size
  images, labels = _batch(source)
  assert images.shape == (8, height, width, 3) and images.dtype == np.uint8
  assert labels.shape == (8, height, width) and labels.dtype == np.uint8
  assert labels.max() < num_classes
  colours = class_colours(num_classes).astype(np.float64)
  for image, label in zip(images, labels):
    deviation = np.abs(image - colours[label])
    # Each pixel stays near its class colour, but regions are not flat.
    assert deviation.max() < colour_spacing(num_classes) / 2
    assert deviation.std() > 1.0
  if num_classes > 2:
    assert np.mean([len(np.unique(l)) for l in labels]) >= 3


def test_class_colours_are_distinct_and_fixed():
  for n in (2, 8, 9, 150, 182, 255):
    colours = class_colours(n)
    assert colours.shape == (n, 3) and colours.dtype == np.uint8
    assert len(np.unique(colours, axis=0)) == n
    # Distinct grid points: >= one grid step apart in some channel.
    steps = np.abs(colours[:, None].astype(int) -
                   colours[None].astype(int)).max(-1)
    assert steps[~np.eye(n, dtype=bool)].min() >= colour_spacing(n) - 1
  np.testing.assert_array_equal(class_colours(182), class_colours(182))
  with pytest.raises(ValueError, match="num_classes"):
    class_colours(256)
  with pytest.raises(ValueError, match="num_classes"):
    SyntheticSource(4, 32, 300)


@pytest.mark.parametrize("num_classes,size", [(182, 64), (8, 32)])
def test_scorer_recovers_the_labels(num_classes, size):
  images, labels = _batch(SyntheticSource(16, size, num_classes, seed=7))
  segment = functools.partial(segment_synthetic, num_classes=num_classes)
  clean = mean_iou(segment(images), labels, num_classes)
  degraded = mean_iou(segment(_blur3_and_noise(images, sigma=8.0)), labels,
                      num_classes)
  assert clean >= 0.95, clean
  assert degraded >= 0.8, degraded
  # A single image (H, W, 3) works too.
  np.testing.assert_array_equal(segment_synthetic(images[0], num_classes),
                                segment(images)[0])


def test_scorer_is_not_fooled_by_the_wrong_masks():
  images, labels = _batch(SyntheticSource(8, 32, 8, seed=3))
  pred = segment_synthetic(images, 8)
  assert mean_iou(pred, labels[::-1], 8) < 0.6
  assert mean_iou(pred, np.roll(labels, 6, axis=2), 8) < 0.8


def test_mean_iou_by_hand():
  target = np.array([[0, 0, 1, 1], [2, 2, IGNORE_ID, IGNORE_ID]])
  pred = np.array([[0, 1, 1, 1], [2, IGNORE_ID, 0, 3]])
  # class 0: tp 1, fp 0, fn 1 -> 1/2; class 1: tp 2, fp 1 -> 2/3;
  # class 2: tp 1, fn 1 (predicted IGNORE_ID counts as wrong) -> 1/2;
  # class 3 absent from target and (non-ignored) prediction -> skipped.
  ious = iou_per_class(pred, target, 5)
  np.testing.assert_allclose(ious[:3], [0.5, 2 / 3, 0.5])
  assert np.isnan(ious[3]) and np.isnan(ious[4])
  assert mean_iou(pred, target, 5) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
  conf = confusion_matrix(pred, target, 5)
  assert conf.shape == (5, 6) and conf.sum() == 6 and conf[2, 5] == 1
  assert mean_iou(target, target, 5) == 1.0
  assert np.isnan(mean_iou(target[:, 2:] * 0 + IGNORE_ID,
                           target[:, 2:] * 0 + IGNORE_ID, 5))
  with pytest.raises(ValueError, match="target value 7"):
    mean_iou(pred, np.full_like(target, 7), 5)
