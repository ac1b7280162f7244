"""Saving and restoring model directories and train states with orbax.

The layouts are described in `workdir_files.py`.
"""

import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from segldm_jax import formatting
from segldm_jax.checkpoint import manifest
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import workdir_files
from segldm_jax.checkpoint.workdir_files import CHECKPOINTS_DIR, CONFIG_FILE, MANIFEST_FILE
from segldm_jax.checkpoint.workdir_files import MANIFEST_ITEM, MODEL_FILE, PARAMS_DIR
from segldm_jax.errors import CheckpointMismatchError
from segldm_jax.errors import CheckpointNotFoundError
from segldm_jax.errors import CorruptCheckpointError
from segldm_jax.errors import SaveFailedError
from segldm_jax.models import build
from segldm_jax.runtime import distributed

def save_model_dir(path: str | pathlib.Path, node: Mapping[str, Any],
                   params: Any, report: str | None = None) -> pathlib.Path:
  """Writes config node + params; refuses to overwrite existing params.

  In a multi-process run every process calls it (orbax synchronises the
  save); the small text files come from process 0.
  """

  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  hashes = manifest.make(params)  # every process: a collective if sharded
  if jax.process_index() == 0:
    (path / MODEL_FILE).write_text(yaml.safe_dump({"model": formatting.plain(node)},
                                                  sort_keys=False))
    if report is not None:
      (path / "report.txt").write_text(report + "\n")
  with ocp.Checkpointer(_lean_pytree_handler()) as checkpointer:
    checkpointer.save(path / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
  if jax.process_index() == 0:  # after the weights: a manifest means done
    (path / MANIFEST_FILE).write_text(json.dumps(hashes) + "\n")
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
    saved_shapes.check_saved_item(path / PARAMS_DIR, shapes, f"{path}:")
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
  try:
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, shapes)
    saved = (json.loads((path / MANIFEST_FILE).read_text())
             if (path / MANIFEST_FILE).is_file() else None)
  except (ValueError, OSError, RuntimeError) as e:  # tensorstore, JSON
    raise CorruptCheckpointError(_unreadable(str(path), e)) from e
  _check_manifest(saved, params, f"{path}: {PARAMS_DIR}/")
  return module, params, node


def _unreadable(where: str, error: BaseException) -> str:
  return (f"{where} cannot be read ({formatting.describe_error(error, 300)}): "
          "the checkpoint is corrupt or incomplete")


def _check_manifest(saved: Any, tree: Any, where: str) -> None:
  """Raises CorruptCheckpointError naming the first array of `tree` whose
  hash is not the one saved with it (`where`: the step or directory)."""
  bad = manifest.first_mismatch(saved, tree)
  if bad is not None:
    name, then, now = bad
    raise CorruptCheckpointError(
        f"{where} array {name!r} does not match the hash saved with it "
        f"({then} saved, {now} read): the checkpoint is corrupt (changed on "
        "disk or in a copy)")


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
  (workdir / CONFIG_FILE).write_text(
      json.dumps(formatting.plain(config), indent=2) + "\n")
  items = {"params": ocp.args.StandardSave(params),
           "meta": ocp.args.JsonSave(formatting.plain(meta))}
  if ema_params is not None:
    items["ema_params"] = ocp.args.StandardSave(ema_params)
  items[MANIFEST_ITEM] = ocp.args.JsonSave(manifest.make(
      {"params": params, "ema_params": ema_params}))
  with checkpoint_manager(workdir) as mgr:
    mgr.save(step, args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()
  return workdir


def restore_params(workdir: str | pathlib.Path, ldm, step: int | None = None,
                   use_ema: bool = True, shardings: Any = None):
  """-> (params {unet, cond_stage}, step) from the newest (or given) step.

  With `use_ema` the UNet weights come from `ema_params` when saved (the
  rescaler has no EMA, as in the reference). `shardings` ({unet,
  cond_stage} trees of shardings) places the arrays as they are read;
  default: this process's first device.
  """
  with checkpoint_manager(workdir) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(
          f"{workdir}: no checkpoint under {CHECKPOINTS_DIR}/; train one with "
          "train.py or convert one with convert_torch_ckpt.py")
    # Onto `shardings` (default: this process's first device), whatever mesh
    # wrote the checkpoint.
    import jax  # pylint: disable=g-import-not-at-top
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = saved_shapes.ldm_param_shapes(ldm)
    if shardings is None:
      shardings = jax.tree.map(lambda _: here, abstract)
    shapes = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, shardings)
    items = {"params": ocp.args.StandardRestore(shapes)}
    if use_ema and has_ema(workdir, step):
      items["ema_params"] = ocp.args.StandardRestore({"unet": shapes["unet"]})
    try:
      saved_shapes.check_saved_params(workdir, step, shapes, use_ema=use_ema)
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(
          f"{e}; the workdir's {CONFIG_FILE} does not describe these "
          "weights") from None
    restored = _restore_verified(mgr, step, items)
  params = dict(restored["params"])
  if "ema_params" in items:
    params["unet"] = restored["ema_params"]["unet"]
  return params, step


def restore_meta(workdir: str | pathlib.Path, step: int) -> dict:
  """The JSON `meta` item saved at `step` ({} when there is none): EMA
  decay / update count, scale_factor, global_step of a converted workdir;
  step, ema_updates, skipped of a trained one."""
  with checkpoint_manager(workdir) as mgr:
    if not (mgr.directory / str(step) / "meta").is_dir():
      return {}
    restored = mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
  return dict(restored["meta"] or {})


def has_ema(workdir: str | pathlib.Path, step: int) -> bool:
  """Whether the checkpoint at `step` holds EMA weights (`ema_params`)."""
  return (pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR / str(step)
          / "ema_params").is_dir()


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
    free = shutil.disk_usage(directory).free
    free = f" ({formatting.human_bytes(free)} free there)"
  except OSError:
    free = ""
  kept = (f"the last complete checkpoint (step {latest}) is intact"
          if latest is not None else "no complete checkpoint was written")
  return (f"saving a checkpoint under {directory} failed: {reason}{free}; "
          f"{kept}: free space and re-run the same command to resume")


class _TrainCheckpointManager(ocp.CheckpointManager):
  """Reports a failed asynchronous save as one line (SaveFailedError).

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
      raise SaveFailedError(_save_failure(self.directory, e, latest)) from e


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


def resume_step(mgr: ocp.CheckpointManager) -> int | None:
  """The step a run continues from, or None for a new run.

  Step 0 is resumed like any other: convert_torch_ckpt.py numbers a workdir
  by the file's global_step, which is 0 for weights Lightning never stepped
  (or a bare state_dict), and those weights, their EMA and its update count
  must be restored, not replaced by a fresh init.
  """
  return mgr.latest_step()


def save_train_state(mgr: ocp.CheckpointManager, step: int, state,
                     force: bool = False) -> None:
  """Saves state as params / ema_params / opt_state / meta items; meta's
  "frozen" lists the parameters without optimiser state (train.trainable).

  The split keeps converted workdirs and training workdirs one format:
  sample.py reads params and ema_params from either.
  """
  if step in mgr.all_steps():
    return
  # Hashed where the arrays are, before the save copies them (one pass over
  # the state on its devices); the manifest is an item of the same step, so
  # it is written (or lost) with it.
  hashes = manifest.make({"params": state.params, "ema_params": state.ema,
                          "opt_state": state.opt_state})
  mgr.save(step, force=force, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      ema_params=ocp.args.StandardSave(state.ema),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave({"step": step,
                              "ema_updates": int(state.ema_updates),
                              "skipped": int(state.skipped),
                              "frozen": saved_shapes.stateless_params(
                                  state.params, state.opt_state)}),
      **{MANIFEST_ITEM: ocp.args.JsonSave(hashes)}))


def _restore_verified(mgr: ocp.CheckpointManager, step: int,
                      items: dict) -> Any:
  """`mgr.restore` of `items` at `step`, checked against the step's manifest
  (when it has one: older and foreign checkpoints do not)."""
  where = f"{mgr.directory.parent}: {CHECKPOINTS_DIR}/{step}"
  listed = (mgr.directory / str(step) / MANIFEST_ITEM).is_dir()
  if listed:
    items = {**items, MANIFEST_ITEM: ocp.args.JsonRestore()}
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, OSError, RuntimeError) as e:  # tensorstore, JSON
    raise CorruptCheckpointError(_unreadable(where, e)) from e
  _check_manifest(restored[MANIFEST_ITEM] if listed else None,
                  {k: restored[k] for k in items
                   if k not in ("meta", MANIFEST_ITEM)}, f"{where}:")
  return restored


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
    CorruptCheckpointError: an array read back does not match the hash
      saved with it (the message names it and the step), or the step cannot
      be read at all.
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
      saved_shapes.check_saved_item(step_dir / name, abstract,
                       f"{mgr.directory.parent}: {CHECKPOINTS_DIR}/{step}")
  items = {"params": ocp.args.StandardRestore(
      target(abstract_state.params, shardings.params)),
           "meta": ocp.args.JsonRestore()}
  for name, abstract, sh in (("ema_params", abstract_state.ema, shardings.ema),
                             ("opt_state", abstract_state.opt_state,
                              shardings.opt_state)):
    if (step_dir / name).is_dir():
      items[name] = ocp.args.StandardRestore(target(abstract, sh))
  r = _restore_verified(mgr, step, items)
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


def restore_latest_intact(mgr: ocp.CheckpointManager, abstract_state,
                          shardings, init_opt_state):
  """-> (state, step): the newest step that restores intact (see
  `restore_train_state`).

  A step whose arrays no longer match their manifest (or cannot be read) is
  renamed STEP.corrupt, which orbax no longer lists, with a warning naming
  the array; the previous complete step is tried next. Every process takes
  the same path (the hashes are computed together).

  Raises:
    CheckpointNotFoundError: no step was saved.
    CorruptCheckpointError: no step is intact (the newest one's message).
    CheckpointMismatchError: as `restore_train_state`.
  """
  first = None
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      return restore_train_state(mgr, step, abstract_state, shardings,
                                 init_opt_state), step
    except CorruptCheckpointError as e:
      first = first or e
      aside = _set_aside(mgr, step)
      logging.warning("%s; set aside as %s, resuming from the previous "
                      "complete checkpoint", e, aside.name)
  if first is None:
    raise CheckpointNotFoundError(
        f"{mgr.directory}: no checkpoint to resume from")
  raise CorruptCheckpointError(
      f"{first}; no earlier checkpoint is intact: start again in a new "
      "--workdir (the corrupt steps are kept as STEP.corrupt)")


def _set_aside(mgr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Renames step `step` to STEP.corrupt (STEP.corrupt.N if taken)."""
  source = mgr.directory / str(step)
  target = source.with_name(source.name + workdir_files.CORRUPT_SUFFIX)
  n = 1
  while target.exists():
    target = source.with_name(f"{source.name}{workdir_files.CORRUPT_SUFFIX}.{n}")
    n += 1
  if jax.process_index() == 0:
    source.rename(target)
  distributed.barrier(f"segldm_set_aside_{step}")
  mgr.reload()
  return target
