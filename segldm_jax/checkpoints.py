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
                               training runs, opt_state and data_iter
"""

import json
import pathlib
from typing import Any, Mapping

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
  """Writes config node + params; refuses to overwrite existing params."""
  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  (path / MODEL_FILE).write_text(yaml.safe_dump({"model": _plain(node)},
                                                sort_keys=False))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  if report is not None:
    (path / "report.txt").write_text(report + "\n")
  return path


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
    shapes = {"unet": build.param_shapes(ldm.unet),
              "cond_stage": build.param_shapes(ldm.cond_stage)}
    has_ema = (mgr.directory / str(step) / "ema_params").is_dir()
    items = {"params": ocp.args.StandardRestore(shapes)}
    if use_ema and has_ema:
      items["ema_params"] = ocp.args.StandardRestore({"unet": shapes["unet"]})
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  params = dict(restored["params"])
  if "ema_params" in items:
    params["unet"] = restored["ema_params"]["unet"]
  return params, step
