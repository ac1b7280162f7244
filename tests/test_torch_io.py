"""Tests for segldm_jax.convert.torch_io: reading torch.save checkpoints without torch.

Test checkpoints are written by tests/torch_files.py (torch is never needed);
the reference fixtures under tests/fixtures were written by real torch 2.13.
"""

import collections
import json
import mmap
import os
import pathlib
import pickle
import pickletools
import subprocess
import sys
import textwrap
import uuid
import zipfile

import ml_dtypes
import numpy as np
import pytest

import torch_files as tf
from segldm_jax.convert.torch_io import CheckpointError
from segldm_jax.convert.torch_io import ForeignObject
from segldm_jax.convert.torch_io import load_checkpoint
from segldm_jax.convert.torch_io import load_state_dict

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE_CASES = ["ldm_tiny", "rescaler", "unet_tiny", "unet_tiny_ss", "vq_tiny"]
SCHEDULE_BUFFERS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
]
MODEL_CHECKPOINT = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")


def load_error(path, load=load_checkpoint) -> str:
  """Loads expecting CheckpointError; checks the message is one line that
  names the file, and returns it."""
  with pytest.raises(CheckpointError) as info:
    load(path)
  message = str(info.value)
  assert "\n" not in message
  assert os.path.basename(path) in message
  return message


def nbytes_of_tree(obj) -> int:
  return sum(v.size for v in obj.values())


def buffer_owner(array: np.ndarray):
  """The object at the end of an array's `.base` chain."""
  while isinstance(array, np.ndarray) and array.base is not None:
    array = array.base
  return array.obj if isinstance(array, memoryview) else array


# ---------------------------------------------------------------------------
# 1. The reference fixtures (written by real torch 2.13 + Lightning layout).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixture_loads_as_lightning_checkpoint(fixtures_dir, case):
  ckpt = load_checkpoint(fixtures_dir / f"{case}.ckpt")
  assert set(ckpt) == {"epoch", "global_step", "pytorch-lightning_version",
                       "state_dict", "optimizer_states", "lr_schedulers"}
  assert ckpt["pytorch-lightning_version"] == "1.4.2"
  assert ckpt["epoch"] == 0 and ckpt["global_step"] == 0
  assert ckpt["optimizer_states"] == [] and ckpt["lr_schedulers"] == []
  state_dict = load_state_dict(fixtures_dir / f"{case}.ckpt")
  assert list(state_dict) == list(ckpt["state_dict"])
  for name, value in state_dict.items():
    assert isinstance(value, np.ndarray), name
    # Lazy: read-only views of the file map, not copies.
    assert not value.flags.writeable and not value.flags.owndata, name
    assert isinstance(buffer_owner(value), mmap.mmap), name


@pytest.mark.parametrize("case", ["rescaler", "unet_tiny", "unet_tiny_ss",
                                  "vq_tiny"])
def test_fixture_parameter_count_matches_json(fixtures_dir, case):
  meta = json.loads((fixtures_dir / f"{case}.json").read_text())
  state_dict = load_state_dict(fixtures_dir / f"{case}.ckpt")
  # These models register no buffers (no BatchNorm, no VQ remap `used`), so
  # every state_dict entry is a parameter.
  assert all(value.dtype == np.float32 for value in state_dict.values())
  assert nbytes_of_tree(state_dict) == meta["params"]


def test_vq_tiny_values(fixtures_dir):
  state_dict = load_state_dict(fixtures_dir / "vq_tiny.ckpt")
  ref = np.load(fixtures_dir / "vq_tiny.npz")
  assert len(state_dict) == 183
  assert nbytes_of_tree(state_dict) == 779710
  codebook = state_dict["quantize.embedding.weight"]
  assert codebook.shape == (64, 3)
  # The codebook rows picked by the reference indices are exactly `quant`'s.
  rows = codebook[ref["indices_bhw"]].transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(rows, ref["quant_exact_codebook_rows"])
  # h = quant_conv(enc_out), a 1x1 convolution.
  weight = state_dict["quant_conv.weight"][:, :, 0, 0]
  h = np.einsum("oc,bchw->bohw", weight, ref["enc_out"])
  h += state_dict["quant_conv.bias"][None, :, None, None]
  np.testing.assert_allclose(h, ref["h"], atol=1e-5)


def test_rescaler_values(fixtures_dir):
  state_dict = load_state_dict(fixtures_dir / "rescaler.ckpt")
  ref = np.load(fixtures_dir / "rescaler.npz")
  assert list(state_dict) == ["channel_mapper.weight"]
  weight = state_dict["channel_mapper.weight"]
  assert weight.shape == (3, 5, 1, 1)
  # Two bilinear x0.5 stages on even sizes = 4x4 average pooling, then 1x1.
  pooled = ref["x_float"].reshape(2, 5, 8, 4, 8, 4).mean(axis=(3, 5))
  out = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], pooled)
  np.testing.assert_allclose(out, ref["out_float"], atol=1e-5)


def test_ldm_tiny_values(fixtures_dir):
  meta = json.loads((fixtures_dir / "ldm_tiny.json").read_text())
  ref = np.load(fixtures_dir / "ldm_tiny.npz")
  state_dict = load_state_dict(fixtures_dir / "ldm_tiny.ckpt")
  assert len(state_dict) == 454
  assert list(state_dict)[:12] == SCHEDULE_BUFFERS
  for name in SCHEDULE_BUFFERS:
    assert state_dict[name].shape == (1000,)
    assert state_dict[name].dtype == np.float32
    np.testing.assert_array_equal(state_dict[name], ref[f"sched_{name}"])
  assert state_dict["betas"][0] == pytest.approx(0.0015)
  assert state_dict["betas"][-1] == pytest.approx(0.0205)
  assert "lvlb_weights" not in state_dict  # persistent=False in LDM.

  num_updates = state_dict["model_ema.num_updates"]
  assert num_updates.dtype == np.int32 and num_updates.shape == ()
  assert int(num_updates) == meta["model_ema_num_updates"] == 4321
  assert state_dict["model_ema.decay"].dtype == np.float32

  def count(prefix):
    return sum(v.size for k, v in state_dict.items() if k.startswith(prefix))

  assert count("model.diffusion_model.") == meta["params_unet"]
  assert count("first_stage_model.") == meta["params_first_stage"]
  assert count("cond_stage_model.") == meta["params_cond_stage"]
  # LitEma keeps one shadow per UNet parameter, named without the dots.
  unet = {k[len("model."):].replace(".", ""): v for k, v in state_dict.items()
          if k.startswith("model.diffusion_model.")}
  shadows = {k[len("model_ema."):]: v for k, v in state_dict.items()
             if k.startswith("model_ema.diffusion_model")}
  assert {k: v.shape for k, v in shadows.items()} == {
      k: v.shape for k, v in unet.items()}
  assert any(not np.array_equal(shadows[k], unet[k]) for k in unet)


# ---------------------------------------------------------------------------
# 2. Round trips through tests/torch_files.py.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [
    np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64, np.int32,
    np.int16, np.int8, np.uint8, np.bool_, np.complex64,
])
def test_round_trip_dtypes(tmp_path, dtype):
  values = np.array([[0, 1, -2.5], [3.25, 100, -7]], np.float64)
  if dtype == np.bool_:
    values = values > 0
  if dtype == np.uint8:
    values = np.abs(values)
  array = values.astype(dtype)
  path = tmp_path / "m.pt"
  tf.save_torch(path, {"w": array, "scalar": np.array(array[1, 2])})
  state_dict = load_state_dict(path)
  assert state_dict["w"].dtype == np.dtype(dtype)
  assert state_dict["w"].shape == (2, 3)
  np.testing.assert_array_equal(state_dict["w"], array)
  assert state_dict["scalar"].shape == ()
  assert state_dict["scalar"] == array[1, 2]


def test_round_trip_views_offsets_and_shared_storage(tmp_path):
  base = np.arange(24, dtype=np.float32)
  storage = tf.Storage(base)
  path = tmp_path / "views.pt"
  tf.save_torch(path, {"state_dict": {
      # A transposed (non-contiguous) 3x4 view starting at element 2.
      "transposed": tf.Tensor(storage, (3, 4), (1, 6), offset=2),
      # A contiguous 2x2 block at the end of the same storage.
      "tail": tf.Tensor(storage, (2, 2), offset=20),
      "expanded": tf.Tensor(storage, (4, 3), (0, 1), offset=5),
      "empty": tf.Tensor(storage, (0, 3), offset=24),
      "whole": tf.Tensor(storage, (24,)),
  }})
  ckpt = load_checkpoint(path)
  state_dict = ckpt["state_dict"]
  np.testing.assert_array_equal(
      state_dict["transposed"],
      [[2, 8, 14, 20], [3, 9, 15, 21], [4, 10, 16, 22]])
  np.testing.assert_array_equal(state_dict["tail"], [[20, 21], [22, 23]])
  np.testing.assert_array_equal(state_dict["expanded"],
                                np.tile([5, 6, 7], (4, 1)))
  assert state_dict["empty"].shape == (0, 3)
  np.testing.assert_array_equal(state_dict["whole"], base)
  # One storage in the file, so all views share memory.
  with zipfile.ZipFile(path) as zf:
    assert [n for n in zf.namelist() if "/data/" in n] == ["archive/data/0"]
  for name in ("transposed", "tail", "expanded"):
    assert np.shares_memory(state_dict[name], state_dict["whole"]), name
    assert not state_dict[name].flags.writeable


def test_plain_module_state_dict_with_metadata(tmp_path):
  # torch.save(model.state_dict()): an OrderedDict carrying `_metadata`.
  state_dict = collections.OrderedDict(
      [("0.weight", np.ones((2, 2), np.float32)),
       ("0.bias", np.zeros(2, np.float32)),
       ("1.num_batches_tracked", np.array(5, np.int64))])
  state_dict._metadata = collections.OrderedDict(
      [("", {"version": 1}), ("0", {"version": 1})])
  path = tmp_path / "sd.pth"
  tf.save_torch(path, state_dict)
  raw = load_checkpoint(path)
  assert isinstance(raw, collections.OrderedDict)
  assert raw._metadata["0"] == {"version": 1}
  loaded = load_state_dict(path)
  assert type(loaded) is dict
  assert list(loaded) == ["0.weight", "0.bias", "1.num_batches_tracked"]
  assert loaded["1.num_batches_tracked"] == 5
  assert loaded["1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("layout", [
    dict(prefix="archive"),
    dict(prefix="my_model"),
    dict(prefix="archive", align=0),
    dict(prefix="archive", byteorder=None),
    dict(prefix="archive", compress=True),
])
def test_zip_layout_variants(tmp_path, layout):
  array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  path = tmp_path / "v.ckpt"
  tf.save_torch(path, {"state_dict": {"a": array, "b": array[::2]}}, **layout)
  state_dict = load_state_dict(path)
  np.testing.assert_array_equal(state_dict["a"], array)
  np.testing.assert_array_equal(state_dict["b"], array[::2])


def test_storages_are_64_byte_aligned_like_torch(tmp_path):
  path = tmp_path / "a.ckpt"
  tf.save_torch(path, {"state_dict": {"a": np.ones(3, np.float32),
                                      "b": np.ones(5, np.float64)}})
  state_dict = load_state_dict(path)
  for value in state_dict.values():
    assert value.ctypes.data % 64 == 0 and value.flags.aligned
  # Also with torch's own files.
  fixture = load_state_dict(REPO_ROOT / "tests/fixtures/unet_tiny.ckpt")
  assert all(v.ctypes.data % 64 == 0 for v in fixture.values() if v.ndim == 1)


def test_big_endian_byteorder(tmp_path):
  values = {
      "f": np.array([1.5, -2.0, 3.0], np.float32),
      "i": np.array([1, -300], np.int64),
      "h": np.array([0.5, 7], ml_dtypes.bfloat16),
      "c": np.array([1 + 2j], np.complex64),
  }
  storages = {k: tf.Storage(v) for k, v in values.items()}
  pkl, _ = tf.dumps_torch(
      {k: tf.Tensor(storages[k], v.shape) for k, v in values.items()})
  swapped = {}
  for key, (name, value) in zip(map(str, range(4)), values.items()):
    raw = np.frombuffer(value.tobytes(), np.uint8)
    width = 4 if name == "c" else value.dtype.itemsize
    swapped[key] = raw.reshape(-1, width)[:, ::-1].tobytes()
  path = tmp_path / "be.pt"
  tf.write_torch_zip(path, pkl, swapped, byteorder="big")
  loaded = load_checkpoint(path)
  for name, value in values.items():
    assert loaded[name].dtype == value.dtype
    np.testing.assert_array_equal(loaded[name], value)


def test_plain_metadata_values(tmp_path):
  path = tmp_path / "meta.ckpt"
  tf.save_torch(path, {
      "state_dict": {"w": np.ones(1, np.float32)},
      "np_float": np.float32(1.25), "np_int": np.int64(-7),
      "np_bool": np.bool_(True), "bytes": b"\x00\xff", "set": {1, 2},
      "frozen": frozenset({"a"}), "tuple": (1, "x", None), "complex": 1 + 2j,
      "nested": {"lr": [1e-4, 2e-4], "betas": (0.9, 0.999), "flag": False},
  })
  ckpt = load_checkpoint(path)
  assert ckpt["np_float"] == np.float32(1.25)
  assert type(ckpt["np_float"]) is np.float32
  assert type(ckpt["np_int"]) is np.int64 and ckpt["np_int"] == -7
  assert ckpt["np_bool"] is np.True_
  assert ckpt["bytes"] == b"\x00\xff"
  assert ckpt["set"] == {1, 2} and ckpt["frozen"] == frozenset({"a"})
  assert ckpt["tuple"] == (1, "x", None) and ckpt["complex"] == 1 + 2j
  assert ckpt["nested"] == {"lr": [1e-4, 2e-4], "betas": (0.9, 0.999),
                            "flag": False}


def test_torch_dtype_and_parameter_globals(tmp_path):
  # What newer torch writes: _rebuild_tensor_v3 on an untyped storage with a
  # dtype global, tensors wrapped as Parameters, and _rebuild_from_type_v2.
  raw = np.array([1, 65535, 7], np.uint16)
  untyped = tf.Storage(raw.view(np.uint8), storage_name="UntypedStorage")
  v3 = tf.Reduce(tf.Global("torch._utils", "_rebuild_tensor_v3"),
                 (untyped, 0, (3,), (1,), False, collections.OrderedDict(),
                  tf.Global("torch", "uint16")))
  param = tf.Reduce(tf.Global("torch._utils", "_rebuild_parameter"),
                    (np.full((2,), 3.0, np.float32), True,
                     collections.OrderedDict()))
  from_type = tf.Reduce(
      tf.Global("torch._tensor", "_rebuild_from_type_v2"),
      (tf.Global("torch._utils", "_rebuild_tensor_v2"),
       tf.Global("torch", "Tensor"),
       (tf.Storage(np.array([4.0, 5.0], np.float32)), 1, (1,), (1,), False,
        collections.OrderedDict()), {"foo": "bar"}))
  path = tmp_path / "new.pt"
  tf.save_torch(path, {"u16": v3, "param": param, "attr": from_type})
  state_dict = load_state_dict(path)
  assert state_dict["u16"].dtype == np.uint16
  np.testing.assert_array_equal(state_dict["u16"], raw)
  np.testing.assert_array_equal(state_dict["param"], [3.0, 3.0])
  np.testing.assert_array_equal(state_dict["attr"], [5.0])


def test_lightning_metadata_becomes_inert_placeholders(tmp_path):
  callback = tf.Global.of(MODEL_CHECKPOINT)
  path = tmp_path / "pl.ckpt"
  tf.save_torch(path, {
      "state_dict": {"w": np.arange(3, dtype=np.float32)},
      # Lightning 1.x: callback states keyed by the callback class itself.
      "callbacks": {callback: {"best_model_score": np.array(0.5, np.float32),
                               "dirpath": "/runs/x"}},
      # An instance, pickled by __reduce__ + BUILD.
      "trainer_callback": tf.Reduce(callback, (), {"monitor": "val/loss",
                                                   "save_top_k": 3}),
      "hparams": tf.Reduce(tf.Global("argparse", "Namespace"), (),
                           {"lr": 1e-4}),
      "config": tf.Reduce(tf.Global("omegaconf.dictconfig", "DictConfig"), (),
                          {"_metadata": tf.Reduce(
                              tf.Global("omegaconf.base", "ContainerMetadata"),
                              (), {"ref_type": tf.Global("typing", "Any")})}),
  })
  ckpt = load_checkpoint(path)
  (key, value), = ckpt["callbacks"].items()
  assert isinstance(key, type) and issubclass(key, ForeignObject)
  assert key.qualified_name() == MODEL_CHECKPOINT
  assert value["dirpath"] == "/runs/x" and value["best_model_score"] == 0.5
  instance = ckpt["trainer_callback"]
  assert isinstance(instance, key)  # Same placeholder class for one global.
  assert instance.state == {"monitor": "val/loss", "save_top_k": 3}
  assert instance.args == ()
  assert ckpt["hparams"].qualified_name() == "argparse.Namespace"
  assert ckpt["hparams"].state == {"lr": 1e-4}
  metadata = ckpt["config"].state["_metadata"]
  assert metadata.qualified_name() == "omegaconf.base.ContainerMetadata"
  assert metadata.state["ref_type"].qualified_name() == "typing.Any"
  assert "pytorch_lightning" not in sys.modules
  np.testing.assert_array_equal(load_state_dict(path)["w"], [0, 1, 2])


# ---------------------------------------------------------------------------
# 3. Malicious pickles: refused, and nothing runs.
# ---------------------------------------------------------------------------


def _write_payload(tmp_path, value_ops: bytes, protocol: int = 2):
  path = tmp_path / "evil.ckpt"
  tf.write_torch_zip(path, tf.checkpoint_pickle_with(value_ops, protocol), {})
  return path


def _globals_in(pkl: bytes) -> list:
  """The globals a pickle names, read by disassembly (nothing is run)."""
  found, strings = [], []
  for opcode, arg, _ in pickletools.genops(pkl):
    if opcode.name == "GLOBAL":
      found.append(arg.replace(" ", "."))
    elif opcode.name == "STACK_GLOBAL":
      found.append(".".join(strings[-2:]))
    elif isinstance(arg, str):
      strings.append(arg)
  return found


def _shell_payloads(marker: str) -> dict:
  """name -> opcodes that, under a plain unpickler, create `marker`."""
  touch = f"touch {marker}"
  return {
      "os.system": tf.op_call(tf.op_global("os.system"), tf.op_str(touch)),
      "posix.system": tf.op_call(tf.op_global("posix.system"),
                                 tf.op_str(touch)),
      "builtins.eval": tf.op_call(
          tf.op_global("builtins.eval"),
          tf.op_str(f"__import__('os').system({touch!r})")),
      "builtins.exec": tf.op_call(
          tf.op_global("builtins.exec"),
          tf.op_str(f"open({marker!r}, 'w').close()")),
      "subprocess.Popen": tf.op_call(
          tf.op_global("subprocess.Popen"),
          tf.op_tuple(tf.op_str("touch"), tf.op_str(marker))),
      # getattr(__import__('os'), 'system')('touch ...')
      "builtins.getattr": tf.op_call(tf.op_call(
          tf.op_global("builtins.getattr"),
          tf.op_call(tf.op_global("builtins.__import__"), tf.op_str("os")),
          tf.op_str("system")), tf.op_str(touch)),
      # Python 2 spelling, mapped to builtins by pickle's own find_class.
      "builtins.eval (py2 name)": tf.op_call(
          tf.op_global("__builtin__.eval"),
          tf.op_str(f"__import__('os').system({touch!r})")),
      # A numpy function that calls exec(): numpy is not wildcard-allowed.
      "numpy.testing._private.utils.runstring": tf.op_call(
          tf.op_global("numpy.testing._private.utils.runstring"),
          tf.op_str(f"open({marker!r}, 'w').close()"),
          pickle.EMPTY_DICT),
  }


@pytest.mark.parametrize("name", list(_shell_payloads("/m")))
def test_malicious_global_is_refused_and_not_run(tmp_path, name):
  marker = tmp_path / "PWNED"
  ops = _shell_payloads(str(marker))[name]
  qualified = name.split(" ")[0]
  path = _write_payload(tmp_path, ops)
  # The payload is what it claims: it names the callable and calls it.
  pkl = tf.checkpoint_pickle_with(ops)
  assert _globals_in(pkl)[0] in (qualified, "__builtin__.eval")
  assert any(op.name == "REDUCE" for op, _, _ in pickletools.genops(pkl))
  assert str(marker) in pkl.decode("latin-1")

  message = load_error(path)
  assert f"'{qualified}'" in message
  assert "nothing was executed" in message
  assert not marker.exists()
  load_error(path, load_state_dict)
  assert not marker.exists()


def test_stack_global_payload_is_refused(tmp_path):
  marker = tmp_path / "PWNED"
  ops = tf.op_call(tf.op_global("os.system", stack=True),
                   tf.op_str(f"touch {marker}"))
  path = _write_payload(tmp_path, ops, protocol=4)
  assert _globals_in(tf.checkpoint_pickle_with(ops, 4)) == ["os.system"]
  assert "'os.system'" in load_error(path)
  assert not marker.exists()


@pytest.mark.parametrize("importer", ["importlib.import_module",
                                      "builtins.__import__", "module_global"])
def test_arbitrary_module_is_never_imported(tmp_path, monkeypatch, importer):
  # A module whose import alone creates the marker.
  marker = tmp_path / "IMPORTED"
  module = f"evil_{uuid.uuid4().hex}"
  (tmp_path / f"{module}.py").write_text(
      f"open({str(marker)!r}, 'w').close()\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  if importer == "module_global":
    ops, qualified = tf.op_global(f"{module}.anything"), f"{module}.anything"
  else:
    ops = tf.op_call(tf.op_global(importer), tf.op_str(module))
    qualified = importer
  path = _write_payload(tmp_path, ops)
  assert f"'{qualified}'" in load_error(path)
  assert not marker.exists()
  assert module not in sys.modules


def test_internal_markers_cannot_be_modified(tmp_path):
  # BUILD on the stand-in for torch.FloatStorage, trying to change its dtype
  # to object (which would read file bytes as pointers).
  ops = (tf.op_global("torch.FloatStorage") + pickle.EMPTY_DICT +
         tf.op_str("dtype") + tf.op_str("O") + pickle.SETITEM + pickle.BUILD)
  message = load_error(_write_payload(tmp_path, ops))
  assert "corrupt or unsupported pickle in data.pkl (AttributeError" in message
  # Slot state, the other BUILD form.
  ops = (tf.op_global("torch.FloatStorage") + pickle.NONE + pickle.EMPTY_DICT +
         tf.op_str("dtype") + tf.op_str("O") + pickle.SETITEM + pickle.TUPLE2 +
         pickle.BUILD)
  assert "modify internal object" in load_error(_write_payload(tmp_path, ops))


@pytest.mark.parametrize("ops, expected", [
    # A persistent id that is not a storage record.
    (tf.op_str("x") + pickle.BINPERSID, "unexpected persistent id"),
    (tf.op_tuple(tf.op_str("storage"), tf.op_str("FloatStorage"),
                 tf.op_str("0"), tf.op_str("cpu"), pickle.NONE) +
     pickle.BINPERSID, "not a storage type"),
    # A tensor built on something that is not a storage.
    (tf.op_call(tf.op_global("torch._utils._rebuild_tensor_v2"),
                pickle.EMPTY_LIST, b"K\x00", tf.op_tuple(), tf.op_tuple()),
     "not a storage"),
    # Unsupported tensor kinds get their own message.
    (tf.op_global("torch._utils._rebuild_qtensor"), "does not support"),
    # Internal torch functions are not wildcard-allowed.
    (tf.op_global("torch.load"), "'torch.load'"),
    (tf.op_global("torch.serialization._load"), "'torch.serialization._load'"),
    # bytes(n) would allocate n bytes.
    (tf.op_call(tf.op_global("__builtin__.bytes"), b"J\xff\xff\xff\x7f"),
     "unexpected arguments"),
])
def test_malformed_records_are_refused(tmp_path, ops, expected):
  assert expected in load_error(_write_payload(tmp_path, ops))


# ---------------------------------------------------------------------------
# 4. Broken files: one-line messages naming the file and the problem.
# ---------------------------------------------------------------------------


@pytest.fixture
def good_ckpt(tmp_path):
  path = tmp_path / "good.ckpt"
  tf.save_torch(path, {"state_dict": {"w": np.arange(1000, dtype=np.float32)}})
  return path


def test_error_type():
  assert issubclass(CheckpointError, ValueError)


def test_truncated_zip(tmp_path, good_ckpt):
  data = good_ckpt.read_bytes()
  for cut in (len(data) // 2, len(data) - 10):
    path = tmp_path / f"cut{cut}.ckpt"
    path.write_bytes(data[:cut])
    assert "truncated or not a zip archive" in load_error(path)


def test_random_bytes(tmp_path):
  path = tmp_path / "noise.ckpt"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  assert "not a PyTorch checkpoint" in load_error(path)


def test_legacy_format(tmp_path):
  # What torch.save(..., _use_new_zipfile_serialization=False) starts with:
  # the magic number as a protocol-2 LONG1.
  path = tmp_path / "old.pth"
  path.write_bytes(b"\x80\x02\x8a\x0a" + (0x1950a86a20f9469cfc6c).to_bytes(
      10, "little") + b".\x80\x02M\xe9\x03.")
  message = load_error(path)
  assert "legacy (non-zip) torch.save format" in message
  assert "torch>=1.6" in message


def test_other_formats(tmp_path):
  path = tmp_path / "plain.pkl"
  path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
  assert "a bare pickle, not a torch.save zip" in load_error(path)
  path = tmp_path / "w.safetensors"
  path.write_bytes(b"\x10" + b"\x00" * 7 + b'{"__metadata__":{}}')
  assert "safetensors" in load_error(path)


def test_corrupt_compressed_entry(tmp_path):
  path = tmp_path / "deflated.ckpt"
  data = np.arange(4096, dtype=np.float32)
  tf.save_torch(path, {"w": data}, compress=True)
  np.testing.assert_array_equal(load_state_dict(path)["w"], data)
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("archive/data/0")
  raw = bytearray(path.read_bytes())
  # Damage the deflated storage bytes (after its 30-byte header and name).
  start = info.header_offset + 30 + len(info.filename) + 40
  raw[start:start + 16] = b"\xff" * 16
  path.write_bytes(bytes(raw))
  assert "zip entry 'archive/data/0' is corrupt" in load_error(path)


def test_falls_back_to_reading_when_mmap_fails(tmp_path, monkeypatch):
  path = tmp_path / "nomap.ckpt"
  data = np.arange(10, dtype=np.int64)
  tf.save_torch(path, {"w": data, "v": tf.Tensor.of(data[::-1].copy())})

  def no_mmap(*args, **kwargs):
    raise OSError("mmap not supported")

  monkeypatch.setattr(mmap, "mmap", no_mmap)
  state_dict = load_state_dict(path)
  np.testing.assert_array_equal(state_dict["w"], data)
  np.testing.assert_array_equal(state_dict["v"], data[::-1])


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / "nopkl.ckpt"
  tf.write_torch_zip(path, b"", {"0": b"\x00" * 8}, include_pickle=False)
  assert "without <folder>/data.pkl" in load_error(path)
  npz = tmp_path / "arrays.npz"
  np.savez(npz, a=np.ones(3))
  assert "not a torch.save checkpoint" in load_error(npz)


def test_truncated_pickle(tmp_path, good_ckpt):
  pkl, storages = tf.dumps_torch({"state_dict": {"w": np.ones(3, np.float32)}})
  path = tmp_path / "halfpkl.ckpt"
  tf.write_torch_zip(path, pkl[:len(pkl) // 2], storages)
  assert "corrupt or unsupported pickle in data.pkl" in load_error(path)


def test_missing_empty_and_directory(tmp_path):
  assert "no such file" in load_error(tmp_path / "nope.ckpt")
  (tmp_path / "empty.ckpt").write_bytes(b"")
  assert "empty file" in load_error(tmp_path / "empty.ckpt")
  (tmp_path / "dir.ckpt").mkdir()
  assert "directory" in load_error(tmp_path / "dir.ckpt")


def test_no_state_dict(tmp_path):
  path = tmp_path / "model_only.ckpt"
  tf.save_torch(path, {"model": {"w": np.ones(2, np.float32)}, "epoch": 3})
  assert load_checkpoint(path)["epoch"] == 3
  message = load_error(path, load_state_dict)
  assert "no 'state_dict' entry" in message
  assert "'model'" in message and "'epoch'" in message
  path = tmp_path / "list.ckpt"
  tf.save_torch(path, [np.ones(2, np.float32)])
  assert "holds a list, not a state_dict" in load_error(path, load_state_dict)
  path = tmp_path / "bad_entry.ckpt"
  tf.save_torch(path, {"state_dict": {"w": np.ones(2, np.float32), "n": 3}})
  assert "entry 'n' is a int" in load_error(path, load_state_dict)


def test_storage_points_to_missing_entry(tmp_path):
  pkl, _ = tf.dumps_torch({"state_dict": {"w": np.ones(3, np.float32)}})
  path = tmp_path / "missing.ckpt"
  tf.write_torch_zip(path, pkl, {})
  message = load_error(path)
  assert "storage '0' points to missing zip entry 'archive/data/0'" in message


def test_tensor_beyond_its_storage(tmp_path):
  storage = tf.Storage(np.arange(10, dtype=np.float32))
  path = tmp_path / "overrun.ckpt"
  tf.save_torch(path, {"state_dict": {"w": tf.Tensor(storage, (4, 4))}})
  message = load_error(path)
  assert "reaches element 15 of storage '0', which has only 10" in message
  tf.save_torch(path, {"w": tf.Tensor(storage, (2,), (5,), offset=6)})
  assert "reaches element 11" in load_error(path)


def test_absurd_sizes(tmp_path):
  path = tmp_path / "absurd.ckpt"
  # A storage record claiming 1e18 elements for a 40-byte entry.
  storage = tf.Storage(np.arange(10, dtype=np.float32), declared_numel=10**18)
  tf.save_torch(path, {"w": tf.Tensor(storage, (10,))})
  message = load_error(path)
  assert "declares 1000000000000000000 float32 elements" in message
  assert "holds 40 bytes" in message
  # A stride-0 view of 1e21 elements on a valid one-element storage.
  storage = tf.Storage(np.ones(1, np.float32))
  tf.save_torch(path, {"w": tf.Tensor(storage, (10**7,) * 3, (0, 0, 0))})
  assert "refusing absurd size" in load_error(path)


def test_recursive_structures(tmp_path):
  loop = []
  loop.append(loop)
  cycle = {"name": "d"}
  cycle["self"] = cycle
  path = tmp_path / "loops.ckpt"
  tf.save_torch(path, {"state_dict": {"w": np.ones(2, np.float32)},
                       "loop": loop, "cycle": cycle, "tup": (loop, cycle)})
  ckpt = load_checkpoint(path)
  assert ckpt["loop"][0] is ckpt["loop"]
  assert ckpt["cycle"]["self"] is ckpt["cycle"]
  assert ckpt["tup"][0] is ckpt["loop"]
  np.testing.assert_array_equal(load_state_dict(path)["w"], [1, 1])
  # A state_dict that contains itself is not a flat mapping of tensors.
  cycle = {"w": np.ones(1, np.float32)}
  cycle["me"] = cycle
  tf.save_torch(path, cycle)
  assert "no 'state_dict' entry" in load_error(path, load_state_dict)


def test_deep_nesting(tmp_path):
  deep = []
  for _ in range(20000):
    deep = [deep]
  path = tmp_path / "deep.ckpt"
  pkl = (pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * 20000 +
         pickle.APPEND * 19999 + pickle.STOP)
  tf.write_torch_zip(path, pkl, {})
  loaded = load_checkpoint(path)
  depth = 0
  while loaded:
    loaded, depth = loaded[0], depth + 1
  assert depth == 19999


# ---------------------------------------------------------------------------
# 5. Memory: a large checkpoint is mapped, not copied.
# ---------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    sys.modules["torch"] = None  # Any `import torch` now fails.
    import numpy as np
    from segldm_jax.convert.torch_io import load_state_dict

    def rss_anon():
      try:
        for line in open("/proc/self/status"):
          if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
      except OSError:
        pass
      return None

    scale = 1024 if sys.platform.startswith("linux") else 1
    def peak():
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    base_peak, base_anon = peak(), rss_anon()
    sd = load_state_dict(sys.argv[1])
    after_load = peak()
    sums = {k: float(v.sum(dtype=np.float64)) for k, v in sd.items()}
    firsts = {k: v[:2, :3].tolist() for k, v in sd.items()}
    anon = rss_anon()
    print(json.dumps(dict(
        base_peak=base_peak, after_load=after_load, after_touch=peak(),
        anon_growth=None if anon is None else anon - base_anon,
        sums=sums, firsts=firsts, shapes={k: v.shape for k, v in sd.items()})))
""")


def test_large_checkpoint_is_memory_mapped(tmp_path):
  rows, cols, n_tensors = 25_600, 1024, 3  # 3 x 100 MiB of float32.
  pattern = np.arange(cols, dtype=np.float32)

  def chunks(i):
    block = (pattern + i * cols).tobytes() * 1024  # 1024 rows, 4 MiB.
    return lambda: (block for _ in range(rows // 1024))

  tensors = {
      f"t{i}": tf.Tensor(tf.Storage(dtype=np.float32, numel=rows * cols,
                                    chunks=chunks(i)), (rows, cols))
      for i in range(n_tensors)
  }
  path = tmp_path / "big.ckpt"
  tf.save_torch(path, {"state_dict": tensors})
  file_size = path.stat().st_size
  assert file_size > 300 * 2**20

  result = subprocess.run(
      [sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True,
      text=True, check=True, timeout=120,
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  probe = json.loads(result.stdout)
  for i in range(n_tensors):
    assert probe["shapes"][f"t{i}"] == [rows, cols]
    expected = rows * float(np.sum(pattern + i * cols, dtype=np.float64))
    assert probe["sums"][f"t{i}"] == expected
    assert probe["firsts"][f"t{i}"] == [[i * cols + j for j in range(3)]] * 2
  # Lazy: loading maps the file and checksums it, but keeps (almost) none of
  # its pages.
  assert probe["after_load"] - probe["base_peak"] < 0.05 * file_size
  # Touching everything costs the file's pages once, not a second copy.
  assert probe["after_touch"] - probe["base_peak"] < 1.5 * file_size
  if probe["anon_growth"] is not None:  # Linux: no private copy at all.
    assert probe["anon_growth"] < 0.05 * file_size
