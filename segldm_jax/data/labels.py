"""Turning stored label maps into canonical class ids.

Order of operations on a stored label map (value ``v`` per pixel):

1. colour masks only: the RGB colour is looked up in the palette -> ``v``;
2. ``v == ignore_label`` -> ``IGNORE_ID`` (matched on the stored value,
   before remapping, because that is how datasets document it);
3. ``remap`` (if given): ``v -> remap.get(v, v)``; a remap target of
   ``IGNORE_ID`` (255) also marks the pixel as ignored;
4. range check: any remaining value ``>= num_classes`` is a ``DataError``
   naming the file and the value.

Example, ADE20K (0 = unlabeled, classes 1..150)::

  LabelSpec.create(150, ignore_label=0, remap={v: v - 1 for v in range(1, 151)})

Palette file formats (``palette=`` path):

* ``*.json``: a list of ``[r, g, b]`` whose position is the class id, or an
  object ``{"<id>": [r, g, b], ...}``;
* any other suffix: text lines ``id r g b`` (spaces or commas), ``#`` starts
  a comment, blank lines are skipped.

Remap (``remap=`` dict, path to a JSON object ``{"<stored>": <new>}``, or
the name of a built-in table, ``BUILTIN_REMAPS``):

* ``"ade20k"``: ADEChallengeData2016's 1..150 -> 0..149 (0 "other" is
  ``ignore_label=0``);
* ``"cityscapes"``: Cityscapes ``*_gtFine_labelIds.png`` ids 0..33 -> the 19
  train ids of cityscapesScripts' ``labels.py``, every other id -> ignored
  (what its ``createTrainIdLabelImgs.py`` writes as ``*_labelTrainIds.png``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from segldm_jax.data import palette as palette_lib
from segldm_jax.data.base import DataError, IGNORE_ID, check_num_classes

PathLike = Union[str, os.PathLike]


def _read_text(path: PathLike, what: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"cannot read {what} file {os.fspath(path)}: {e}") from e


def _as_int(value: Any, where: str, what: str) -> int:
  """Accepts ints, integral floats and int strings (JSON keys are strings)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str):
    try:
      return int(value.strip())
    except ValueError:
      pass
  raise DataError(f"{where}: {what} must be an integer, got {value!r}")


def _colour(value: Any, where: str) -> tuple[int, int, int]:
  if not isinstance(value, (list, tuple)) or len(value) != 3:
    raise DataError(f"{where}: a colour must be [r, g, b], got {value!r}")
  rgb = tuple(_as_int(c, where, "a colour channel") for c in value)
  if any(not 0 <= c <= 255 for c in rgb):
    raise DataError(f"{where}: colour channels must be in 0..255, got "
                    f"{value!r}")
  return rgb  # type: ignore[return-value]


def load_palette(palette: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reads a palette: returns ``(colours uint8 (K, 3), ids int64 (K,))``.

  Args:
    palette: a path (format in the module docstring), a sequence of
      ``[r, g, b]`` indexed by id, or a mapping ``id -> [r, g, b]``.
  """
  where = "palette"
  if isinstance(palette, (str, os.PathLike)):
    where = f"palette file {os.fspath(palette)}"
    text = _read_text(palette, "palette")
    if os.fspath(palette).lower().endswith(".json"):
      try:
        palette = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e}") from e
    else:
      entries = {}
      for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").split()
        if not line:
          continue
        if len(line) != 4:
          raise DataError(f"{where} line {n}: expected 'id r g b', got "
                          f"{' '.join(line)!r}")
        entries[_as_int(line[0], f"{where} line {n}", "the id")] = line[1:]
      palette = entries
  if isinstance(palette, Mapping):
    items = [(_as_int(k, where, "a palette id"), v) for k, v in palette.items()]
  elif isinstance(palette, (list, tuple, np.ndarray)):
    items = list(enumerate(np.asarray(palette).tolist()))
  else:
    raise DataError(f"{where}: expected a list or mapping, got "
                    f"{type(palette).__name__}")
  if not items:
    raise DataError(f"{where}: the palette is empty")
  ids = np.array([i for i, _ in items], np.int64)
  if ids.min() < 0:
    raise DataError(f"{where}: palette ids must be >= 0, got {ids.min()}")
  colours = np.array([_colour(c, f"{where} id {i}") for i, c in items],
                     np.uint8)
  codes = _codes(colours)
  uniq, counts = np.unique(codes, return_counts=True)
  for code in uniq[counts > 1]:
    # Several colours may share an id, but one colour cannot mean two ids.
    clash = sorted(set(ids[codes == code].tolist()))
    if len(clash) > 1:
      raise DataError(f"{where}: colour {_rgb(code)} is given to ids {clash}")
  return colours, ids


# Cityscapes labelId -> trainId for the 19 evaluated classes (road, sidewalk,
# building, wall, fence, pole, traffic light, traffic sign, vegetation,
# terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle).
_CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24,
                               25, 26, 27, 28, 31, 32, 33)
BUILTIN_REMAPS = {
    "ade20k": {v: v - 1 for v in range(1, 151)},
    "cityscapes": {**{v: IGNORE_ID for v in range(34)},
                   **{v: t for t, v in enumerate(_CITYSCAPES_TRAIN_LABEL_IDS)}},
}


def load_remap(remap: Any) -> dict[int, int]:
  """Reads a remap: a mapping, a built-in name (``BUILTIN_REMAPS``) or a path
  to a JSON object ``{stored: new}``."""
  where = "remap"
  if isinstance(remap, str) and remap in BUILTIN_REMAPS:
    return dict(BUILTIN_REMAPS[remap])
  if isinstance(remap, str) and not os.path.exists(remap) and not (
      os.sep in remap or remap.lower().endswith(".json")):
    raise DataError(f"remap {remap!r} is neither a built-in table "
                    f"({', '.join(BUILTIN_REMAPS)}) nor a JSON file")
  if isinstance(remap, (str, os.PathLike)):
    where = f"remap file {os.fspath(remap)}"
    try:
      remap = json.loads(_read_text(remap, "remap"))
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON: {e}") from e
  if hasattr(remap, "to_dict"):  # ml_collections.ConfigDict
    remap = remap.to_dict()
  if not isinstance(remap, Mapping):
    raise DataError(f"{where}: expected a mapping of stored value -> class "
                    f"id, got {type(remap).__name__}")
  out = {}
  for key, value in remap.items():
    src = _as_int(key, where, "a remap key")
    dst = _as_int(value, f"{where} key {key}", "a remap value")
    if src < 0 or not 0 <= dst <= IGNORE_ID:
      raise DataError(f"{where}: entry {key} -> {value} is out of range "
                      f"(keys >= 0, values 0..{IGNORE_ID})")
    out[src] = dst
  return out


UNKNOWN_COLOURS = ("error", "ignore")
def _codes(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.int32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _rgb(code: int) -> tuple[int, int, int]:
  code = int(code)
  return (code >> 16) & 255, (code >> 8) & 255, code & 255


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSpec:
  """How stored label maps become class ids (see the module docstring).

  Plain numpy fields only, so it pickles into grain worker processes.
  """

  num_classes: int
  ignore_label: int | None = None
  remap: dict[int, int] | None = None
  palette_codes: np.ndarray | None = None  # sorted packed 0xRRGGBB
  palette_ids: np.ndarray | None = None  # id of each sorted code
  # Painted masks (see `colours_to_values`); datasets keep exact colours.
  palette_tolerance: float = 0.0  # RGB distance a colour may snap over
  unknown_colours: str = "error"  # or "ignore": unmatched pixels = IGNORE_ID

  @classmethod
  def create(cls, num_classes: int, *, ignore_label: int | None = None,
             palette: Any = None, remap: Any = None,
             palette_tolerance: float = 0.0,
             unknown_colours: str = "error") -> "LabelSpec":
    """Validates the settings and loads the palette / remap files."""
    if unknown_colours not in UNKNOWN_COLOURS:
      raise ValueError(f"unknown_colours={unknown_colours!r}; use one of "
                       f"{UNKNOWN_COLOURS}")
    if palette_tolerance < 0:
      raise ValueError(f"palette_tolerance must be >= 0, got "
                       f"{palette_tolerance}")
    num_classes = check_num_classes(num_classes)
    if ignore_label is not None:
      ignore_label = _as_int(ignore_label, "ignore_label", "ignore_label")
      if ignore_label < 0:
        raise ValueError(f"ignore_label must be >= 0, got {ignore_label}")
    codes = ids = None
    if palette is not None:
      colours, ids = load_palette(palette)
      codes = _codes(colours)
      order = np.argsort(codes, kind="stable")
      codes, ids = codes[order], ids[order]
    remap = load_remap(remap) if remap is not None else None
    return cls(num_classes, ignore_label, remap, codes, ids,
               float(palette_tolerance), unknown_colours)

  @property
  def uses_palette(self) -> bool:
    return self.palette_codes is not None

  def colours_to_values(self, rgb: np.ndarray, where: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """An RGB mask (H, W, 3) -> (stored ids (H, W), unknown (H, W) bool).

    Exact palette colours always match. With `palette_tolerance` > 0 (masks
    people paint) colours snap within the tolerance and the blends that
    anti-aliasing or a resize leave between regions take one of their
    regions' ids (`palette.read_painted` has the rule). What remains is a
    DataError that counts the pixels and names the first, or, with
    unknown_colours "ignore", comes back in `unknown` (its ids are
    placeholders).
    """
    codes = _codes(rgb)
    if self.palette_tolerance > 0:
      colours = np.stack([(self.palette_codes >> s) & 255
                          for s in (16, 8, 0)], -1)
      index, known = palette_lib.read_painted(rgb, colours,
                                              self.palette_tolerance)
      values = self.palette_ids[np.maximum(index, 0)]
    else:
      uniq, inverse = np.unique(codes, return_inverse=True)
      near = np.minimum(np.searchsorted(self.palette_codes, uniq),
                        len(self.palette_codes) - 1)
      ok = self.palette_codes[near] == uniq
      inverse = inverse.reshape(codes.shape)
      values, known = self.palette_ids[near][inverse], ok[inverse]
    if known.all() or self.unknown_colours == "ignore":
      return values, ~known
    y, x = (int(v[0]) for v in np.nonzero(~known))
    if self.palette_tolerance > 0:
      raise DataError(
          f"{where}: {int((~known).sum())} pixels are no palette colour "
          f"(within palette_tolerance={self.palette_tolerance:g}) and no "
          "blend of the regions beside them, the first at "
          f"(y={y}, x={x}): {_rgb(codes[y, x])}; paint "
          "with the palette's colours, raise the tolerance, or let them be "
          "\"don't care\" (unknown_colours=ignore)")
    unknown = np.unique(codes[~known])
    raise DataError(
        f"{where}: colour {_rgb(unknown[0])} is not in the palette "
        f"({len(unknown)} unknown colour(s), {int((~known).sum())} pixels)")

  def _lookup(self, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Builds value -> class id and value -> is-valid tables for 0..size-1."""
    values = np.arange(size, dtype=np.int64)
    mapped = values.copy()
    ignored = np.zeros(size, bool)
    if self.remap:
      for src, dst in self.remap.items():
        if src < size:
          mapped[src] = dst
          ignored[src] = dst == IGNORE_ID
    if self.ignore_label is not None and self.ignore_label < size:
      ignored[self.ignore_label] = True
    valid = ignored | (mapped < self.num_classes)
    table = np.where(ignored, IGNORE_ID, np.where(valid, mapped, 0))
    return table.astype(np.uint8), valid

  def to_ids(self, values: np.ndarray, where: str) -> np.ndarray:
    """Stored label values (any int dtype) -> canonical uint8 class ids."""
    values = np.asarray(values)
    if values.size and values.min() < 0:
      raise DataError(f"{where}: negative label value {int(values.min())}")
    size = max(256, int(values.max()) + 1 if values.size else 0)
    table, valid = self._lookup(size)
    if not valid[values].all():
      bad = np.unique(values[~valid[values]])
      shown = ", ".join(str(int(b)) for b in bad[:5])
      raise DataError(
          f"{where}: label value {int(bad[0])} is out of range for "
          f"num_classes={self.num_classes} (bad values: {shown}"
          f"{', ...' if len(bad) > 5 else ''}); set ignore_label or remap "
          f"if these are unlabeled pixels")
    return table[values]
