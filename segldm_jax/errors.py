"""The errors a user can fix, each told in one line.

The library raises these (never SystemExit); `train.py`, `sample.py` and
`convert_torch_ckpt.py` print `error: <message>` and exit 1. Every message
names the file, key or value at fault and, where one exists, the fix.
"""


class UserError(Exception):
  """A problem in the user's input, config, files or environment."""


class ConfigError(UserError, ValueError):
  """A run config is contradictory or incomplete (names the key to change)."""


class InputError(UserError, ValueError):
  """A file or value given to a script cannot be used as it is."""


class ModelConfigError(UserError, ValueError):
  """A model config (LDM YAML node) names an unknown target or an option the
  port does not support."""


class WorkdirError(UserError, OSError):
  """A workdir cannot be used: not writable, too little free space."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A model directory or workdir lacks what it should hold."""


class CheckpointMismatchError(UserError, ValueError):
  """Saved tensors are not those of the model the config builds."""


class SaveFailedError(UserError, RuntimeError):
  """A checkpoint save failed in the background (disk full, I/O error)."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient (with nonfinite=stop)."""


class MissingWeightsError(UserError, FileNotFoundError):
  """An evaluation network's weights package is not installed (names the
  install command)."""


class MissingPackageError(UserError, ImportError):
  """An optional package a chosen feature runs on is not installed (names
  the pip command and, where one exists, the alternative)."""


class CorruptCheckpointError(UserError, ValueError):
  """Saved arrays no longer match the hashes saved with them (names the
  array and the step), or cannot be read at all."""
