"""Fine-tuning: a new run that starts from another model's weights
(`init_from=DIR`), in its own workdir, at step 0, with a fresh optimiser and
its own data. DIR is only read.

DIR is a workdir: trained here, or converted by convert_torch_ckpt.py (the
released models). `adopt` runs before the run's checks and makes its config
describe DIR's networks: the model node (UNet, rescaler, diffusion settings,
scale_factor) and the first stage are DIR's; only the rescaler's class count
follows data.num_classes, so a config need not restate them, and one that
sets a different value (`--config.model...`) is refused naming the key.
The rescaler's rows are mapped to the new classes (`class_map`). What was
taken is printed and kept in config.json (`init_from_taken`).

DIR may also be a model directory holding a UNet alone (a converted
UNet checkpoint): its UNet (architecture and weights) is taken, and the
rest is the config's, as in a new run: the rescaler starts from random
weights (there are no rows to map) and the first stage is
first_stage.checkpoint.

`initial_state` then builds the train state born sharded: DIR's UNet (its
EMA weights by default, the live ones with init_from_ema=False) read
straight into the run's shardings, the mapped rescaler, an EMA equal to
those weights (LitEma's warm-up starts again), a fresh optimiser.

A workdir that already has a checkpoint resumes from it as any run does:
the architecture is then its own config.json's, and DIR is not read again.
"""

import copy
import dataclasses
import json
import pathlib
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections as mlc
import numpy as np

from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.data import class_names
from segldm_jax.models import build
from segldm_jax.training import class_map
from segldm_jax.training import ldm_step

CLASSES_KEY = "params.cond_stage_config.params.in_channels"
# Model keys an override may set freely: they follow the data.
_FOLLOW_DATA = ("model." + CLASSES_KEY, "model.params.image_size",
                "model.params.unet_config.params.image_size",
                "model.params.channels")


UNET_DIR = "UNet model directory"


@dataclasses.dataclass(frozen=True)
class Source:
  """A model to start from, as far as its files tell without weights."""
  path: pathlib.Path
  kind: str                 # "workdir" | "converted workdir" | UNET_DIR
  step: int | None          # its newest checkpoint (None: a model directory)
  model: dict               # its LDM node (a UNet directory: its UNet node)
  first_stage: pathlib.Path | None  # its frozen VQ's model directory
  has_ema: bool
  classes: class_names.ClassSet | None


def _steps(workdir: pathlib.Path) -> list[int]:
  ckpt = workdir / workdir_files.CHECKPOINTS_DIR
  return sorted(int(p.name) for p in ckpt.iterdir()
                if p.name.isdigit()) if ckpt.is_dir() else []


def _not_a_source(given: str, why: str) -> errors.ConfigError:
  return errors.ConfigError(
      f"init_from={given}: {why}; init_from takes a workdir (config.json and "
      f"{workdir_files.CHECKPOINTS_DIR}/STEP/, from train.py or "
      "convert_torch_ckpt.py) or a UNet's model directory")


def _model_dir(given: str, path: pathlib.Path) -> Source:
  """A model directory: a UNet is a source, anything else one line."""
  try:
    node = store.check_model_dir(path)
  except (errors.UserError, OSError, ValueError) as e:
    raise _not_a_source(given, f"an unreadable model directory ({e})") from None
  target = node.get("target")
  if target == build.UNET_TARGET:
    return Source(path=path, kind=UNET_DIR, step=None, model=node,
                  first_stage=None, has_ema=False, classes=None)
  if target in build.VQ_TARGETS:
    raise _not_a_source(given, "a model directory holding a first stage (VQ), "
                        "not a latent diffusion model: pass it as "
                        "--config.first_stage.checkpoint")
  raise _not_a_source(given, f"a model directory holding a {target} alone")


def _first_stage_of(path: pathlib.Path, config: Mapping[str, Any],
                    given: str) -> pathlib.Path:
  checkpoint = (config.get("first_stage") or {}).get("checkpoint")
  if checkpoint:
    p = pathlib.Path(checkpoint).expanduser()
    found = p if p.is_absolute() else (
        path / p if (path / p).exists() else p.absolute())
  else:
    found = path / workdir_files.FIRST_STAGE_DIR
  if not (found / workdir_files.MODEL_FILE).is_file():
    raise _not_a_source(given, f"its first stage {found} is missing (no "
                        f"{workdir_files.MODEL_FILE})")
  return found


def _source_classes(config: Mapping[str, Any], model: Mapping[str, Any]
                    ) -> class_names.ClassSet:
  count = int(run_config.get_key({"model": model}, "model." + CLASSES_KEY))
  data = dict(config.get("data") or {"num_classes": count})
  try:
    return class_names.class_set(data)
  except errors.UserError as e:  # its data.class_names file is gone
    logging.warning("init_from: the source's class names: %s", e)
    return class_names.ClassSet(f"{count} unnamed classes", count, None)


def open_source(given: str) -> Source:
  """Raises errors.ConfigError: DIR is not a workdir (one line)."""
  path = pathlib.Path(given).expanduser().absolute()
  if not path.is_dir():
    raise _not_a_source(given, "no such directory")
  if (path / workdir_files.MODEL_FILE).is_file():
    return _model_dir(given, path)
  steps = _steps(path)
  if not (path / workdir_files.CONFIG_FILE).is_file() or not steps:
    raise _not_a_source(given, "neither a workdir nor a model directory")
  try:
    config = json.loads((path / workdir_files.CONFIG_FILE).read_text())
    model = config["model"]
    int(run_config.get_key({"model": model}, "model." + CLASSES_KEY))
  except (OSError, ValueError, KeyError, TypeError):  # MISSING: TypeError
    raise _not_a_source(given, f"its {workdir_files.CONFIG_FILE} holds no LDM "
                        "model node") from None
  kind = ("converted workdir" if "converted_from" in config or "data" not in config
          else "workdir")
  return Source(path=path, kind=kind, step=steps[-1], model=model,
                first_stage=_first_stage_of(path, config, given),
                has_ema=store.has_ema(path, steps[-1]),
                classes=_source_classes(config, model))


def _full_model(config, source: Source) -> dict:
  """The LDM node the source stands for: a workdir's own; for a UNet
  directory, the config's with the directory's UNet."""
  if source.kind != UNET_DIR:
    return source.model
  model = config.model.to_dict()
  model["params"]["unet_config"] = copy.deepcopy(source.model)
  return model


def _check_overrides(config, source: Source, overrides: Mapping[str, Any]
                     ) -> None:
  """A command-line model key that differs from DIR's is refused by name."""
  full = {"model": _full_model(config, source)}
  for key, value in overrides.items():
    if key == "first_stage.checkpoint" and value and source.first_stage:
      p = pathlib.Path(value).expanduser().absolute()
      if p != source.first_stage:
        raise errors.ConfigError(
            f"--config.first_stage.checkpoint={value} but init_from="
            f"{source.path} brings its own first stage ({source.first_stage}), "
            "which its UNet was trained on: drop the override")
    if not key.startswith("model.") or key in _FOLLOW_DATA:
      continue
    old = run_config.get_key(full, key)
    if old is run_config.MISSING:
      continue  # not in DIR's node: set here, then checked tensor by tensor
    if formatting.plain(old) != formatting.plain(value):
      raise errors.ConfigError(
          f"--config.{key}={run_config.cli_value(formatting.plain(value))} "
          f"but init_from={source.path} has {key}="
          f"{run_config.cli_value(formatting.plain(old))}: the architecture "
          "comes from init_from (only the class count follows "
          "data.num_classes); drop the override")


def _adopted_model(config, source: Source, overrides: Mapping[str, Any]) -> dict:
  """DIR's LDM node with data.num_classes classes. From a workdir,
  scale_by_std is off: its UNet was trained on latents scaled by its
  scale_factor, which stays."""
  model = {"model": copy.deepcopy(_full_model(config, source))}
  for key, value in overrides.items():
    if key.startswith("model.") and run_config.get_key(
        model, key) is run_config.MISSING and key not in _FOLLOW_DATA:
      *parents, last = key.split(".")
      node = model
      for part in parents:
        node = node.setdefault(part, {})
      node[last] = formatting.plain(value)
  params = model["model"]["params"]
  params["cond_stage_config"]["params"]["in_channels"] = int(
      config.data.num_classes)
  if source.kind != UNET_DIR:
    params["scale_by_std"] = False
  return model["model"]


def _source_shapes(source: Source, use_ema: bool) -> dict:
  """DIR's tensors, checked against the files (metadata only)."""
  if source.kind == UNET_DIR:  # store.check_model_dir checked its params/
    return {"unet": build.param_shapes(build.build_model(source.model))}
  shapes = saved_shapes.ldm_param_shapes(build.build_model(source.model))
  try:
    saved_shapes.check_saved_params(source.path, source.step, shapes,
                                    use_ema=use_ema)
  except errors.CheckpointMismatchError as e:
    raise errors.CheckpointMismatchError(
        f"init_from: {e}; its {workdir_files.CONFIG_FILE} does not describe "
        "these weights") from None
  return shapes


def _check_tensors(source: Source, model: Mapping[str, Any], use_ema: bool) -> None:
  """DIR's saved tensors are its config's, and this run's networks differ
  from them in the rescaler's class count at most."""
  ours = saved_shapes.leaf_shapes(saved_shapes.ldm_param_shapes(
      build.build_model(model)))
  for path, shape in saved_shapes.leaf_shapes(
      _source_shapes(source, use_ema)).items():
    mine = ours.get(path)
    rows = path == "cond_stage/channel_mapper/kernel"
    if mine is None or (mine[1:] != shape[1:] if rows else mine != shape):
      raise errors.CheckpointMismatchError(
          f"init_from={source.path}: {path} is {shape} there but "
          f"{mine or 'absent'} in this run: the architectures differ in more "
          "than the class count (e.g. a rescaler without out_channels feeds "
          "the classes to the UNet itself)")


def _say(text: str) -> None:
  logging.info("%s", text)
  if jax.process_index() == 0:
    print(text, flush=True)


def _resume_own(config, workdir: pathlib.Path) -> None:
  """The workdir's own architecture and record, DIR unread."""
  saved = run_config.load(workdir)
  first = saved.get("first_stage", {})
  with config.unlocked():
    config.model = mlc.ConfigDict(saved.model.to_dict())
    config.first_stage.checkpoint = first.get("checkpoint", "")
    config.first_stage.train_steps = first.get("train_steps", 0)
    if "init_from_taken" in saved:
      config.init_from_taken = saved.init_from_taken.to_dict()
  _say(f"init_from: {workdir} has checkpoints: resuming from them as any run "
       f"does; init_from={config.init_from} is not read again")


def _class_map(config, source: Source) -> class_map.ClassMap:
  new = class_names.class_set(config.data)
  if source.kind == UNET_DIR:  # no rows to map
    return class_map.ClassMap("none", new, class_names.ClassSet(
        "a UNet alone", 0, None), None, ())
  return class_map.resolve(config.get("init_class_map", "by_name"), new,
                           source.classes)


def _taken(config, source: Source, model: dict, cmap) -> tuple[dict, str]:
  """-> (what config.json keeps, the line printed)."""
  asked = bool(config.get("init_from_ema", True))
  use_ema = asked and source.has_ema
  taken = {"dir": str(source.path), "kind": source.kind, "step": source.step,
           "unet": "ema" if use_ema else "live",
           "first_stage": str(source.first_stage or config.first_stage.checkpoint),
           "scale_factor": model["params"].get("scale_factor", 1.0),
           "class_map": cmap.record()}
  if source.kind == UNET_DIR:
    return taken, (f"init_from {source.path}: {source.kind}, its UNet weights; "
                   "the rescaler starts from random weights and the first "
                   "stage is first_stage.checkpoint, as in a new run; this run "
                   "starts at step 0 with a fresh optimiser")
  unet = ("EMA" if use_ema else "live") + " UNet weights" + (
      " (it saved no EMA)" if asked and not source.has_ema else "")
  return taken, (f"init_from {source.path}: {source.kind}, step {source.step}, "
                 f"{unet}, first stage {source.first_stage}; this run starts "
                 f"at step 0 with a fresh optimiser\n{cmap.summary()}")


def adopt(config: mlc.ConfigDict, workdir: str | pathlib.Path,
          overrides: Mapping[str, Any] | None = None) -> None:
  """Makes `config` a fine-tune of `config.init_from` (module docstring);
  nothing when init_from is unset. `overrides`: the command line's config
  overrides ({dotted key: value}).

  Raises:
    errors.UserError: DIR is not a workdir, an override contradicts it, its
      networks differ in more than the class count, a bad class map; one
      line each.
  """
  if not config.get("init_from"):
    return
  workdir = pathlib.Path(workdir).absolute()
  if _steps(workdir) and (workdir / workdir_files.CONFIG_FILE).is_file():
    _resume_own(config, workdir)
    return
  source = open_source(config.init_from)
  overrides = dict(overrides or {})
  _check_overrides(config, source, overrides)
  model = _adopted_model(config, source, overrides)
  _check_tensors(source, model, bool(config.get("init_from_ema", True)))
  taken, text = _taken(config, source, model, _class_map(config, source))
  with config.unlocked():
    config.model = mlc.ConfigDict(model)
    if source.first_stage is not None:
      config.first_stage.checkpoint = str(source.first_stage)
      config.first_stage.train_steps = 0
    config.init_from_taken = taken
  _say(text)


def _fresh_key(config) -> jax.Array:
  """The rescaler key of a new run's state (startup.initial_state's)."""
  key = jax.random.fold_in(jax.random.key(config.seed), -1 % 2**31)
  return jax.random.split(key)[1]


def _workdir_weights(config, shardings) -> tuple[Any, Any]:
  """-> (UNet in its shardings, mapped rescaler on the host, or None for a
  new run's): the UNet read straight into its shards, the small rescaler
  replicated."""
  taken = config.init_from_taken
  cmap = taken.class_map
  node = config.model.to_dict()
  node["params"]["cond_stage_config"]["params"]["in_channels"] = int(
      cmap.source_classes)
  source = build.build_model(node)
  mesh = jax.tree.leaves(shardings.params)[0].mesh
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = saved_shapes.ldm_param_shapes(source)
  params, _ = store.restore_params(
      taken.dir, source, step=int(taken.step), use_ema=taken.unet == "ema",
      shardings={"unet": shardings.params["unet"],
                 "cond_stage": jax.tree.map(lambda _: repl, shapes["cond_stage"])})
  if cmap.rows is None:
    return params["unet"], None
  rescaler = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                          params["cond_stage"])
  if "channel_mapper" in rescaler:
    rescaler["channel_mapper"]["kernel"] = class_map.map_rows(
        rescaler["channel_mapper"]["kernel"], cmap.rows, cmap.mean_excludes)
  return params["unet"], rescaler


def initial_state(config: mlc.ConfigDict, optimizer, shardings
                  ) -> ldm_step.TrainState:
  """The fine-tune's step-0 state (module docstring), placed in
  `shardings` as it is made."""
  if config.init_from_taken.kind == UNET_DIR:  # a small directory: via host
    _, unet, _ = store.load_model_dir(config.init_from_taken.dir)
    unet, rescaler = jax.device_put(unet, shardings.params["unet"]), None
  else:
    unet, rescaler = _workdir_weights(config, shardings)
  target = build.build_model(config.model)
  key = _fresh_key(config)

  def make(unet, rescaler):
    if rescaler is None:  # a new run's
      rescaler = build.init_params(target.cond_stage, key)
    return ldm_step.init_state({"unet": unet, "cond_stage": rescaler}, optimizer)

  return jax.jit(make, out_shardings=shardings, donate_argnums=(0,))(
      unet, rescaler)
