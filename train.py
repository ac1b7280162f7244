r"""Train a segmentation-conditioned latent diffusion model.

  python train.py --config configs/seg_f4.py[:VARIANT] --workdir DIR \
      [--config.train.batch_size=16 ...]

A run resumes from the newest checkpoint in DIR by default (model, optimiser,
EMA, step and data iterator), so re-running the same command after a crash
continues where it stopped and sees the same batches.
"""

import functools
import itertools
import json
import logging as pylogging
import math
import pathlib
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from segldm_jax import saved_shapes
from segldm_jax import layout
from segldm_jax import errors
from segldm_jax import checkpoints
from segldm_jax import compilation_cache
from segldm_jax import first_stage as first_stage_lib
from segldm_jax import metrics as metrics_lib
from segldm_jax import parallel
from segldm_jax import run_config
from segldm_jax import sampling
from segldm_jax import ldm_training
from segldm_jax import xla_cpu
from segldm_jax import viz
from segldm_jax.data import check as data_check
from segldm_jax.data import pipeline
from segldm_jax.models import build

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
  """absl's flag parsing, with a config mistake reported in one line.

  ml_collections raises a multi-line AttributeError/KeyError (a traceback)
  for an unknown override such as --config.train.batchsize=8, and defers a
  config file that failed to load until first use.
  """
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("seed")  # a config file that did not load raises here
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    sys.exit(f"config error: {run_config.flag_error(argv, e)}")


class _OnlyOurInfo(pylogging.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings only."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  compilation_cache.setup(FLAGS.config.get("compilation_cache_dir"))
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  if FLAGS.check_data:  # before any device, model or workdir is touched
    report = data_check.check_data(FLAGS.config.data)
    print(report.summary())
    sys.exit(0 if report.ok else 1)
  parallel.maybe_initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir).absolute()

  # ===================================================================== #
  #                           Logging and workdir                         #
  # ===================================================================== #
  is_main = jax.process_index() == 0
  try:
    geometry = run_config.validate(config)
    # What later sections would trip over, after minutes of work: the mesh,
    # the first stage and, resuming, the workdir's config and saved tensors
    # (metadata and shapes only).
    run_config.check_mesh(config, jax.process_count())
    first_stage_lib.check(config, workdir)
    layout.ensure_writable(workdir)
    mgr = checkpoints.train_checkpoint_manager(workdir, config.train)
    start_step = mgr.latest_step() or 0
    # Shapes only (no weights): what saved tensors and free space are
    # checked against, before the first stage or a sample is written; the
    # Sharding section derives the state's shardings from the same.
    optimizer = ldm_training.make_optimizer(config.train)
    param_shapes = saved_shapes.ldm_param_shapes(build.build_model(config.model))
    abstract_state = jax.eval_shape(
        lambda p: ldm_training.init_state(p, optimizer), param_shapes)
    saved_config = None  # the Model section overwrites it; kept for errors
    if start_step:
      run_config.check_resume(config, workdir, start_step)
      saved_shapes.check_saved_params(workdir, start_step, param_shapes)
      if (workdir / layout.CONFIG_FILE).is_file():
        saved_config = (workdir / layout.CONFIG_FILE).read_text()
  except run_config.ConfigError as e:
    sys.exit(f"config error: {e}")
  except errors.CheckpointMismatchError as e:
    sys.exit(f"config error: {e}; resume with the settings in "
             f"{workdir / layout.CONFIG_FILE} or use a new --workdir")
  # Fails now, not at a save hours later; a save that fails anyway (a disk
  # filled meanwhile) ends the run in one line too (see checkpoints).
  layout.check_free_space(
      workdir, layout.tree_nbytes(abstract_state),
      keep=config.train.keep_checkpoints, existing=len(mgr.all_steps()))
  logging.info("workdir %s; %d process(es), %d device(s): %s", workdir,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)

  # ===================================================================== #
  #                                  Mesh                                 #
  # ===================================================================== #
  mesh = parallel.make_mesh(config.mesh)
  batch_devices = math.prod(mesh.shape[a] for a in parallel.batch_axes(mesh))
  try:
    run_config.check_batch_fits_mesh(config, batch_devices, jax.process_count())
  except run_config.ConfigError as e:
    sys.exit(f"config error: {e}")
  repl = parallel.replicated(mesh)
  logging.info("mesh %s", dict(mesh.shape))

  # ===================================================================== #
  #                                 Input                                 #
  # ===================================================================== #
  source = pipeline.make_source(config.data)
  bad_records = config.data.get("bad_records", "error")
  # Batch k of the stream is a pure function of (seed, k): a resumed run
  # starts at its step and sees what an uninterrupted run would have seen.
  data_iter = iter(pipeline.make_dataset(
      source, image_size=geometry["image"],
      batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed, train=True, num_workers=config.data.num_workers,
      start_batch=start_step, bad_records=bad_records))
  # Skip mode's per-record flags are counted here on the host and never
  # reach the devices (the step's batch sharding covers image and labels).
  bad_log = data_check.BadRecordLog(source)
  batches = (parallel.global_batch(bad_log(b), mesh) for b in data_iter)
  # Peeked: scale_by_std measures it, and every process compiles the step on
  # it before the first collective.
  first_batch = next(batches)
  batches = itertools.chain([first_batch], batches)

  # ===================================================================== #
  #                                 Model                                 #
  # ===================================================================== #
  # The first stage is frozen: loaded from a model directory, or (demo)
  # trained here first and kept in WORKDIR/first_stage for resumed runs.
  fs_module, fs_params, fs_node = first_stage_lib.prepare(
      config, workdir, mesh, source)
  fs_params = jax.device_put(fs_params, repl)
  with config.unlocked():
    config.model.params.first_stage_config = fs_node
    if config.model.params.get("scale_by_std", False):
      config.model.params.scale_factor = first_stage_lib.std_scale_factor(
          fs_module, fs_params, first_batch["image"], workdir, start_step)
  geometry = run_config.geometry(config)
  mask_stages = int(math.log2(geometry["image"] // geometry["mask"]))
  ldm = build.build_model(config.model, dtype=jnp.float32)
  if is_main:
    run_config.save(config, workdir)

  # ===================================================================== #
  #                                Sharding                               #
  # ===================================================================== #
  def init_state(rng):
    k_unet, k_cond = jax.random.split(rng)
    params = {"unet": build.init_params(ldm.unet, k_unet),
              "cond_stage": build.init_params(ldm.cond_stage, k_cond)}
    return ldm_training.init_state(params, optimizer)

  rng = jax.random.key(config.seed)
  state_shardings = parallel.shardings_from_rules(
      abstract_state, mesh, config.sharding_rules)
  logging.info("parameters:\n%s", parallel.describe(
      state_shardings.params, abstract_state.params))

  # ===================================================================== #
  #                             Train step                                #
  # ===================================================================== #
  batch_sharding = parallel.batch_sharding(mesh)
  step_fn = jax.jit(
      ldm_training.make_train_step(ldm, optimizer, config.train, mask_stages),
      in_shardings=(state_shardings, batch_sharding, repl, repl),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,))

  # ===================================================================== #
  #                              Checkpoints                              #
  # ===================================================================== #
  if start_step == 0:
    state = jax.jit(init_state, out_shardings=state_shardings)(
        jax.random.fold_in(rng, -1 % 2**31))
  else:
    logging.info("resuming from step %d", start_step)
    try:
      state = checkpoints.restore_train_state(
          mgr, start_step, abstract_state, state_shardings,
          jax.jit(optimizer.init, out_shardings=state_shardings.opt_state))
    except errors.CheckpointMismatchError as e:  # e.g. the optimiser
      if is_main and saved_config is not None:  # this config never trained
        (workdir / layout.CONFIG_FILE).write_text(saved_config)
      sys.exit(f"config error: {e}; resume with the settings in "
               f"{workdir / layout.CONFIG_FILE} or use a new --workdir")

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  writer.truncate_after(start_step)
  preview_labels = first_stage_lib.preview_labels(source, config, geometry)
  sample_key = jax.random.fold_in(rng, 2**30)

  def stop_if_nonfinite(step: int) -> None:
    # With nonfinite=stop the step applies even a non-finite update (no
    # select over the state); such a state must never reach a checkpoint.
    if config.train.nonfinite == "stop" and int(state.skipped) > 0:
      bar.close()
      writer.close()
      mgr.wait_until_finished()
      sys.exit(f"non-finite loss or gradient by step {step}: stopped, and the "
               f"last checkpoint ({mgr.latest_step()}) is intact; lower the "
               "learning rate or set --config.train.nonfinite=skip")

  def save(step: int, force: bool = False) -> None:
    stop_if_nonfinite(step)
    checkpoints.save_train_state(mgr, step, state, force=force)

  generate = jax.jit(functools.partial(
      sampling.generate, ldm, sampler=config.sample.sampler,
      steps=config.sample.steps, eta=config.sample.eta, mask_stages=mask_stages,
      guidance_scale=float(config.sample.get("guidance_scale", 1.0))))
  preview_labels_dev = jax.device_put(preview_labels, repl)

  def write_samples(step: int) -> None:
    nonlocal generate
    params = {"unet": state.ema["unet"], "cond_stage": state.params["cond_stage"]}
    if not isinstance(generate, jax.stages.Compiled):
      generate = parallel.compile_for_all(
          generate, params, fs_params, preview_labels_dev, sample_key,
          name=f"sampler_compiled_{step}")
    images = generate(params, fs_params, preview_labels_dev, sample_key)
    grid = viz.mask_sample_grid(preview_labels, np.asarray(images),
                                config.data.num_classes)
    if is_main:
      viz.save_png(grid, workdir / "samples" / f"step_{step:07d}.png")
      writer.write_images(step, {"samples": grid})

  # ===================================================================== #
  #                              Train loop                               #
  # ===================================================================== #
  stop = {"signal": None}

  def on_signal(signum, frame):
    del frame
    stop["signal"] = signum

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)

  lr = ldm_training.lr_schedule(config.train)
  total = config.train.steps
  bar = tqdm.tqdm(total=total, initial=start_step, disable=not is_main,
                  dynamic_ncols=True, desc="train")
  t_last, n_last = time.perf_counter(), 0
  step = start_step
  if step < total:
    step_fn = parallel.compile_for_all(step_fn, state, first_batch, fs_params,
                                       rng, name="train_step_compiled")
  while step < total and stop["signal"] is None:
    batch = next(batches)
    state, metrics = step_fn(state, batch, fs_params, rng)
    step += 1
    bar.update(1)

    if config.train.log_every and step % config.train.log_every == 0 or step == total:
      m = jax.device_get(metrics)
      elapsed = time.perf_counter() - t_last
      ips = (step - start_step - n_last) * config.train.batch_size / elapsed
      t_last, n_last = time.perf_counter(), step - start_step
      record = {"loss": float(m["loss"]),
                "loss_simple": float(m["loss_simple"]),
                "loss_vlb": float(m["loss_vlb"]), "lr": float(lr(step - 1)),
                "grad_norm": float(m["grad_norm"]),
                "ema_decay": float(m["ema_decay"]),
                "skipped_steps": int(m["skipped"]), "images_per_sec": ips}
      if bad_records == "skip":
        # Bad records skipped since this run (re)started, all processes.
        total_bad = np.int64(bad_log.total)
        if jax.process_count() > 1:
          total_bad = multihost_utils.process_allgather(total_bad).sum()
        record["bad_records"] = int(total_bad)
      writer.write_scalars(step, record)
      bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{ips:.1f}")
      stop_if_nonfinite(step)
    if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
      save(step)
    if config.train.sample_every and step % config.train.sample_every == 0:
      write_samples(step)

  bar.close()
  if stop["signal"] is not None:
    logging.warning("signal %d: saving step %d and exiting", stop["signal"], step)
  save(step, force=True)
  mgr.wait_until_finished()
  if (stop["signal"] is None and config.train.sample_every
      and step % config.train.sample_every):
    write_samples(step)  # the final model's samples, unless just written
  writer.close()
  if is_main:
    print(json.dumps({"workdir": str(workdir), "step": step,
                      "checkpoint": mgr.latest_step()}))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
