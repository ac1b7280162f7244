"""Procedural scenes whose per-pixel classes are known by construction.

Each record is a few horizontal background bands with wavy borders plus
several ellipses, rotated rectangles and star-shaped polygons, each region
filled with its class colour (``class_colours``) and a mild luminance texture
(stripes, a lighting gradient and a little noise). Record ``i`` depends only
on ``(seed, i)``; nothing is downloaded. Colours sit on a regular RGB grid so
``segldm_jax.eval.miou.segment_synthetic`` can recover the classes.
"""
from __future__ import annotations

import numpy as np

from segldm_jax.data.base import check_num_classes

# Grid range: away from 0/255 so the texture is not clipped on one side.
_COLOUR_LO, _COLOUR_HI = 16, 240
_COLOUR_SEED = 1234  # fixed: colours depend on num_classes only
# Texture amplitudes (grey levels). Their sum stays well below half the grid
# spacing (>= 18 for 255 classes), so every pixel keeps its class colour.
_STRIPE_AMP = (3.0, 6.0)
_LIGHT_AMP = 3.0
_NOISE_STD = 1.5


def colour_grid_levels(num_classes: int) -> int:
  """Smallest L with L**3 >= num_classes (at least 2)."""
  levels = 2
  while levels**3 < num_classes:
    levels += 1
  return levels


def colour_spacing(num_classes: int) -> float:
  """Distance between neighbouring class colours along one channel."""
  return (_COLOUR_HI - _COLOUR_LO) / (colour_grid_levels(num_classes) - 1)


def class_colours(num_classes: int) -> np.ndarray:
  """The class colours, uint8 (num_classes, 3): distinct points of a grid."""
  num_classes = check_num_classes(num_classes)
  levels = np.round(np.linspace(_COLOUR_LO, _COLOUR_HI,
                                colour_grid_levels(num_classes)))
  grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1)
  grid = grid.reshape(-1, 3)
  # A fixed shuffle so that neighbouring ids do not get similar colours.
  order = np.random.default_rng(_COLOUR_SEED).permutation(len(grid))
  return grid[order[:num_classes]].astype(np.uint8)


# Every class keeps a uniform patch of this size: a 3x3 blur still leaves a
# uniform 3x3 core, which is what the scorer looks for.
_CORE = 5


def _uniform_cores(labels: np.ndarray, size: int = _CORE) -> np.ndarray:
  """Class ids that own at least one uniform ``size`` x ``size`` patch."""
  h, w = labels.shape
  r = size // 2
  centre = labels[r:h - r, r:w - r]
  uniform = np.ones(centre.shape, bool)
  for dy in range(size):
    for dx in range(size):
      uniform &= labels[dy:dy + h - 2 * r, dx:dx + w - 2 * r] == centre
  return np.unique(centre[uniform])


def _all_classes_have_cores(labels: np.ndarray) -> bool:
  return np.array_equal(np.unique(labels), _uniform_cores(labels))


def _shape_mask(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray,
                height: int, width: int) -> np.ndarray:
  """One random ellipse, rotated rectangle or star-shaped polygon."""
  size = min(height, width)
  cy = rng.uniform(0.1, 0.9) * height
  cx = rng.uniform(0.1, 0.9) * width
  radius = rng.uniform(0.12, 0.3) * size
  angle = rng.uniform(0, np.pi)
  dy, dx = ys - cy, xs - cx
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  kind = rng.integers(3)
  if kind == 0:  # ellipse
    minor = radius * rng.uniform(0.6, 1.0)
    return (u / radius)**2 + (v / minor)**2 <= 1.0
  if kind == 1:  # rectangle
    minor = radius * rng.uniform(0.5, 1.0)
    return (np.abs(u) <= radius) & (np.abs(v) <= minor)
  # Star-shaped polygon (triangle .. hexagon) around the centre; crossing
  # number test on pixel centres.
  count = int(rng.integers(3, 7))
  thetas = np.sort(rng.uniform(0, 2 * np.pi, count))
  radii = radius * rng.uniform(0.6, 1.0, count)
  vy, vx = cy + radii * np.sin(thetas), cx + radii * np.cos(thetas)
  inside = np.zeros(ys.shape, bool)
  for i in range(count):
    y1, x1, y2, x2 = vy[i], vx[i], vy[(i + 1) % count], vx[(i + 1) % count]
    if y1 == y2:
      continue
    crosses = (y1 > ys) != (y2 > ys)
    x_at = x1 + (x2 - x1) * (ys - y1) / (y2 - y1)
    inside ^= crosses & (xs < x_at)
  return inside


def render_scene(seed: int, index: int, height: int, width: int,
                 num_classes: int) -> dict[str, np.ndarray]:
  """Renders record ``index`` of the scene family ``seed``."""
  rng = np.random.default_rng([seed, index])
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  labels = np.zeros((height, width), np.uint8)
  region = np.zeros((height, width), np.int32)

  # Background bands: evenly spaced wavy borders keep every band thick.
  n_bands = int(rng.integers(1, 4))
  band_classes = rng.choice(num_classes, n_bands,
                            replace=num_classes < n_bands)
  labels[:] = band_classes[0]
  for k in range(1, n_bands):
    base = (k + rng.uniform(-0.15, 0.15)) / n_bands * height
    amp = rng.uniform(0, 0.06) * height
    freq = rng.uniform(0.5, 2.0) * 2 * np.pi / width
    border = base + amp * np.sin(freq * xs + rng.uniform(0, 2 * np.pi))
    labels[ys > border] = band_classes[k]
    region[ys > border] = k

  # Shapes, painted in order; one that would leave any class without a
  # uniform core (a sliver) is dropped, so every class stays recoverable.
  n_regions = n_bands
  for _ in range(int(rng.integers(2, 7))):
    mask = _shape_mask(rng, ys, xs, height, width)
    cls = rng.integers(num_classes)
    candidate = labels.copy()
    candidate[mask] = cls
    if mask.sum() >= _CORE**2 and _all_classes_have_cores(candidate):
      labels = candidate
      region[mask] = n_regions
      n_regions += 1

  # Per-region stripes (luminance only) + lighting gradient + noise.
  amp = rng.uniform(*_STRIPE_AMP, n_regions)
  period = rng.uniform(4.0, 10.0, n_regions)
  theta = rng.uniform(0, np.pi, n_regions)
  phase = rng.uniform(0, 2 * np.pi, n_regions)
  proj = (xs * np.cos(theta)[region] + ys * np.sin(theta)[region])
  texture = amp[region] * np.sin(2 * np.pi * proj / period[region] +
                                 phase[region])
  gy, gx = rng.uniform(-1, 1, 2)
  texture += _LIGHT_AMP * (gy * (ys / height - 0.5) + gx * (xs / width - 0.5))
  texture += rng.normal(0.0, _NOISE_STD, (height, width))
  image = class_colours(num_classes)[labels].astype(np.float64)
  image += texture[..., None]
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return {"image": image, "labels": labels}


class SyntheticSource:
  """Grain random-access source of procedural scenes (see module docstring).

  Args:
    num_records: number of records.
    image_size: int (square) or (height, width).
    num_classes: 1..255 classes.
    seed: scene family; record ``i`` depends only on ``(seed, i)``.
  """

  decoder = None  # records are rendered in __getitem__ (in grain workers)

  def __init__(self, num_records: int, image_size: int | tuple[int, int],
               num_classes: int, seed: int = 0):
    if num_records < 1:
      raise ValueError(f"num_records must be >= 1, got {num_records}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    if isinstance(image_size, int):
      image_size = (image_size, image_size)
    self.height, self.width = (int(s) for s in image_size)
    if min(self.height, self.width) < 8:
      raise ValueError(f"image_size must be >= 8, got {image_size}")
    self.num_records = int(num_records)
    self.num_classes = check_num_classes(num_classes)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range 0..{self.num_records - 1}")
    return render_scene(self.seed, index, self.height, self.width,
                        self.num_classes)

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_records={self.num_records}, image_size="
            f"({self.height}, {self.width}), num_classes={self.num_classes}, "
            f"seed={self.seed})")
