"""The compiled sampling programs a server keeps, at most so many.

A program is compiled once per (kind, input shapes, sampler, steps, eta,
guided or not): the guidance scale and the seed are inputs of it
(`generation.guidance_input`, the key), so any value of either reuses it.
Every other choice a request may make (a canvas size, a step count, a
count of images) may compile another program; the least recently used one
beyond `capacity` is dropped, said in the log, and JAX's own caches are
cleared so that its memory goes back (they hold every program ever
compiled, keyed weakly only on the lowered module).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Hashable

import jax

log = logging.getLogger("segldm_jax.ui")


class Programs:
  """An LRU of compiled programs. Not thread-safe: use it from one request
  at a time (the server's lane)."""

  def __init__(self, capacity: int):
    if capacity < 1:
      raise ValueError(f"capacity must be >= 1, got {capacity}")
    self.capacity = capacity
    self.compiled = 0      # programs built (cache misses)
    self.evicted = 0
    self._kept: collections.OrderedDict[Hashable, Any] = (
        collections.OrderedDict())

  def __len__(self) -> int:
    return len(self._kept)

  def get(self, key: Hashable, lower: Callable[[], Any]) -> Any:
    """The program for `key`, compiled from `lower()` (a jax `Lowered`) on
    first use."""
    if key in self._kept:
      self._kept.move_to_end(key)
      return self._kept[key]
    start = time.monotonic()
    program = lower().compile()
    self.compiled += 1
    log.info("compiled %s in %.1f s (%d kept)", _describe(key),
             time.monotonic() - start, len(self._kept) + 1)
    self._kept[key] = program
    if len(self._kept) > self.capacity:
      old, _ = self._kept.popitem(last=False)
      self.evicted += 1
      jax.clear_caches()
      log.info("dropped the least recently used program, %s (at most %d "
               "kept: --max_programs)", _describe(old), self.capacity)
    return program


def _describe(key: Hashable) -> str:
  return " ".join(str(part) for part in key) if isinstance(key, tuple) else (
      str(key))
