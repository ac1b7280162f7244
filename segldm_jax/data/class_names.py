"""The names of a run's classes, and one class set's names matched to
another's (fine-tuning onto new classes, `init_class_map=by_name`).

A run's class names (`class_set`), first that applies:

* ``data.class_names``: a file naming the classes, one per line (line k is
  class k; blank lines and ``#`` comments are skipped) or a JSON list;
* a built-in label set: ``data.dataset`` (ade20k, coco_stuff, cityscapes)
  or, by class count, 182 = COCO-Stuff and 150 = ADE20K (as the palettes);
* the synthetic scenes: a class is its colour, named ``#rrggbb``, so two
  synthetic runs share a class exactly when they draw it alike;
* none: the classes have no names (`ClassSet.names` is None).

A new class finds the source classes it starts from by the first rule that
finds one (names compared ignoring case, ``_`` and repeated spaces):

1. the same name;
2. its plural or singular (``car`` / ``cars``, ``bus`` / ``buses``,
   ``sky`` / ``skies``);
3. COCO-Stuff's catch-all stuff classes: ``X`` matches ``X-other`` or
   ``X-stuff`` (``sky`` -> ``sky-other``, ``building`` ->
   ``building-other``, ``wall`` -> ``wall-other``, ``door`` ->
   ``door-stuff``);
4. rules 1-3 on each synonym of `SYNONYMS` (``sidewalk`` -> ``pavement``,
   ``vegetation`` -> ``tree``).

Several source classes found by one rule are averaged. A source class its
label set never annotates (COCO-Stuff's 11 unused ids, e.g. ``street
sign``) is never taken, since its row was never trained: the rule goes on,
and a name left unmatched says so.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

from segldm_jax.data import palette
from segldm_jax.data.base import DataError

# Names that mean the same class in the built-in label sets (each group
# matches both ways). Small on purpose: a wrong match is worse than none.
SYNONYMS = (
    ("sidewalk", "pavement"),        # Cityscapes / COCO-Stuff
    ("vegetation", "tree"),          # Cityscapes: trees, hedges, bushes
    ("terrain", "grass"),            # Cityscapes: grass, soil, sand
    ("rider", "person"),             # COCO labels a rider as a person
    ("traffic sign", "street sign", "signboard"),
    ("traffic light", "traffic"),    # ADE20K's short name of traffic light
    ("sofa", "couch"),
    ("television", "tv"),
    ("windowpane", "window"),        # COCO-Stuff: window-other
    ("earth", "ground"),             # COCO-Stuff: ground-other
    ("minibike", "motorcycle"),
)
_STUFF_SUFFIXES = ("-other", "-stuff")
_BUILTIN = ("ade20k", "coco_stuff", "cityscapes")
_BY_COUNT = {182: "coco_stuff", 150: "ade20k"}
_UNUSED = {"coco_stuff": frozenset(palette.COCO_STUFF_UNUSED)}


@dataclasses.dataclass(frozen=True)
class ClassSet:
  """A run's classes: `label` says where the names come from (for messages);
  `unused` are ids its label set never annotates."""
  label: str
  size: int
  names: tuple[str, ...] | None
  unused: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Match:
  """Source ids a new class starts from (averaged; empty: unmatched) and
  how they were found, or why none was."""
  ids: tuple[int, ...]
  how: str


def read_names(path: str | pathlib.Path, num_classes: int) -> tuple[str, ...]:
  """The names in a `data.class_names` file (format in the module
  docstring); raises DataError unless there is one per class."""
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as e:
    raise DataError(f"data.class_names={path}: cannot read it ({e.strerror or e})"
                    ) from None
  if path.suffix.lower() == ".json":
    try:
      names = json.loads(text)
    except ValueError as e:
      raise DataError(f"data.class_names={path}: invalid JSON: {e}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise DataError(f"data.class_names={path}: expected a JSON list of names")
  else:
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
  if len(names) != num_classes:
    raise DataError(f"data.class_names={path} names {len(names)} classes but "
                    f"data.num_classes={num_classes}: one name per class")
  return tuple(names)


def class_set(data_config: Any) -> ClassSet:
  """The classes of a run's `data` config (see the module docstring)."""
  size = int(data_config.get("num_classes"))
  if data_config.get("class_names"):
    path = data_config.get("class_names")
    return ClassSet(f"data.class_names={path}", size, read_names(path, size))
  if data_config.get("source") == "synthetic":
    from segldm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    names = tuple("#%02x%02x%02x" % tuple(int(v) for v in rgb)
                  for rgb in synthetic.class_colours(size))
    return ClassSet("the synthetic scenes", size, names)
  key = str(data_config.get("dataset", "") or "").replace("-", "_")
  if key not in _BUILTIN or len(palette.named(key)[1]) != size:
    key = _BY_COUNT.get(size)
  if key is None:
    return ClassSet(f"{size} unnamed classes", size, None)
  names = palette.named(key)[1]
  return ClassSet(key.replace("_", "-"), size, tuple(names),
                  _UNUSED.get(key, frozenset()))


def normalise(name: str) -> str:
  return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def _number_forms(name: str) -> set[str]:
  """Plural and singular forms of `name` (its last word), itself excluded."""
  forms = {name + "s", name + "es"}
  if name.endswith("ies"):
    forms.add(name[:-3] + "y")
  if name.endswith("es"):
    forms.add(name[:-2])
  if name.endswith("s") and not name.endswith("ss"):
    forms.add(name[:-1])
  if name.endswith("y"):
    forms.add(name[:-1] + "ies")
  return forms - {name}


def _synonyms(name: str) -> list[str]:
  return [s for group in SYNONYMS if name in group for s in group if s != name]


def _rules(name: str) -> list[tuple[str, set[str]]]:
  """(how, names it accepts), in the order tried (module docstring)."""
  def stuff(forms: set[str]) -> set[str]:
    return {f + s for f in forms for s in _STUFF_SUFFIXES}

  forms = {name} | _number_forms(name)
  own = [("name", {name}), ("plural/singular", forms - {name}),
         ("stuff class", stuff(forms))]
  for synonym in _synonyms(name):
    forms = {synonym} | _number_forms(synonym)
    own += [(f"synonym {synonym!r}", forms | stuff(forms))]
  return own


def match_name(name: str, source: ClassSet) -> Match:
  """The source classes a new class named `name` starts from (rules in the
  module docstring), or an unmatched Match whose `how` says why."""
  index: dict[str, list[int]] = {}
  for i, n in enumerate(source.names or ()):
    index.setdefault(normalise(n), []).append(i)
  skipped = []
  for how, accepted in _rules(normalise(name)):
    found = sorted(i for n in accepted for i in index.get(n, ()))
    used = tuple(i for i in found if i not in source.unused)
    if used:
      return Match(used, how)
    skipped += [source.names[i] for i in found]
  if skipped:
    return Match((), f"{', '.join(map(repr, skipped))} is a {source.label} "
                     "class never annotated (its row never trained)")
  return Match((), "no class of that name (nor its plural, -other/-stuff "
                   f"class or synonym) in {source.label}")


def match(new: ClassSet, source: ClassSet) -> list[Match]:
  """One Match per new class. Two unnamed sets of one size, or two equal
  name lists, map by identity.

  Raises:
    DataError: a side has no names (and the sizes differ).
  """
  if new.names == source.names and new.size == source.size:
    return [Match((k,), "identity") for k in range(new.size)]
  for side, what in ((new, "the new data's"), (source, "the source's")):
    if side.names is None:
      raise DataError(
          f"init_class_map=by_name: {what} {side.size} classes have no names "
          "(not ADE20K, COCO-Stuff, Cityscapes or the synthetic scenes): "
          "name them with data.class_names=FILE (one per line), or pass "
          "init_class_map=FILE.json ({new_id: old_id}) or none")
  return [match_name(n, source) for n in new.names]
