"""What train.py checks before it spends minutes on work, and how a run
begins: a fresh train state or the workdir's newest intact checkpoint.

Mistakes that later sections would trip over after minutes (the mesh, the
first stage, a resumed workdir trained with other settings, an unwritable
workdir or a full disk) fail here, in one line each (`errors.UserError`).
Only metadata and shapes are read; no weight is loaded.
"""

import dataclasses
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections as mlc
import optax
import orbax.checkpoint as ocp

from segldm_jax import errors
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.inference import first_stage
from segldm_jax.models import build
from segldm_jax.runtime import compilation_cache
from segldm_jax.runtime import peers
from segldm_jax.runtime import sharding
from segldm_jax.training import init_from
from segldm_jax.training import ldm_step


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts, as far as it can be known before any device work."""
  geometry: run_config.Geometry
  manager: ocp.CheckpointManager
  step: int                 # the step the run continues from (0 when new)
  resuming: bool            # a checkpoint exists (a converted one may be 0)
  optimizer: optax.GradientTransformation
  abstract_state: ldm_step.TrainState  # ShapeDtypeStructs, no weights
  lock: workdir_files.WorkdirLock | None  # held by process 0 for the run's life


def _resume_hint(error: errors.CheckpointMismatchError,
                 workdir: pathlib.Path) -> errors.CheckpointMismatchError:
  return errors.CheckpointMismatchError(
      f"{error}; resume with the settings in {workdir / workdir_files.CONFIG_FILE} "
      "or use a new --workdir")


def preflight(config: mlc.ConfigDict, workdir: pathlib.Path) -> Start:
  """Resolves `config`'s derived sizes and checks everything checkable now.

  Raises:
    errors.UserError: the first problem found, in one line.
  """
  compilation_cache.setup(config.get("compilation_cache_dir"))
  # A lost peer ends this process in one line naming it and how to resume.
  peers.watch_peers(config.parallel.heartbeat_timeout_s,
                       workdir / workdir_files.CHECKPOINTS_DIR)
  logging.info("workdir %s; %d process(es), %d device(s): %s", workdir,
               jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  geometry = run_config.resolve(config)
  run_config.check_mesh(config, jax.process_count())
  if config.train.get("eval_every") and jax.process_count() > 1:
    raise errors.ConfigError(
        "train.eval_every runs on one process; set --config.train.eval_every=0 "
        "and score checkpoints with evaluate.py --workdir")
  first_stage.check(config, workdir)
  workdir_files.ensure_writable(workdir)
  lock = (workdir_files.WorkdirLock.acquire(workdir) if jax.process_index() == 0
          else None)
  manager = store.train_checkpoint_manager(workdir, config.train)
  resume_from = store.resume_step(manager)  # None: a new run
  step = resume_from or 0
  # Shapes only: what saved tensors and free space are checked against, and
  # what train.py derives the state's shardings from.
  optimizer = ldm_step.make_optimizer(config.train)
  param_shapes = saved_shapes.ldm_param_shapes(build.build_model(config.model))
  abstract_state = jax.eval_shape(
      lambda p: ldm_step.init_state(p, optimizer), param_shapes)
  if resume_from is not None:
    run_config.check_resume(config, workdir, step)
    try:
      saved_shapes.check_saved_params(workdir, step, param_shapes)
    except errors.CheckpointMismatchError as e:
      raise _resume_hint(e, workdir) from None
  # Fails now, not at a save hours later; a save that fails anyway (a disk
  # filled meanwhile) ends the run in one line too (see checkpoints).
  workdir_files.check_free_space(
      workdir, workdir_files.tree_nbytes(abstract_state),
      keep=config.train.keep_checkpoints, existing=len(manager.all_steps()))
  return Start(geometry=geometry, manager=manager, step=step,
               resuming=resume_from is not None,
               optimizer=optimizer, abstract_state=abstract_state,
               lock=lock)


def state_shardings(start: Start, config: mlc.ConfigDict, mesh) -> Any:
  """The train state's shardings on `mesh` by `config.sharding_strategy`;
  logs the mesh and where each parameter lives."""
  logging.info("mesh %s", dict(mesh.shape))
  shardings = sharding.shardings_from_rules(
      start.abstract_state, mesh, config.sharding_strategy)
  logging.info("parameters:\n%s", sharding.describe(
      shardings.params, start.abstract_state.params))
  return shardings


def initial_state(start: Start, config: mlc.ConfigDict, workdir: pathlib.Path,
                  shardings: Any) -> tuple[Any, Start]:
  """-> (train state, start): a new state born sharded, or the newest intact
  checkpoint read into `shardings` (a corrupt step is set aside with a
  warning and the one before is taken, so `start.step` may move back).

  Runs before the data stream is built, which starts at the step restored.
  """
  if not start.resuming and config.get("init_from_taken"):  # issue 25
    return init_from.initial_state(config, start.optimizer, shardings), start
  if not start.resuming:
    init = ldm_step.fresh_state_fn(build.build_model(config.model),
                                       start.optimizer)
    key = jax.random.fold_in(jax.random.key(config.seed), -1 % 2**31)
    return jax.jit(init, out_shardings=shardings)(key), start
  try:
    state, step = store.restore_latest_intact(
        start.manager, start.abstract_state, shardings,
        jax.jit(start.optimizer.init, out_shardings=shardings.opt_state))
  except errors.CheckpointMismatchError as e:  # e.g. the optimiser's layout
    raise _resume_hint(e, workdir) from None
  logging.info("resuming from step %d", step)
  return state, dataclasses.replace(start, step=step)
