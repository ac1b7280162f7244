"""Pictures people look at: colourised masks beside samples, as PNG grids."""

import pathlib

import numpy as np
from PIL import Image
from PIL import ImageDraw

from segldm_jax.data import palette as palette_lib


def grid(rows: list[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
  """Rows of (N, H, W, 3) uint8 images -> one (R*H', N*W', 3) picture."""
  n = max(r.shape[0] for r in rows)
  h, w = rows[0].shape[1:3]
  out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), fill,
                np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = img
  return out


def mask_sample_grid(labels: np.ndarray, samples: np.ndarray,
                     colours: np.ndarray) -> np.ndarray:
  """Masks drawn in `colours` (ignored pixels black) over their samples.

  samples may be (N, H, W, 3) or (N, K, H, W, 3) for K samples per mask.
  `colours`: `palette.for_data(config.data)`, the colours the classes take
  in the run's images where known, so each region can be checked by eye.
  """
  rows = [palette_lib.colorize(np.asarray(labels), colours)]
  samples = np.asarray(samples)
  if samples.ndim == 5:
    rows += [samples[:, k] for k in range(samples.shape[1])]
  else:
    rows.append(samples)
  return grid(rows)


def save_png(image: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
  return path


def legend(colours: np.ndarray, names, columns: int = 4,
           swatch: int = 18) -> np.ndarray:
  """A swatch sheet to paint masks with: colour, id and class name per
  entry, column by column -> uint8 (H, W, 3)."""
  cell_w, cell_h = 200, swatch + 4
  rows = -(-len(colours) // columns)
  image = Image.new("RGB", (columns * cell_w + 8, rows * cell_h + 8), "white")
  draw = ImageDraw.Draw(image)
  for i, (rgb, name) in enumerate(zip(np.asarray(colours), names)):
    x, y = 4 + (i // rows) * cell_w, 4 + (i % rows) * cell_h
    draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in rgb),
                   outline="black")
    draw.text((x + swatch + 6, y + 4), f"{i:3d} {name}", fill="black")
  return np.asarray(image)
