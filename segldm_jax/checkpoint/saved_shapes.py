"""Saved tensors against the tensors a config builds, from metadata alone.

A resumed run, `sample.py` and a first stage are checked before any weight
is read: orbax's own error on a mismatch names neither the tensor nor the
shapes, so ours names the first differing tensor, both shapes and the config
keys that set it.
"""

import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from segldm_jax import formatting
from segldm_jax.checkpoint import workdir_files
from segldm_jax.errors import CheckpointMismatchError
from segldm_jax.models import build


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'unet/out_2/kernel': shape} for arrays, ShapeDtypeStructs or orbax
  metadata. Optax namedtuples and the lists orbax saves them as give the
  same paths ('0/0/mu/unet/...')."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {formatting.path_str(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def saved_shapes(item_dir: str | pathlib.Path
                 ) -> dict[str, tuple[int, ...]] | None:
  """Shapes an orbax pytree item holds, from its metadata; None when that
  cannot be read (the restore then reports what is wrong)."""
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(pathlib.Path(item_dir))
  except Exception:  # pylint: disable=broad-except
    return None
  return leaf_shapes(getattr(meta, "tree", meta))


def _fmt_shape(shape: tuple[int, ...]) -> str:
  return "(" + ",".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def first_mismatch(saved: Mapping[str, tuple[int, ...]],
                   wanted: Mapping[str, tuple[int, ...]]
                   ) -> tuple[str, str] | None:
  """-> (path, problem) for the first tensor, in `wanted`'s order, that
  `saved` lacks or holds with another shape, else for the first one only
  `saved` has; None when both agree."""
  for path, shape in wanted.items():
    if path not in saved:
      return path, f"is not saved; the config builds {_fmt_shape(shape)}"
    if tuple(saved[path]) != tuple(shape):
      return path, (f"is {_fmt_shape(saved[path])}; the config builds "
                    f"{_fmt_shape(shape)}")
  for path, shape in saved.items():
    if path not in wanted:
      return path, (f"{_fmt_shape(shape)} is saved but the config builds no "
                    "such tensor")
  return None


def _config_keys_for(item: str, path: str) -> str:
  """The config keys that shape a saved tensor, to name in a mismatch."""
  parts = path.split("/")
  if "cond_stage" in parts:
    return "data.num_classes, model.params.cond_stage_config.params"
  if "unet" in parts:
    return "model.params.unet_config.params"
  if item == "opt_state":  # optax's state layout follows the optimiser chain
    return ("train.grad_clip_norm, train.lr_schedule, train.warmup_steps, "
            "train.trainable")
  return ""


def check_saved_item(item_dir: pathlib.Path, target: Any, label: str) -> None:
  """Raises CheckpointMismatchError naming the first tensor of the saved
  item `item_dir` whose path or shape differs from `target`'s (a tree of
  ShapeDtypeStructs); `label` starts the message (e.g. the step directory).
  An item whose metadata cannot be read is left to the restore."""
  saved = saved_shapes(item_dir)
  if saved is None:
    return
  found = first_mismatch(saved, leaf_shapes(target))
  if found is None:
    return
  path, problem = found
  keys = _config_keys_for(item_dir.name, path)
  raise CheckpointMismatchError(
      f"{label} {item_dir.name}/{path} {problem}"
      + (f" (set by {keys})" if keys else ""))


def stateless_params(params: Any, opt_state: Any) -> list[str]:
  """The paths of `params` that no leaf of `opt_state` is kept for (optax
  names a moment by the parameter's path: 'mu/unet/...'): the frozen ones."""
  kept = set()
  for path in leaf_shapes(opt_state):
    parts = path.split("/")
    kept.update("/".join(parts[i:]) for i in range(len(parts)))
  return [p for p in leaf_shapes(params) if p not in kept]


def ldm_param_shapes(ldm) -> dict:
  """The `params` item's layout: {unet, cond_stage} shape trees."""
  return {"unet": build.param_shapes(ldm.unet),
          "cond_stage": build.param_shapes(ldm.cond_stage)}


def check_saved_params(workdir: str | pathlib.Path, step: int, shapes,
                       use_ema: bool = True) -> None:
  """Raises CheckpointMismatchError when the `params` (or `ema_params`)
  item of `step` holds other tensors than `shapes` ({unet, cond_stage}, see
  `ldm_param_shapes`): the first one, both shapes and the config keys
  behind it. Reads metadata only."""
  workdir = pathlib.Path(workdir).absolute()
  step_dir = workdir / workdir_files.CHECKPOINTS_DIR / str(step)
  label = f"{workdir}: {workdir_files.CHECKPOINTS_DIR}/{step}"
  check_saved_item(step_dir / "params", shapes, label)
  if use_ema and (step_dir / "ema_params").is_dir():
    check_saved_item(step_dir / "ema_params", {"unet": shapes["unet"]}, label)
