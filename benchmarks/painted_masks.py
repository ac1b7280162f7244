r"""Resized painted masks read back as classes (issue 26, item 7).

  python benchmarks/painted_masks.py [--maps '../shared/data/sflckr/segmentations/*/*.png']

Each sflckr label map (COCO-Stuff ids, DeepLab's: full of one-pixel
details at this size) is taken to 128x64 and 64x128 (nearest), coloured
with the COCO-Stuff palette, enlarged 2x with bilinear filtering, and read
the way `sample.py --palette coco-stuff` reads it (tolerance 30). Reports
how many maps are refused and the unknown pixels; over the maps read, the
share of pixels equal to the nearest-neighbour enlargement of the ids, and
the pixels given a class that no source pixel within 2 has; the seconds.
Uses only `masks.painted_spec` and `LabelSpec.colours_to_values`, so a
copy of this file in an older checkout measures that checkout's reader.
"""

import argparse
import glob
import json
import pathlib
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from segldm_jax.data import masks as masks_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from segldm_jax.data import palette  # pylint: disable=g-import-not-at-top,wrong-import-position
from segldm_jax.data.base import DataError  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
              "sflckr" / "segmentations" / "*" / "*.png")


def _outside(got: np.ndarray, ids: np.ndarray, radius: int = 2) -> int:
  h, w = ids.shape
  yy, xx = np.arange(2 * h) // 2, np.arange(2 * w) // 2
  ok = np.zeros(got.shape, bool)
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      ok |= got == ids[np.clip(yy + dy, 0, h - 1)][:, np.clip(xx + dx, 0,
                                                             w - 1)]
  return int((~ok).sum())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--maps", default=DEFAULT)
  args = ap.parse_args()
  colours, _ = palette.named("coco-stuff")
  spec = masks_lib.painted_spec(182, "coco-stuff", 30.0)
  paths = sorted(glob.glob(args.maps))
  refused, unknown, equal, outside, pixels, seconds = 0, 0, 0, 0, 0, 0.0
  for path in paths:
    for size in ((128, 64), (64, 128)):
      with Image.open(path) as labels:
        ids = np.asarray(labels.resize(size, Image.NEAREST))
      rgb = np.asarray(Image.fromarray(colours[ids]).resize(
          (2 * size[0], 2 * size[1]), Image.BILINEAR))
      start = time.monotonic()
      try:
        values, _ = spec.colours_to_values(rgb, path)
      except DataError as e:
        refused += 1
        unknown += int(str(e).split(": ", 1)[1].split()[0])
        continue
      finally:
        seconds += time.monotonic() - start
      got = spec.to_ids(values, path)
      equal += int((got == np.repeat(np.repeat(ids, 2, 0), 2, 1)).sum())
      outside += _outside(got, ids)
      pixels += got.size
  print(json.dumps({
      "maps": 2 * len(paths), "refused": refused, "unknown_pixels": unknown,
      "read_pixels": pixels,
      "equal_to_nearest": round(equal / max(pixels, 1), 4),
      "class_not_within_2_source_px": outside,
      "seconds_per_map": round(seconds / max(2 * len(paths), 1), 3)}))


if __name__ == "__main__":
  main()
