"""Joint image/label transforms as grain transforms.

Every transform moves image and labels together, so they stay aligned pixel
for pixel. Random choices come from the ``rng`` grain passes per record
(derived from the pipeline seed and the record's position), so a pipeline is
reproducible and resumable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

Record = dict[str, Any]


def _check_pair(record: Record) -> tuple[np.ndarray, np.ndarray]:
  image, labels = record["image"], record["labels"]
  if image.shape[:2] != labels.shape:
    raise ValueError(f"image {image.shape} and labels {labels.shape} differ "
                     f"in size")
  return image, labels


def _check_fits(size: int, shape: tuple[int, ...]) -> None:
  if shape[0] < size or shape[1] < size:
    raise ValueError(f"cannot crop {size}x{size} from {shape[0]}x{shape[1]}; "
                     f"resize the shorter side first")


@dataclasses.dataclass(frozen=True)
class ResizeShorterSide(grain.transforms.Map):
  """Scales so the shorter side is ``size``, keeping the aspect ratio.

  Image: area averaging (PIL BOX) when shrinking, bicubic when enlarging, as
  taming's SmallestMaxSize(INTER_AREA) for the usual downscale. Labels:
  nearest neighbour, so ids are never blended.
  """

  size: int

  def map(self, record: Record) -> Record:
    image, labels = _check_pair(record)
    h, w = labels.shape
    if min(h, w) == self.size:
      return record
    scale = self.size / min(h, w)
    if h <= w:
      new_h, new_w = self.size, max(self.size, round(w * scale))
    else:
      new_h, new_w = max(self.size, round(h * scale)), self.size
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    labels = np.asarray(Image.fromarray(labels).resize(
        (new_w, new_h), Image.Resampling.NEAREST))
    return {**record, "image": image, "labels": labels}


@dataclasses.dataclass(frozen=True)
class CenterCrop(grain.transforms.Map):
  """Crops the central ``size`` x ``size`` window (evaluation)."""

  size: int

  def map(self, record: Record) -> Record:
    image, labels = _check_pair(record)
    _check_fits(self.size, labels.shape)
    top = (labels.shape[0] - self.size) // 2
    left = (labels.shape[1] - self.size) // 2
    window = np.s_[top:top + self.size, left:left + self.size]
    return {**record, "image": np.ascontiguousarray(image[window]),
            "labels": np.ascontiguousarray(labels[window])}


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """Crops a uniformly placed ``size`` x ``size`` window (training)."""

  size: int

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    image, labels = _check_pair(record)
    _check_fits(self.size, labels.shape)
    top = int(rng.integers(0, labels.shape[0] - self.size + 1))
    left = int(rng.integers(0, labels.shape[1] - self.size + 1))
    window = np.s_[top:top + self.size, left:left + self.size]
    return {**record, "image": np.ascontiguousarray(image[window]),
            "labels": np.ascontiguousarray(labels[window])}


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors image and labels left-right with probability ``prob``."""

  prob: float = 0.5

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    image, labels = _check_pair(record)
    if rng.random() >= self.prob:
      return record
    return {**record, "image": np.ascontiguousarray(image[:, ::-1]),
            "labels": np.ascontiguousarray(labels[:, ::-1])}
