"""Where things live in a workdir and a model directory, and the checks
that a workdir can hold a run (writable, room for its checkpoints).

A **model directory** holds one network, e.g. a converted vq-f4:

    DIR/model.yaml    LDM-style config node (`model: {target, params}`)
    DIR/params/       orbax checkpoint of the Flax parameter tree
    DIR/report.txt    what the conversion did (when converted)
    DIR/manifest.json hashes of the params' arrays (see `manifest.py`)

A **workdir** holds a latent diffusion run (trained here or converted):

    WORKDIR/config.json        the resolved run config (`model` = LDM node)
    WORKDIR/first_stage/       model directory of the frozen VQ
    WORKDIR/checkpoints/STEP/  orbax items: params {unet, cond_stage},
                               ema_params {unet}, meta (JSON), manifest
                               (JSON: a hash of every array) and, for
                               training runs, opt_state. The data position
                               is not saved: it is the step (batch k of the
                               stream is a function of the seed and k).
    WORKDIR/checkpoints/STEP.corrupt/   a step whose arrays no longer
                               matched their manifest, set aside on resume
    WORKDIR/metrics.jsonl, tensorboard/, samples/   logs and pictures
    WORKDIR/run.lock           who is training here now (WorkdirLock)
"""

import atexit
import datetime
import fcntl
import json
import math
import os
import pathlib
import shutil
import socket
from typing import Any

from absl import logging

import jax
import numpy as np

from segldm_jax import errors
from segldm_jax import formatting

MODEL_FILE = "model.yaml"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
FIRST_STAGE_DIR = "first_stage"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"  # in a model directory
MANIFEST_ITEM = "manifest"  # orbax item of a workdir's checkpoint step
CORRUPT_SUFFIX = ".corrupt"  # orbax lists only the steps named by a number


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
    raise errors.WorkdirError(
        f"workdir {workdir} is not writable: {e.strerror or e}") from None


def tree_nbytes(tree: Any) -> int:
  """Bytes of a tree of arrays or ShapeDtypeStructs (e.g. an abstract state)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def check_free_space(workdir: pathlib.Path, state_bytes: int, keep: int,
                     existing: int = 0) -> None:
  """Fails at once when the workdir's filesystem cannot hold the checkpoints
  this run will keep, instead of at a save hours later.

  Orbax writes a new step before it deletes the oldest, so up to `keep` + 1
  train states (params, EMA, optimiser) sit on disk; `existing` of them
  (a resumed run's) are already there.
  """
  keep = max(int(keep), 0)
  copies = max(1, keep + 1 - min(int(existing), keep))
  needed = state_bytes * copies
  # Orbax metadata, samples, logs and the first stage are small next to it.
  needed += max(64 << 20, needed // 50)
  free = shutil.disk_usage(workdir).free
  if free < needed:
    already = f", {existing} already saved" if existing else ""
    gib = formatting.human_bytes
    raise errors.WorkdirError(
        f"workdir {workdir}: {gib(free)} free on its filesystem, but its "
        f"checkpoints need {gib(needed)} ({copies} x {gib(state_bytes)} train "
        f"state: train.keep_checkpoints={keep} + 1 being written{already}, "
        "plus margin); free space, pass --config.train.keep_checkpoints=1 or "
        "use a --workdir on a bigger disk")


LOCK_FILE = "run.lock"


class WorkdirLock:
  """One training run per workdir, for the run's whole life.

  Process 0 of a run holds an exclusive `flock` on WORKDIR/run.lock, which
  names it (host, pid, since when). The kernel drops the lock when the
  process dies, however it dies, so a second `train.py` on the same workdir
  is refused while the first lives, and a killed run's lock is free to take
  (its note, left behind, is reported). A clean exit empties the note. On
  shared storage the lock is the filesystem's: NFSv4 and Lustre honour it.
  """

  def __init__(self, path: pathlib.Path, fd: int):
    self.path, self._fd = path, fd

  @classmethod
  def acquire(cls, workdir: pathlib.Path) -> "WorkdirLock":
    """Raises errors.WorkdirError naming the holder if another run has it."""
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_note(fd)
      os.close(fd)
      raise errors.WorkdirError(
          f"workdir {workdir} is in use by another run ({_describe(holder)}); "
          "wait for it to end or stop it, or use another --workdir") from None
    left = _read_note(fd)
    if left:
      logging.warning("workdir %s: taking over the lock of a run that ended "
                      "without releasing it (%s): it was killed or crashed",
                      workdir, _describe(left))
    note = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    os.fsync(fd)
    lock = cls(path, fd)
    atexit.register(lock.release)
    return lock

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # a clean end leaves no note behind
    os.close(self._fd)  # and drops the flock
    self._fd = None


def _read_note(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0) or b"{}")
  except ValueError:
    return {}


def _describe(note: dict) -> str:
  if not note:
    return "holder unknown"
  return (f"host {note.get('host')}, pid {note.get('pid')}, since "
          f"{note.get('since')}")
