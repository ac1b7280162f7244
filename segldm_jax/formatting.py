"""How values are written in messages, logs and config files.

One place for the small formatters every layer needs, so that a byte count,
a tree path or an error reads the same in every message.
"""

import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np


def human_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def key_str(key: Any) -> str:
  """One tree-path entry (DictKey, GetAttrKey, SequenceKey, ...) as text."""
  if isinstance(key, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """Key path -> 'params/unet/input_blocks_1_0/in_layers_2/kernel'."""
  return "/".join(key_str(k) for k in path)


def plain(tree: Any) -> Any:
  """JSON/YAML-safe copy: mappings -> dicts, tuples -> lists, numpy and
  ConfigDict values -> Python, so that equal settings compare equal."""
  if hasattr(tree, "to_dict"):  # ConfigDict
    tree = tree.to_dict()
  if isinstance(tree, Mapping):
    return {str(k): plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [plain(v) for v in tree]
  if isinstance(tree, (np.generic, np.ndarray)):
    return tree.tolist()
  if isinstance(tree, (str, int, float, bool)) or tree is None:
    return tree
  return json.loads(json.dumps(tree, default=str))


def printable(text: Any, limit: int = 1000) -> str:
  """`text` with control characters escaped (a file may name a tensor with a
  newline or a terminal escape), truncated to `limit` characters: what a
  file says stays on one line of ours."""
  text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
  return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: Any, limit: int = 400) -> str:
  """A multi-line message (a traceback's tail, 'Error in config file:' then
  the cause) as its first and last lines, then `printable`."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if len(lines) > 1:
    text = f"{lines[0].rstrip(':')}: {lines[-1]}"
  else:
    text = lines[0] if lines else ""
  return printable(text, limit)


def describe_error(error: BaseException, limit: int = 400) -> str:
  """'TypeName: message', printable (just the name when it has none)."""
  text = printable(error, limit)
  return f"{type(error).__name__}: {text}" if text else type(error).__name__
