"""train.py and sample.py as users run them: real processes, real files.

All runs use the `tiny` variant (the reference recipe at reduced width) and
share one XLA compilation cache, so only the first run pays for compiling.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import corruption
import event_files
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.data import pipeline
from segldm_jax.data import viz
from segldm_jax.models import build
from segldm_jax.training import metrics

ROOT = pathlib.Path(__file__).parents[1]
FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# Steps take ~50 ms here, so 60 of them leave time to kill a run between two
# committed checkpoints.
RUN = ("--config.train.steps=60", "--config.train.checkpoint_every=10")
SYNTHETIC = ["--config.data.source=synthetic", "--config.data.num_records=32",
             "--config.first_stage.allow_random_init=True",
             "--config.train.batch_size=2", "--config.train.log_every=1",
             "--config.train.sample_every=0"]


@pytest.fixture(scope="module")
def env():
  e = dict(os.environ)
  # One device, as users run it; the session's compilation cache (conftest)
  # is shared with the other modules that run train.py the same way.
  e.update(JAX_PLATFORMS="cpu", XLA_FLAGS="",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return e


def _train(workdir, env, *extra, check=True, **kw):
  cmd = [sys.executable, str(ROOT / "train.py"),
         "--config", str(ROOT / "configs/seg_f4.py:tiny"),
         "--workdir", str(workdir), *SYNTHETIC, *extra]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                     timeout=600, **kw)
  if check and r.returncode != 0:
    raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
  return r


def _losses(workdir):
  return {r["step"]: r["loss"] for r in
          metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


def _steps(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
  wd = tmp_path_factory.mktemp("uninterrupted")
  _train(wd, env, *RUN)
  return wd


def test_uninterrupted_run_leaves_everything(uninterrupted):
  wd = uninterrupted
  assert _steps(wd) == [40, 50, 60]  # keep_checkpoints=3
  losses = _losses(wd)
  assert sorted(losses) == list(range(1, 61))
  assert all(np.isfinite(v) and 0.05 < v < 2.0 for v in losses.values())
  events = event_files.read_events(wd / "tensorboard")
  assert [e.step for e in events if e.summary.value] == list(range(1, 61))
  config = json.loads((wd / "config.json").read_text())
  assert config["train"]["steps"] == 60
  assert (wd / "first_stage" / "model.yaml").is_file()


def test_sigkill_then_resume_gives_the_same_loss_curve(uninterrupted, tmp_path,
                                                       env):
  wd = tmp_path / "killed"
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), "--config",
       str(ROOT / "configs/seg_f4.py:tiny"), "--workdir", str(wd), *SYNTHETIC,
       *RUN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  # Kill once a checkpoint is committed and training has gone past it.
  while time.time() < deadline and proc.poll() is None:
    saved = _steps(wd) if (wd / "checkpoints").is_dir() else []
    if saved and (wd / "metrics.jsonl").exists() and max(_losses(wd)) > saved[-1]:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(wd))
  assert 60 not in _steps(wd) and _steps(wd)[-1] < killed_at

  r = _train(wd, env, *RUN)
  # The killed run's lock was free to take; its note is reported.
  assert ("taking over the lock of a run that ended without releasing it "
          f"(host {socket.gethostname()}, pid {proc.pid}, since") in r.stderr
  want, got = _losses(uninterrupted), _losses(wd)
  assert sorted(got) == list(range(1, 61))  # no step logged twice
  np.testing.assert_allclose([got[s] for s in range(1, 61)],
                             [want[s] for s in range(1, 61)], rtol=1e-5)
  # Nor in TensorBoard, which honours the resumed run's restart marker.
  events = event_files.purged(event_files.read_events(wd / "tensorboard"))
  assert [e.step for e in events if e.summary.value] == list(range(1, 61))


def test_a_corrupt_checkpoint_falls_back_in_train_and_is_refused_by_sample(
    uninterrupted, tmp_path, env):
  wd = pathlib.Path(shutil.copytree(uninterrupted, tmp_path / "corrupt"))
  corruption.flip_array_byte(wd / "checkpoints" / "60")
  r = subprocess.run(
      [sys.executable, str(ROOT / "sample.py"), "--workdir", str(wd),
       "--steps", "2", "--out", str(tmp_path / "s")],
      env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1
  assert re.fullmatch(
      rf"error: {re.escape(str(wd))}: checkpoints/60: array 'params/\S+' does "
      r"not match the hash saved with it .*", r.stderr.strip().splitlines()[-1])
  # Resuming (here: to train 5 steps more) sets step 60 aside, with a
  # warning naming the array, and continues from step 50, the last intact.
  r = _train(wd, env, "--config.train.steps=65",
             "--config.train.checkpoint_every=10")
  assert re.search(r"checkpoints/60: array 'params/\S+' does not match .*; "
                   r"set aside as 60.corrupt, resuming from the previous "
                   r"complete checkpoint", r.stderr), r.stderr[-2000:]
  assert "resuming from step 50" in r.stderr
  assert _steps(wd) == [50, 60, 65] and (wd / "checkpoints/60.corrupt").is_dir()
  want = _losses(uninterrupted)
  got = _losses(wd)  # steps 51..60 again, as the uninterrupted run had them
  np.testing.assert_allclose([got[s] for s in range(51, 61)],
                             [want[s] for s in range(51, 61)], rtol=1e-5)



def test_five_sigkills_at_random_moments_lose_nothing(uninterrupted, tmp_path,
                                                     env):
  """SIGKILL during start-up and mid-run, with an asynchronous save after
  every step (so most kills land inside one), restarting each time: the
  run ends with the uninterrupted run's parameters and loss curve."""
  wd = tmp_path / "killed5"
  cmd = [sys.executable, str(ROOT / "train.py"), "--config",
         str(ROOT / "configs/seg_f4.py:tiny"), "--workdir", str(wd), *SYNTHETIC,
         "--config.train.steps=60", "--config.train.checkpoint_every=1"]
  rng = np.random.default_rng(5)
  # The first kill hits start-up (compiling or restoring); the others hit
  # training at random steps, each past the step the previous restart began.
  targets = [0, *sorted(rng.choice(np.arange(5, 55), 4, replace=False))]
  mid_save = 0
  for target in targets:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 600
    if target == 0:
      time.sleep(rng.uniform(1.0, 3.0))
    while target and time.time() < deadline and proc.poll() is None:
      if (wd / "metrics.jsonl").exists() and max(_losses(wd), default=0) >= target:
        break
      time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Committed checkpoints never run ahead of the logged steps.
    saved = _steps(wd) if (wd / "checkpoints").is_dir() else []
    assert not saved or saved[-1] <= max(_losses(wd), default=0)
    # A save cut short leaves orbax's temporary directory, never a step.
    mid_save += any("tmp" in p.name for p in (wd / "checkpoints").glob("*"))
  assert max(_losses(wd)) < 60
  assert mid_save >= 1  # at least one kill landed inside a save

  _train(wd, env, "--config.train.steps=60", "--config.train.checkpoint_every=1")
  want, got = _losses(uninterrupted), _losses(wd)
  assert sorted(got) == list(range(1, 61))
  np.testing.assert_allclose([got[s] for s in range(1, 61)],
                             [want[s] for s in range(1, 61)], rtol=1e-5)
  events = event_files.purged(event_files.read_events(wd / "tensorboard"))
  assert [e.step for e in events if e.summary.value] == list(range(1, 61))
  ldm = build.build_model(run_config.load(wd).model)
  for ema in (False, True):
    (a, sa), (b, sb) = (store.restore_params(w, ldm, use_ema=ema)
                        for w in (wd, uninterrupted))
    assert sa == sb == 60
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_a_second_run_is_refused_and_sigterm_saves_and_exits_cleanly(
    tmp_path, env):
  """While a run trains, a second train.py on its workdir is refused in one
  line naming the first and leaves it untouched; SIGTERM then makes the
  first save its step, exit 0 and release the lock. (One long run serves
  both: each used to start and train one of its own.)"""
  wd = tmp_path / "term"
  long_run = ("--config.train.steps=100000",
              "--config.train.checkpoint_every=1000")
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), "--config",
       str(ROOT / "configs/seg_f4.py:tiny"), "--workdir", str(wd), *SYNTHETIC,
       *long_run], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  lock = wd / "run.lock"
  while time.time() < deadline and not (lock.exists() and lock.read_text()):
    time.sleep(0.05)
  r = _train(wd, env, *long_run, check=False)
  assert r.returncode == 1
  assert re.fullmatch(
      rf"error: workdir {re.escape(str(wd))} is in use by another run \(host "
      rf"{re.escape(socket.gethostname())}, pid {proc.pid}, since \S+\); "
      r"wait for it to end or stop it, or use another --workdir",
      r.stderr.strip().splitlines()[-1]), r.stderr[-1000:]
  assert proc.poll() is None, proc.stderr.read().decode()[-2000:]

  while time.time() < deadline and proc.poll() is None:
    if (wd / "metrics.jsonl").exists() and max(_losses(wd) or [0]) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
  saved = _steps(wd)
  assert len(saved) == 1 and saved[0] >= 3
  assert saved[0] == max(_losses(wd))
  # The first run, untouched by the refused one: every step logged once.
  assert sorted(_losses(wd)) == list(range(1, saved[0] + 1))
  assert lock.read_text() == ""  # released at its clean end


def test_without_a_first_stage_it_trains_one_then_reuses_it(tmp_path, env):
  """The demo path: a VQ trained first (on crops), kept for resumed runs."""
  wd = tmp_path / "own_vq"
  vq = ["--config.first_stage.allow_random_init=False",
        "--config.first_stage.train_steps=3",
        "--config.first_stage.train_crop=16",
        "--config.first_stage.train_batch_size=2",
        "--config.first_stage.quantize_warmup_steps=1",
        "--config.train.checkpoint_every=2",
        "--config.model.params.scale_by_std=True"]
  first = _train(wd, env, *vq, "--config.train.steps=2")
  fs = wd / workdir_files.FIRST_STAGE_DIR
  vq_model, params, node = store.load_model_dir(fs)
  # scale_by_std: 1 / std of the pre-quantisation latents of batch 0.
  config = run_config.load(wd)
  batch = next(iter(pipeline.make_dataset(
      pipeline.make_source(config.data), image_size=32, batch_size=2,
      seed=config.seed, train=True, num_workers=0)))
  h = vq_model.apply({"params": params}, batch["image"] / 127.5 - 1.0,
                     method="encode")
  np.testing.assert_allclose(config.model.params.scale_factor,
                             1.0 / np.std(np.asarray(h)), rtol=1e-4)
  assert "scale_by_std: latent std" in first.stderr  # measured, once
  saved = json.loads((wd / "config.json").read_text())
  assert node["params"]["ddconfig"]["resolution"] == 32
  # Originals over reconstructions of whole 32x32 images (it trained on 16).
  two_rows = viz.grid([np.zeros((2, 32, 32, 3), np.uint8)] * 2)
  assert (Image.open(fs / "reconstructions.png").size[::-1]
          == two_rows.shape[:2])
  assert saved["model"]["params"]["first_stage_config"] == node
  # Logged as the LDM is (log_every=1 here), under its own prefix and
  # TensorBoard run.
  vq_records = [r for r in metrics.read_jsonl(wd / "metrics.jsonl")
                if "first_stage/l1" in r]
  assert [r["step"] for r in vq_records] == [1, 2, 3]
  assert all(k.startswith("first_stage/") for r in vq_records for k in r
             if k != "step")
  assert {"first_stage/loss", "first_stage/psnr", "first_stage/lr",
          "first_stage/images_per_sec"} <= set(vq_records[0])
  vq_events = event_files.read_events(wd / "tensorboard" / "first_stage")
  assert event_files.preempted(vq_events)["first_stage/l1"] == [1, 2, 3]
  r = _train(wd, env, *vq, "--config.train.steps=4")
  # A resumed run keeps the factor it started with, read from config.json:
  # not measured again (its first batch is step 2's, so a new measurement
  # would differ), and the train step is the program the first run compiled
  # (a planted factor would compile another).
  assert "scale_by_std: latent std" not in r.stderr
  assert (run_config.load(wd).model.params.scale_factor
          == config.model.params.scale_factor)
  assert "trained earlier in this workdir" in r.stderr
  assert "first stage (VQ)" not in r.stderr
  _, again, _ = store.load_model_dir(fs)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert _steps(wd) == [2, 4]
  # The resumed LDM's log went on from step 2; the first stage's is whole.
  records = metrics.read_jsonl(wd / "metrics.jsonl")
  assert [r for r in records if "first_stage/l1" in r] == vq_records
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, env):
  wd = tmp_path / "nan"
  r = _train(wd, env, "--config.train.steps=50", "--config.train.checkpoint_every=1",
             "--config.train.base_learning_rate=1e12", check=False)
  assert r.returncode != 0
  assert "non-finite loss or gradient by step" in r.stderr
  failed_at = int(r.stderr.split("non-finite loss or gradient by step ")[1].split(":")[0])
  assert _steps(wd)[-1] == failed_at - 1  # the bad update was never saved
  from segldm_jax.checkpoint import store  # pylint: disable=g-import-not-at-top
  from segldm_jax.config import run_config  # pylint: disable=g-import-not-at-top
  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top
  ldm = build.build_model(run_config.load(wd).model)
  params, _ = store.restore_params(wd, ldm, use_ema=False)
  import jax  # pylint: disable=g-import-not-at-top
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_converted_ldm_workdir_samples(tmp_path, env):
  out = tmp_path / "converted"
  subprocess.run([sys.executable, str(ROOT / "convert_torch_ckpt.py"),
                  str(FIXTURES / "ldm_tiny.ckpt"), "--config",
                  str(FIXTURES / "ldm_tiny.yaml"), "--out", str(out)],
                 env=env, check=True, capture_output=True)
  masks = tmp_path / "masks"
  masks.mkdir()
  for i in range(3):  # 5 classes, like the fixture's rescaler
    labels = (np.arange(32)[:, None] // (8 + i) + np.arange(32)[None] // 16) % 5
    Image.fromarray(labels.astype(np.uint8)).save(masks / f"m{i}.png")

  def sample(dest):
    r = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--workdir", str(out),
         "--masks", str(masks), "--num_samples", "2", "--steps", "4",
         "--seed", "3", "--out", str(dest)],
        env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

  summary = sample(tmp_path / "a")
  assert summary["samples"] == 6 and summary["ema"] is True
  files = sorted(p.name for p in (tmp_path / "a").glob("m*_*.png"))
  assert files == [f"m{i}_{k}.png" for i in range(3) for k in range(2)]
  grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
  assert grid.shape == (3 * 34 + 2, 3 * 34 + 2, 3)
  sample(tmp_path / "b")  # same seed, same images
  for f in files:
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / f)),
                                  np.asarray(Image.open(tmp_path / "b" / f)))
