"""JAX's persistent compilation cache, on by default in the user's cache folder.

A resumed run or a second `sample.py` compiles the same programs again (the
train step is the slowest to compile, on CPU as on GPU: BENCHMARKS.md gives
the times); with the cache they are read back from disk instead. `compilation_cache_dir`
in the run config moves it (a path) or turns it off (''); unset, it lives in
$XDG_CACHE_HOME/segldm_jax/jax_cache (~/.cache/... without XDG_CACHE_HOME),
or wherever JAX_COMPILATION_CACHE_DIR points when that is set.

Entries are keyed by the program, the jax/jaxlib version, the device and the
XLA flags, so a stale entry is never used; the folder can be deleted at any
time.
"""

import os
import pathlib

from absl import logging
import jax
from jax import monitoring

# Every program, however fast to compile: a start-up also dispatches about a
# hundred small eager ops, each quicker to compile than jax's default minimum
# of 1 s, so without this a second start compiled all of them again
# (BENCHMARKS.md, "Start-up with the persistent compilation cache").
MIN_COMPILE_SECONDS = 0.0
# jax.monitoring events, counted by `stats()`.
_HIT = "/jax/compilation_cache/cache_hits"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_counts = {_HIT: 0, _REQUEST: 0}
_listening = False
_folder = ""  # the cache folder in use, once `setup` turned it on


def default_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "segldm_jax" / "jax_cache"


def _count(event: str, **_) -> None:
  if event in _counts:
    _counts[event] += 1


def setup(cache_dir: str | None = None) -> str:
  """Turns the persistent cache on (or off); call once, before compiling.

  Args:
    cache_dir: the config's `compilation_cache_dir`: None for the default
      (JAX_COMPILATION_CACHE_DIR if set, else `default_dir()`), '' for off,
      or a folder (created if missing).

  Returns:
    The folder in use, or '' when the cache is off (also when the folder
    cannot be created: a cache is never worth failing a run for).
  """
  global _listening
  if not _listening:
    monitoring.register_event_listener(_count)
    _listening = True
  if cache_dir is None:
    cache_dir = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or str(default_dir()))
  if not cache_dir:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  path = pathlib.Path(cache_dir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  global _folder
  _folder = str(path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      MIN_COMPILE_SECONDS)
  return str(path)


def report() -> None:
  """Logs how many programs came from the cache (the scripts call it when
  they end cleanly; an error line stays their last)."""
  if _folder and stats()["requests"]:
    s = stats()
    logging.info("compilation cache %s: %d of %d programs read back, not "
                 "compiled", _folder, s["hits"], s["requests"])


def stats() -> dict[str, int]:
  """Compilations that consulted the cache since `setup`, and how many hit."""
  return {"requests": _counts[_REQUEST], "hits": _counts[_HIT]}
