"""Content manifests: a saved array that changed on disk is never used.

Train steps and model directories carry a hash of every array; restoring
checks them. A flipped byte in a train step's array data: the restore names
the array and the step, `restore_latest_intact` sets the step aside and
resumes from the previous one, and sample.py's `restore_params` refuses.
"""

import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections as mlc
import ml_dtypes
import numpy as np
import optax
import pytest

import corruption

from configs import seg_f4
from segldm_jax.checkpoint import manifest
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.errors import CorruptCheckpointError
from segldm_jax.models import build
from segldm_jax.runtime import sharding
from segldm_jax.training import ldm_step


def test_device_and_host_hashes_agree_under_any_sharding():
  rng = np.random.default_rng(0)
  host = {"f32": rng.normal(size=(3, 8, 5)).astype(np.float32),
          "bf16": rng.normal(size=(16,)).astype(ml_dtypes.bfloat16),
          "i32": np.array(7, np.int32),
          "bool": np.array([True, False, True]),
          "u8": rng.integers(0, 255, size=(5, 4)).astype(np.uint8)}
  expected = {k: f"{manifest.numpy_hash(v):08x}" for k, v in host.items()}
  assert manifest.hashes(host) == expected  # numpy leaves
  assert manifest.hashes(jax.tree.map(jnp.asarray, host)) == expected
  mesh = sharding.make_mesh([("data", -1)])
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, "data", None))  # a trailing axis split over 8 devices
  sharded = jax.device_put(host["f32"], split)
  assert manifest.hashes({"f32": sharded})["f32"] == expected["f32"]
  # The on-device reduction (accelerators, arrays split over processes)
  # gives the same numbers, whatever the split.
  on_device = manifest._jax_hash_jit  # pylint: disable=protected-access
  assert f"{int(on_device(sharded)):08x}" == expected["f32"]
  for k, v in host.items():
    assert f"{int(on_device(jnp.asarray(v))):08x}" == expected[k], k
  # Any one changed element changes the hash; so does a swap.
  changed = host["f32"].copy()
  changed[1, 2, 3] = np.nextafter(changed[1, 2, 3], np.float32(9))
  swapped = host["f32"].copy()
  swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
  for other in (changed, swapped):
    assert f"{manifest.numpy_hash(other):08x}" != expected["f32"]
  # float64 (host only) hashes its two words per element; shapes and dtypes
  # are orbax's to check, the hash is of the values' bits.
  x64 = rng.normal(size=5)
  assert manifest.numpy_hash(x64) == manifest.numpy_hash(x64.view(np.uint32))
  assert manifest.numpy_hash(x64) != manifest.numpy_hash(x64 * 2)


@pytest.fixture(scope="module")
def tiny():
  """The tiny recipe's LDM, random weights (no init compile), a mesh."""
  config = seg_f4.get_config("tiny")
  ldm = build.build_model(config.model)
  shapes = saved_shapes.ldm_param_shapes(ldm)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), shapes)
  optimizer = optax.adamw(1e-3)
  abstract = jax.eval_shape(lambda p: ldm_step.init_state(p, optimizer),
                            shapes)
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:2])
  shardings = sharding.shardings_from_rules(abstract, mesh, [(".*", "replicate")])
  return mlc.ConfigDict({"config": config}), ldm, params, optimizer, abstract, shardings


def _workdir_with_two_steps(root: pathlib.Path, tiny) -> pathlib.Path:
  holder, _, params, optimizer, _, _ = tiny
  workdir = root / "run"
  (workdir).mkdir()
  (workdir / workdir_files.CONFIG_FILE).write_text(holder.config.to_json())
  mgr = store.train_checkpoint_manager(
      workdir, mlc.ConfigDict({"keep_checkpoints": 3, "keep_period": 0}))
  for step in (1, 2):
    moved = jax.tree.map(lambda p, s=step: p + s, params)
    store.save_train_state(
        mgr, step, ldm_step.init_state(moved, optimizer))
  mgr.wait_until_finished()
  mgr.close()
  return workdir


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny):
  return _workdir_with_two_steps(tmp_path_factory.mktemp("pristine"), tiny)


def _copy(pristine, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(pristine, tmp_path / "run"))


@pytest.fixture
def corrupt_workdir(tmp_path, pristine):
  workdir = _copy(pristine, tmp_path)
  corruption.flip_array_byte(workdir / workdir_files.CHECKPOINTS_DIR / "2")
  return workdir


def _manager(workdir):
  return store.train_checkpoint_manager(
      workdir, mlc.ConfigDict({"keep_checkpoints": 3, "keep_period": 0}))


NAMED = r"checkpoints/2: array 'params/(unet|cond_stage)/[^']+' does not match "


def test_a_flipped_byte_is_named_on_restore(corrupt_workdir, tiny):
  *_, optimizer, abstract, shardings = tiny
  with _manager(corrupt_workdir) as mgr:
    with pytest.raises(CorruptCheckpointError,
                       match=f"^{corrupt_workdir}: " + NAMED +
                       r"the hash saved with it \([0-9a-f]{8} saved, "
                       r"[0-9a-f]{8} read\): the checkpoint is corrupt"):
      store.restore_train_state(mgr, 2, abstract, shardings,
                                      optimizer.init)


def test_resume_falls_back_to_the_previous_step(corrupt_workdir, tiny, caplog):
  _, _, params, optimizer, abstract, shardings = tiny
  caplog.set_level(logging.WARNING)
  with _manager(corrupt_workdir) as mgr:
    state, step = store.restore_latest_intact(mgr, abstract, shardings,
                                                    optimizer.init)
    assert step == 1 and mgr.all_steps() == [1]
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "does not match" in r.getMessage()]
  assert len(warnings) == 1
  assert warnings[0].endswith("; set aside as 2.corrupt, resuming from the "
                              "previous complete checkpoint")
  assert (corrupt_workdir / workdir_files.CHECKPOINTS_DIR / "2.corrupt").is_dir()
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b + 1)  # step 1's weights, exactly


def test_sampling_refuses_a_corrupt_step(corrupt_workdir, tiny):
  _, ldm, *_ = tiny
  with pytest.raises(CorruptCheckpointError, match=NAMED):
    store.restore_params(corrupt_workdir, ldm)
  params, step = store.restore_params(corrupt_workdir, ldm, step=1)
  assert step == 1 and jax.tree.leaves(params)


def test_no_intact_step_left_is_one_error(tmp_path, tiny, pristine):
  _, _, _, optimizer, abstract, shardings = tiny
  workdir = _copy(pristine, tmp_path)
  for step in ("1", "2"):
    corruption.flip_array_byte(workdir / workdir_files.CHECKPOINTS_DIR / step)
  with _manager(workdir) as mgr:
    with pytest.raises(CorruptCheckpointError) as e:
      store.restore_latest_intact(mgr, abstract, shardings,
                                        optimizer.init)
  assert "checkpoints/2: array 'params/" in str(e.value)
  assert str(e.value).endswith(
      "; no earlier checkpoint is intact: start again in a new --workdir "
      "(the corrupt steps are kept as STEP.corrupt)")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
      "1.corrupt", "2.corrupt"]


def test_model_directory_is_checked(tmp_path, tiny):
  holder, *_ = tiny
  node = holder.config.model.params.first_stage_config.to_dict()
  module = build.build_model(node)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                        build.param_shapes(module))
  path = store.save_model_dir(tmp_path / "vq", node, params)
  assert (path / workdir_files.MANIFEST_FILE).is_file()
  _, restored, _ = store.load_model_dir(path)  # intact: loads
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  files = [p for p in (path / workdir_files.PARAMS_DIR).rglob("*")
           if p.is_file() and p.parent.name == "d"]
  big = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x04
  big.write_bytes(bytes(data))
  with pytest.raises(CorruptCheckpointError,
                     match=f"^{path}: params/ array '[^']+' does not match "):
    store.load_model_dir(path)
