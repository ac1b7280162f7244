"""export_torch_ckpt.py: weights back out to PyTorch, and in again.

The fixtures are ground truth written by torch from the original code. One
converted workdir (ldm_tiny, live + EMA) and one model directory (vq_tiny)
are exported once per module; the files must hold every tensor the original
checkpoint held, bit for bit, in a pickle that names only tensors and plain
containers, and convert back to the very same parameters.
"""

import collections
import contextlib
import functools
import io
import pickletools
import zipfile

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy
import yaml

import convert_torch_ckpt
import export_torch_ckpt
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.convert import export
from segldm_jax.convert import torch_io
from segldm_jax.convert import torch_writer
from segldm_jax.models import build

# What the pickle may name: torch's tensor rebuild, the storages of the
# dtypes written (float32 weights, LitEma's int32 update count), and the
# OrderedDict of a state_dict and of each tensor's (empty) backward hooks.
ALLOWED_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"),
                   ("torch", "FloatStorage"), ("torch", "IntStorage"),
                   ("collections", "OrderedDict")}
# Tensors of a torch checkpoint that the converter drops and so cannot come
# back: a trained VQGAN's training loss (LPIPS, discriminator). The fixtures
# hold none; the VQ case below adds some to show they are the only loss.
IGNORED = ("loss.",)


def _cli(main, *args) -> None:
  assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def ldm(tmp_path_factory, fixtures_dir):
  """The ldm_tiny fixture converted, and exported with and without --ema."""
  root = tmp_path_factory.mktemp("export")
  _cli(convert_torch_ckpt.main, fixtures_dir / "ldm_tiny.ckpt", "--config",
       fixtures_dir / "ldm_tiny.yaml", "--out", root / "wd")
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    _cli(export_torch_ckpt.main, root / "wd", "--out", root / "live",
         "--no-ema")
  (root / "live.txt").write_text(printed.getvalue())
  _cli(export_torch_ckpt.main, root / "wd", "--out", root / "ema")
  return root


@pytest.fixture(scope="module")
def vq(tmp_path_factory, fixtures_dir):
  """vq_tiny plus two loss.* tensors (as a trained VQGAN's file has),
  converted to a model directory and exported."""
  root = tmp_path_factory.mktemp("export_vq")
  sd = collections.OrderedDict(
      torch_io.load_state_dict(fixtures_dir / "vq_tiny.ckpt"))
  sd["loss.discriminator.main.0.weight"] = np.ones((4, 3, 4, 4), np.float32)
  sd["loss.logvar"] = np.zeros((), np.float32)
  torch_writer.save(root / "vq.ckpt", {"state_dict": sd})
  _cli(convert_torch_ckpt.main, root / "vq.ckpt", "--config",
       fixtures_dir / "vq_tiny.yaml", "--out", root / "vq")
  _cli(export_torch_ckpt.main, root / "vq", "--out", root / "out")
  return root, sd


def _assert_bit_identical(got, want) -> None:
  assert sorted(got) == sorted(want)
  for key in want:
    a, b = np.asarray(got[key]), np.asarray(want[key])
    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
    assert a.tobytes() == b.tobytes(), key


def _flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.cache
def _workdir_weights(workdir) -> dict[str, np.ndarray]:
  """Live and EMA parameters of a workdir's newest step, flattened."""
  model = build.build_model(run_config.load(workdir).model.to_dict())
  live, step = store.restore_params(workdir, model, use_ema=False)
  ema, _ = store.restore_params(workdir, model, use_ema=True)
  first = store.load_model_dir(workdir / workdir_files.FIRST_STAGE_DIR)[1]
  return {**_flat({"live": live, "first_stage": first}),
          **_flat({"ema": ema["unet"]}), "step": np.asarray(step)}


def test_fixture_checkpoint_comes_back_bit_for_bit(ldm, fixtures_dir):
  original = torch_io.load_state_dict(fixtures_dir / "ldm_tiny.ckpt")
  assert not [k for k in original if k.startswith(IGNORED)]
  got = torch_io.load_state_dict(ldm / "live" / "model.ckpt")
  # 454 tensors: networks, LitEma's shadows and buffers, 12 schedule buffers.
  assert len(original) == 454
  _assert_bit_identical(got, original)


def test_ema_export_puts_the_ema_weights_in_both_places(ldm, fixtures_dir):
  original = torch_io.load_state_dict(fixtures_dir / "ldm_tiny.ckpt")
  got = torch_io.load_state_dict(ldm / "ema" / "model.ckpt")
  unet = "model.diffusion_model."
  swapped = {k: (original["model_ema." + k[len("model."):].replace(".", "")]
                 if k.startswith(unet) else v) for k, v in original.items()}
  _assert_bit_identical(got, swapped)
  assert not np.array_equal(got[unet + "out.2.weight"],
                            original[unet + "out.2.weight"])


def test_pickle_names_only_tensors_and_plain_containers(ldm):
  with zipfile.ZipFile(ldm / "ema" / "model.ckpt") as zf:
    names = zf.namelist()
    data_pkl = zf.read("archive/data.pkl")
    # Stored, and aligned as torch writes them (torch.load(mmap=True)).
    for info in zf.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      if info.filename.startswith("archive/data/"):
        assert (info.header_offset + 30 + len(info.filename)
                + len(info.extra)) % 64 == 0
  assert names[:2] == ["archive/data.pkl", "archive/byteorder"]
  assert names[-1] == "archive/version" and len(names) == 454 + 3
  globals_, ops = set(), set()
  for op, arg, _ in pickletools.genops(data_pkl):
    ops.add(op.name)
    if op.name == "GLOBAL":
      globals_.add(tuple(arg.split(" ")))
  assert globals_ == ALLOWED_GLOBALS
  # No other way to name or build an object.
  assert not ops & {"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",
                    "BUILD", "EXT1", "EXT2", "EXT4"}
  ckpt = torch_io.load_checkpoint(ldm / "ema" / "model.ckpt")
  assert sorted(ckpt) == ["global_step", "state_dict"]
  assert ckpt["global_step"] == 0
  assert ckpt["state_dict"]["model_ema.num_updates"].dtype == np.int32
  assert int(ckpt["state_dict"]["model_ema.num_updates"]) == 4321


def test_safetensors_hold_the_same_tensors(ldm):
  for which in ("live", "ema"):
    tensors = st_numpy.load_file(ldm / which / "model.safetensors")
    _assert_bit_identical(
        tensors, torch_io.load_state_dict(ldm / which / "model.ckpt"))


@pytest.mark.parametrize("source", ["model.ckpt", "model.safetensors"])
def test_round_trip_gives_the_same_parameters(ldm, source):
  back = ldm / f"back_{source.replace('.', '_')}"
  _cli(convert_torch_ckpt.main, ldm / "live" / source, "--config",
       ldm / "live" / "config.yaml", "--out", back)
  want = _workdir_weights(ldm / "wd")
  got = _workdir_weights(back)
  assert sorted(got) == sorted(want)
  assert any(k.startswith("ema/") for k in want)
  _assert_bit_identical(got, want)
  assert not np.array_equal(got["ema/out_2/kernel"],
                            got["live/unet/out_2/kernel"])


def test_config_yaml_builds_the_same_model(ldm, vq):
  node = build.load_model_config(ldm / "live" / "config.yaml")
  text = yaml.safe_load((ldm / "live" / "config.yaml").read_text())["model"]
  # What the original's instantiate_from_config and main.py need.
  assert list(text)[:2] == ["base_learning_rate", "target"]
  assert text["params"]["use_ema"] is True
  assert text["params"]["cond_stage_key"] == "segmentation"
  assert text["params"]["first_stage_config"]["params"]["lossconfig"] == {
      "target": "torch.nn.Identity"}
  original = build.build_model(run_config.load(ldm / "wd").model.to_dict())
  rebuilt = build.build_model(node)
  assert rebuilt == original
  for part in ("unet", "first_stage", "cond_stage"):
    assert (jax.tree.map(lambda s: s.shape,
                         build.param_shapes(getattr(rebuilt, part)))
            == jax.tree.map(lambda s: s.shape,
                            build.param_shapes(getattr(original, part))))
  vq_node = build.load_model_config(vq[0] / "out" / "config.yaml")
  assert build.build_model(vq_node) == build.build_model(
      store.check_model_dir(vq[0] / "vq"))


def test_model_directory_exports_taming_names(vq):
  root, original = vq
  got = torch_io.load_state_dict(root / "out" / "model.ckpt")
  kept = {k: v for k, v in original.items() if not k.startswith(IGNORED)}
  assert len(original) - len(kept) == 2
  _assert_bit_identical(got, kept)
  _assert_bit_identical(st_numpy.load_file(root / "out" / "model.safetensors"),
                        kept)
  assert sorted(torch_io.load_checkpoint(root / "out" / "model.ckpt")) == [
      "state_dict"]


def test_cli_output_and_errors(ldm, tmp_path, capsys):
  out = (ldm / "live.txt").read_text().splitlines()
  assert out[0] == f"{ldm / 'wd'}: LatentDiffusion at step 0, 454 tensors"
  assert out[1] == "  UNet weights: live; EMA in model_ema.*"
  assert [line.split(" (")[0] for line in out[2:5]] == [
      f"wrote {ldm / 'live' / n}"
      for n in ("model.ckpt", "model.safetensors", "config.yaml")]
  assert out[5].startswith("done in ")
  assert export_torch_ckpt.main(
      [str(ldm / "wd"), "--out", str(ldm / "live")]) == 1
  assert capsys.readouterr().err == (
      f"error: --out {ldm / 'live'} exists and is not an empty directory; "
      "choose another\n")
  assert export_torch_ckpt.main([str(tmp_path), "--out",
                                 str(tmp_path / "b")]) == 1
  assert capsys.readouterr().err == (
      f"error: {tmp_path}: neither a workdir (config.json + checkpoints/) "
      "nor a model directory (model.yaml + params/)\n")
  assert not (tmp_path / "b").exists()
  ckpt = ldm / "live" / "model.ckpt"
  assert export_torch_ckpt.main([str(ckpt), "--out", str(tmp_path / "b")]) == 1
  assert capsys.readouterr().err == (
      f"error: {ckpt} is a file; export_torch_ckpt.py exports a workdir or a "
      "model directory (convert_torch_ckpt.py converts a checkpoint in)\n")


def test_run_without_ema_exports_no_model_ema(ldm, tmp_path, fixtures_dir):
  _cli(convert_torch_ckpt.main, ldm / "live" / "model.safetensors",
       "--config", ldm / "live" / "config.yaml", "--out", tmp_path / "wd",
       "--no-ema")
  done = export.export(tmp_path / "wd", tmp_path / "out")
  assert done.notes == [
      "UNet weights: live (the run has no EMA; use_ema: false)"]
  assert not [k for k in done.state_dict if k.startswith("model_ema.")]
  assert done.node["params"]["use_ema"] is False
  original = torch_io.load_state_dict(fixtures_dir / "ldm_tiny.ckpt")
  _assert_bit_identical(
      done.state_dict,
      {k: v for k, v in original.items() if not k.startswith("model_ema.")})


def test_writer_round_trips_values_through_our_reader(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  sd = collections.OrderedDict(
      w=np.arange(6, dtype=np.float32).reshape(2, 3),
      h=np.array([1.5, -2], np.float16), b=np.ones(3, ml_dtypes.bfloat16),
      n=np.array(-7, np.int64), flag=np.array([True, False]),
      empty=np.zeros((0, 4), np.float32),
      t=np.arange(6, dtype=np.float32).reshape(2, 3).T)  # not contiguous
  obj = {"state_dict": sd, "global_step": 2**40, "epoch": -1, "lr": 0.25,
         "name": "ünï", "list": [1, None, True], "pair": (3, "x")}
  torch_writer.save(tmp_path / "x.ckpt", obj)
  back = torch_io.load_checkpoint(tmp_path / "x.ckpt")
  assert isinstance(back["state_dict"], collections.OrderedDict)
  _assert_bit_identical(back["state_dict"], sd)
  assert {k: v for k, v in back.items() if k != "state_dict"} == {
      k: v for k, v in obj.items() if k != "state_dict"}
  with pytest.raises(TypeError, match="cannot write a set"):
    torch_writer.save(tmp_path / "y.ckpt", {"s": {1}})


def test_scale_by_std_exports_its_scale_factor_buffer(ldm, fixtures_dir):
  """LatentDiffusion registers `scale_factor` as a buffer only with
  scale_by_std (an attribute otherwise): the export follows, and the
  converter reads it back."""
  from segldm_jax import convert  # pylint: disable=g-import-not-at-top
  conv = convert.convert_checkpoint(fixtures_dir / "ldm_tiny.ckpt",
                                    fixtures_dir / "ldm_tiny.yaml")
  assert "scale_factor" not in export.ldm_state_dict(conv.model, conv.params,
                                                     None, {})
  node = build.load_model_config(ldm / "live" / "config.yaml")
  node["params"].update(scale_by_std=True, scale_factor=0.18215)
  sd = export.ldm_state_dict(build.build_model(node), conv.params, None, {})
  assert sd["scale_factor"].dtype == np.float32
  assert sd["scale_factor"].shape == ()
  assert sd["scale_factor"] == np.float32(0.18215)
  meta = convert.convert_ldm(conv.model, sd)[2]
  assert meta["scale_factor"] == float(np.float32(0.18215))
