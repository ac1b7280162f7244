"""Class palettes and mask colourisation, used for every mask picture.

* 182 classes: the COCO-Stuff palette of the semantic-synthesis literature
  (NVlabs/SPADE ``util.labelcolormap(182)``): the PASCAL-VOC bit-interleaved
  colour map of ``id + 1`` with fixed colours for sea, sky-other, tree,
  clouds and grass, so landscapes look like landscapes.
* 150 classes: the standard ADE20K palette (CSAIL semantic-segmentation
  ``color150``, also mmsegmentation's ``ADE20KDataset`` palette); id ``k`` is
  ADE class ``k + 1``. Kept verbatim: ids 6 and 48 share (140, 140, 140).
* any other count: the same bit-interleaved map of ``id + 1`` (distinct
  colours for up to 2**21 - 1 ids, none black).

``IGNORE_ID`` pixels are drawn black.
"""
from __future__ import annotations

import numpy as np

from segldm_jax.data.base import IGNORE_ID

# COCO-Stuff 0-based ids (COCO-Stuff label - 1) -> SPADE's fixed colours.
_COCO_STUFF_FIXED = {
    154: (54, 62, 167),  # sea
    156: (95, 219, 255),  # sky-other
    168: (140, 104, 47),  # tree
    105: (170, 170, 170),  # clouds
    123: (29, 195, 49),  # grass
}

_ADE20K = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50),
    (4, 200, 3), (120, 120, 80), (140, 140, 140), (204, 5, 255),
    (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224),
    (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153),
    (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0),
    (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0),
    (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255),
    (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255),
    (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160),
    (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0),
    (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0),
    (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204),
    (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194),
    (102, 255, 0), (92, 0, 255),
)

_NAMED_SIZES = {"coco_stuff": 182, "ade20k": 150}


def bit_palette(num_classes: int) -> np.ndarray:
  """PASCAL-VOC style colours of ``id + 1``: bits spread over r, g, b."""
  ids = np.arange(1, num_classes + 1, dtype=np.int64)
  rgb = np.zeros((num_classes, 3), np.int64)
  for j in range(7):
    for channel in range(3):
      rgb[:, channel] |= ((ids >> channel) & 1) << (7 - j)
    ids >>= 3
  return rgb.astype(np.uint8)


def palette(num_classes: int, name: str | None = None) -> np.ndarray:
  """Class colours, uint8 (num_classes, 3).

  Args:
    num_classes: number of classes.
    name: "coco_stuff" (182), "ade20k" (150) or "generic"; None picks by
      ``num_classes`` (182 -> COCO-Stuff, 150 -> ADE20K, else generic).
  """
  if num_classes < 1 or num_classes >= 2**21:
    raise ValueError(f"num_classes must be in 1..{2**21 - 1}, got "
                     f"{num_classes}")
  if name is None:
    name = {182: "coco_stuff", 150: "ade20k"}.get(num_classes, "generic")
  if name in _NAMED_SIZES and num_classes != _NAMED_SIZES[name]:
    raise ValueError(f"the {name} palette has {_NAMED_SIZES[name]} classes, "
                     f"not {num_classes}")
  if name == "ade20k":
    return np.array(_ADE20K, np.uint8)
  if name not in ("coco_stuff", "generic"):
    raise ValueError(f"unknown palette {name!r}; use coco_stuff, ade20k or "
                     f"generic")
  colours = bit_palette(num_classes)
  if name == "coco_stuff":
    for class_id, rgb in _COCO_STUFF_FIXED.items():
      colours[class_id] = rgb
  return colours


def colorize(labels, colours: np.ndarray) -> np.ndarray:
  """Label map (any shape, int) -> uint8 RGB (..., 3); IGNORE_ID is black.

  Raises:
    ValueError: a label is neither a palette index nor IGNORE_ID.
  """
  labels = np.asarray(labels).astype(np.int64)
  colours = np.asarray(colours, np.uint8)
  table = np.zeros((max(len(colours), IGNORE_ID + 1), 3), np.uint8)
  table[:len(colours)] = colours
  table[IGNORE_ID] = 0
  bad = (labels < 0) | (labels >= len(table)) | (
      (labels >= len(colours)) & (labels != IGNORE_ID))
  if bad.any():
    raise ValueError(f"label {labels[bad].flat[0]} has no colour (palette "
                     f"has {len(colours)} entries; {IGNORE_ID} = ignore)")
  return table[labels]
