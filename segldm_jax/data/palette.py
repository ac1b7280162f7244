"""Class palettes and mask colourisation, used for every mask picture, and
the reader that takes painted colours back to classes (`read_painted`).

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


# ---------------------------------------------------------------------------
# Painted masks: colours read back as classes.
# ---------------------------------------------------------------------------

FLAT_RGB = 8        # a pixel this close to its 4 neighbours is inside a region
WINDOW_PX = 2       # radius of the window whose regions explain a blend
BLEND_RGB = 2.0     # a blend of two colours lies this close to their segment
FILL_PX = 3         # blends no pair explains take a class from this close by
_ENDS = 4           # distinct region classes of a window considered
_CHUNK = 1 << 16


def _unpack(codes: np.ndarray) -> np.ndarray:
  """Packed 0xRRGGBB -> float32 (..., 3)."""
  codes = np.asarray(codes, np.int64)
  return np.stack([(codes >> s) & 255 for s in (16, 8, 0)], -1).astype(
      np.float32)


def _pack(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.int32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def nearest_colour(pixels: np.ndarray, colours: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """float32 RGB rows (P, 3) and (K, 3) -> per pixel, the index of the
  nearest colour (Euclidean; the first on ties) and its squared distance
  (a little below 0 where rounding makes it so)."""
  d2 = ((pixels * pixels).sum(1)[:, None] - 2 * pixels @ colours.T
        + (colours * colours).sum(1)[None])
  near = d2.argmin(1)
  return near, d2[np.arange(len(pixels)), near]


def _nearest(colours: np.ndarray, pal: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  """(N, 3) colours -> (index of the nearest palette colour, its RGB
  distance), in chunks (a photo has ~10^5 distinct colours)."""
  near = np.empty(len(colours), np.int64)
  dist = np.empty(len(colours), np.float32)
  for s in range(0, len(colours), _CHUNK // 4):
    a = colours[s:s + _CHUNK // 4]
    near[s:s + len(a)], d2 = nearest_colour(a, pal)
    dist[s:s + len(a)] = np.sqrt(np.maximum(d2, 0))
  # exact matches are exact, whatever the float rounding above
  return near, np.where((pal[near] == colours).all(1), 0, dist)


def _flat(rgb: np.ndarray) -> np.ndarray:
  """(H, W) bool: no 4-neighbour differs by more than FLAT_RGB per channel."""
  x = rgb.astype(np.int16)
  p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[:2]
  diff = np.zeros((h, w), np.int16)
  for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
    diff = np.maximum(diff, np.abs(p[dy:dy + h, dx:dx + w] - x).max(-1))
  return diff <= FLAT_RGB


def _in_block(codes: np.ndarray) -> np.ndarray:
  """(H, W) bool: part of a 2x2 block of one colour (the border repeated)."""
  h, w = codes.shape
  p = np.pad(codes, 1, mode="edge")
  one = ((p[:-1, :-1] == p[1:, :-1]) & (p[:-1, :-1] == p[:-1, 1:])
         & (p[:-1, :-1] == p[1:, 1:]))
  out = np.zeros((h, w), bool)
  for dy in (0, 1):
    for dx in (0, 1):
      out |= one[dy:dy + h, dx:dx + w]
  return out


def _all_around(mask: np.ndarray) -> np.ndarray:
  """(H, W) bool: the pixel and its 8 neighbours are all `mask` (outside
  the image counts as True)."""
  h, w = mask.shape
  p = np.pad(mask, 1, constant_values=True)
  out = np.ones((h, w), bool)
  for dy in range(3):
    for dx in range(3):
      out &= p[dy:dy + h, dx:dx + w]
  return out


def _repeats(codes: np.ndarray) -> np.ndarray:
  """(H, W) bool: a 4-neighbour has the very same colour (a band along an
  edge is uniform along it; a pixel where three regions meet is not)."""
  h, w = codes.shape
  p = np.pad(codes, 1, constant_values=-1)
  out = np.zeros((h, w), bool)
  for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
    out |= p[dy:dy + h, dx:dx + w] == codes
  return out


def _window_classes(classes: np.ndarray, ys: np.ndarray, xs: np.ndarray
                    ) -> np.ndarray:
  """The distinct classes (>= 0) of `classes` within WINDOW_PX of each
  pixel (ys, xs), nearest first -> (n, _ENDS), -1 where fewer."""
  r = WINDOW_PX
  offsets = sorted(((dy, dx) for dy in range(-r, r + 1)
                    for dx in range(-r, r + 1)),
                   key=lambda o: (max(abs(o[0]), abs(o[1])),
                                  abs(o[0]) + abs(o[1])))
  padded = np.pad(classes, r, constant_values=-1)
  win = np.stack([padded[ys + r + dy, xs + r + dx] for dy, dx in offsets], 1)
  seen = np.zeros(win.shape, bool)
  for j in range(1, win.shape[1]):
    seen[:, j] = (win[:, :j] == win[:, j:j + 1]).any(1)
  keep = (win >= 0) & ~seen
  order = np.argsort(~keep, axis=1, kind="stable")
  return np.take_along_axis(np.where(keep, win, -1), order, 1)[:, :_ENDS]


def _segment(p: np.ndarray, a: np.ndarray, b: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  """Distance from p to the segment a-b and the position t in [0, 1] of
  its nearest point (0 = a), broadcast over leading axes."""
  ab = b - a
  t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9),
              0.0, 1.0)
  return np.sqrt(((p - a - t[..., None] * ab) ** 2).sum(-1)), t


def _by_pairs(p: np.ndarray, ends: np.ndarray, pal: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """The best explanation of colours p (n, 3) by one or two of `ends`
  (n, _ENDS) -> (distance, class of the nearer end), inf / -1 for none."""
  best_d = np.full(len(p), np.inf, np.float32)
  best_c = np.full(len(p), -1, np.int64)
  for i in range(ends.shape[1]):
    for j in range(i, ends.shape[1]):
      a, b = ends[:, i], ends[:, j]
      d, t = _segment(p, pal[np.maximum(a, 0)], pal[np.maximum(b, 0)])
      d = np.where((a >= 0) & (b >= 0), d, np.inf)
      better = d < best_d
      best_d = np.where(better, d, best_d)
      best_c = np.where(better, np.where(t <= 0.5, a, b), best_c)
  return best_d, best_c


def _by_extension(p: np.ndarray, ends: np.ndarray, pal: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Colours p (n, 3) strictly between one of `ends` (n, _ENDS) and any
  palette colour -> (distance, that end's class): a feature too thin to
  keep its own colour after a resize reads as the region beside it."""
  best_d = np.full(len(p), np.inf, np.float32)
  best_c = np.full(len(p), -1, np.int64)
  for i in range(ends.shape[1]):
    a = ends[:, i]
    d, t = _segment(p[:, None], pal[np.maximum(a, 0)][:, None], pal[None])
    d = np.where((a >= 0)[:, None] & (t > 0) & (t < 1), d, np.inf).min(1)
    better = d < best_d
    best_d = np.where(better, d, best_d)
    best_c = np.where(better, a, best_c)
  return best_d, best_c


def _per_distinct(fn, p_codes: np.ndarray, ends: np.ndarray, pal: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`fn(p, ends, pal)` once per distinct (colour, ends) row: a band along
  an edge repeats both."""
  if not len(p_codes):
    return np.zeros(0, np.float32), np.zeros(0, np.int64)
  rows, inverse = np.unique(np.column_stack([p_codes, ends]), axis=0,
                            return_inverse=True)
  d, c = [], []
  for s in range(0, len(rows), _CHUNK // 16):
    part = rows[s:s + _CHUNK // 16]
    got = fn(_unpack(part[:, 0]), part[:, 1:], pal)
    d.append(got[0])
    c.append(got[1])
  inverse = inverse.reshape(-1)
  return np.concatenate(d)[inverse], np.concatenate(c)[inverse]


def _same_colour_region(rgb: np.ndarray, seeds: np.ndarray, steps: int
                        ) -> np.ndarray:
  """`seeds` grown by up to `steps` pixels into 4-neighbours of their colour
  (within FLAT_RGB per channel)."""
  x = rgb.astype(np.int16)
  h, w = seeds.shape
  region = seeds.copy()
  px = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  for _ in range(steps):
    pr = np.pad(region, 1)
    grown = region.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
      close = np.abs(px[dy:dy + h, dx:dx + w] - x).max(-1) <= FLAT_RGB
      grown |= pr[dy:dy + h, dx:dx + w] & close
    region = grown
  return region


def _fill_from_neighbours(values: np.ndarray, known: np.ndarray, steps: int,
                          blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Unknown pixels (not `blocked`) within `steps` pixels (8-neighbourhood)
  of known ones take a known neighbour's value."""
  h, w = known.shape
  for _ in range(steps):
    if known.all():
      break
    pk, pv = np.pad(known, 1), np.pad(values, 1)
    grown_known, grown = known.copy(), values.copy()
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        nk = pk[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        take = ~grown_known & ~blocked & nk
        grown = np.where(take, pv[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], grown)
        grown_known |= take
    values, known = grown, grown_known
  return values, known


def read_painted(rgb: np.ndarray, colours: np.ndarray, tolerance: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """A mask painted in `colours` (K, 3), perhaps resized or anti-aliased
  -> (index into `colours` (H, W), known (H, W) bool).

  1. Regions: a pixel within `tolerance` (RGB distance) of a palette
     colour whose 4 neighbours are within FLAT_RGB of it, or of exactly a
     palette colour in a 2x2 block of it, is that colour's class.
  2. Blends: any other pixel on (within `tolerance` of) the segment
     between the colours of two regions within WINDOW_PX of it, or near
     one of them, takes the nearer end's class, however flat its band is.
     A pixel of exactly a palette colour keeps its class where that class
     is a region nearby or every pixel around is a palette colour (a sharp
     painting), unless two regions nearby mix to it (within BLEND_RGB):
     a resize makes colours that happen to be a third class's (COCO-Stuff's
     colours lie on a lattice), and a line one pixel wide painted exactly
     in the mix of its two sides reads as one of them.
  3. A band along an edge (its colour repeats beside it) that lies
     strictly between a nearby region's colour and another palette colour
     (within BLEND_RGB) is a feature too thin to keep its own colour after
     a resize: it takes that region's class.
  4. Pixels no pair explains (where three regions meet) take a class from
     an explained pixel up to FILL_PX away, except in a flat area of one
     colour: a colour no class has is unknown to its border.

  What remains is unknown (`known` False): a colour explained by nothing
  nearby.
  """
  h, w = rgb.shape[:2]
  pal = np.asarray(colours, np.float32).reshape(-1, 3)
  codes = _pack(rgb)
  uniq, inverse = np.unique(codes, return_inverse=True)
  near_u, dist_u = _nearest(_unpack(uniq), pal)
  inverse = inverse.reshape(h, w)
  near, dist = near_u[inverse], dist_u[inverse]
  exact, flat = dist == 0, _flat(rgb)
  region = (flat & (dist <= tolerance)) | (exact & _in_block(codes))
  index, known = np.where(region, near, -1), region.copy()

  ys, xs = np.nonzero(~region)
  ends = _window_classes(index, ys, xs)
  d, c = _per_distinct(_by_pairs, codes[ys, xs], ends, pal)
  own = exact[ys, xs] & ~(d <= BLEND_RGB) & (
      _all_around(exact)[ys, xs] | (ends == near[ys, xs][:, None]).any(1))
  d, c = np.where(own, 0.0, d), np.where(own, near[ys, xs], c)
  ok = d <= tolerance
  index[ys[ok], xs[ok]], known[ys[ok], xs[ok]] = c[ok], True

  thin = ~ok & _repeats(codes)[ys, xs]
  ys, xs, ends = ys[thin], xs[thin], ends[thin]
  d, c = _per_distinct(_by_extension, codes[ys, xs], ends, pal)
  ok = d <= BLEND_RGB
  index[ys[ok], xs[ok]], known[ys[ok], xs[ok]] = c[ok], True

  foreign = _same_colour_region(rgb, flat & ~known, FILL_PX)
  return _fill_from_neighbours(index, known, FILL_PX, foreign)
