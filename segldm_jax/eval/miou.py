"""Mask adherence: per-class IoU / mIoU, and the nearest-colour segmenter
that recovers the classes of synthetic-scene images.

``segment_synthetic`` is a fixed, training-free segmenter for images in the
style of ``segldm_jax.data.synthetic``: every class has a known colour, so a
pixel's class is its nearest class colour. To survive the blur and noise of
generated images it

1. denoises with a 3x3 box blur,
2. keeps only the classes that own a uniform 3x3 patch in a first
   nearest-colour pass (colour mixtures along borders produce 1-pixel-thin
   lines of unrelated classes; they never form a patch), and
3. labels each pixel from the remaining colours: a raw pixel clearly inside
   one class's colour cell keeps that class (keeps corners sharp); any other
   pixel is fitted, after the blur, as a mix of two class colours (what
   blur does at a border) and gets the dominant one.
"""
from __future__ import annotations

import numpy as np

from segldm_jax.data.base import IGNORE_ID
from segldm_jax.data.palette import nearest_colour
from segldm_jax.data.synthetic import class_colours, colour_spacing

# A raw pixel within this fraction of the grid spacing (per channel) of a
# class colour is trusted as is; the clean texture stays below ~0.35.
_CONFIDENT = 0.4


def _box_blur3(images: np.ndarray) -> np.ndarray:
  """3x3 mean filter with edge replication, (B, H, W, C) float32."""
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  out = np.zeros_like(images)
  for dy in range(3):
    for dx in range(3):
      out += padded[:, dy:dy + h, dx:dx + w]
  return out / 9.0


def _unmix(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """Dominant colour of the best two-colour mix per pixel, (P,) indices.

  Fits ``t * c_i + (1 - t) * c_j`` (t in [0, 1]) for every pair; single
  colours are the pairs' end points. Pixels go in chunks to bound memory.
  """
  diff = colours[:, None] - colours[None]  # (K, K, 3): c_i - c_j
  norm = np.maximum((diff**2).sum(-1), 1e-6)
  k = len(colours)
  out = np.empty(len(pixels), np.int64)
  for start in range(0, len(pixels), 8192):
    x = pixels[start:start + 8192, None, None] - colours[None, None]  # - c_j
    t = np.clip((x * diff).sum(-1) / norm, 0.0, 1.0)
    resid = ((x - t[..., None] * diff)**2).sum(-1).reshape(len(x), -1)
    best = resid.argmin(-1)
    i, j = np.unravel_index(best, (k, k))
    out[start:start + len(x)] = np.where(
        t.reshape(len(x), -1)[np.arange(len(x)), best] >= 0.5, i, j)
  return out


def _patch_owners(labels: np.ndarray) -> np.ndarray:
  """Ids that own a pixel with a uniform 3x3 neighbourhood (edge-padded)."""
  padded = np.pad(labels, 1, mode="edge")
  h, w = labels.shape
  uniform = np.ones((h, w), bool)
  for dy in range(3):
    for dx in range(3):
      uniform &= padded[dy:dy + h, dx:dx + w] == labels
  return np.unique(labels[uniform])


def segment_synthetic(images: np.ndarray, num_classes: int) -> np.ndarray:
  """Recovers per-pixel classes of synthetic-scene images.

  Args:
    images: uint8 (H, W, 3) or (B, H, W, 3).
    num_classes: the class count the images were made with.

  Returns:
    uint8 labels, (H, W) or (B, H, W).
  """
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected (B, H, W, 3) images, got {images.shape}")
  colours = class_colours(num_classes).astype(np.float32)
  trust = _CONFIDENT * colour_spacing(num_classes)
  raw = images.astype(np.float32)
  blurred = _box_blur3(raw)
  out = np.empty(images.shape[:3], np.uint8)
  for b in range(images.shape[0]):
    h, w = images.shape[1:3]
    smooth = blurred[b].reshape(-1, 3)
    first, _ = nearest_colour(smooth, colours)
    keep = _patch_owners(first.reshape(h, w))
    if keep.size == 0:  # e.g. pure noise: fall back to all classes seen
      keep = np.unique(first)
    sub = colours[keep]
    from_smooth = _unmix(smooth, sub)
    raw_pixels = raw[b].reshape(-1, 3)
    from_raw, _ = nearest_colour(raw_pixels, sub)
    raw_dist = np.abs(raw_pixels - sub[from_raw]).max(-1)  # per channel
    pick = np.where(raw_dist <= trust, from_raw, from_smooth)
    out[b] = keep[pick].reshape(h, w)
  return out[0] if single else out


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_id: int = IGNORE_ID) -> np.ndarray:
  """(num_classes, num_classes + 1) int64 counts, rows = target class.

  The extra last column counts predictions outside ``0..num_classes-1``
  (e.g. ``IGNORE_ID``): always wrong. Target pixels equal to ``ignore_id``
  are skipped.
  """
  pred = np.asarray(pred).astype(np.int64).ravel()
  target = np.asarray(target).astype(np.int64).ravel()
  if pred.shape != target.shape:
    raise ValueError(f"pred and target differ in size: {pred.size} vs "
                     f"{target.size}")
  valid = target != ignore_id
  if (target[valid] >= num_classes).any() or (target[valid] < 0).any():
    bad = target[valid][(target[valid] >= num_classes) | (target[valid] < 0)]
    raise ValueError(f"target value {bad[0]} out of range for "
                     f"num_classes={num_classes}")
  pred, target = pred[valid], target[valid]
  pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
  counts = np.bincount(target * (num_classes + 1) + pred,
                       minlength=num_classes * (num_classes + 1))
  return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int,
                  ignore_id: int = IGNORE_ID) -> np.ndarray:
  """IoU per class, float64 (num_classes,); NaN where a class is absent from
  both prediction and target (over non-ignored pixels)."""
  conf = confusion_matrix(pred, target, num_classes, ignore_id)
  tp = np.diag(conf[:, :num_classes]).astype(np.float64)
  union = conf.sum(1) + conf[:, :num_classes].sum(0) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / union, np.nan)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int,
             ignore_id: int = IGNORE_ID) -> float:
  """Mean IoU over classes present in prediction or target.

  All pixels of a batch are pooled (dataset-level IoU, not a mean of
  per-image scores). Returns NaN when no class is present.
  """
  ious = iou_per_class(pred, target, num_classes, ignore_id)
  present = ~np.isnan(ious)
  return float(ious[present].mean()) if present.any() else float("nan")
