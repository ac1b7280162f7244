"""Label maps and photos handed to the sampler: read, made ids, sized.

The dataset's own masks come through the pipeline; these are the user's
files (`sample.py --masks`, `--edit_image`). By default they are decoded
like the run's source (its palette, ignore label and remap). A painted mask
names its palette (`palette=`: a label set of `palette.named`, e.g.
"coco-stuff", or a palette file) and is then in class-id space: colours snap
to the nearest palette colour within `palette_tolerance`, and blended edges
take their regions' ids (`palette.read_painted`). 255 always means "don't
care", since it is never a class id.

Masks keep their aspect ratio: sides must be multiples of the model's
`step_px` (first stage factor x the UNet's and the mask's halvings), or be
resized explicitly (`height`, `width`, or `size` for the shorter side).
"""

import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from segldm_jax.data import folder
from segldm_jax.data import palette as palette_lib
from segldm_jax.data import pipeline
from segldm_jax.data.base import DataError
from segldm_jax.data.base import IGNORE_ID
from segldm_jax.data.labels import LabelSpec


def painted_spec(num_classes: int, palette: str, tolerance: float,
                 unknown_colours: str = "error") -> LabelSpec:
  """Class-id space for masks painted with `palette` (a label set's name or
  a palette file)."""
  if os.path.exists(palette):
    colours = palette
  else:
    try:
      colours, _ = palette_lib.named(palette)
    except ValueError as e:
      raise DataError(f"--palette {palette}: {e}, or a palette file") from None
    if len(colours) != num_classes:
      raise DataError(f"--palette {palette} has {len(colours)} classes; this "
                      f"model has {num_classes}")
    colours = colours.tolist()
  return LabelSpec.create(num_classes, ignore_label=IGNORE_ID, palette=colours,
                          palette_tolerance=tolerance,
                          unknown_colours=unknown_colours)


def read_masks(path: pathlib.Path, data_config: Any,
               spec: LabelSpec | None = None
               ) -> tuple[list[str], list[np.ndarray]]:
  """A PNG label map or a folder of them -> (names, ids (H, W) each).

  `spec` (e.g. `painted_spec`) overrides the run's own label settings.

  Raises:
    DataError: no PNG found, or a map the labels cannot decode.
  """
  files = sorted(path.rglob("*.png")) if path.is_dir() else [path]
  if not files:
    raise DataError(f"--masks {path}: no PNG label maps found")
  spec = spec or pipeline.label_spec(data_config, ignore_default=IGNORE_ID)
  return ([f.stem for f in files],
          [folder.read_mask(str(f), spec) for f in files])


def _multiple(n: float, step: int) -> int:
  return max(step, int(round(n / step)) * step)


def nearest_sizes(height: int, width: int, step: int
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
  """The valid (height, width) just below and just above a size."""
  return ((max(step, height // step * step), max(step, width // step * step)),
          (-(-height // step) * step, -(-width // step) * step))


def target_size(shape: tuple[int, int], step: int, *, size: int | None = None,
                height: int | None = None, width: int | None = None,
                name: str = "mask") -> tuple[int, int]:
  """The (height, width) a mask of `shape` is sampled at.

  Explicit `height`/`width` win (one alone keeps the aspect ratio); `size`
  scales the shorter side; otherwise the mask's own size, which must then be
  a multiple of `step` on both sides.
  """
  h, w = shape
  if size and size % step:
    raise DataError(
        f"--size {size} is not a multiple of {step} (the first stage's "
        f"factor x the UNet's and the mask's halvings); use "
        f"{size // step * step or step}")
  if height or width:
    height = height or _multiple(h * width / w, step)
    width = width or _multiple(w * height / h, step)
  elif size:
    scale = size / min(h, w)
    height, width = _multiple(h * scale, step), _multiple(w * scale, step)
  else:
    height, width = h, w
  if height % step or width % step:
    lo, hi = nearest_sizes(height, width, step)
    raise DataError(
        f"{name} is {height}x{width} (height x width); sides must be "
        f"multiples of {step} (the first stage's factor x the UNet's and the "
        f"mask's halvings): use --height {lo[0]} --width {lo[1]} or "
        f"--height {hi[0]} --width {hi[1]}")
  return height, width


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
  if labels.shape == (height, width):
    return labels
  return np.asarray(Image.fromarray(labels).resize((width, height),
                                                   Image.NEAREST))


def size_masks(names: list[str], labels: list[np.ndarray], step: int,
               **sizes) -> np.ndarray:
  """Each mask at its `target_size` -> (N, H, W); all must agree."""
  out = [resize_labels(m, *target_size(m.shape, step, name=n, **sizes))
         for n, m in zip(names, labels)]
  shapes = {m.shape for m in out}
  if len(shapes) > 1:
    listed = ", ".join(f"{n} {m.shape[0]}x{m.shape[1]}"
                       for n, m in list(zip(names, out))[:4])
    raise DataError(f"the masks differ in size ({listed}); sample them "
                    "apart or give --height and --width")
  return np.stack(out)


def check_aspect(photo_shape: tuple[int, int], shape: tuple[int, int],
                 name: str) -> None:
  """A photo of (h, w) fits a label map of `shape` up to 2% of aspect."""
  h, w = photo_shape
  if abs(h / w - shape[0] / shape[1]) > 0.02 * shape[0] / shape[1]:
    raise DataError(f"{name} is {h}x{w} but its label map is "
                    f"{shape[0]}x{shape[1]}: the aspect ratios differ")


def fit_photo(photo: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """uint8 (h, w, 3) resized (bicubic) to `shape` = (height, width)."""
  return np.asarray(Image.fromarray(photo).resize(shape[::-1], Image.BICUBIC))


def read_photo(path: pathlib.Path, shape: tuple[int, int]) -> np.ndarray:
  """A photo resized to its label map's (height, width): (H, W, 3) uint8."""
  photo = folder.read_image(str(path))
  check_aspect(photo.shape[:2], shape, str(path))
  return fit_photo(photo, shape)


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
