"""Workdirs saved before the package was split by role (commit 01cfa7b, the
parent of 778c96d) still load, sample the same pictures and resume.

tests/data/old_layout/ holds what that commit's code wrote (make.py there
regenerates it, run with that commit's code): `trained/`, train.py's workdir
after 20 steps, and `converted/`, convert_torch_ckpt.py's workdir of that
run exported to a CompVis checkpoint and converted back; and the samples
the old `segldm_jax.load(dir).sample(...)` drew from them (expected.npz,
expected.json).
Today's code reads both folders (copies: loading must not write) and
draws the same samples, up to float rounding (see `_assert_same_images`).
"""

import ast
import filecmp
import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import segldm_jax
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.config import run_config
from segldm_jax.models import build
from segldm_jax.training import ldm_step
from segldm_jax.training import metrics

OLD = pathlib.Path(__file__).parent / "data" / "old_layout"
EXPECTED = json.loads((OLD / "expected.json").read_text())
CASES = {name: (workdir, use_ema, options)
         for name, workdir, use_ema, options in EXPECTED["cases"]}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
  root = tmp_path_factory.mktemp("old_layout")
  for name in ("trained", "converted"):
    shutil.copytree(OLD / name, root / name)
  return root


@pytest.fixture(scope="module")
def expected():
  with np.load(OLD / "expected.npz") as f:
    return dict(f)


@pytest.fixture(scope="module")
def models(copies):
  return {(workdir, use_ema): segldm_jax.load(copies / workdir, use_ema=use_ema)
          for workdir, use_ema, _ in CASES.values()}


def _assert_same_images(got: np.ndarray, want: np.ndarray) -> None:
  """uint8 images drawn from the same weights, noise and sampler by another
  compiled program: at most 1 level apart, on at most 0.1% of the values.

  Measured on trained_live (12288 values, 2 masks x 2 samples): today's
  code on one device with the Winograd convolutions make.py's old code ran
  draws the old pictures bit for bit; on this session's 8 host devices 3
  values differ by 1 level, with XLA's convolutions 1. Rounding moves a
  value to the next level only where it lies within float error of a .5
  boundary: weights scaled by 1 + 1e-7 N(0, 1) (about an ulp) move 1 value,
  1e-6: 7 (0.06%), 1e-5: 41 (0.3%), 1e-4: 3%, never by more than 1 level.
  What this guards against is far beyond that: the EMA read in place of
  the live UNet changes 90% of the values, by up to 131 levels."""
  assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
  diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
  assert diff.max() <= 1, f"max difference {diff.max()} levels"
  assert np.mean(diff > 0) <= 0.001, f"{np.mean(diff > 0):.3%} of values differ"


@pytest.mark.parametrize("case", list(CASES))
def test_old_workdirs_sample_the_old_pictures(models, expected, case):
  workdir, use_ema, options = CASES[case]
  got = models[workdir, use_ema].sample(
      expected["masks"], num_samples=EXPECTED["num_samples"],
      seed=EXPECTED["seed"], **options)
  _assert_same_images(got, expected[case])


STEP = EXPECTED["models"]["trained"]["step"]


def test_the_old_pictures_tell_the_weights_apart(expected):
  """The fixture is sensitive to what it tests: the EMA and the live UNet
  draw other pictures (a UNet that has not moved from its zero output
  layer would draw the decoded noise whatever its weights), and the
  converted model, the run's EMA, draws the trained one's EMA pictures."""
  assert np.mean(expected["trained_ema"] != expected["trained_live"]) > 0.5
  np.testing.assert_array_equal(expected["converted"], expected["trained_ema"])


def test_old_workdirs_read_back_config_and_step(models, copies):
  for workdir, facts in EXPECTED["models"].items():
    model = models[workdir, True]
    assert model.step == facts["step"] == STEP
    assert model.num_classes == facts["num_classes"] == 182
    assert model.has_dataset == facts["has_dataset"]
    saved = json.loads((copies / workdir / "config.json").read_text())
    assert model.config.model.to_dict() == saved["model"]
    unet = model.config.model.params.unet_config.params
    assert (unet.model_channels, list(unet.channel_mult)) == (32, [1])
  trained = models["trained", True]
  assert trained.config.data.source == "synthetic"
  assert trained.config.train.steps == STEP
  assert trained.sample_options()["steps"] == 5  # the run's `sample` config
  assert [r["step"] for r in metrics.read_jsonl(
      copies / "trained" / "metrics.jsonl")] == list(range(1, STEP + 1))
  # The EMA and the live weights are told apart.
  ema, live = models["trained", True], models["trained", False]
  assert not np.allclose(ema.params["unet"]["out_2"]["kernel"],
                         live.params["unet"]["out_2"]["kernel"])


def _module(name: str):
  spec = importlib.util.spec_from_file_location(
      f"old_layout_{name}", OLD / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _old_command_config():
  """The config of make.py's train.py command, built by today's
  configs/seg_f4.py: what a user resuming the old run passes again."""
  config = _module("tiny_config").get_config()
  for flag in _module("make").TRAIN_FLAGS:
    key, value = flag.removeprefix("--config.").split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a string, as the flag parser takes it
    config.update_from_flattened_dict({key: value})
  return config


@pytest.mark.parametrize("workdir", ["trained", "converted"])
def test_old_workdirs_resume(models, tmp_path, workdir):
  """What train.py does before its first step when resuming (the checks of
  training/startup.py and the restore), on today's code."""
  path = pathlib.Path(shutil.copytree(OLD / workdir, tmp_path / workdir))
  config = _old_command_config()
  run_config.resolve(config)
  mgr = store.train_checkpoint_manager(path, config.train)
  try:
    step = store.resume_step(mgr)
    assert step == STEP
    if workdir == "trained":  # a converted one has no data node to compare
      run_config.check_resume(config, path, step)
    optimizer = ldm_step.make_optimizer(config.train)
    shapes = saved_shapes.ldm_param_shapes(build.build_model(config.model))
    saved_shapes.check_saved_params(path, step, shapes)
    abstract = jax.eval_shape(lambda p: ldm_step.init_state(p, optimizer),
                              shapes)
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: here, abstract)
    state, restored = store.restore_latest_intact(
        mgr, abstract, shardings,
        jax.jit(optimizer.init, out_shardings=shardings.opt_state))
  finally:
    mgr.close()
  assert restored == STEP and int(state.step) == STEP
  def same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)

  cond_stage = models[workdir, True].params["cond_stage"]
  same(state.params["cond_stage"], cond_stage)
  counts = {int(x) for x in jax.tree.leaves(state.opt_state)
            if getattr(x, "dtype", None) == np.int32}
  if workdir == "trained":
    same(state.params["unet"], models["trained", False].params["unet"])
    same(state.ema["unet"], models["trained", True].params["unet"])
    assert int(state.ema_updates) == STEP  # LitEma's warm-up goes on
    assert counts == {STEP}  # AdamW's step count
  else:  # one UNet (the run's EMA); the EMA starts from it, AdamW afresh
    unet = models["trained", True].params["unet"]
    same(state.params["unet"], unet)
    same(state.ema["unet"], unet)
    assert int(state.ema_updates) == STEP  # the checkpoint's LitEma count
    assert counts == {0}


def test_loading_writes_nothing(models, copies):
  del models  # loaded (and sampled or resumed) from the copies
  for name in ("trained", "converted"):
    cmp = filecmp.dircmp(OLD / name, copies / name)
    _assert_same_tree(cmp)


def _assert_same_tree(cmp: filecmp.dircmp) -> None:
  assert not cmp.left_only and not cmp.right_only, (cmp.left_only,
                                                    cmp.right_only)
  _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files,
                                         shallow=False)
  assert not mismatch and not errors, (cmp.left, mismatch, errors)
  for sub in cmp.subdirs.values():
    _assert_same_tree(sub)
