"""On-disk layouts: model directories and run workdirs (orbax underneath).

A **model directory** holds one network, e.g. a converted vq-f4:

    DIR/model.yaml    LDM-style config node (`model: {target, params}`)
    DIR/params/       orbax checkpoint of the Flax parameter tree
    DIR/report.txt    what the conversion did (when converted)

A **workdir** holds a latent diffusion run (trained here or converted):

    WORKDIR/config.json        the resolved run config (`model` = LDM node)
    WORKDIR/first_stage/       model directory of the frozen VQ
    WORKDIR/checkpoints/STEP/  orbax items: params {unet, cond_stage},
                               ema_params {unet}, meta (JSON), and, for
                               training runs, opt_state. The data position
                               is not saved: it is the step (see
                               data.pipeline.make_dataset's start_batch).
"""

import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from segldm_jax.models import build

MODEL_FILE = "model.yaml"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
FIRST_STAGE_DIR = "first_stage"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointNotFoundError(FileNotFoundError):
  """A model directory or workdir lacks what it should hold."""


class CheckpointMismatchError(ValueError):
  """Saved tensors are not those of the model the config builds (one line)."""


# --------------------------------------------------------------------------
# Saved shapes vs the shapes a config builds (metadata only, nothing read).
# --------------------------------------------------------------------------


def _key_str(key: Any) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'unet/out_2/kernel': shape} for arrays, ShapeDtypeStructs or orbax
  metadata. Optax namedtuples and the lists orbax saves them as give the
  same paths ('0/0/mu/unet/...')."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_str(k) for k in path): tuple(getattr(leaf, "shape", ()))
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
    return "train.grad_clip_norm, train.lr_schedule, train.warmup_steps"
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


def save_model_dir(path: str | pathlib.Path, node: Mapping[str, Any],
                   params: Any, report: str | None = None) -> pathlib.Path:
  """Writes config node + params; refuses to overwrite existing params.

  In a multi-process run every process calls it (orbax synchronises the
  save); the small text files come from process 0.
  """

  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (path / MODEL_FILE).write_text(yaml.safe_dump({"model": _plain(node)},
                                                  sort_keys=False))
    if report is not None:
      (path / "report.txt").write_text(report + "\n")
  with ocp.Checkpointer(_lean_pytree_handler()) as checkpointer:
    checkpointer.save(path / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
  return path


def _lean_pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """What StandardCheckpointer writes (OCDBT, the same layout; it restores
  with StandardCheckpointer), in a synchronous save that copies nothing.

  The stock handler deep-copies every numpy array first (a guard for async
  saves) and zstd-compresses while OCDBT holds every compressed chunk until
  it commits: two extra copies of the weights at the peak, for files of
  float weights only 5-8% smaller. Here the save waits, the arrays are
  written from where they are, and the files are uncompressed.
  """

  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
      *((t, th.get_type_handler(t))
        for t in (jax.Array, np.number, int, float, bytes, str)))
  return ocp.PyTreeCheckpointHandler(use_compression=False,
                                     type_handler_registry=registry)


def _open_model_dir(path: str | pathlib.Path, **build_kw):
  """-> (path, module, param shapes, node), the weights checked against the
  model that model.yaml builds (metadata only)."""
  path = pathlib.Path(path).absolute()
  if not (path / MODEL_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
    raise CheckpointNotFoundError(
        f"{path}: not a model directory (expected {MODEL_FILE} and "
        f"{PARAMS_DIR}/); make one with: python convert_torch_ckpt.py "
        f"model.ckpt --out {path}")
  node = build.load_model_config(path / MODEL_FILE)
  module = build.build_model(node, **build_kw)
  shapes = build.param_shapes(module)
  try:
    check_saved_item(path / PARAMS_DIR, shapes, f"{path}:")
  except CheckpointMismatchError as e:
    # Before orbax's own error, which names neither tensor nor shapes.
    raise CheckpointMismatchError(
        f"{e}; {MODEL_FILE} there does not describe these weights (edited, "
        "or params/ copied from another model?)") from None
  return path, module, shapes, node


def check_model_dir(path: str | pathlib.Path) -> dict:
  """-> the model node, after the checks `load_model_dir` makes (no weight
  is read). Raises CheckpointNotFoundError / CheckpointMismatchError."""
  return _open_model_dir(path)[3]


def load_model_dir(path: str | pathlib.Path, **build_kw):
  """-> (module, params, node). `build_kw` (e.g. dtype) goes to the builder.

  Raises:
    CheckpointNotFoundError: not a model directory.
    CheckpointMismatchError: params/ holds other tensors than model.yaml's
      model (the message names the first one and both shapes).
  """
  path, module, shapes, node = _open_model_dir(path, **build_kw)
  params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, shapes)
  return module, params, node


def checkpoint_manager(workdir: str | pathlib.Path,
                       options: ocp.CheckpointManagerOptions | None = None
                       ) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR,
                               options=options)


def save_converted_workdir(workdir: str | pathlib.Path, config: Mapping[str, Any],
                           step: int, params: Any, ema_params: Any | None,
                           meta: Mapping[str, Any]) -> pathlib.Path:
  """A workdir that `sample.py --workdir` (and `train.py` to fine-tune) reads."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG_FILE).write_text(json.dumps(_plain(config), indent=2) + "\n")
  items = {"params": ocp.args.StandardSave(params),
           "meta": ocp.args.JsonSave(_plain(meta))}
  if ema_params is not None:
    items["ema_params"] = ocp.args.StandardSave(ema_params)
  with checkpoint_manager(workdir) as mgr:
    mgr.save(step, args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()
  return workdir


def _plain(tree: Any) -> Any:
  """YAML/JSON-safe copy: tuples -> lists, numpy scalars -> Python."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_plain(v) for v in tree]
  if hasattr(tree, "item") and not isinstance(tree, (str, bytes)):
    return tree.item()
  return tree


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
  step_dir = workdir / CHECKPOINTS_DIR / str(step)
  label = f"{workdir}: {CHECKPOINTS_DIR}/{step}"
  check_saved_item(step_dir / "params", shapes, label)
  if use_ema and (step_dir / "ema_params").is_dir():
    check_saved_item(step_dir / "ema_params", {"unet": shapes["unet"]}, label)


def restore_params(workdir: str | pathlib.Path, ldm, step: int | None = None,
                   use_ema: bool = True):
  """-> (params {unet, cond_stage}, step) from the newest (or given) step.

  With `use_ema` the UNet weights come from `ema_params` when saved (the
  rescaler has no EMA, as in the reference).
  """
  with checkpoint_manager(workdir) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(
          f"{workdir}: no checkpoint under {CHECKPOINTS_DIR}/; train one with "
          "train.py or convert one with convert_torch_ckpt.py")
    # Onto this process's first device, whatever mesh wrote the checkpoint.
    import jax  # pylint: disable=g-import-not-at-top
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
        {"unet": build.param_shapes(ldm.unet),
         "cond_stage": build.param_shapes(ldm.cond_stage)})
    has_ema = (mgr.directory / str(step) / "ema_params").is_dir()
    items = {"params": ocp.args.StandardRestore(shapes)}
    if use_ema and has_ema:
      items["ema_params"] = ocp.args.StandardRestore({"unet": shapes["unet"]})
    try:
      check_saved_params(workdir, step, shapes, use_ema=use_ema)
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(
          f"{e}; the workdir's {CONFIG_FILE} does not describe these "
          "weights") from None
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  params = dict(restored["params"])
  if "ema_params" in items:
    params["unet"] = restored["ema_params"]["unet"]
  return params, step


# --------------------------------------------------------------------------
# Training runs.
# --------------------------------------------------------------------------


def ensure_writable(workdir: pathlib.Path) -> None:
  """Fails at once (not hours later, at the first save) on a bad workdir."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    # One name per process: hosts sharing the workdir must not unlink each
    # other's probe.
    probe = workdir / f".write_probe.{os.getpid()}.{jax.process_index()}"
    probe.write_bytes(b"\0" * 4096)
    probe.unlink()
  except OSError as e:
    raise SystemExit(f"workdir {workdir} is not writable: {e.strerror or e}")


def human_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def tree_nbytes(tree: Any) -> int:
  """Bytes of a tree of arrays or ShapeDtypeStructs (e.g. an abstract state)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def check_free_space(workdir: pathlib.Path, state_bytes: int, keep: int,
                     existing: int = 0) -> None:
  """Fails at once when the workdir's filesystem cannot hold the checkpoints
  this run will keep, instead of at a save hours later.

  Orbax writes a new step before it deletes the oldest, so up to `keep` + 1
  train states (params, EMA, optimiser) sit on disk; `existing` of them
  (a resumed run's) are already there.
  """
  keep = max(int(keep), 0)
  copies = max(1, keep + 1 - min(int(existing), keep))
  needed = state_bytes * copies
  # Orbax metadata, samples, logs and the first stage are small next to it.
  needed += max(64 << 20, needed // 50)
  free = shutil.disk_usage(workdir).free
  if free < needed:
    already = f", {existing} already saved" if existing else ""
    raise SystemExit(
        f"workdir {workdir}: {human_bytes(free)} free on its filesystem, but "
        f"its checkpoints need {human_bytes(needed)} ({copies} x "
        f"{human_bytes(state_bytes)} train state: train.keep_checkpoints="
        f"{keep} + 1 being written{already}, plus margin); free space, pass "
        "--config.train.keep_checkpoints=1 or use a --workdir on a bigger disk")


def _save_failure(directory: pathlib.Path, error: BaseException,
                  latest: int | None) -> str:
  """One line for a background save that failed (disk full, I/O error)."""
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore's errors
  if isinstance(error, OSError) and error.errno:
    reason = os.strerror(error.errno)
  elif code:
    reason = os.strerror(int(code.group(1)))
  else:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
  try:
    free = f" ({human_bytes(shutil.disk_usage(directory).free)} free there)"
  except OSError:
    free = ""
  kept = (f"the last complete checkpoint (step {latest}) is intact"
          if latest is not None else "no complete checkpoint was written")
  return (f"saving a checkpoint under {directory} failed: {reason}{free}; "
          f"{kept}: free space and re-run the same command to resume")


class _TrainCheckpointManager(ocp.CheckpointManager):
  """Reports a failed asynchronous save as one line (SystemExit).

  A save runs in orbax's background thread; a write error there (ENOSPC,
  EIO) surfaces at the next `save` or `wait_until_finished`, as a long
  tensorstore message after orbax has logged its traceback. Neither hangs.
  """

  def wait_until_finished(self) -> None:
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      try:
        latest = self.latest_step()
      except Exception:  # pylint: disable=broad-except
        latest = None
      raise SystemExit(_save_failure(self.directory, e, latest)) from e


def train_checkpoint_manager(workdir: str | pathlib.Path, train_cfg
                             ) -> ocp.CheckpointManager:
  """Asynchronous saves; keeps the last K plus every `keep_period`-th step.

  Orbax writes each step to a temporary directory and renames it when
  complete, so a crash mid-save leaves no step that would be restored. A
  save that fails in the background (full disk) ends the run with one line
  at the next save or wait (see `_TrainCheckpointManager`).
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(train_cfg.keep_checkpoints),
      keep_period=int(train_cfg.keep_period) or None,
      enable_async_checkpointing=True,
      create=True)
  return _TrainCheckpointManager(
      pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR, options=options)


def save_train_state(mgr: ocp.CheckpointManager, step: int, state,
                     force: bool = False) -> None:
  """Saves state as params / ema_params / opt_state / meta items.

  The split keeps converted workdirs and training workdirs one format:
  sample.py reads params and ema_params from either.
  """
  if step in mgr.all_steps():
    return
  mgr.save(step, force=force, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      ema_params=ocp.args.StandardSave(state.ema),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave({"step": step,
                              "ema_updates": int(state.ema_updates),
                              "skipped": int(state.skipped)})))


def restore_train_state(mgr: ocp.CheckpointManager, step: int, abstract_state,
                        shardings, init_opt_state):
  """-> the train state at `step`, arrays placed with `shardings`.

  Any mesh works: arrays are read straight into the given shardings. A
  converted workdir has no optimiser state: it starts fresh
  (`init_opt_state(params)`, fine-tuning), while the weights and the EMA's
  update count carry over.

  Raises:
    CheckpointMismatchError: a saved tensor is missing, extra or of another
      shape than `abstract_state`'s (the model the config builds); the
      message names the first one, both shapes and the config keys behind it.
  """

  def target(tree, sh):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)

  step_dir = mgr.directory / str(step)
  # Checked from metadata first: orbax's own error on a mismatch names
  # neither the tensor nor the shapes.
  for name, abstract in (("params", abstract_state.params),
                         ("ema_params", abstract_state.ema),
                         ("opt_state", abstract_state.opt_state)):
    if (step_dir / name).is_dir():
      check_saved_item(step_dir / name, abstract,
                       f"{mgr.directory.parent}: {CHECKPOINTS_DIR}/{step}")
  items = {"params": ocp.args.StandardRestore(
      target(abstract_state.params, shardings.params)),
           "meta": ocp.args.JsonRestore()}
  for name, abstract, sh in (("ema_params", abstract_state.ema, shardings.ema),
                             ("opt_state", abstract_state.opt_state,
                              shardings.opt_state)):
    if (step_dir / name).is_dir():
      items[name] = ocp.args.StandardRestore(target(abstract, sh))
  r = mgr.restore(step, args=ocp.args.Composite(**items))
  params = r["params"]
  ema = r["ema_params"] if "ema_params" in items else {
      "unet": jax.tree.map(jax.numpy.copy, params["unet"])}  # donated apart
  meta = r["meta"] or {}
  state = abstract_state.replace(
      step=jax.device_put(jax.numpy.asarray(step, "int32"), shardings.step),
      params=params, ema=ema,
      ema_updates=jax.device_put(
          jax.numpy.asarray(meta.get("ema_updates", meta.get("num_updates", 0)),
                            "int32"), shardings.ema_updates),
      skipped=jax.device_put(jax.numpy.asarray(meta.get("skipped", 0), "int32"),
                             shardings.skipped))
  opt_state = r["opt_state"] if "opt_state" in items else init_opt_state(params)
  return state.replace(opt_state=opt_state)
