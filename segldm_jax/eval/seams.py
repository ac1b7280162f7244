"""Tile seams: how much lines at given offsets stand out in images."""

import numpy as np


def seam_ratio(images: np.ndarray, seams, period: int) -> float:
  """How visible lines are: gradient energy across them vs other lines.

  Mean squared neighbour difference across the lines at pixel offsets
  `seams` (between pixel s-1 and s, rows and columns alike) divided by the
  same across the other lines of the same phase modulo `period` (e.g. the
  networks' total stride, whose own pattern would otherwise count). 1 means
  the lines do not stand out. images: (B, H, W, C), square.
  """
  x = np.asarray(images, np.float32)
  g = (((x[:, :, 1:] - x[:, :, :-1])**2).mean((0, 1, 3)) +
       ((x[:, 1:] - x[:, :-1])**2).mean((0, 2, 3))) / 2
  others = [e for e in range(period, x.shape[1], period) if e not in seams]
  return float(np.mean(g[np.asarray(seams) - 1]) /
               np.mean(g[np.asarray(others) - 1]))
