"""A new class set's rescaler rows, taken from a source model's
(`init_class_map`, when fine-tuning onto other classes).

The SpatialRescaler is linear in the one-hot mask: its bias-free 1x1 map
gives class k the vector `kernel[k]`, and a pixel's conditioning is the
area-weighted sum of its classes' vectors. A new class set is a new set of
rows, each taken from the source's:

* ``by_name``: the new classes' names matched to the source's
  (`segldm_jax.data.class_names`: name, plural, COCO-Stuff's ``-other``
  classes, a small synonym table); equal class sets map by identity;
* ``FILE`` (a JSON file) ``{"new_id": old_id, "new_id": [old_ids]}``: a
  list is averaged, ids not in the file are unmatched;
* ``none``: nothing is taken; the rescaler starts as a new run's (random).

A row taken from one source class is that class's row, bit for bit; from
several, their mean. An unmatched class starts from the mean of the
source's rows (over the classes its label set annotates: COCO-Stuff's 11
unused ids are left out): an "average class", a vector the UNet has seen
the like of, which training then moves apart.
"""

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from segldm_jax import errors
from segldm_jax.data import class_names
from segldm_jax.data.class_names import ClassSet

METHODS = ("by_name", "none")


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """rows[k]: the source ids new class k starts from (empty: unmatched);
  None for `none`. how[k]: how they were found, or why none was."""
  method: str
  new: ClassSet
  source: ClassSet
  rows: tuple[tuple[int, ...], ...] | None
  how: tuple[str, ...]

  @property
  def matched(self) -> int:
    return sum(bool(r) for r in self.rows or ())

  def _name(self, side: ClassSet, k: int) -> str:
    return side.names[k] if side.names else f"class {k}"

  def record(self) -> dict[str, Any]:
    """What config.json keeps (and the state is built from)."""
    return {"method": self.method, "source_classes": self.source.size,
            "classes": self.new.size,
            "rows": None if self.rows is None else [list(r) for r in self.rows],
            "matched": self.matched,
            "unmatched": [self._name(self.new, k) for k, r in
                          enumerate(self.rows or ()) if not r],
            "unmatched_init": "mean of the source's rows",
            "mean_excludes": sorted(self.source.unused)}

  def summary(self) -> str:
    """The printed map: what matched (and how), every unmatched name."""
    head = (f"class map ({self.method}): {self.source.label} "
            f"({self.source.size} classes) -> {self.new.label} "
            f"({self.new.size} classes): ")
    if self.rows is None:
      return head + ("none taken; the rescaler starts from random weights, "
                     "as a new run's")
    if all(h == "identity" for h in self.how):
      return head + f"identity, all {self.new.size} classes"
    lines = [head + f"{self.matched} of {self.new.size} matched"]
    pairs = []
    for k, (ids, how) in enumerate(zip(self.rows, self.how)):
      if ids:
        old = " + ".join(self._name(self.source, i) for i in ids)
        note = "" if how in ("name", "file") else f" ({how})"
        pairs.append(f"{self._name(self.new, k)} <- {old}{note}")
    lines += _packed(pairs, 100)
    unmatched = [k for k, ids in enumerate(self.rows) if not ids]
    if unmatched:
      used = self.source.size - len(self.source.unused)
      lines.append(f"  unmatched, starting from the mean of the source's "
                   f"{used} rows:")
      lines += [f"    {self._name(self.new, k)}: {self.how[k]}"
                for k in unmatched]
    return "\n".join(lines)


def _packed(items: Sequence[str], width: int) -> list[str]:
  """Indented lines of "; "-joined items, none split across lines."""
  lines: list[str] = []
  for item in items:
    if lines and len(lines[-1]) + 2 + len(item) <= width:
      lines[-1] += "; " + item
    else:
      lines.append("  " + item)
  return lines


def read_file(path: str | pathlib.Path, new_size: int, source_size: int
              ) -> list[tuple[int, ...]]:
  """A class-map file -> rows (see the module docstring).

  Raises:
    errors.ConfigError: unreadable, not {id: id | [ids]}, or an id out of
      range (one line naming it).
  """
  where = f"init_class_map={path}"
  try:
    doc = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except OSError as e:
    raise errors.ConfigError(f"{where}: cannot read it ({e.strerror or e}); "
                             f"use {' or '.join(METHODS)} or a JSON file "
                             "{new_id: old_id | [old_ids]}") from None
  except ValueError as e:
    raise errors.ConfigError(f"{where}: invalid JSON ({e})") from None
  if not isinstance(doc, dict):
    raise errors.ConfigError(f"{where}: expected a JSON object "
                             "{new_id: old_id | [old_ids]}")
  rows: list[tuple[int, ...]] = [()] * new_size
  for key, value in doc.items():
    new_id = _int(key, f"{where}: key {key!r}")
    if not 0 <= new_id < new_size:
      raise errors.ConfigError(
          f"{where}: new id {new_id} is out of range: the new data has "
          f"{new_size} classes (0..{new_size - 1})")
    olds = value if isinstance(value, list) else [value]
    olds = [_int(v, f"{where}: new id {new_id}'s value {v!r}") for v in olds]
    if not olds:
      raise errors.ConfigError(f"{where}: new id {new_id} maps to an empty "
                               "list; leave it out to start it from the mean")
    for old in olds:
      if not 0 <= old < source_size:
        raise errors.ConfigError(
            f"{where}: new id {new_id} -> old id {old} is out of range: the "
            f"source has {source_size} classes (0..{source_size - 1})")
    rows[new_id] = tuple(olds)
  return rows


def _int(value: Any, where: str) -> int:
  try:
    if isinstance(value, bool) or (isinstance(value, float)
                                   and not value.is_integer()):
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    raise errors.ConfigError(f"{where} is not a class id") from None


def resolve(method: str, new: ClassSet, source: ClassSet) -> ClassMap:
  """`init_class_map` (by_name | none | FILE) between two class sets."""
  method = str(method or "by_name")
  if method == "none":
    return ClassMap("none", new, source, None, ())
  if method == "by_name":
    try:
      matches = class_names.match(new, source)
    except errors.UserError as e:
      raise errors.ConfigError(str(e)) from None
    return ClassMap("by_name", new, source, tuple(m.ids for m in matches),
                    tuple(m.how for m in matches))
  rows = read_file(method, new.size, source.size)
  return ClassMap(method, new, source, tuple(rows),
                  tuple("file" if r else f"not in {method}" for r in rows))


def map_rows(kernel: np.ndarray, rows: Sequence[Sequence[int]],
             mean_excludes: Sequence[int] = ()) -> np.ndarray:
  """(source classes, C) rescaler kernel -> (len(rows), C): each new row is
  its source row (exactly), the mean of its source rows, or (empty) the
  mean of every source row not in `mean_excludes`."""
  kernel = np.asarray(kernel)
  keep = np.setdiff1d(np.arange(len(kernel)), np.asarray(mean_excludes, int))
  mean = kernel[keep].astype(np.float64).mean(0)
  out = np.empty((len(rows), kernel.shape[1]), kernel.dtype)
  for k, ids in enumerate(rows):
    if len(ids) == 1:
      out[k] = kernel[ids[0]]
    else:
      out[k] = kernel[list(ids)].astype(np.float64).mean(0) if ids else mean
  return out
