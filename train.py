r"""Train a segmentation-conditioned latent diffusion model.

  python train.py --config configs/seg_f4.py[:VARIANT] --workdir DIR \
      [--config.train.batch_size=16 ...]

A run resumes from the newest checkpoint in DIR by default (model, optimiser,
EMA and step; the data stream is a function of the seed and the step), so
re-running the same command after a crash continues where it stopped and
sees the same batches.
"""

import json
import logging as pylogging
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

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
from segldm_jax.training import loop
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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a `--config` mistake reported in one line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("seed")  # a config file that did not load raises here
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    sys.exit(f"config error: {cli.flag_error(argv, e)}")


def _check_data(data_config) -> int:
  """--check_data: every record decoded, a summary printed -> exit code."""
  report = data_check.check_data(data_config)
  print(report.summary())
  return 0 if report.ok else 1


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
    return _check_data(FLAGS.config.data)
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
  state_shardings = startup.state_shardings(start, config, mesh)  # logged

  # ===================================================================== #
  #                              Checkpoints                              #
  # ===================================================================== #
  # Before the input: the data stream starts at the step restored, and a
  # corrupt newest checkpoint sends the run back to the one before.
  state, start = startup.initial_state(start, config, workdir, state_shardings)

  # ===================================================================== #
  #                                 Input                                 #
  # ===================================================================== #
  source = pipeline.make_source(config.data)
  batches, first_batch, bad_log = loop.train_batches(config, source, start, mesh)

  # ===================================================================== #
  #                                 Model                                 #
  # ===================================================================== #
  # The first stage is frozen: loaded from a model directory, or (demo)
  # trained here first and kept in WORKDIR/first_stage for resumed runs;
  # config.model gets its node (and scale_by_std's factor, from batch 0).
  conv_impl = xla_cpu.preferred_conv()  # Winograd's 3x3 convolutions on CPU
  fs_params = first_stage_setup.set_up(
      config, workdir, mesh, source, first_batch, start.resuming, conv=conv_impl)
  geometry = run_config.geometry(config)
  ldm = build.build_model(config.model, conv=conv_impl)
  if is_main:
    run_config.save(config, workdir)

  # ===================================================================== #
  #                             Train step                                #
  # ===================================================================== #
  # Two programs: the frozen encoder, then the UNet and rescaler's update.
  encode_fn = loop.jit_encoder(  # (image, fs_params) -> latents
      ldm_step.make_encoder(ldm, config.train), mesh)
  step_fn = loop.jit_train_step(  # (state, batch of latents, rng)
      ldm_step.make_latent_train_step(
          ldm, start.optimizer, config.train, geometry.mask_stages,
          gather_weights=sharding.gathered_for_compute(mesh)),
      mesh, state_shardings, replicated_args=1)

  # ===================================================================== #
  #                          Logs and previews                            #
  # ===================================================================== #
  rng = jax.random.key(config.seed)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  log = loop.ProgressLog(writer, "train", total=config.train.steps,
                         initial=start.step, batch_size=config.train.batch_size,
                         log_every=config.train.log_every,
                         extra=loop.bad_record_counter(config, bad_log))
  save = loop.Saver(start.manager, config.train.nonfinite, on_stop=log.close)
  write_samples = previews.PreviewSampler(
      ldm, config, previews.preview_labels(source, config, geometry.image),
      fs_params, mesh, workdir, writer, geometry.mask_stages,
      key=jax.random.fold_in(rng, 2**30))
  evaluate = workdir_eval.for_training(config, workdir, ldm, fs_params)

  # ===================================================================== #
  #                              Train loop                               #
  # ===================================================================== #
  stop = loop.StopSignal()
  lr = ldm_step.lr_schedule(config.train)
  step, total = start.step, config.train.steps
  if step < total:
    encode_fn, step_fn = loop.compile_ldm_programs(
        encode_fn, step_fn, state, first_batch, fs_params, rng)
  while step < total and stop.signum is None:
    batch = loop.encoded(next(batches), encode_fn, fs_params)
    state, metrics = step_fn(state, batch, rng)
    step += 1
    log.advance()
    if log.due(step):  # device_get waits for the step
      record = ldm_step.log_record(jax.device_get(metrics), lr(step - 1))
      log.write(step, record, loss=f"{record['loss']:.4f}")
      save.stop_if_nonfinite(step, state)
    if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
      save(step, state)
    if config.train.sample_every and step % config.train.sample_every == 0:
      write_samples(step, state)
    if evaluate and step % config.train.eval_every == 0:
      writer.write_scalars(step, evaluate(step, state))
    stop.after_step(step)  # a SIGTERM to any one process stops all

  stop.warn_if_stopped(step)
  save.last(step, state)
  if (stop.signum is None and config.train.sample_every
      and step % config.train.sample_every):
    write_samples(step, state)  # the final model's samples, unless just written
  log.close()
  if is_main:
    print(json.dumps({"workdir": str(workdir), "step": step,
                      "checkpoint": save.manager.latest_step()}))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
