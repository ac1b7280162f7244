"""Uploaded pictures, read as a careless or hostile sender may send them.

Sizes are checked from the header before anything is decoded (`open_image`):
a 174 KB PNG may declare 13376x13376 pixels, and decoding it would take
gigabytes. Nothing is written to disk and a file's name is only ever shown
(`display_name`), never used as a path. Every mistake is an
`errors.InputError` of one line.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO
import warnings

import numpy as np
from PIL import Image

from segldm_jax import errors
from segldm_jax.data import masks as masks_lib
from segldm_jax.data.base import DataError
from segldm_jax.data.labels import LabelSpec

NAME_CHARS = 60          # longer names are shown shortened
BYTES_PER_PIXEL = 16     # the most a sane format stores per pixel (float RGBA)
_ID_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX")
_MODE_WORDS = {"F": "floating-point pixels", "LA": "grey with alpha",
               "CMYK": "CMYK colours", "YCbCr": "YCbCr colours",
               "LAB": "Lab colours", "HSV": "HSV colours"}


def display_name(filename: str | None, fallback: str) -> str:
  """The part of an upload's name a message may show: its last path
  component, printable characters only, at most NAME_CHARS long; `fallback`
  for none, "." or ".."."""
  name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
  name = "".join(ch for ch in name if ch.isprintable()).strip()
  if name in ("", ".", ".."):
    return fallback
  if len(name) > NAME_CHARS:
    half = (NAME_CHARS - 3) // 2
    name = f"{name[:half]}...{name[-half:]}"
  return name


def max_bytes(max_pixels: int) -> int:
  """The largest upload an image of `max_pixels` needs."""
  return BYTES_PER_PIXEL * max_pixels + (1 << 20)


def open_image(data: bytes | BinaryIO, name: str, max_pixels: int
               ) -> Image.Image:
  """The picture's header, checked: not empty, an image, at most
  `max_pixels` pixels, no larger in bytes than such an image needs.
  Nothing is decoded yet."""
  file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  size = file.seek(0, io.SEEK_END)
  file.seek(0)
  if not size:
    raise errors.InputError(f"{name} is empty")
  if size > max_bytes(max_pixels):
    raise errors.InputError(
        f"{name} is {size} bytes; an image of at most {max_pixels} pixels "
        f"(--max_pixels) needs at most {max_bytes(max_pixels)}")
  try:
    with warnings.catch_warnings():  # the size is checked below
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(file)
  except Image.DecompressionBombError as e:
    found = re.search(r"\((\d+) pixels\)", str(e))
    declared = f"{found.group(1)} pixels, " if found else ""
    raise errors.InputError(
        f"{name} declares {declared}more than the image decoder's limit of "
        f"{2 * Image.MAX_IMAGE_PIXELS} (a decompression bomb?); this server "
        f"takes at most {max_pixels} pixels per image") from None
  except (OSError, SyntaxError, ValueError):
    raise errors.InputError(f"{name} is not an image (PNG, JPEG, ...)"
                            ) from None
  w, h = image.size
  if w * h > max_pixels:
    raise errors.InputError(
        f"{name} is {h}x{w} (height x width), {h * w} pixels; this server "
        f"takes at most {max_pixels} pixels per image (--max_pixels)")
  return image


def _decoded(image: Image.Image, name: str, mode: str | None = None
             ) -> np.ndarray:
  try:
    return np.asarray(image.convert(mode) if mode else image)
  except (OSError, SyntaxError, ValueError):
    raise errors.InputError(f"{name} is not an image (PNG, JPEG, ...): it "
                            "ends early or is damaged") from None


def _grey_in_colour(rgb: np.ndarray, colour_spec: LabelSpec) -> bool:
  """Every pixel grey, and not every pixel a palette colour: ids saved by
  a format without greyscale (WebP) or converted to RGB."""
  if not ((rgb[..., 0] == rgb[..., 1]).all()
          and (rgb[..., 1] == rgb[..., 2]).all()):
    return False
  codes = np.unique(rgb[..., 0].astype(np.int64) * 0x010101)
  return not np.isin(codes, colour_spec.palette_codes).all()


def decode_labels(image: Image.Image, name: str, id_spec: LabelSpec,
                  colour_spec: LabelSpec) -> np.ndarray:
  """A label map's pixels -> uint8 ids (H, W): grey values (L, P, 1, 16-bit)
  are ids, RGB colours go through the painted-mask reader of
  `colour_spec`."""
  mode = image.mode
  try:
    if mode in _ID_MODES:
      values = _decoded(image, name)
      return id_spec.to_ids(values.astype(
          np.int64 if mode.startswith("I") else np.uint8), name)
    if mode == "LA":
      return id_spec.to_ids(_decoded(image, name, "L"), name)
    if mode not in _COLOUR_MODES:
      raise errors.InputError(
          f"{name} holds {_MODE_WORDS.get(mode, f'{mode} pixels')}; a label "
          "map is a greyscale PNG of class ids or a PNG in the palette's "
          "colours")
    rgb = _decoded(image, name, "RGB")
    if _grey_in_colour(rgb, colour_spec):
      raise errors.InputError(
          f"{name} is grey but stored as colour ({image.format or mode}); "
          "save class ids as a greyscale PNG (WebP has no greyscale)")
    values, _ = colour_spec.colours_to_values(rgb, name)  # or raises
    return colour_spec.to_ids(values, name)
  except DataError as e:
    raise errors.InputError(str(e)) from None


def check_size(shape: tuple[int, int], name: str, step: int,
               max_pixels: int) -> None:
  """Sides in multiples of `step`, else one line naming the nearest sizes
  that fit (and the pixel cap)."""
  h, w = shape
  if not (h % step or w % step):
    return
  fits = sorted({(a, b) for a, b in masks_lib.nearest_sizes(h, w, step)
                 if a * b <= max_pixels})
  need = f"{name} is {h}x{w} (height x width); this model needs sides in "
  if fits:
    raise errors.InputError(
        f"{need}multiples of {step}: resize it to "
        f"{' or '.join(f'{a}x{b}' for a, b in fits)}")
  raise errors.InputError(
      f"{need}multiples of {step} and this server at most {max_pixels} "
      "pixels: no size near it fits")


def decode_photo(image: Image.Image, name: str, shape: tuple[int, int]
                 ) -> np.ndarray:
  """A photo at its label map's (height, width) -> uint8 (H, W, 3); the
  aspect ratio is checked from the header, before decoding."""
  w, h = image.size
  try:
    masks_lib.check_aspect((h, w), shape, name)
  except DataError as e:
    raise errors.InputError(str(e)) from None
  return masks_lib.fit_photo(_decoded(image, name, "RGB"), shape)
