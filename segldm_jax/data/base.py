"""Shared constants, the data error type and the record conventions.

A decoded record is ``{"image": uint8 (H, W, 3), "labels": uint8 (H, W)}``.
Labels are canonical class ids ``0..num_classes-1``; ``IGNORE_ID`` marks
pixels without a class. Every source below follows these conventions, so the
transforms and the pipeline never need to know where a record came from.
"""
from __future__ import annotations

from typing import Any, Protocol

from segldm_jax import errors

# 255 cannot be a class id: uint8 labels hold ids 0..254 plus this marker.
IGNORE_ID = 255
MAX_CLASSES = 255


class DataError(errors.UserError, ValueError):
  """Bad input data; the message names the file (or record) and the value."""


# What a bad record may raise: our own errors, and I/O (permissions, a file
# deleted mid-run) that escaped them.
RECORD_ERRORS = (DataError, OSError)
# Skip mode's per-record batch field (int32): the source index of the bad
# record this slot replaced, or -1. One epoch counts each bad record once.
SKIPPED = "bad_record_index"


class PairSource(Protocol):
  """A grain random-access source of image/label pairs.

  ``decoder`` (a ``grain.transforms.Map`` or None) turns ``source[i]`` into a
  decoded record; ``make_dataset`` applies it inside the grain pipeline so the
  decoding runs in grain's worker processes.
  """

  decoder: Any

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Any:
    ...


def check_num_classes(num_classes: int) -> int:
  """Validates a class count: ids must fit uint8 next to ``IGNORE_ID``."""
  if isinstance(num_classes, bool) or int(num_classes) != num_classes:
    raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
  num_classes = int(num_classes)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if num_classes > MAX_CLASSES:
    raise ValueError(
        f"num_classes={num_classes} is too large: labels are stored as uint8 "
        f"with {IGNORE_ID} reserved for ignored pixels, so at most "
        f"{MAX_CLASSES} classes are supported")
  return num_classes


def load_record(source: PairSource, index: int) -> dict[str, Any]:
  """Returns the decoded record ``index`` of any source (outside grain)."""
  raw = source[index]
  decoder = getattr(source, "decoder", None)
  return decoder.map(raw) if decoder is not None else raw
