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
import os
import pathlib
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


def load_model_dir(path: str | pathlib.Path, **build_kw):
  """-> (module, params, node). `build_kw` (e.g. dtype) goes to the builder."""
  path = pathlib.Path(path).absolute()
  if not (path / MODEL_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
    raise CheckpointNotFoundError(
        f"{path}: not a model directory (expected {MODEL_FILE} and "
        f"{PARAMS_DIR}/); make one with: python convert_torch_ckpt.py "
        f"model.ckpt --out {path}")
  node = build.load_model_config(path / MODEL_FILE)
  module = build.build_model(node, **build_kw)
  params = ocp.StandardCheckpointer().restore(
      path / PARAMS_DIR, build.param_shapes(module))
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


def train_checkpoint_manager(workdir: str | pathlib.Path, train_cfg
                             ) -> ocp.CheckpointManager:
  """Asynchronous saves; keeps the last K plus every `keep_period`-th step.

  Orbax writes each step to a temporary directory and renames it when
  complete, so a crash mid-save leaves no step that would be restored.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(train_cfg.keep_checkpoints),
      keep_period=int(train_cfg.keep_period) or None,
      enable_async_checkpointing=True,
      create=True)
  return checkpoint_manager(workdir, options)


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
  """

  def target(tree, sh):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)

  step_dir = mgr.directory / str(step)
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
