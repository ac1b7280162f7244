"""What a training loop needs around its step, for the LDM's (train.py) and
the demo VQ's (vq_trainer.py) alike: the jit conventions of a train step,
the log steps (every `train.log_every` steps and the last: a record in
metrics.jsonl and TensorBoard, throughput, bad records, the progress bar),
and for the LDM run its input stream, its stop signals and its checkpoint
saves with the non-finite guard.
"""

import itertools
import signal
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.data import check as data_check
from segldm_jax.data import pipeline
from segldm_jax.runtime import distributed
from segldm_jax.runtime import sharding
from segldm_jax.training import ldm_step
from segldm_jax.training import metrics as metrics_lib
from segldm_jax.training import startup


def jit_train_step(step: Callable, mesh, state_shardings, replicated_args: int = 0
                   ) -> Callable:
  """`step(state, batch, *others) -> (state, metrics)` jitted as every train
  step is: the state keeps `state_shardings` and is donated (its buffers
  become the new state's), the batch is split over the mesh's batch axes,
  the `replicated_args` other arguments and the metrics are replicated."""
  repl = sharding.replicated(mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    *(repl,) * replicated_args),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,))


def jit_encoder(encode: Callable, mesh) -> Callable:
  """`encode(image, first_stage_params) -> latents` (ldm_step.make_encoder)
  jitted as its own program: images and latents split over the mesh's batch
  axes, the frozen first stage replicated."""
  rows = sharding.batch_sharding(mesh)
  return jax.jit(encode, in_shardings=(rows, sharding.replicated(mesh)),
                 out_shardings=rows)


def encoded(batch: Mapping[str, Any], encode: Callable, first_stage_params
            ) -> dict[str, Any]:
  """`batch` with its images encoded by `encode` (from `jit_encoder`):
  what the step (ldm_step.make_latent_train_step) takes."""
  return ldm_step.with_latents(batch,
                               encode(batch["image"], first_stage_params))


def compile_ldm_programs(encode: Callable, step: Callable, state, batch,
                         first_stage_params, rng) -> tuple[Callable, Callable]:
  """The encoder and the step compiled by every process before the first
  collective runs (distributed.compile_for_all); one process: as given."""
  latents = encoded(batch, lambda *a: jax.eval_shape(encode, *a),
                    first_stage_params)
  encode = distributed.compile_for_all(encode, batch["image"],
                                       first_stage_params,
                                       name="encoder_compiled")
  step = distributed.compile_for_all(step, state, latents, rng,
                                     name="train_step_compiled")
  return encode, step


def train_batches(config, source, start: startup.Start, mesh):
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


def bad_record_counter(config, bad_log: data_check.BadRecordLog
                       ) -> Callable[[], dict[str, int]]:
  """-> a function giving {"bad_records": skipped since this run
  (re)started, all processes} in skip mode, {} otherwise. Every process
  calls it at the same steps (a collective in multi-process runs)."""
  def count() -> dict[str, int]:
    if config.data.get("bad_records", "error") != "skip":
      return {}
    total = np.int64(bad_log.total)
    if jax.process_count() > 1:
      total = multihost_utils.process_allgather(total).sum()
    return {"bad_records": int(total)}

  return count


class ImagesPerSecond:
  """Training throughput since the previous call (or the run's start)."""

  def __init__(self, step: int, batch_size: int):
    self._step, self._batch, self._time = step, batch_size, time.perf_counter()

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    ips = (step - self._step) * self._batch / (now - self._time)
    self._step, self._time = step, now
    return ips


class ProgressLog:
  """A loop's progress bar and its log steps: every `log_every` steps and
  at the last (`total`), one record through `writer`, ending with
  `images_per_sec` and what `extra` gives (e.g. `bad_record_counter`).
  The log goes on from step `initial`: what the writer's series logged
  above it (a killed run, past its last checkpoint) is dropped first.
  `close` closes the bar and the writer."""

  def __init__(self, writer: metrics_lib.MetricWriter, desc: str, *,
               total: int, initial: int, batch_size: int, log_every: int,
               extra: Callable[[], Mapping[str, Any]] = dict):
    writer.truncate_after(initial)
    self.writer, self._total, self._every = writer, total, log_every
    self._extra = extra
    self._rate = ImagesPerSecond(initial, batch_size)
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc,
                          disable=jax.process_index() != 0, dynamic_ncols=True)

  def advance(self) -> None:
    """One step done."""
    self._bar.update(1)

  def due(self, step: int) -> bool:
    """Whether `step` (steps done) is a log step."""
    return bool(self._every and step % self._every == 0 or step == self._total)

  def write(self, step: int, record: Mapping[str, Any], **shown: str) -> None:
    """Logs `record` (its step's metrics, already on the host) at `step`,
    and shows `shown` (formatted values) and the throughput on the bar."""
    ips = self._rate(step)
    self.writer.write_scalars(step, {**record, "images_per_sec": ips,
                                     **self._extra()})
    self._bar.set_postfix(**shown, img_s=f"{ips:.1f}")

  def close(self) -> None:
    self._bar.close()
    self.writer.close()


class StopSignal:
  """SIGTERM (a preemption notice) or SIGINT: finish the step, save, exit."""

  def __init__(self):
    self.signum = None
    if jax.process_count() == 1:  # else jax's preemption service takes it
      signal.signal(signal.SIGTERM, self._handle)
    signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def warn_if_stopped(self, step: int) -> None:
    if self.signum is not None:
      logging.warning("signal %d: saving step %d and exiting", self.signum,
                      step)

  def after_step(self, step: int) -> None:
    """Every process calls it after each step: a SIGTERM to any one process
    of a multi-process run stops them all at the same step."""
    if distributed.preemption_requested(step):
      self.signum = signal.SIGTERM


class Saver:
  """The LDM run's checkpoint saves (through the run's orbax manager),
  each behind the non-finite guard."""

  def __init__(self, manager, nonfinite: str, on_stop: Callable[[], None]):
    self.manager, self._nonfinite, self._on_stop = manager, nonfinite, on_stop

  def stop_if_nonfinite(self, step: int, state) -> None:
    """With nonfinite=stop the step applies even a non-finite update (no
    select over the state); such a state must never reach a checkpoint:
    `on_stop` (closing the logs), and NonFiniteError."""
    if self._nonfinite == "stop" and int(state.skipped) > 0:
      self._on_stop()
      self.manager.wait_until_finished()
      raise errors.NonFiniteError(
          f"non-finite loss or gradient by step {step}: stopped, and the last "
          f"checkpoint ({self.manager.latest_step()}) is intact; lower the "
          "learning rate or set --config.train.nonfinite=skip")

  def __call__(self, step: int, state, force: bool = False) -> None:
    self.stop_if_nonfinite(step, state)
    store.save_train_state(self.manager, step, state, force=force)

  def last(self, step: int, state) -> None:
    """The run's final save (whatever the checkpoint interval), written
    before it returns."""
    self(step, state, force=True)
    self.manager.wait_until_finished()
