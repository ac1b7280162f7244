"""Class palettes and mask colourisation, used for every mask picture.

* 182 classes: the COCO-Stuff palette of the semantic-synthesis literature
  (NVlabs/SPADE ``util.labelcolormap(182)``): the PASCAL-VOC bit-interleaved
  colour map of ``id + 1`` with fixed colours for sea, sky-other, tree,
  clouds and grass, so landscapes look like landscapes.
* 150 classes: the standard ADE20K palette (CSAIL semantic-segmentation
  ``color150``, also mmsegmentation's ``ADE20KDataset`` palette); id ``k`` is
  ADE class ``k + 1``. One change: there, ids 6 (road) and 48 (skyscraper)
  share (140, 140, 140), so a painted colour could not say which; here
  skyscraper is (140, 140, 200), a colour no other class has. Masks
  coloured with the original palette read that grey as road.
* 19 classes: the Cityscapes train ids in their official colours.
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
_ADE20K_SKYSCRAPER = (48, (140, 140, 200))  # see the module docstring

_CITYSCAPES = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
    (0, 0, 230), (119, 11, 32),
)

# COCO-Stuff: id k is COCO-Stuff label k + 1: the 91 COCO thing ids (11 of them
# never annotated: COCO_STUFF_UNUSED), then the 91 stuff classes.
COCO_STUFF_NAMES = ('person', 'bicycle', 'car', 'motorcycle', 'airplane',
    'bus', 'train', 'truck', 'boat', 'traffic light', 'fire hydrant',
    'street sign', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'hat',
    'backpack', 'umbrella', 'shoe', 'eye glasses', 'handbag', 'tie',
    'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'plate', 'wine glass', 'cup', 'fork', 'knife',
    'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'mirror', 'dining table', 'window', 'desk',
    'toilet', 'door', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator',
    'blender', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush', 'hair brush', 'banner', 'blanket', 'branch', 'bridge',
    'building-other', 'bush', 'cabinet', 'cage', 'cardboard', 'carpet',
    'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter',
    'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence',
    'floor-marble', 'floor-other', 'floor-stone', 'floor-tile', 'floor-wood',
    'flower', 'fog', 'food-other', 'fruit', 'furniture-other', 'grass',
    'gravel', 'ground-other', 'hill', 'house', 'leaves', 'light', 'mat',
    'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net',
    'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform',
    'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof',
    'rug', 'salad', 'sand', 'sea', 'shelf', 'sky-other', 'skyscraper', 'snow',
    'solid-other', 'stairs', 'stone', 'straw', 'structural-other', 'table',
    'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick',
    'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile',
    'wall-wood', 'water-other', 'waterdrops', 'window-blind', 'window-other',
    'wood')
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
# ADE20K SceneParsing: id k is ADE class k + 1 (annotation value 0 = unlabeled).
ADE20K_NAMES = ('wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road',
    'bed', 'windowpane', 'grass', 'cabinet', 'sidewalk', 'person', 'earth',
    'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator',
    'grandstand', 'path', 'stairs', 'runway', 'case', 'pool', 'pillow',
    'screen', 'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee',
    'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen', 'computer', 'swivel', 'boat', 'bar', 'arcade', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight',
    'booth', 'television', 'airplane', 'dirt', 'apparel', 'pole', 'land',
    'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage',
    'van', 'ship', 'fountain', 'conveyer', 'canopy', 'washer', 'plaything',
    'swimming', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag',
    'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic', 'tray',
    'ashcan', 'fan', 'pier', 'crt', 'plate', 'monitor', 'bulletin', 'shower',
    'radiator', 'glass', 'clock', 'flag')
# Cityscapes: the 19 train ids.
CITYSCAPES_NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole',
    'traffic light', 'traffic sign', 'vegetation', 'terrain', 'sky', 'person',
    'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle')

_NAMES = {"coco_stuff": COCO_STUFF_NAMES, "ade20k": ADE20K_NAMES,
          "cityscapes": CITYSCAPES_NAMES}
_NAMED_SIZES = {name: len(names) for name, names in _NAMES.items()}


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
    name: "coco_stuff" (182), "ade20k" (150), "cityscapes" (19) or
      "generic" ("-" and "_" alike); None picks by ``num_classes`` (182 ->
      COCO-Stuff, 150 -> ADE20K, else generic).
  """
  name = None if name is None else name.replace("-", "_")
  if num_classes < 1 or num_classes >= 2**21:
    raise ValueError(f"num_classes must be in 1..{2**21 - 1}, got "
                     f"{num_classes}")
  if name is None:
    name = {182: "coco_stuff", 150: "ade20k"}.get(num_classes, "generic")
  if name in _NAMED_SIZES and num_classes != _NAMED_SIZES[name]:
    raise ValueError(f"the {name} palette has {_NAMED_SIZES[name]} classes, "
                     f"not {num_classes}")
  if name == "ade20k":
    colours = np.array(_ADE20K, np.uint8)
    colours[_ADE20K_SKYSCRAPER[0]] = _ADE20K_SKYSCRAPER[1]
    return colours
  if name == "cityscapes":
    return np.array(_CITYSCAPES, np.uint8)
  if name not in ("coco_stuff", "generic"):
    raise ValueError(f"unknown palette {name!r}; use coco-stuff, ade20k, "
                     "cityscapes or generic")
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


def named(name: str) -> tuple[np.ndarray, tuple[str, ...]]:
  """A dataset's label set: (colours uint8 (K, 3), class names)."""
  key = name.replace("-", "_")
  if key not in _NAMES:
    raise ValueError(f"unknown label set {name!r}; use "
                     f"{', '.join(n.replace('_', '-') for n in _NAMES)}")
  return palette(_NAMED_SIZES[key], key), _NAMES[key]


def _label_set(data_config) -> str | None:
  """The named label set a run uses: its `data.dataset`, else by class count
  (182 COCO-Stuff, 150 ADE20K, as `palette` picks); None for others."""
  num_classes = int(data_config.get("num_classes"))
  if data_config.get("source") == "synthetic":
    return None
  key = str(data_config.get("dataset", "") or "").replace("-", "_")
  if key in _NAMES and _NAMED_SIZES[key] == num_classes:
    return key
  return {182: "coco_stuff", 150: "ade20k"}.get(num_classes)


def for_data(data_config) -> np.ndarray:
  """The colours a run's masks are drawn in, so that a reader can match each
  region to what it should become: the scenes' own class colours for the
  synthetic source, else the label set's palette."""
  num_classes = int(data_config.get("num_classes"))
  if data_config.get("source") == "synthetic":
    from segldm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.class_colours(num_classes)
  return palette(num_classes, _label_set(data_config))


def names_for_data(data_config) -> tuple[str, ...]:
  """The names of a run's classes, as people pick them from a palette: the
  label set's, else "class k"."""
  key = _label_set(data_config)
  if key is not None:
    return _NAMES[key]
  return tuple(f"class {k}" for k in range(int(data_config.get("num_classes"))))
