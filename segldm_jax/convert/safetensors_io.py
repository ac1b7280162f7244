"""Reads `.safetensors` state_dicts (CompVis key names) through the
`safetensors` package's numpy API.

Tensors are read one at a time, when the converter asks for them, from the
package's memory map of the file: loading costs the converted weights, not
a second copy of the whole file.
"""

import pathlib
from typing import Iterator, Mapping

import ml_dtypes  # noqa: F401  registers bfloat16, which BF16 tensors need
import numpy as np

from segldm_jax import errors
from segldm_jax import formatting

SUFFIX = ".safetensors"


class LazyStateDict(Mapping):
  """{key: ndarray}, each tensor read from the file when looked up."""

  def __init__(self, path: pathlib.Path, handle):
    self._path, self._handle = path, handle
    self._keys = list(handle.keys())
    self._known = set(self._keys)

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._known:
      raise KeyError(key)
    try:
      return self._handle.get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except
      # SafetensorError, or TypeError for a dtype numpy lacks.
      raise errors.InputError(
          f"{self._path}: cannot read tensor {key!r}: "
          f"{formatting.describe_error(e, 200)}") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)

  def metadata(self) -> dict[str, str]:
    return dict(self._handle.metadata() or {})


def load_state_dict(path: str | pathlib.Path) -> LazyStateDict:
  """The file's tensors by name.

  Raises:
    errors.InputError: not a readable safetensors file (one line).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  try:
    return LazyStateDict(path, safe_open(str(path), framework="np"))
  except OSError as e:
    raise errors.InputError(f"{path}: {e.strerror or e}") from None
  except Exception as e:  # pylint: disable=broad-except
    # SafetensorError (a bare Exception): a truncated or foreign file.
    raise errors.InputError(
        f"{path}: not a safetensors file "
        f"({formatting.describe_error(e, 200)})") from None
