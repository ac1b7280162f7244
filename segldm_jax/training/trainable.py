"""Which parameters a run trains: `train.trainable`, a regex over parameter
paths (`re.search`), or one of `PRESETS`.

Paths read like ``unet/input_blocks_0_0/kernel`` and
``cond_stage/channel_mapper/kernel`` (the rescaler). A frozen parameter
keeps its exact bits: the optimiser holds no state for it (its update is
zero) and the train step hands back its old array and its old EMA, so
nothing of it changes, not even the sign of a zero. Checkpoints list the
frozen parameters (`meta` "frozen": the ones without optimiser state).
The default trains everything, with the optimiser exactly as before.
"""

import re
from typing import Any

import jax
import optax

from segldm_jax import errors
from segldm_jax import formatting

PRESETS = {
    "all": ".*",
    # The rescaler only: a new class set's rows, the UNet untouched.
    "rescaler": r"^cond_stage/",
    # The rescaler and the UNet's first convolution (which reads the
    # rescaled mask) and output layers (norm and last convolution).
    "rescaler_unet_ends": r"^(cond_stage/|unet/input_blocks_0_0/|unet/out_)",
}


def pattern(train_cfg) -> str | None:
  """The regex `train.trainable` stands for; None when everything trains."""
  value = str(train_cfg.get("trainable", "all") or "all")
  value = PRESETS.get(value, value)
  if value in (".*", ""):
    return None
  try:
    re.compile(value)
  except re.error as e:
    raise errors.ConfigError(
        f"train.trainable={value!r} is not a regex ({e}); use one of "
        f"{', '.join(PRESETS)} or a regex over parameter paths") from None
  return value


def _paths(tree: Any) -> list[tuple[Any, str]]:
  return [(path, formatting.path_str(path))
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def labels(params: Any, regex: str) -> Any:
  """"train" / "frozen" per parameter (optax.multi_transform's labels).

  Raises:
    errors.ConfigError: the regex trains no parameter.
  """
  names = [name for _, name in _paths(params)]
  if not any(re.search(regex, n) for n in names):
    raise errors.ConfigError(
        f"train.trainable={regex!r} matches no parameter; paths read like "
        f"{names[0]!r} and {names[-1]!r} (presets: {', '.join(PRESETS)})")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: ("train" if re.search(regex, formatting.path_str(path))
                       else "frozen"), params)


def wrap_optimizer(optimizer: optax.GradientTransformation, train_cfg
                   ) -> optax.GradientTransformation:
  """`optimizer` on the trainable parameters; none on the frozen ones (no
  state, zero updates). Unchanged when everything trains."""
  regex = pattern(train_cfg)
  if regex is None:
    return optimizer
  return optax.multi_transform(
      {"train": optimizer, "frozen": optax.set_to_zero()},
      lambda params: labels(params, regex))


def keep_frozen(train_cfg, state, params: Any, ema: Any) -> tuple[Any, Any]:
  """The step's new (params, ema) with every frozen parameter's array and
  EMA taken back from `state` unchanged (chosen at trace time)."""
  regex = pattern(train_cfg)
  if regex is None:
    return params, ema

  def keep(path, new, old):
    return new if re.search(regex, formatting.path_str(path)) else old

  return (jax.tree_util.tree_map_with_path(keep, params, state.params),
          jax.tree_util.tree_map_with_path(keep, ema, state.ema))


def frozen_paths(train_cfg, params: Any) -> list[str]:
  """The paths of the parameters `train.trainable` leaves out."""
  regex = pattern(train_cfg)
  if regex is None:
    return []
  return [name for _, name in _paths(params) if not re.search(regex, name)]
