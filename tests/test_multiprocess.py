"""Several processes: jax.distributed on localhost, CPU collectives (gloo).

2 processes x 4 CPU devices train the tiny recipe and must match one process
with 8 devices (losses, parameters, the sample picture of process 0); the
checkpoint then restores onto 1 process with 4 devices and training goes on.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from segldm_jax import checkpoints
from segldm_jax import metrics
from segldm_jax import run_config
from segldm_jax.models import build

ROOT = pathlib.Path(__file__).parents[1]
ARGS = ["--config", str(ROOT / "configs/seg_f4.py:tiny"),
        "--config.data.source=synthetic", "--config.data.num_records=32",
        "--config.first_stage.allow_random_init=True",
        "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3", "--config.train.sample_every=3",
        "--config.sample.num_masks=2", "--config.sample.steps=4"]


def _env(devices, cache):
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           JAX_COMPILATION_CACHE_DIR=str(cache),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return e


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, steps, processes, devices, cache, *extra):
  cmd = [sys.executable, str(ROOT / "train.py"), *ARGS,
         f"--workdir={workdir}", f"--config.train.steps={steps}", *extra]
  if processes > 1:
    port = _free_port()
    cmds = [[*cmd, f"--coordinator_address=localhost:{port}",
             f"--num_processes={processes}", f"--process_id={i}"]
            for i in range(processes)]
  else:
    cmds = [cmd]
  # Logs go to files: a full pipe would block one process inside a
  # collective while the others wait for it.
  logs = [workdir.parent / f"{workdir.name}.{i}.{steps}.log"
          for i in range(len(cmds))]
  procs = [subprocess.Popen(c, env=_env(devices, cache), stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
           for c, log in zip(cmds, logs)]
  for p in procs:
    p.wait(timeout=900)
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  # Every process's log: the one that failed first is not always process 0.
  assert not failed, "\n".join(
      f"--- process {i} (exit {procs[i].returncode}):\n"
      f"{_first_error(logs[i].read_text())}" for i in range(len(procs)))


def _first_error(log):
  """The first traceback (the cause), then the end (the abort it led to)."""
  start = log.find("Traceback")
  head = log[start:start + 3000] + "\n[...]\n" if start >= 0 else ""
  return head + log[-2000:]


def _params(workdir):
  ldm = build.build_model(run_config.load(workdir).model)
  params, step = checkpoints.restore_params(workdir, ldm, use_ema=False)
  return jax.tree.leaves(params), step


def _losses(workdir):
  return [r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp")
  cache = root / "xla"
  _launch(root / "multi", 3, processes=2, devices=4, cache=cache)
  _launch(root / "single", 3, processes=1, devices=8, cache=cache)
  return root


def test_two_processes_match_one(runs):
  multi, single = runs / "multi", runs / "single"
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
  (pm, sm), (ps, ss) = _params(multi), _params(single)
  assert sm == ss == 3
  for a, b in zip(pm, ps):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # Process 0 alone writes pictures; they are the single run's, up to the
  # last-bit rounding of two differently partitioned programs (one level on
  # a pixel at a rounding boundary).
  pic = "samples/step_0000003.png"
  diff = np.abs(np.asarray(Image.open(multi / pic), np.int16)
                - np.asarray(Image.open(single / pic), np.int16))
  assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, diff.max()


def test_restore_onto_one_process_with_four_fsdp_devices(runs):
  multi = runs / "multi"  # written by 2 processes x 4 devices, data parallel
  _launch(multi, 5, 1, 4, runs / "xla", "--config.mesh=(('data', 1), ('fsdp', 4))",
          "--config.sharding_strategy=(('.*', 'fsdp'),)")
  losses = _losses(multi)
  assert len(losses) == 5 and np.isfinite(losses).all()
  leaves, step = _params(multi)
  assert step == 5
  # Three steps were restored, two more trained: the parameters moved on.
  (before, _) = _params(runs / "single")
  assert any(not np.allclose(a, b) for a, b in zip(leaves, before))
