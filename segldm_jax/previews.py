"""Preview pictures a run writes while it trains: fixed masks, sampled.

The same few masks every time (centre crops of the first records), so that
grids from successive steps can be compared side by side.
"""

import pathlib

import numpy as np

from segldm_jax import viz
from segldm_jax.data import pipeline


def preview_labels(source, config, geometry) -> np.ndarray:
  """The same few masks every time (centre crops of the first records)."""
  n = int(config.sample.num_masks)
  ds = pipeline.make_dataset(source, image_size=geometry["image"],
                             batch_size=n, seed=config.seed, train=False,
                             shard_index=0, shard_count=1, drop_remainder=False,
                             bad_records=config.data.get("bad_records",
                                                         "error"))
  return next(iter(ds))["labels"]


def write_grid(labels: np.ndarray, images: np.ndarray, num_classes: int,
               path: pathlib.Path) -> np.ndarray:
  """Saves masks above their samples as one PNG; -> the grid."""
  grid = viz.mask_sample_grid(labels, images, num_classes)
  viz.save_png(grid, path)
  return grid
