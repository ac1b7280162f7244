"""convert_torch_ckpt.py end to end, and the converter's errors and reports.

Every fixture checkpoint goes through the CLI (in-process) into a model
directory or workdir, which must load back to exactly the parameters that
`convert.convert_checkpoint` returns. Broken and extended checkpoints are
written with tests/torch_files.py (no torch): loss.* tensors of a trained
VQGAN are ignored and listed, a missing / unexpected / misshaped tensor is an
error that names it, and nothing is written then.
"""

import functools
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
import yaml

import torch_files
from segldm_jax import convert
from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.convert import infer_config
from segldm_jax.convert import torch_io
from segldm_jax.models import build

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
import convert_torch_ckpt  # noqa: E402  pylint: disable=g-import-not-at-top

FIXTURES = pathlib.Path(os.environ.get(
    "SEGLDM_FIXTURES", pathlib.Path(__file__).parent / "fixtures"))
CASES = sorted(p.stem for p in FIXTURES.glob("*.ckpt")
               if p.with_suffix(".yaml").exists())
LOSS_REASON = convert.IGNORED_PREFIXES["loss."]


@functools.cache
def _state_dict(name: str) -> dict[str, np.ndarray]:
  return torch_io.load_state_dict(FIXTURES / f"{name}.ckpt")


@functools.cache
def _converted(name: str) -> convert.Converted:
  return convert.convert_checkpoint(FIXTURES / f"{name}.ckpt",
                                    FIXTURES / f"{name}.yaml")


def _flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same(got, want) -> None:
  """Same paths, float32, exactly equal values."""
  got, want = _flat(got), _flat(want)
  assert sorted(got) == sorted(want)
  for path, w in want.items():
    assert got[path].dtype == np.float32, path
    np.testing.assert_array_equal(got[path], w, err_msg=path)


def _cli(capsys, *argv) -> tuple[int, str, str]:
  rc = convert_torch_ckpt.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _write(path: pathlib.Path, state_dict, **extra) -> pathlib.Path:
  """A Lightning-style checkpoint (what the fixtures are) with `state_dict`."""
  torch_files.save_torch(path, {"epoch": 0, "global_step": 0, **extra,
                                "state_dict": dict(state_dict)})
  return path


def _with(name: str, drop=(), **add) -> dict[str, np.ndarray]:
  sd = {k: v for k, v in _state_dict(name).items() if k not in drop}
  for k in drop:
    assert k in _state_dict(name), k
  sd.update(add)
  return sd


def test_fixture_folder_has_checkpoints():
  assert {"vq_tiny", "unet_tiny", "unet_tiny_ss", "ldm_tiny",
          "rescaler"} <= set(CASES), CASES


# --- 1. every fixture through the CLI ---------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_cli_converts_fixture(case, tmp_path, capsys):
  out = tmp_path / "out"
  rc, stdout, _ = _cli(capsys, FIXTURES / f"{case}.ckpt", "--config",
                       FIXTURES / f"{case}.yaml", "--out", out)
  assert rc == 0
  conv = _converted(case)
  report = conv.report
  assert f"used {len(report.used)} tensors, ignored {len(report.ignored)}" in stdout
  assert report.summary() in stdout
  assert (out / "report.txt").read_text() == report.summary() + "\n"
  # Every tensor of the file is accounted for, once.
  assert len(report.used) == len(set(report.used))
  assert not set(report.used) & set(report.ignored)
  assert set(report.used) | set(report.ignored) == set(_state_dict(case))

  if conv.kind != "ldm":
    module, params, node = store.load_model_dir(out)
    assert type(module) is type(conv.model)
    assert node["target"] == conv.node["target"]
    _assert_same(params, conv.params)
    return

  config = json.loads((out / workdir_files.CONFIG_FILE).read_text())
  assert config["model"] == json.loads(json.dumps(conv.node))
  _, fs_params, fs_node = store.load_model_dir(out / config["first_stage"][
      "checkpoint"])
  assert fs_node == json.loads(json.dumps(conv.node["params"]["first_stage_config"]))
  _assert_same(fs_params, conv.params["first_stage"])

  ldm = build.build_model(config["model"])
  assert conv.ema is not None
  ema, step = store.restore_params(out, ldm, use_ema=True)
  assert step == conv.meta.get("global_step", 0)
  _assert_same(ema, {"unet": conv.ema["unet"],
                     "cond_stage": conv.params["cond_stage"]})
  live, _ = store.restore_params(out, ldm, use_ema=False)
  _assert_same(live, {k: conv.params[k] for k in ("unet", "cond_stage")})
  # The fixtures' EMA differs from the live weights, so the two are told apart.
  assert any(not np.array_equal(a, b) for a, b in
             zip(_flat(ema["unet"]).values(), _flat(live["unet"]).values()))


def test_cli_no_ema_writes_live_unet_only(tmp_path, capsys):
  ckpt = _write(tmp_path / "ldm.ckpt", _state_dict("ldm_tiny"),
                global_step=1234)
  out = tmp_path / "out"
  rc, stdout, _ = _cli(capsys, ckpt, "--config", FIXTURES / "ldm_tiny.yaml",
                       "--out", out, "--no-ema")
  assert rc == 0
  assert "UNet weights: live)" in stdout
  # Lightning's global_step numbers the workdir's step.
  assert [p.name for p in (out / workdir_files.CHECKPOINTS_DIR).iterdir()
          if p.name.isdigit()] == ["1234"]
  assert not (out / workdir_files.CHECKPOINTS_DIR / "1234" / "ema_params").exists()
  conv = _converted("ldm_tiny")
  params, step = store.restore_params(out, conv.model, use_ema=True)
  assert step == 1234
  _assert_same(params, {k: conv.params[k] for k in ("unet", "cond_stage")})
  # The EMA tensors are reported as ignored, not silently dropped.
  shadow = [k for k in conv.report.used if k.startswith(convert.EMA_PREFIX)]
  assert shadow
  assert f"ignored {len(shadow)} (EMA weights (--no-ema))" in stdout
  assert (f"used {len(conv.report.used) - len(shadow)} tensors, ignored "
          f"{len(conv.report.ignored) + len(shadow)}") in stdout


# --- 2. ignored keys ---------------------------------------------------------


def _loss_tensors(prefix: str = "") -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      prefix + "loss.discriminator.main.0.weight":
          rng.standard_normal((64, 3, 4, 4), dtype=np.float32),
      prefix + "loss.perceptual_loss.net.slice1.0.weight":
          rng.standard_normal((64, 3, 3, 3), dtype=np.float32),
      prefix + "loss.discriminator.main.1.num_batches_tracked":
          np.asarray(5000, np.int64),
      prefix + "loss.logvar": np.zeros((), np.float32),
  }


def test_vq_training_loss_is_ignored_and_listed(tmp_path, capsys):
  loss = _loss_tensors()
  ckpt = _write(tmp_path / "vq.ckpt", _with("vq_tiny", **loss))
  out = tmp_path / "out"
  rc, stdout, _ = _cli(capsys, ckpt, "--config", FIXTURES / "vq_tiny.yaml",
                       "--out", out)
  assert rc == 0
  base = _converted("vq_tiny").report
  assert f"used {len(base.used)} tensors, ignored {len(loss)}" in stdout
  assert f"ignored {len(loss)} ({LOSS_REASON}): " in stdout
  for key in loss:
    assert key in stdout
  _, params, _ = store.load_model_dir(out)
  _assert_same(params, _converted("vq_tiny").params)


def test_ldm_first_stage_loss_is_ignored_and_listed(tmp_path):
  loss = _loss_tensors("first_stage_model.")
  ckpt = _write(tmp_path / "ldm.ckpt", _with("ldm_tiny", **loss))
  conv = convert.convert_checkpoint(ckpt, FIXTURES / "ldm_tiny.yaml")
  base = _converted("ldm_tiny")
  for key in loss:
    assert conv.report.ignored[key] == LOSS_REASON
    assert key in conv.report.summary()
  assert sorted(conv.report.used) == sorted(base.report.used)
  _assert_same(conv.params, base.params)
  _assert_same(conv.ema, base.ema)


# --- 3. errors name the tensor, and nothing is written -----------------------


def _broken_vq():
  sd = _state_dict("vq_tiny")
  conv_in = sd["encoder.conv_in.weight"]
  assert conv_in.shape[0] != conv_in.shape[1]
  return {
      "missing": ("decoder.conv_out.bias",
                  _with("vq_tiny", drop=["decoder.conv_out.bias"])),
      "unexpected": ("encoder.extra.weight", _with(
          "vq_tiny", **{"encoder.extra.weight": np.ones((4, 4), np.float32)})),
      "misshaped": ("encoder.conv_in.weight", _with(
          "vq_tiny", **{"encoder.conv_in.weight":
                        np.ascontiguousarray(conv_in.transpose(1, 0, 2, 3))})),
  }


@pytest.mark.parametrize("what", ["missing", "unexpected", "misshaped"])
def test_error_names_the_tensor(what, tmp_path, capsys):
  key, sd = _broken_vq()[what]
  ckpt = _write(tmp_path / "vq.ckpt", sd)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_checkpoint(ckpt, FIXTURES / "vq_tiny.yaml")
  msg = str(e.value)
  assert "\n" not in msg and repr(key) in msg, msg

  out = tmp_path / "out"
  rc, stdout, stderr = _cli(capsys, ckpt, "--config",
                            FIXTURES / "vq_tiny.yaml", "--out", out)
  assert rc == 1
  assert stderr.startswith("error: ") and repr(key) in stderr, stderr
  assert len(stderr.strip().splitlines()) == 1, stderr
  assert "wrote" not in stdout
  assert not out.exists()


def test_converter_errors_are_user_errors():
  # One family: the scripts' main_exits prints them in one line; callers
  # that caught ValueError still do.
  for error in (torch_io.CheckpointError, convert.ConversionError,
                infer_config.InferenceError):
    assert issubclass(error, errors.UserError), error
    assert issubclass(error, ValueError), error


def test_config_that_does_not_match_names_first_mismatch(tmp_path, capsys):
  # What unet_tiny_ss's config expects, in torch names and layouts.
  ss = build.build_model(build.load_model_config(FIXTURES / "unet_tiny_ss.yaml"))
  fake = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape),
                                build.param_shapes(ss))
  expected = {k: v.shape for k, v in convert.to_torch_state_dict(fake, "unet").items()}
  sd = _state_dict("unet_tiny")
  first = next(k for k, v in sd.items() if expected.get(k) != v.shape)

  out = tmp_path / "out"
  rc, _, stderr = _cli(capsys, FIXTURES / "unet_tiny.ckpt", "--config",
                       FIXTURES / "unet_tiny_ss.yaml", "--out", out)
  assert rc == 1
  assert stderr.startswith("error: ") and repr(first) in stderr, stderr
  assert not out.exists()


def test_non_empty_out_is_refused(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    convert_torch_ckpt.main([str(FIXTURES / "vq_tiny.ckpt"), "--config",
                             str(FIXTURES / "vq_tiny.yaml"), "--out", str(out)])
  assert e.value.code == 2
  assert "not empty" in capsys.readouterr().err
  assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- 4. without --config: inferred, printed, and right -----------------------


def test_cli_infers_config_and_reproduces_reference(tmp_path, capsys):
  out = tmp_path / "out"
  rc, stdout, _ = _cli(capsys, FIXTURES / "unet_tiny.ckpt", "--num-heads", "2",
                       "--out", out)
  assert rc == 0
  assert "Inferred config" in stdout
  printed = stdout.split("Inferred config", 1)[1].split("\n", 1)[1]
  printed = printed.split(f"{FIXTURES / 'unet_tiny.ckpt'}: ", 1)[0]
  assert "target:" in printed
  node = yaml.safe_load(printed)["model"]
  assert node["target"] == build.UNET_TARGET
  assert node["params"]["num_heads"] == 2

  module, params, saved = store.load_model_dir(out)
  assert saved == node
  ref = np.load(FIXTURES / "unet_tiny.npz")
  x = np.transpose(ref["x"], (0, 2, 3, 1))
  got = jax.jit(module.apply)({"params": params}, x, ref["timesteps"])
  np.testing.assert_allclose(np.asarray(got),
                             np.transpose(ref["out"], (0, 2, 3, 1)),
                             rtol=1e-4, atol=1e-4)

  # Without --num-heads the head count is a guess, and the user is told.
  guessed = convert.convert_checkpoint(FIXTURES / "unet_tiny.ckpt")
  assert guessed.inferred
  assert any("WARNING" in n for n in guessed.report.notes), guessed.report.notes


# --- 5. scale_by_std checkpoints --------------------------------------------


def test_scale_factor_buffer_wins(tmp_path):
  ckpt = _write(tmp_path / "ldm.ckpt", _with(
      "ldm_tiny", scale_factor=np.asarray(0.18215, np.float32)))
  conv = convert.convert_checkpoint(ckpt, FIXTURES / "ldm_tiny.yaml")
  want = float(np.float32(0.18215))
  assert conv.meta["scale_factor"] == want
  assert "scale_factor" in conv.report.ignored
  assert any("scale_factor" in n and "0.18215" in n for n in conv.report.notes)
  assert "0.18215" in conv.report.summary()
  # The node (the workdir's config.json, which sample.py builds from) and
  # the model agree with the checkpoint, not with the YAML's 1.0.
  assert conv.node["params"]["scale_factor"] == want
  assert conv.model.scale_factor == want
  _assert_same(conv.params, _converted("ldm_tiny").params)


# --- 6. incomplete EMA -------------------------------------------------------


def test_incomplete_ema_names_the_mangled_key(tmp_path, capsys):
  unet_keys = [k for k in _state_dict("ldm_tiny")
               if k.startswith(convert.LDM_PREFIXES["unet"])]
  victim = convert.ema_key(unet_keys[len(unet_keys) // 2][
      len(convert.LDM_PREFIXES["unet"]):])
  assert victim in _state_dict("ldm_tiny") and "." not in victim[len("model_ema."):]
  ckpt = _write(tmp_path / "ldm.ckpt", _with("ldm_tiny", drop=[victim]))
  with pytest.raises(convert.ConversionError, match=repr(victim)):
    convert.convert_checkpoint(ckpt, FIXTURES / "ldm_tiny.yaml")
  rc, _, stderr = _cli(capsys, ckpt, "--config", FIXTURES / "ldm_tiny.yaml",
                       "--out", tmp_path / "out")
  assert rc == 1 and repr(victim) in stderr
  assert not (tmp_path / "out").exists()
