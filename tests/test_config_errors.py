"""Start-up errors of train.py: one line that names the key and what works.

Unit-level: the functions train.py calls (flag parsing, mesh, first stage,
resume config, saved tensors, free space, workdir, failed saves), each with
its exact message. One train.py subprocess checks the real command line.
"""

import collections
import errno
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest
import yaml

from configs import seg_f4
from segldm_jax import errors
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import cli
from segldm_jax.config import run_config
from segldm_jax.inference import first_stage
from segldm_jax.models import build
from segldm_jax.training import ldm_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/seg_f4.py") + ":tiny"
CS = "model.params.cond_stage_config.params"
UNET = "model.params.unet_config.params"


def _config(num_classes=182, model_channels=32, **train):
  """The tiny recipe (validated, so derived sizes are filled in)."""
  c = seg_f4.get_config("tiny")
  c.data.source = "synthetic"
  c.first_stage.allow_random_init = True
  c.data.num_classes = num_classes
  c.model.params.cond_stage_config.params.in_channels = num_classes
  c.model.params.unet_config.params.model_channels = model_channels
  for k, v in train.items():
    setattr(c.train, k, v)
  run_config.validate(c)
  return c


@functools.cache
def _abstract_state(num_classes=182, model_channels=32, grad_clip_norm=0.0):
  c = _config(num_classes, model_channels, grad_clip_norm=grad_clip_norm)
  ldm = build.build_model(c.model)
  optimizer = ldm_step.make_optimizer(c.train)

  # ShapeDtypeStructs in, ShapeDtypeStructs out: nothing is allocated.
  return jax.eval_shape(lambda p: ldm_step.init_state(p, optimizer),
                        saved_shapes.ldm_param_shapes(ldm)), ldm


# ---------------------------------------------------------------------------
# 1. Flags: an unknown key, a bad value, a config file that does not load.
# ---------------------------------------------------------------------------


def _flag_error(*args: str) -> str:
  """Parses `--config CONFIG args` like train.py; -> its one-line error."""
  argv = ["train.py", f"--config={CONFIG}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
    fv.config.get("seed")  # what train.py does: a file that did not load
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    message = cli.flag_error(argv, e)
    assert "\n" not in message
    return message
  raise AssertionError(f"{args} parsed")


@pytest.mark.parametrize("arg, expected", [
    ("--config.train.batchsize=8",
     "unknown config key train.batchsize; did you mean train.batch_size?"),
    ("--config.trian.batch_size=8",
     "unknown config key trian.batch_size; did you mean train.batch_size?"),
    (f"--config.{UNET}.model_chanels=64",
     f"unknown config key {UNET}.model_chanels; did you mean "
     f"{UNET}.model_channels?"),
    ("--config.data.numclasses=16",
     "unknown config key data.numclasses; did you mean data.num_classes?"),
    ("--config.train.zzzqqq=1", "unknown config key train.zzzqqq; train has: "
     "base_learning_rate, batch_size, "),
    ("--config.train.batch_size.x=1",
     "config key train.batch_size holds 1 (int), it has no field 'x'"),
])
def test_unknown_key_names_the_closest_known_key(arg, expected):
  assert _flag_error(arg).startswith(expected)


def test_value_of_the_wrong_type_names_key_and_current_value():
  assert _flag_error("--config.train.batch_size=abc") == (
      "--config.train.batch_size=abc: invalid literal for int() with base 10: "
      "'abc'; the config's value is 1 (int)")


def test_config_file_errors_are_one_line(tmp_path):
  argv = ["train.py", f"--config={tmp_path / 'nope.py'}"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  with pytest.raises(OSError) as e:
    fv.config.get("seed")
  assert cli.flag_error(argv, e.value) == (
      f"cannot load --config={tmp_path / 'nope.py'}: [Errno 2] No such file "
      f"or directory: '{tmp_path / 'nope.py'}'")
  argv = ["train.py", "--config=configs/seg_f4.py:bogus"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  with pytest.raises(flags.Error) as e:
    fv(argv)
  assert cli.flag_error(argv, e.value) == (
      "flag --config=configs/seg_f4.py:bogus: Error whilst parsing config "
      "file: ValueError: configs/seg_f4.py: unknown variant 'bogus'; choose "
      "one of reference, demo, tiny, ade20k, coco_stuff, cityscapes, or "
      "DATASET,tiny")


def test_train_py_reports_an_unknown_key_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  r = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", CONFIG,
       "--workdir", str(workdir), "--config.train.batchsize=8"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=300)
  assert r.returncode == 1
  assert r.stderr.splitlines() == [
      "config error: unknown config key train.batchsize; did you mean "
      "train.batch_size?"]
  assert not workdir.exists()


# ---------------------------------------------------------------------------
# 2. The mesh (conftest gives 8 CPU devices).
# ---------------------------------------------------------------------------


def test_mesh_that_does_not_fit_the_devices():
  c = _config()
  c.mesh = (("data", 3), ("fsdp", 1))
  with pytest.raises(run_config.ConfigError) as e:
    run_config.check_mesh(c, processes=1)
  assert str(e.value) == (
      "mesh [('data', 3), ('fsdp', 1)] needs 3 devices but 8 are available; "
      "use ('data', -1) or sizes whose product is 8 (--config.mesh)")


def test_mesh_that_does_not_divide_the_batch():
  c = _config(batch_size=12)
  with pytest.raises(run_config.ConfigError) as e:
    run_config.check_mesh(c, processes=1)
  assert str(e.value) == (
      "train.batch_size=12 (micro-batch 12) does not split over the mesh's 8 "
      "batch devices (mesh=[('data', -1), ('fsdp', 1)]); use a multiple of 8")
  run_config.check_mesh(_config(batch_size=16), processes=1)


def test_class_count_that_contradicts_the_rescaler_names_the_fix():
  c = seg_f4.get_config("tiny")
  c.data.source = "synthetic"
  c.first_stage.allow_random_init = True
  c.data.num_classes = 3
  with pytest.raises(run_config.ConfigError) as e:
    run_config.validate(c)
  assert str(e.value) == (
      "model.params.cond_stage_config.params.in_channels=182 but "
      "data.num_classes=3; they must be equal: set "
      "--config.model.params.cond_stage_config.params.in_channels=3")


# ---------------------------------------------------------------------------
# 3. Resuming: the workdir's config.json and its saved tensors.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir16(tmp_path_factory):
  """A workdir trained (step 400) with 16 classes and model_channels 32."""
  wd = tmp_path_factory.mktemp("wd16")
  abstract, _ = _abstract_state(16)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  mgr = store.train_checkpoint_manager(wd, _config(16).train)
  store.save_train_state(mgr, 400, state)
  mgr.wait_until_finished()
  run_config.save(_config(16), wd)
  return wd, mgr


@pytest.mark.parametrize("num_classes, model_channels, message", [
    (182, 32, "data.num_classes=16; this config has 182: pass "
              f"--config.data.num_classes=16 --config.{CS}.in_channels=16"),
    (16, 64, f"{UNET}.model_channels=32; this config has 64: pass "
             f"--config.{UNET}.model_channels=32"),
], ids=["class_count", "width"])
def test_resume_with_other_model_names_key_and_fix(workdir16, num_classes,
                                                   model_channels, message):
  wd, _ = workdir16
  with pytest.raises(run_config.ConfigError) as e:
    run_config.check_resume(_config(num_classes, model_channels), wd, 400)
  assert str(e.value) == (f"workdir {wd} (checkpoints/400) was trained with "
                          f"{message} or use a new --workdir")


def test_resume_with_same_model_and_other_training_settings_is_fine(workdir16):
  wd, _ = workdir16
  c = _config(16, steps=99, base_learning_rate=1.0, batch_size=4)
  run_config.check_resume(c, wd, 400)
  run_config.check_resume(c, wd / "missing", 400)  # no config.json: no check


def test_converted_workdir_without_data_names_both_tied_keys(tmp_path):
  # convert_torch_ckpt.py's workdirs hold the model node but no `data`.
  saved = json.loads(_config(5).to_json_best_effort())
  (tmp_path / "config.json").write_text(json.dumps({"model": saved["model"]}))
  with pytest.raises(run_config.ConfigError) as e:
    run_config.check_resume(_config(182), tmp_path, 7)
  assert str(e.value) == (
      f"workdir {tmp_path} (checkpoints/7) was trained with "
      f"{CS}.in_channels=5; this config has 182: pass "
      f"--config.{CS}.in_channels=5 --config.data.num_classes=5 or use a new "
      "--workdir")


def test_saved_params_of_another_class_count_name_first_tensor(workdir16):
  wd, mgr = workdir16
  abstract, ldm = _abstract_state(182)
  expected = (f"{wd}: checkpoints/400 params/cond_stage/channel_mapper/kernel "
              "is (16,3); the config builds (182,3) (set by data.num_classes, "
              f"{CS})")
  with pytest.raises(errors.CheckpointMismatchError) as e:
    saved_shapes.check_saved_params(wd, 400, saved_shapes.ldm_param_shapes(ldm))
  assert str(e.value) == expected
  with pytest.raises(errors.CheckpointMismatchError) as e:
    store.restore_train_state(mgr, 400, abstract, None, None)
  assert str(e.value) == expected
  with pytest.raises(errors.CheckpointMismatchError) as e:  # sample.py's
    store.restore_params(wd, ldm)
  assert str(e.value) == (
      f"{expected}; the workdir's config.json does not describe these weights")


def test_saved_params_of_another_width_name_first_tensor(workdir16):
  wd, mgr = workdir16
  abstract, _ = _abstract_state(16, model_channels=64)
  with pytest.raises(errors.CheckpointMismatchError) as e:
    store.restore_train_state(mgr, 400, abstract, None, None)
  assert str(e.value) == (
      f"{wd}: checkpoints/400 params/unet/input_blocks_0_0/bias is (32,); the "
      f"config builds (64,) (set by {UNET})")


def test_saved_optimizer_state_of_another_optimizer(workdir16):
  wd, mgr = workdir16
  abstract, _ = _abstract_state(16, grad_clip_norm=1.0)  # adds a chain link
  with pytest.raises(errors.CheckpointMismatchError) as e:
    store.restore_train_state(mgr, 400, abstract, None, None)
  assert str(e.value) == (
      f"{wd}: checkpoints/400 opt_state/1/0/count is not saved; the config "
      "builds () (set by train.grad_clip_norm, train.lr_schedule, "
      "train.warmup_steps, train.trainable)")


def test_matching_workdir_passes_every_check(workdir16):
  wd, _ = workdir16
  abstract, ldm = _abstract_state(16)
  run_config.check_resume(_config(16), wd, 400)
  saved_shapes.check_saved_params(wd, 400, saved_shapes.ldm_param_shapes(ldm))
  for name, tree in (("params", abstract.params), ("ema_params", abstract.ema),
                     ("opt_state", abstract.opt_state)):
    saved_shapes.check_saved_item(wd / "checkpoints/400" / name, tree, "x")


# ---------------------------------------------------------------------------
# 4. The first stage: a model directory that fits the config.
# ---------------------------------------------------------------------------


def _vq_dir(path, **params):
  """A model directory holding a (zero) VQ: the tiny recipe's, changed."""
  node = _config().model.params.first_stage_config.to_dict()
  node["params"].update(params)
  module = build.build_model(node)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                       build.param_shapes(module))
  store.save_model_dir(path, node, zeros)
  return path


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
  return _vq_dir(tmp_path_factory.mktemp("vq") / "vq")


def _first_stage_error(config, workdir) -> str:
  with pytest.raises(run_config.ConfigError) as e:
    first_stage.check(config, workdir)
  return str(e.value)


def test_first_stage_that_fits_passes(vq_dir, tmp_path):
  c = _config()
  c.first_stage.checkpoint = str(vq_dir)
  first_stage.check(c, tmp_path)
  c.first_stage.checkpoint = ""
  first_stage.check(c, tmp_path)  # nothing configured, nothing trained yet


def test_missing_first_stage_directory(tmp_path):
  c = _config()
  c.first_stage.checkpoint = str(tmp_path / "vq-f4")
  assert _first_stage_error(c, tmp_path) == (
      f"first_stage.checkpoint={tmp_path / 'vq-f4'}: {tmp_path / 'vq-f4'}: not "
      "a model directory (expected model.yaml and params/); make one with: "
      f"python convert_torch_ckpt.py model.ckpt --out {tmp_path / 'vq-f4'}")


def test_first_stage_with_other_latent_channels(tmp_path):
  path = _vq_dir(tmp_path / "vq4", embed_dim=4)
  c = _config()
  c.first_stage.checkpoint = str(path)
  assert _first_stage_error(c, tmp_path) == (
      f"with first_stage.checkpoint={path}: {UNET}.in_channels=6 but the UNet "
      "sees latent (4) + conditioning (3) channels; use 7")


def test_first_stage_whose_weights_do_not_match_its_model_yaml(vq_dir,
                                                               tmp_path):
  path = tmp_path / "edited"
  shutil.copytree(vq_dir, path)
  doc = yaml.safe_load((path / "model.yaml").read_text())
  doc["model"]["params"]["ddconfig"]["ch"] = 64
  (path / "model.yaml").write_text(yaml.safe_dump(doc))
  message = (f"{path}: params/decoder/conv_in/bias is (128,); the config "
             "builds (256,); model.yaml there does not describe these weights "
             "(edited, or params/ copied from another model?)")
  with pytest.raises(errors.CheckpointMismatchError) as e:
    store.load_model_dir(path)
  assert str(e.value) == message
  c = _config()
  c.first_stage.checkpoint = str(path)
  assert _first_stage_error(c, tmp_path) == (
      f"first_stage.checkpoint={path}: {message}")


def test_first_stage_that_is_not_a_vq(tmp_path):
  node = {"target": build.RESCALER_TARGET,
          "params": {"n_stages": 0, "in_channels": 2, "out_channels": 1}}
  module = build.build_model(node)
  store.save_model_dir(tmp_path / "r", node, jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), build.param_shapes(module)))
  c = _config()
  c.first_stage.checkpoint = str(tmp_path / "r")
  assert _first_stage_error(c, tmp_path) == (
      f"first_stage.checkpoint={tmp_path / 'r'} holds a {build.RESCALER_TARGET}"
      ", not a VQ first stage; convert the VQ (e.g. vq-f4/model.ckpt) and "
      "pass its directory")


# ---------------------------------------------------------------------------
# 5. Disk: free space, an unwritable workdir, a save that fails.
# ---------------------------------------------------------------------------


_Usage = collections.namedtuple("_Usage", "total used free")


def _disk_usage_with_free(free):
  return lambda path: _Usage(10 * free, 9 * free, free)


def test_too_little_free_space_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(shutil, "disk_usage", _disk_usage_with_free(100 << 20))
  with pytest.raises(errors.WorkdirError) as e:
    workdir_files.check_free_space(tmp_path, 3 << 30, keep=3)
  assert str(e.value) == (
      f"workdir {tmp_path}: 100.0 MiB free on its filesystem, but its "
      "checkpoints need 12.2 GiB (4 x 3.0 GiB train state: "
      "train.keep_checkpoints=3 + 1 being written, plus margin); free space, "
      "pass --config.train.keep_checkpoints=1 or use a --workdir on a bigger "
      "disk")
  # A resumed run already holds some: only the rest must fit.
  with pytest.raises(errors.WorkdirError) as e:
    workdir_files.check_free_space(tmp_path, 3 << 30, keep=3, existing=3)
  assert "need 3.1 GiB (1 x 3.0 GiB train state: train.keep_checkpoints=3 " \
         "+ 1 being written, 3 already saved, plus margin)" in str(e.value)
  monkeypatch.setattr(shutil, "disk_usage", _disk_usage_with_free(13 << 30))
  workdir_files.check_free_space(tmp_path, 3 << 30, keep=3)


def test_free_space_estimate_is_the_train_state():
  abstract, _ = _abstract_state(16)
  params = workdir_files.tree_nbytes(abstract.params)
  unet = workdir_files.tree_nbytes(abstract.params["unet"])
  # params + EMA of the UNet + Adam's two moments (+ a step counter).
  assert workdir_files.tree_nbytes(abstract) == pytest.approx(
      params + unet + 2 * params, abs=64)


def test_workdir_under_a_file_is_not_writable(tmp_path):
  (tmp_path / "file").write_text("x")  # fails for root too
  workdir = tmp_path / "file" / "workdir"
  with pytest.raises(errors.WorkdirError) as e:
    workdir_files.ensure_writable(workdir)
  assert str(e.value) == f"workdir {workdir} is not writable: Not a directory"


def test_full_disk_fails_the_write_probe(tmp_path, monkeypatch):
  def full(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

  monkeypatch.setattr(pathlib.Path, "write_bytes", full)
  with pytest.raises(errors.WorkdirError) as e:
    workdir_files.ensure_writable(tmp_path / "run")
  assert str(e.value) == (
      f"workdir {tmp_path / 'run'} is not writable: No space left on device")


_FAILING_SAVE = textwrap.dedent("""
    import pathlib, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
    import ml_collections as mlc
    import numpy as np
    import orbax.checkpoint as ocp
    from segldm_jax.checkpoint import store
    from segldm_jax.config import cli

    def save(mgr, step, n):
      tree = {"w": np.random.default_rng(step).random(n, dtype=np.float32)}
      mgr.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(tree)))

    @cli.main_exits
    def main():
      mgr = store.train_checkpoint_manager(
          pathlib.Path(sys.argv[1]),
          mlc.ConfigDict({"keep_checkpoints": 2, "keep_period": 0}))
      save(mgr, 1, 16)
      mgr.wait_until_finished()
      # Files may not grow past 1 MiB: the 4 MiB save fails in the background.
      resource.setrlimit(resource.RLIMIT_FSIZE,
                         (1 << 20, resource.RLIM_INFINITY))
      save(mgr, 2, 1 << 20)
      print("save 2 returned", flush=True)
      save(mgr, 3, 16)  # waits for save 2 first: its failure surfaces here
      print("save 3 returned", flush=True)

    sys.exit(main())
""")


def test_failed_background_save_ends_the_run_in_one_line(tmp_path):
  r = subprocess.run(
      [sys.executable, "-c", _FAILING_SAVE, str(tmp_path)], cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
      capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stdout == "save 2 returned\n"  # async: the error comes later
  last = r.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      rf"error: saving a checkpoint under {re.escape(str(tmp_path))}/checkpoints "
      r"failed: File too large \([0-9.]+ [KMGT]?i?B free there\); the last "
      r"complete checkpoint \(step 1\) is intact: free space and re-run the "
      r"same command to resume", last), last
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["1"]
