"""Label maps and photos handed to the sampler: read, made ids, fitted.

The dataset's own masks come through the pipeline; these are the user's
files (`sample.py --masks`, `--edit_image`). They are decoded with the same
`LabelSpec` as the run's source (palette, ignore label, remap); 255 always
means "don't care" here, since it is never a class id.
"""

import pathlib
from typing import Any

import numpy as np
from PIL import Image

from segldm_jax.data import folder
from segldm_jax.data import pipeline
from segldm_jax.data.base import DataError
from segldm_jax.data.base import IGNORE_ID


def fit(array: np.ndarray, size: int, resample) -> np.ndarray:
  """Shorter side to `size`, then the centre size x size crop."""
  h, w = array.shape[:2]
  scale = size / min(h, w)
  img = Image.fromarray(array).resize(
      (max(size, round(w * scale)), max(size, round(h * scale))), resample)
  a = np.asarray(img)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def read_masks(path: pathlib.Path, data_config: Any, size: int
               ) -> tuple[list[str], np.ndarray]:
  """A PNG label map or a folder of them -> (names, ids (N, size, size)).

  Raises:
    DataError: no PNG found, or a map the config's labels cannot decode.
  """
  files = sorted(path.rglob("*.png")) if path.is_dir() else [path]
  if not files:
    raise DataError(f"--masks {path}: no PNG label maps found")
  spec = pipeline.label_spec(data_config, ignore_default=IGNORE_ID)
  labels = [fit(folder.read_mask(str(f), spec), size, Image.NEAREST)
            for f in files]
  return [f.stem for f in files], np.stack(labels)


def read_photo(path: pathlib.Path, size: int) -> np.ndarray:
  """A photo fitted like the masks: (size, size, 3) uint8."""
  return fit(folder.read_image(str(path)), size, Image.BICUBIC)


def dataset_masks(data_config: Any, size: int, count: int, seed: int
                  ) -> tuple[list[str], np.ndarray, Any]:
  """The first `count` masks of the config's dataset, from its validation
  split when it has one (centre crops; the synthetic source renders at
  `size`) -> (names, ids, source)."""
  data = data_config.copy_and_resolve_references()
  data.image_size = size
  source = pipeline.make_source(
      data, "val" if pipeline.has_val_split(data) else "train")
  ds = pipeline.make_dataset(source, image_size=size, batch_size=count,
                             seed=seed, train=False, shard_index=0,
                             shard_count=1, drop_remainder=False)
  labels = next(iter(ds))["labels"]
  return [f"mask{i:04d}" for i in range(len(labels))], labels, source
