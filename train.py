r"""Train a segmentation-conditioned latent diffusion model.

  python train.py --config configs/seg_f4.py[:VARIANT] --workdir DIR \
      [--config.train.batch_size=16 ...]

A run resumes from the newest checkpoint in DIR by default (model, optimiser,
EMA and step; the data stream is a function of the seed and the step), so
re-running the same command after a crash continues where it stopped and
sees the same batches.
"""

import itertools
import json
import logging as pylogging
import pathlib
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
import tqdm

from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.config import cli
from segldm_jax.config import run_config
from segldm_jax.data import check as data_check
from segldm_jax.data import pipeline
from segldm_jax.eval import workdir_eval
from segldm_jax.models import build
from segldm_jax.runtime import distributed
from segldm_jax.runtime import sharding
from segldm_jax.runtime import xla_cpu
from segldm_jax.training import first_stage_setup
from segldm_jax.training import init_from
from segldm_jax.training import ldm_step
from segldm_jax.training import metrics as metrics_lib
from segldm_jax.training import previews
from segldm_jax.training import startup

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/seg_f4.py:demo", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs "
                    "(or JAX_COORDINATOR_ADDRESS; SLURM/TPU pods are detected)")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_bool(
    "check_data", False,
    "Decode every record of the configured dataset, print a summary of the "
    "bad ones (file and reason) and exit (0: clean, 1: problems) without "
    "training. Training never scans by itself (slow on big datasets): a "
    "bad record stops it naming the file, or is skipped and counted with "
    "--config.data.bad_records=skip.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _train_batches(config, source, start: startup.Start, mesh):
  """-> (global batches from the run's step on, the first of them, the
  skip-mode bad-record log)."""
  # Batch k of the stream is a pure function of (seed, k): a resumed run
  # starts at its step and sees what an uninterrupted run would have seen.
  data_iter = iter(pipeline.make_dataset(
      source, image_size=start.geometry.image,
      batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed, train=True, num_workers=config.data.num_workers,
      start_batch=start.step,
      bad_records=config.data.get("bad_records", "error")))
  # Skip mode's per-record flags are counted here on the host and never
  # reach the devices (the step's batch sharding covers image and labels).
  bad_log = data_check.BadRecordLog(source)
  batches = (sharding.global_batch(bad_log(b), mesh) for b in data_iter)
  # Peeked: scale_by_std measures it, and every process compiles the step on
  # it before the first collective.
  first_batch = next(batches)
  return itertools.chain([first_batch], batches), first_batch, bad_log


def _count_bad_records(config, bad_log) -> dict[str, int]:
  """Bad records skipped since this run (re)started, all processes."""
  if config.data.get("bad_records", "error") != "skip":
    return {}
  total = np.int64(bad_log.total)
  if jax.process_count() > 1:
    total = multihost_utils.process_allgather(total).sum()
  return {"bad_records": int(total)}


class _ImagesPerSecond:
  """Training throughput since the previous call (or the run's start)."""

  def __init__(self, step: int, batch_size: int):
    self._step, self._batch, self._time = step, batch_size, time.perf_counter()

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    ips = (step - self._step) * self._batch / (now - self._time)
    self._step, self._time = step, now
    return ips


class _StopSignal:
  """SIGTERM (a preemption notice) or SIGINT: finish the step, save, exit."""

  def __init__(self):
    self.signum = None
    if jax.process_count() == 1:  # else jax's preemption service takes it
      signal.signal(signal.SIGTERM, self._handle)
    signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a `--config` mistake reported in one line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("seed")  # a config file that did not load raises here
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    sys.exit(f"config error: {cli.flag_error(argv, e)}")


class _OnlyOurInfo(pylogging.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings only."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


@cli.main_exits
def main(argv):
  del argv
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  if FLAGS.check_data:  # before any device, model or workdir is touched
    report = data_check.check_data(FLAGS.config.data)
    print(report.summary())
    return 0 if report.ok else 1
  config = FLAGS.config
  distributed.maybe_initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      heartbeat_timeout_s=config.parallel.heartbeat_timeout_s)
  workdir = pathlib.Path(FLAGS.workdir).absolute()

  # ===================================================================== #
  #                           Logging and workdir                         #
  # ===================================================================== #
  is_main = jax.process_index() == 0
  # --config.init_from (issue 25): DIR's networks and first stage, before the checks.
  init_from.adopt(config, workdir, config_flags.get_override_values(FLAGS["config"]))
  start = startup.preflight(config, workdir)  # config, mesh, workdir, resume

  # ===================================================================== #
  #                           Mesh and sharding                           #
  # ===================================================================== #
  mesh = sharding.make_mesh(config.mesh)  # preflight checked it fits
  repl = sharding.replicated(mesh)
  logging.info("mesh %s", dict(mesh.shape))
  state_shardings = sharding.shardings_from_rules(
      start.abstract_state, mesh, config.sharding_strategy)
  logging.info("parameters:\n%s", sharding.describe(
      state_shardings.params, start.abstract_state.params))

  # ===================================================================== #
  #                              Checkpoints                              #
  # ===================================================================== #
  # Before the input: the data stream starts at the step restored, and a
  # corrupt newest checkpoint sends the run back to the one before.
  state, start = startup.initial_state(start, config, workdir, state_shardings)
  mgr = start.manager

  # ===================================================================== #
  #                                 Input                                 #
  # ===================================================================== #
  source = pipeline.make_source(config.data)
  batches, first_batch, bad_log = _train_batches(config, source, start, mesh)

  # ===================================================================== #
  #                                 Model                                 #
  # ===================================================================== #
  # The first stage is frozen: loaded from a model directory, or (demo)
  # trained here first and kept in WORKDIR/first_stage for resumed runs.
  conv = xla_cpu.preferred_conv()  # Winograd's 3x3 convolutions on CPU
  fs_module, fs_params, fs_node = first_stage_setup.prepare(
      config, workdir, mesh, source, conv=conv)
  fs_params = jax.device_put(fs_params, repl)
  with config.unlocked():
    config.model.params.first_stage_config = fs_node
    if config.model.params.get("scale_by_std", False):
      config.model.params.scale_factor = first_stage_setup.std_scale_factor(
          fs_module, fs_params, first_batch["image"], workdir, start.resuming)
  geometry = run_config.geometry(config)
  ldm = build.build_model(config.model, conv=conv)
  if is_main:
    run_config.save(config, workdir)

  # ===================================================================== #
  #                             Train step                                #
  # ===================================================================== #
  step_fn = jax.jit(
      ldm_step.make_train_step(ldm, start.optimizer, config.train,
                                   geometry.mask_stages),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), repl, repl),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,))

  # ===================================================================== #
  #                          Logs and previews                            #
  # ===================================================================== #
  rng = jax.random.key(config.seed)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  writer.truncate_after(start.step)
  write_samples = previews.PreviewSampler(
      ldm, config, previews.preview_labels(source, config, geometry.image),
      fs_params, mesh, workdir, writer, geometry.mask_stages,
      key=jax.random.fold_in(rng, 2**30))
  evaluate = workdir_eval.for_training(config, workdir, ldm, fs_params)

  def stop_if_nonfinite(step: int) -> None:
    # With nonfinite=stop the step applies even a non-finite update (no
    # select over the state); such a state must never reach a checkpoint.
    if config.train.nonfinite == "stop" and int(state.skipped) > 0:
      bar.close()
      writer.close()
      mgr.wait_until_finished()
      raise errors.NonFiniteError(
          f"non-finite loss or gradient by step {step}: stopped, and the last "
          f"checkpoint ({mgr.latest_step()}) is intact; lower the learning "
          "rate or set --config.train.nonfinite=skip")

  def save(step: int, force: bool = False) -> None:
    stop_if_nonfinite(step)
    store.save_train_state(mgr, step, state, force=force)

  # ===================================================================== #
  #                              Train loop                               #
  # ===================================================================== #
  stop = _StopSignal()
  lr = ldm_step.lr_schedule(config.train)
  total = config.train.steps
  bar = tqdm.tqdm(total=total, initial=start.step, disable=not is_main,
                  dynamic_ncols=True, desc="train")
  rate = _ImagesPerSecond(start.step, config.train.batch_size)
  step = start.step
  if step < total:
    step_fn = distributed.compile_for_all(step_fn, state, first_batch, fs_params,
                                       rng, name="train_step_compiled")
  while step < total and stop.signum is None:
    state, metrics = step_fn(state, next(batches), fs_params, rng)
    step += 1
    bar.update(1)
    if config.train.log_every and step % config.train.log_every == 0 or step == total:
      host_metrics = jax.device_get(metrics)  # waits for the step
      ips = rate(step)
      record = {**ldm_step.log_record(host_metrics, lr(step - 1), ips),
                **_count_bad_records(config, bad_log)}
      writer.write_scalars(step, record)
      bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{ips:.1f}")
      stop_if_nonfinite(step)
    if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
      save(step)
    if config.train.sample_every and step % config.train.sample_every == 0:
      write_samples(step, state)
    if evaluate and step % config.train.eval_every == 0:
      writer.write_scalars(step, evaluate(step, state))
    if distributed.preemption_requested(step):  # SIGTERM to any one process
      stop.signum = signal.SIGTERM

  bar.close()
  if stop.signum is not None:
    logging.warning("signal %d: saving step %d and exiting", stop.signum, step)
  save(step, force=True)
  mgr.wait_until_finished()
  if (stop.signum is None and config.train.sample_every
      and step % config.train.sample_every):
    write_samples(step, state)  # the final model's samples, unless just written
  writer.close()
  if is_main:
    print(json.dumps({"workdir": str(workdir), "step": step,
                      "checkpoint": mgr.latest_step()}))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
