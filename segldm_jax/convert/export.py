"""segldm-jax workdirs and model directories -> PyTorch files, without torch.

A workdir (trained or converted) becomes what a CompVis latent-diffusion run
leaves behind: `model.ckpt` ({"state_dict", "global_step"} in torch.save's zip
format), the same tensors as `model.safetensors`, and `config.yaml`, the YAML
that `instantiate_from_config(config.model)` builds. The state_dict has
LatentDiffusion's own names: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, the schedule buffers, and LitEma's `model_ema.*` when
the run has an EMA. A model directory (a VQ, a UNet, a rescaler) becomes the
state_dict of that module alone (taming's VQModel names for a VQ).

The inverse of `convert_checkpoint`: converting the files back gives the same
parameters, bit for bit.
"""

import collections
import dataclasses
import os
import pathlib
from typing import Any, Mapping

import numpy as np
import yaml

from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.convert import mapping
from segldm_jax.convert import torch_writer
from segldm_jax.diffusion import schedule as schedule_lib
from segldm_jax.inference import first_stage
from segldm_jax.models import build

CKPT_FILE = "model.ckpt"
SAFETENSORS_FILE = "model.safetensors"
CONFIG_YAML = "config.yaml"

_KINDS = {build.UNET_TARGET: "unet", build.RESCALER_TARGET: "rescaler",
          **{t: "vq" for t in build.VQ_TARGETS}}
# Keys of the reference YAMLs that load weights from elsewhere at build time:
# model.ckpt holds them all, and those paths do not exist on another machine.
_LOADING_KEYS = ("ckpt_path", "ignore_keys", "load_only_unet")
# What main.py reads but our node may lack (semantic_synthesis256's values).
_LDM_KEYS = {"first_stage_key": "image", "cond_stage_key": "segmentation"}
_BASE_LEARNING_RATE = 1.0e-6


@dataclasses.dataclass
class Exported:
  """What `export` wrote. kind: "ldm" | "vq" | "unet" | "rescaler"."""
  out: pathlib.Path
  kind: str
  state_dict: dict[str, np.ndarray]
  node: dict
  step: int | None
  notes: list[str]

  def files(self) -> list[pathlib.Path]:
    return [self.out / n for n in (CKPT_FILE, SAFETENSORS_FILE, CONFIG_YAML)]


def _strip(node: Any) -> Any:
  """Drops _LOADING_KEYS; `target` first, as the reference YAMLs have it."""
  if isinstance(node, Mapping):
    keys = sorted(node, key=lambda k: k != "target")
    return {k: _strip(node[k]) for k in keys if k not in _LOADING_KEYS}
  if isinstance(node, (list, tuple)):
    return [_strip(v) for v in node]
  return node


def torch_node(node: Mapping[str, Any], use_ema: bool | None = None,
               base_learning_rate: float | None = None) -> dict:
  """The model node as the original code instantiates it.

  VQModel requires a `lossconfig` (an Identity when ours has none); keys
  that would load weights from elsewhere are dropped; for a LatentDiffusion,
  `use_ema` says whether the state_dict has `model_ema.*` (LitEma otherwise
  keeps its random initial shadow), and main.py's `base_learning_rate` and
  data keys are filled in.
  """
  node = _strip(formatting.plain(node))
  params = node.setdefault("params", {})
  if node["target"] in build.VQ_TARGETS:
    params.setdefault("lossconfig", {"target": "torch.nn.Identity"})
  if node["target"] == build.LDM_TARGET:
    params["first_stage_config"] = torch_node(params["first_stage_config"])
    for key, value in _LDM_KEYS.items():
      params.setdefault(key, value)
    if use_ema is not None:
      params["use_ema"] = use_ema
    node = {"base_learning_rate": base_learning_rate or _BASE_LEARNING_RATE,
            **node}
  return node


def _numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def ldm_state_dict(ldm, params: Mapping[str, Any],
                   ema: Mapping[str, Any] | None,
                   ema_meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """LatentDiffusion.state_dict() in the original's order and names.

  params: {"unet", "first_stage", "cond_stage"}; ema: the UNet weights for
  `model_ema.*` ({"unet": ...}) or None; ema_meta: LitEma's `decay` and
  `num_updates`.
  """
  s = ldm.settings
  sched = schedule_lib.Schedule.create(
      s["beta_schedule"], s["timesteps"], s["linear_start"], s["linear_end"],
      s["cosine_s"], parameterization=s["parameterization"])
  sd = collections.OrderedDict(
      (k, np.asarray(getattr(sched, k))) for k in mapping.SCHEDULE_BUFFERS)
  if s["scale_by_std"]:  # a buffer only then; an attribute otherwise
    sd["scale_factor"] = np.asarray(s["scale_factor"], np.float32)
  live = mapping.to_torch_state_dict(_numpy(params), "ldm")
  unet = mapping.LDM_PREFIXES["unet"]
  sd.update((k, v) for k, v in live.items() if k.startswith(unet))
  if ema is not None:
    sd[mapping.EMA_PREFIX + "decay"] = np.asarray(ema_meta["decay"], np.float32)
    sd[mapping.EMA_PREFIX + "num_updates"] = np.asarray(
        ema_meta["num_updates"], np.int32)
    shadow = mapping.to_torch_state_dict(_numpy(ema["unet"]), "unet")
    sd.update((mapping.ema_key(k), v) for k, v in shadow.items())
  sd.update((k, v) for k, v in live.items() if not k.startswith(unet))
  return sd


def _ema_meta(config, meta: Mapping[str, Any]) -> dict[str, Any]:
  """LitEma's buffers: a converted workdir kept the file's; a trained run
  counts its updates and has its decay in the config."""
  decay = meta.get("decay", config.get("train", {}).get("ema_decay", 0.9999))
  updates = meta.get("num_updates", meta.get("ema_updates", 0))
  return {"decay": float(decay), "num_updates": int(updates)}


def read_workdir(workdir: pathlib.Path, use_ema: bool = True):
  """-> (state_dict, torch node, step, notes) of a workdir's newest step.

  `use_ema`: the EMA UNet weights become `model.diffusion_model.*` too (what
  samples use); otherwise the live weights do, and `model_ema.*` keeps the
  EMA, as a Lightning checkpoint mid-training has it.
  """
  config = run_config.load(workdir)
  node = formatting.plain(config.model)
  found = first_stage.load_existing(config, workdir)
  if found is None:
    raise errors.CheckpointNotFoundError(
        f"{workdir} has no first stage (first_stage/ or "
        "first_stage.checkpoint in config.json)")
  # The first stage's own model.yaml describes the weights exported.
  node["params"]["first_stage_config"] = found[2]
  ldm = build.build_model(node)
  params, step = store.restore_params(workdir, ldm, use_ema=False)
  notes = []
  ema = None
  if store.has_ema(workdir, step):
    ema = store.restore_params(workdir, ldm, step=step, use_ema=True)[0]
    ema = {"unet": ema["unet"]}
    if use_ema:
      params = {**params, "unet": ema["unet"]}
    notes.append("UNet weights: " + ("EMA (model.diffusion_model.* and "
                                     "model_ema.*)" if use_ema else
                                     "live; EMA in model_ema.*"))
  else:
    notes.append("UNet weights: live (the run has no EMA; use_ema: false)")
  ema_meta = _ema_meta(config, store.restore_meta(workdir, step))
  sd = ldm_state_dict(ldm, {**params, "first_stage": found[1]}, ema, ema_meta)
  lr = config.get("train", {}).get("base_learning_rate")
  return sd, torch_node(node, use_ema=ema is not None,
                        base_learning_rate=lr), step, notes


def read_model_dir(path: pathlib.Path):
  """-> (state_dict, torch node, kind) of a model directory."""
  _, params, node = store.load_model_dir(path)
  kind = _KINDS.get(node.get("target"))
  if kind is None:
    raise errors.InputError(f"{path}: a {node.get('target')} model directory "
                            "cannot be exported on its own")
  sd = mapping.to_torch_state_dict(_numpy(params), kind)
  return collections.OrderedDict(sd), torch_node(node), kind


def _write(out: pathlib.Path, name: str, write) -> None:
  """Writes through a temporary name, so a failed write leaves no file that
  looks complete."""
  tmp = out / f".{name}.tmp"
  write(tmp)
  os.replace(tmp, out / name)


def export(source: str | pathlib.Path, out: str | pathlib.Path,
           use_ema: bool = True) -> Exported:
  """Writes model.ckpt, model.safetensors and config.yaml under `out`.

  Raises:
    errors.CheckpointNotFoundError: `source` is neither a workdir nor a model
      directory.
    errors.InputError: `source` is a file, or `out` exists and is not empty.
    errors.WorkdirError: `out` cannot be written.
  """
  # Imported here: the numpy API is only needed once something is exported.
  # pylint: disable-next=g-import-not-at-top
  from safetensors import numpy as st_numpy
  source, out = pathlib.Path(source).absolute(), pathlib.Path(out).absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise errors.InputError(f"--out {out} exists and is not an empty "
                            "directory; choose another")
  if (source / workdir_files.CONFIG_FILE).is_file():
    sd, node, step, notes = read_workdir(source, use_ema)
    kind, ckpt = "ldm", {"state_dict": sd, "global_step": step}
  elif (source / workdir_files.MODEL_FILE).is_file():
    (sd, node, kind), step, notes = read_model_dir(source), None, []
    ckpt = {"state_dict": sd}
  elif source.is_file():
    raise errors.InputError(
        f"{source} is a file; export_torch_ckpt.py exports a workdir or a "
        "model directory (convert_torch_ckpt.py converts a checkpoint in)")
  else:
    raise errors.CheckpointNotFoundError(
        f"{source}: neither a workdir ({workdir_files.CONFIG_FILE} + "
        f"{workdir_files.CHECKPOINTS_DIR}/) nor a model directory "
        f"({workdir_files.MODEL_FILE} + {workdir_files.PARAMS_DIR}/)")
  try:
    out.mkdir(parents=True, exist_ok=True)
    _write(out, CKPT_FILE, lambda p: torch_writer.save(p, ckpt))
    # safetensors wants each tensor C-contiguous (np.ascontiguousarray
    # would turn 0-d buffers into shape (1,)).
    _write(out, SAFETENSORS_FILE, lambda p: st_numpy.save_file(
        {k: np.asarray(v, order="C") for k, v in sd.items()}, str(p),
        metadata={"format": "pt"}))
    _write(out, CONFIG_YAML, lambda p: p.write_text(
        yaml.safe_dump({"model": node}, sort_keys=False)))
  except OSError as e:
    raise errors.WorkdirError(
        f"cannot write {out}: {e.strerror or e}") from None
  return Exported(out, kind, sd, node, step, notes)
