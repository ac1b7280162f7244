"""Image/mask pairs from two folder trees.

``image_dir/<rel>/<name>.<jpg|jpeg|png|webp|bmp>`` pairs with
``mask_dir/<rel>/<name>.png``: pairing is by relative path without the
extension (never by sorted position), through any depth of sub-folders.
With suffixes, image ``REL + image_suffix`` pairs with mask ``REL +
mask_suffix`` and other files are not records, e.g. Cityscapes'
``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png`` with
``gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png`` beside that
folder's ``*_color.png``, ``*_instanceIds.png`` and ``*_polygons.json``.
The source yields file paths; ``DecodePair`` (its ``decoder``) reads them
inside the grain pipeline, i.e. in grain's worker processes. EXIF rotation is
not applied: label maps are aligned with the stored pixels.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from segldm_jax.data.base import IGNORE_ID, DataError
from segldm_jax.data.labels import LabelSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_EXTENSIONS = (".png",)
_SHOWN = 5  # unpaired files listed in an error message
# Decode failures PIL raises (truncated files are OSError as long as
# ImageFile.LOAD_TRUNCATED_IMAGES stays False, PIL's default).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_log = logging.getLogger(__name__)


def scan_tree(root: str, extensions: tuple[str, ...], what: str,
              suffix: str = "") -> dict[str, str]:
  """Maps ``relative/path/stem`` -> file path for files under ``root``.

  Without ``suffix``: files whose extension (case-insensitive) is one of
  ``extensions``, keyed without it. With ``suffix``: files whose name ends
  in it exactly, keyed without it. Hidden files and folders (leading dot)
  are skipped.
  """
  if not os.path.isdir(root):
    raise DataError(f"{what} directory does not exist: {root}")
  found: dict[str, str] = {}
  other = None  # a file that did not match, for the error message
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      if suffix:
        stem = name[:-len(suffix)] if name.endswith(suffix) else None
      else:
        stem, ext = os.path.splitext(name)
        stem = stem if ext.lower() in extensions else None
      if stem is None:
        other = other or os.path.join(dirpath, name)
        continue
      path = os.path.join(dirpath, name)
      key = os.path.relpath(os.path.join(dirpath, stem), root)
      key = key.replace(os.sep, "/")
      if key in found:
        raise DataError(f"two {what} files share the name {key!r}: "
                        f"{found[key]} and {path}")
      found[key] = path
  if not found:
    if suffix:
      seen = f" ({other} is there)" if other else ""
      raise DataError(f"no {what} files ending in {suffix!r} found under "
                      f"{root}{seen}; check data.{what}_suffix")
    raise DataError(f"no {what} files ({', '.join(extensions)}) found under "
                    f"{root}")
  return found


def _listing(keys: list[str], files: dict[str, str]) -> str:
  shown = ", ".join(files[k] for k in keys[:_SHOWN])
  more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
  return f"{len(keys)} ({shown}{more})"


def read_image(path: str) -> np.ndarray:
  """RGB uint8 (H, W, 3); grey, palette and alpha images are converted.

  The whole file is decoded here (``convert`` loads it), so a corrupt or
  truncated image fails now, not later as a grey patch.
  """
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except _PIL_ERRORS as e:
    raise DataError(f"cannot read image {path}: {e}") from e


def read_mask(path: str, spec: LabelSpec) -> np.ndarray:
  """Canonical uint8 class ids (H, W) from a label PNG."""
  try:
    with Image.open(path) as mask:
      mode = mask.mode
      unknown = None
      if spec.uses_palette:
        values, unknown = spec.colours_to_values(
            np.asarray(mask.convert("RGB")), path)
      elif mode in ("L", "P", "1"):  # "P": stored indices are the ids
        values = np.asarray(mask).astype(np.uint8)
      elif mode.startswith("I"):  # 16/32-bit label maps
        values = np.asarray(mask).astype(np.int64)
      else:
        raise DataError(
            f"{path}: mask has mode {mode}; expected a single-channel label "
            f"map (L, P or 16-bit), or pass palette= to map RGB colours to ids")
  except DataError:
    raise
  except _PIL_ERRORS as e:
    raise DataError(f"cannot read mask {path}: {e}") from e
  ids = spec.to_ids(values, path)
  if unknown is not None and unknown.any():  # unknown_colours="ignore"
    ids[unknown] = IGNORE_ID
  return ids


@dataclasses.dataclass(frozen=True)
class DecodePair(grain.transforms.Map):
  """``{"image_path", "mask_path"}`` -> ``{"image", "labels"}`` (decoded)."""

  spec: LabelSpec

  def map(self, record: dict[str, str]) -> dict[str, np.ndarray]:
    image = read_image(record["image_path"])
    labels = read_mask(record["mask_path"], self.spec)
    if image.shape[:2] != labels.shape:
      raise DataError(
          f"size mismatch: image {record['image_path']} is "
          f"{image.shape[1]}x{image.shape[0]} but mask {record['mask_path']} "
          f"is {labels.shape[1]}x{labels.shape[0]} (width x height)")
    return {"image": image, "labels": labels}


class FolderSource:
  """Grain random-access source over paired image and mask folders.

  Args:
    image_dir: root of the images (nested sub-folders allowed).
    mask_dir: root of the label PNGs, mirroring ``image_dir``'s layout.
    num_classes: class count (<= 255).
    ignore_label: stored value meaning "no class" (255 COCO-Stuff, 0 ADE20K,
      None for sflckr); becomes ``IGNORE_ID``.
    palette: path (see ``segldm_jax.data.labels``) for RGB colour masks.
    remap: dict, JSON path or built-in name, stored value -> class id.
    skip_unpaired: log a warning and skip files without a partner instead
      of raising.
    image_suffix: images are the files ending in it ("" = any image
      extension), e.g. "_leftImg8bit.png".
    mask_suffix: masks are the files ending in it ("" = ".png"), e.g.
      "_gtFine_labelIds.png".
  """

  def __init__(self, image_dir: str, mask_dir: str, *, num_classes: int,
               ignore_label: int | None = None, palette: Any = None,
               remap: Any = None, skip_unpaired: bool = False,
               image_suffix: str = "", mask_suffix: str = ""):
    self.image_dir = os.fspath(image_dir)
    self.mask_dir = os.fspath(mask_dir)
    if os.path.abspath(self.image_dir) == os.path.abspath(self.mask_dir):
      raise DataError(f"image_dir and mask_dir are the same folder: "
                      f"{self.image_dir}")
    self.spec = LabelSpec.create(num_classes, ignore_label=ignore_label,
                                 palette=palette, remap=remap)
    images = scan_tree(self.image_dir, IMAGE_EXTENSIONS, "image", image_suffix)
    masks = scan_tree(self.mask_dir, MASK_EXTENSIONS, "mask", mask_suffix)
    no_mask = sorted(images.keys() - masks.keys())
    no_image = sorted(masks.keys() - images.keys())
    if no_mask or no_image:
      exts = ",".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
      image_end = image_suffix or f".{{{exts}}}"
      mask_end = mask_suffix or MASK_EXTENSIONS[0]
      rule = (f"image REL{image_end} pairs with mask REL{mask_end}"
              if image_suffix or mask_suffix
              else "pairs match by relative path without extension")
      unpaired = []
      if no_mask:
        first = os.path.join(self.mask_dir, no_mask[0] + mask_end)
        unpaired.append(f"images without a mask in {self.mask_dir}: "
                        f"{_listing(no_mask, images)}, e.g. no {first}")
      if no_image:
        # Without a suffix the image could have any of several extensions.
        first = (f", e.g. no {os.path.join(self.image_dir, no_image[0])}"
                 f"{image_suffix}" if image_suffix else "")
        unpaired.append(f"masks without an image in {self.image_dir}: "
                        f"{_listing(no_image, masks)}{first}")
      message = f"unpaired files ({rule}): {'; '.join(unpaired)}"
      if not skip_unpaired:
        raise DataError(message + "; pass skip_unpaired=True to skip them")
      _log.warning("skipping %s", message)
    self.keys = sorted(images.keys() & masks.keys())
    if not self.keys:
      raise DataError(f"no image/mask pairs between {self.image_dir} and "
                      f"{self.mask_dir}")
    self._pairs = [(images[k], masks[k]) for k in self.keys]
    self.decoder = DecodePair(self.spec)

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict[str, str]:
    image_path, mask_path = self._pairs[index]
    return {"image_path": image_path, "mask_path": mask_path}

  def __repr__(self) -> str:
    return (f"FolderSource(image_dir={self.image_dir!r}, mask_dir="
            f"{self.mask_dir!r}, num_records={len(self)}, num_classes="
            f"{self.num_classes})")
