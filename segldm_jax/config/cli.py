"""What the three scripts share at their border with the user.

* `flag_error`: a mistake in `--config` or its overrides in one line
  (ml_collections raises a multi-line AttributeError / KeyError for an
  unknown override such as `--config.train.batchsize=8`, and defers a config
  file that failed to load until first use).
* `main_exits`: runs a script's main and turns the library's typed errors
  into one line on stderr and exit status 1.
"""

import difflib
import functools
import re
import sys
from typing import Any, Callable, Sequence

from absl import flags
import ml_collections as mlc
from ml_collections import config_flags

from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.config import run_config
from segldm_jax.runtime import compilation_cache
from segldm_jax.runtime import distributed

_OVERRIDE = re.compile(r"--(?:no)?config\.([^=\s]+)")
# Keys renamed since a release, so an old command line gets the new name.
RENAMED = {
    # big_vision's `sharding_rules` are logical activation axes; its list of
    # (regex, parameter sharding) is `sharding_strategy`, as ours now is.
    "sharding_rules": "sharding_strategy",
}


def unknown_key(config: Any, dotted: str) -> str | None:
  """'unknown config key train.batchsize; did you mean train.batch_size?'
  for an override path the config lacks; None when it has it."""
  if dotted.split("[")[0] in RENAMED:
    new = RENAMED[dotted.split("[")[0]]
    return (f"config key {dotted} is now called {new}: pass "
            f"--config.{new}=... instead")
  node, done = config, []
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    name = part.split("[")[0]
    if not hasattr(node, "keys"):
      held = formatting.one_line(repr(node), 60)
      return (f"config key {'.'.join(done)} holds {held} "
              f"({type(node).__name__}), it has no field {name!r}")
    keys = [str(k) for k in node.keys()]
    if name not in keys:
      rest = [p.split("[")[0] for p in parts[i + 1:]]
      full = ".".join(done + [name] + rest)
      close = difflib.get_close_matches(name, keys, n=1)
      if close:
        return (f"unknown config key {full}; did you mean "
                f"{'.'.join(done + close + rest)}?")
      where = ".".join(done) or "the config"
      return (f"unknown config key {full}; {where} has: "
              f"{formatting.one_line(', '.join(sorted(keys)), 300)}")
    node = node[name]
    done.append(name)
    if "[" in part:
      return None  # An index into a sequence: left to ml_collections.
  return None


def _config_path_from_argv(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def flag_error(argv: Sequence[str], error: BaseException) -> str:
  """One line for an error raised while absl parses a `--config` flag file
  and its overrides (ml_collections raises AttributeError / KeyError with a
  multi-line message for an unknown key, flags.Error for a bad value)."""
  config = None
  path = _config_path_from_argv(argv)
  if path:
    try:  # The file alone, without the overrides, to walk them.
      fv = flags.FlagValues()
      argv0 = ["train.py", f"--config={path}"]
      config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv0)
      fv(argv0)
      config = fv.config
    except Exception:  # pylint: disable=broad-except
      config = None
    if not isinstance(config, mlc.ConfigDict):
      config = None
  if config is not None:
    for arg in argv:
      m = _OVERRIDE.match(arg)
      if m and (message := unknown_key(config, m.group(1))):
        return message
  text = str(error)
  m = re.match(r"flag --config\.([^=\s]+)=(.*?): (.*)", text, re.S)
  if m and config is not None:  # A value of the wrong type.
    current = run_config.get_key(config, m.group(1))
    if current is not run_config.MISSING:
      why = formatting.one_line(m.group(3))
      return (f"--config.{m.group(1)}={m.group(2)}: {why}; "
              f"the config's value is {current!r} ({type(current).__name__})")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, OSError) and path and lines:  # The file did not load.
    return f"cannot load --config={path}: {lines[-1]}"
  return formatting.one_line(text)


def error_line(error: errors.UserError) -> str:
  """The one line a script prints for a typed error."""
  if isinstance(error, (errors.ConfigError, errors.CheckpointMismatchError)):
    return f"config error: {error}"
  return f"error: {error}"


def main_exits(main: Callable[..., int]) -> Callable[..., int]:
  """Decorates a script's main: a UserError becomes one line on stderr and
  the exit status 1 (the script passes main's result to sys.exit)."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      status = main(*args, **kwargs)
    except errors.UserError as e:
      line = error_line(e)
      print(line, file=sys.stderr)
      distributed.end_after_error(line)  # multi-process: do not wait for peers
      return 1
    compilation_cache.report()
    return status

  return wrapped
