"""Inferring the model config of a checkpoint from its tensor shapes.

Every fixture case is inferred from its state_dict and compared, field by
field, with the YAML that really built it. A fake state_dict with the shapes
of the full semantic_synthesis256 model (zero-strided arrays, no memory) pins
the full-size architecture and its parameter counts.
"""

import functools
import pathlib
from typing import Any

import jax
import numpy as np
import pytest
import yaml

from segldm_jax import convert
from segldm_jax.convert import infer_config
from segldm_jax.convert import torch_io
from segldm_jax.diffusion import schedule as schedule_lib
from segldm_jax.models import build

VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"
# What the reference code uses for keys a YAML leaves out (facts sheet, 1).
DEFAULTS = {
    build.LDM_TARGET: {"beta_schedule": "linear", "parameterization": "eps",
                       "scale_factor": 1.0, "use_ema": True,
                       # concat_mode: true implies it
                       "conditioning_key": "concat"},
    build.UNET_TARGET: {"num_head_channels": -1, "use_scale_shift_norm": False,
                        "resblock_updown": False, "conv_resample": True,
                        "use_new_attention_order": False, "dropout": 0.0},
    VQ_TARGET: {},
    build.RESCALER_TARGET: {"method": "bilinear", "multiplier": 0.5,
                            "bias": False},
}
# Fixture YAML keys about training runs, not the model.
NOT_MODEL = {"log_every_t"}
KINDS = {"vq_tiny": "vq", "rescaler": "rescaler", "unet_tiny": "unet",
         "unet_tiny_ss": "unet", "ldm_tiny": "ldm"}
UNET_PARAMS, VQ_PARAMS = 215_229_315, 55_322_782

# models/ldm/semantic_synthesis256/config.yaml (facts sheet, 1).
FULL_CONFIG = {
    "target": build.LDM_TARGET,
    "params": {
        "linear_start": 0.0015, "linear_end": 0.0205, "log_every_t": 100,
        "timesteps": 1000, "loss_type": "l1", "first_stage_key": "image",
        "cond_stage_key": "segmentation", "image_size": 64, "channels": 3,
        "concat_mode": True, "cond_stage_trainable": True,
        "unet_config": {"target": build.UNET_TARGET, "params": {
            "image_size": 64, "in_channels": 6, "out_channels": 3,
            "model_channels": 128, "attention_resolutions": [32, 16, 8],
            "num_res_blocks": 2, "channel_mult": [1, 4, 8], "num_heads": 8}},
        "first_stage_config": {"target": VQ_TARGET, "params": {
            "embed_dim": 3, "n_embed": 8192,
            "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256,
                         "in_channels": 3, "out_ch": 3, "ch": 128,
                         "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": build.RESCALER_TARGET, "params": {
            "n_stages": 2, "in_channels": 182, "out_channels": 3}},
    },
}


@functools.cache
def _state_dict(fixtures: pathlib.Path, name: str) -> dict[str, np.ndarray]:
  return torch_io.load_state_dict(fixtures / f"{name}.ckpt")


def _infer_kwargs(node: dict) -> dict[str, Any]:
  """What shapes cannot tell, read from the true config (as a user would)."""
  p = node["params"]
  vq = p["first_stage_config"]["params"] if "first_stage_config" in p else p
  unet = p["unet_config"]["params"] if "unet_config" in p else p
  kw = {}
  if "ddconfig" in vq:
    kw["resolution"] = vq["ddconfig"]["resolution"]
  if "model_channels" in unet:
    kw["num_heads"] = unet.get("num_heads")
    kw["num_head_channels"] = unet.get("num_head_channels")
  return kw


def _flatten(node: dict) -> dict:
  """{dotted path below the top `params`: (value, target of its node)}."""
  out = {}

  def walk(d: dict, path: str, target: str) -> None:
    for key, value in d.items():
      if isinstance(value, dict):
        walk(value, f"{path}{key}.", value.get("target", target))
      else:
        out[path + key] = (value, target)

  walk(node["params"], "", node["target"])
  return out


def _noted(notes: list[str]) -> set[str]:
  return {n.split(" = ", 1)[0] for n in notes}


def _compare(inferred: dict, reference: dict, notes: list[str],
             guessed_differently: set[str] = frozenset()) -> None:
  """Every inferred field equals the reference's (or its default).

  Guessed fields (named in `notes`) must agree too, except those listed in
  `guessed_differently`, which may differ if noted; every reference field
  must be present.
  """
  assert inferred["target"] == reference["target"]
  assert set(inferred) == {"target", "params"}
  got, want = _flatten(inferred), _flatten(reference)
  noted = _noted(notes)
  assert set(noted) <= set(got), noted - set(got)
  for path, (value, target) in got.items():
    leaf = path.rsplit(".", 1)[-1]
    if path in want:
      expected = want[path][0]
    else:
      assert leaf in DEFAULTS[target], f"{path} = {value!r} not in reference"
      expected = DEFAULTS[target][leaf]
    if path in guessed_differently and value != expected:
      assert path in noted, f"{path} differs but has no note"
      continue
    assert value == expected, f"{path}: inferred {value!r}, true {expected!r}"
    assert type(value) is type(expected) or isinstance(expected, float), path
  missing = {p for p in want if p not in got and p.rsplit(".", 1)[-1]
             not in NOT_MODEL}
  assert not missing


def _build_and_convert(node: dict, state_dict) -> None:
  model = build.build_model(node)
  if isinstance(model, build.LatentDiffusion):
    params, ema, _ = convert.convert_ldm(model, state_dict)
    assert ema is not None and set(params) == {"unet", "cond_stage",
                                               "first_stage"}
  else:
    convert.convert_module(model, state_dict)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_detect_kind(fixtures_dir, name):
  assert infer_config.detect_kind(_state_dict(fixtures_dir, name)) == KINDS[name]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_fixture_config_inferred(fixtures_dir, name):
  true = build.load_model_config(fixtures_dir / f"{name}.yaml")
  sd = _state_dict(fixtures_dir, name)
  node, notes = infer_config.infer_model_config(sd, **_infer_kwargs(true))
  # A bare UNet's image_size is pure bookkeeping; it defaults to 256 / 4.
  _compare(node, true, notes,
           {"image_size"} if KINDS[name] == "unet" else set())
  assert not any("num_heads =" in n for n in notes)  # they were given
  _build_and_convert(node, sd)


def test_fixture_notes(fixtures_dir):
  node, notes = infer_config.infer_model_config(
      _state_dict(fixtures_dir, "ldm_tiny"), resolution=32)
  assert _noted(notes) == {
      "unet_config.params.num_heads", "unet_config.params.image_size",
      "unet_config.params.use_new_attention_order",
      "unet_config.params.dropout", "first_stage_config.params.ddconfig.resolution",
      "first_stage_config.params.ddconfig.dropout",
      "cond_stage_config.params.n_stages", "cond_stage_config.params.method",
      "cond_stage_config.params.multiplier", "image_size", "loss_type",
      "parameterization", "cond_stage_trainable", "scale_factor"}
  # The head count changes the function: loud, first, and says what to pass.
  assert notes[0].startswith("unet_config.params.num_heads = 8: WARNING")
  assert "--config" in notes[0] and "--num-heads" in notes[0]
  assert node["params"]["unet_config"]["params"]["num_heads"] == 8
  assert node["params"]["unet_config"]["params"]["num_head_channels"] == -1
  # Still a valid model (8 heads divide every attention width).
  _build_and_convert(node, _state_dict(fixtures_dir, "ldm_tiny"))

  node, notes = infer_config.infer_model_config(
      _state_dict(fixtures_dir, "unet_tiny_ss"))
  assert {"num_heads", "conv_resample", "image_size"} <= _noted(notes)
  assert node["params"]["resblock_updown"] is True
  assert node["params"]["use_scale_shift_norm"] is True


def test_num_head_channels_alone(fixtures_dir):
  node, notes = infer_config.infer_model_config(
      _state_dict(fixtures_dir, "unet_tiny"), num_head_channels=16)
  assert (node["params"]["num_heads"], node["params"]["num_head_channels"]) == (
      -1, 16)
  assert "num_heads" not in _noted(notes)
  with pytest.raises(ValueError, match="num_head_channels 24 does not divide"):
    infer_config.infer_model_config(_state_dict(fixtures_dir, "unet_tiny"),
                                    num_head_channels=24)


@pytest.mark.parametrize("kind,kw", [
    ("cosine", {"cosine_s": 8e-3}),
    ("sqrt_linear", {"linear_start": 1e-4, "linear_end": 2e-2}),
    ("sqrt", {"linear_start": 0.0015, "linear_end": 0.0205}),
    ("linear", {"linear_start": 0.00085, "linear_end": 0.012}),
])
def test_schedule_recovered_from_betas(fixtures_dir, kind, kw):
  steps = 500
  sched = schedule_lib.Schedule.create(kind, steps, **kw)
  sd = dict(_state_dict(fixtures_dir, "ldm_tiny"))
  sd.update({k: np.asarray(getattr(sched, k)) for k in convert.SCHEDULE_BUFFERS})
  node, _ = infer_config.infer_model_config(sd, resolution=32, num_heads=2)
  p = node["params"]
  assert (p["beta_schedule"], p["timesteps"]) == (kind, steps)
  for key, value in kw.items():
    assert p[key] == value
  if kind == "cosine":
    assert "linear_start" not in p
  # The schedule buffers check of the converter agrees.
  _build_and_convert(node, sd)


def test_unknown_schedule_is_refused(fixtures_dir):
  sd = dict(_state_dict(fixtures_dir, "ldm_tiny"))
  sd["betas"] = np.random.default_rng(0).uniform(1e-4, 2e-2, 1000).astype(
      np.float32)
  with pytest.raises(ValueError, match="matches no linear"):
    infer_config.infer_model_config(sd, num_heads=2)


def test_scale_factor_buffer_is_read(fixtures_dir):
  sd = dict(_state_dict(fixtures_dir, "ldm_tiny"))
  sd["scale_factor"] = np.float32(0.18215)
  node, notes = infer_config.infer_model_config(sd, resolution=32, num_heads=2)
  assert node["params"]["scale_factor"] == 0.18215
  assert "scale_factor" not in _noted(notes)


@pytest.mark.parametrize("state_dict", [
    {"foo.weight": np.zeros(3), "bar.bias": np.zeros(3)},
    {},
    # A KL autoencoder: encoder/decoder but no codebook.
    {"encoder.conv_in.weight": np.zeros((8, 3, 3, 3)),
     "decoder.conv_in.weight": np.zeros((8, 4, 3, 3)),
     "loss.logvar": np.zeros(())},
    {"channel_mapper.weight": np.zeros((3, 5, 1, 1)), "extra": np.zeros(1)},
])
def test_unknown_checkpoint_one_line_error(state_dict):
  with pytest.raises(ValueError) as e:
    infer_config.detect_kind(state_dict)
  msg = str(e.value)
  assert "\n" not in msg and "expected a LatentDiffusion" in msg
  assert "quantize.embedding.weight" in msg
  for key in list(state_dict)[:5]:
    assert key in msg
  with pytest.raises(ValueError, match="cannot tell"):
    infer_config.infer_model_config(state_dict)


def test_inconsistent_vq_attention_is_refused(fixtures_dir):
  sd = {k: v for k, v in _state_dict(fixtures_dir, "vq_tiny").items()
        if not k.startswith("decoder.up.2.attn.")}
  with pytest.raises(ValueError, match=r"attention at levels \[2\] but the "
                     r"decoder at \[\]"):
    infer_config.infer_model_config(sd, resolution=32)


def test_format_config_round_trip(fixtures_dir, tmp_path):
  node, notes = infer_config.infer_model_config(
      _state_dict(fixtures_dir, "ldm_tiny"), resolution=32)
  text = infer_config.format_config(node, notes)
  assert text.startswith("# unet_config.params.num_heads = 8: WARNING")
  assert infer_config.format_config(node).startswith("model:\n  target: ")
  (tmp_path / "config.yaml").write_text(text)
  assert build.load_model_config(tmp_path / "config.yaml") == node
  assert yaml.safe_load(infer_config.format_config(node)) == {"model": node}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_to_torch_state_dict_inverts_conversion(fixtures_dir, name):
  sd = _state_dict(fixtures_dir, name)
  model = build.build_model(build.load_model_config(
      fixtures_dir / f"{name}.yaml"))
  if KINDS[name] == "ldm":
    params, _, _ = convert.convert_ldm(model, sd)
    # Live weights only: no model_ema.*, no schedule buffers.
    sd = {k: v for k, v in sd.items() if k.startswith(
        tuple(convert.LDM_PREFIXES.values()))}
  else:
    params = convert.convert_module(model, sd)
  back = convert.to_torch_state_dict(params, KINDS[name])
  assert set(back) == set(sd)
  for key, value in sd.items():
    assert back[key].shape == value.shape and np.array_equal(back[key], value), key


def _zeros_like_shapes(tree):
  # Zero-strided arrays: a 215 M-parameter tree without the memory.
  return jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.float32(0), s.shape), tree)


def _unet(**kw) -> dict:
  params = {"image_size": 64, "in_channels": 7, "out_channels": 4,
            "model_channels": 32, "attention_resolutions": [],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 4,
            "num_head_channels": -1, "use_scale_shift_norm": False,
            "resblock_updown": False, "conv_resample": True,
            "use_new_attention_order": False, "dropout": 0.0}
  return {"target": build.UNET_TARGET, "params": {**params, **kw}}


def _vq(**kw) -> dict:
  dd = {"double_z": False, "z_channels": 4, "resolution": 64,
        "in_channels": 3, "out_ch": 5, "ch": 32, "ch_mult": [1, 2],
        "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
  return {"target": VQ_TARGET, "params": {
      "embed_dim": 2, "n_embed": 16, "ddconfig": {**dd, **kw},
      "lossconfig": {"target": "torch.nn.Identity"}}}


@pytest.mark.parametrize("kind,reference", [
    ("unet", _unet(channel_mult=[1], num_res_blocks=2,
                   attention_resolutions=[1])),
    ("unet", _unet(channel_mult=[1, 2, 2, 4], num_res_blocks=2,
                   attention_resolutions=[8, 2], conv_resample=False)),
    ("unet", _unet(channel_mult=[1, 1, 2], num_res_blocks=3,
                   attention_resolutions=[4, 1], resblock_updown=True,
                   use_scale_shift_norm=True)),
    ("unet", _unet(channel_mult=[2, 3], attention_resolutions=[2, 1])),
    ("vq", _vq(ch_mult=[1, 1, 2, 4], num_res_blocks=2,
               attn_resolutions=[32, 8])),
    ("vq", _vq(ch_mult=[1], attn_resolutions=[64])),
], ids=["unet_one_level", "unet_avgpool", "unet_updown", "unet_mult23",
        "vq_f8", "vq_f1"])
def test_synthetic_architectures(kind, reference):
  """Configs built here -> torch-layout shapes -> inferred back unchanged."""
  module = build.build_model(reference)
  sd = convert.to_torch_state_dict(
      _zeros_like_shapes(build.param_shapes(module)), kind)
  assert infer_config.detect_kind(sd) == kind
  kw = ({"resolution": 64} if kind == "vq"
        else {"num_heads": reference["params"]["num_heads"]})
  node, notes = infer_config.infer_model_config(sd, **kw)
  guessed = {"image_size", "conv_resample"} if kind == "unet" else set()
  _compare(node, reference, notes, guessed)


# --- the full semantic_synthesis256 model, shapes only ----------------------


@functools.cache
def _full_state_dict() -> dict[str, np.ndarray]:
  """The keys and shapes of a semantic_synthesis256 LatentDiffusion ckpt."""
  ldm = build.build_model(FULL_CONFIG)
  params = {part: _zeros_like_shapes(build.param_shapes(getattr(ldm, part)))
            for part in convert.LDM_PREFIXES}
  sd = convert.to_torch_state_dict(params, "ldm")
  unet = convert.LDM_PREFIXES["unet"]
  for key in [k for k in sd if k.startswith(unet)]:
    sd[convert.ema_key(key[len(unet):])] = sd[key]
  sd["model_ema.decay"] = np.float32(0.9999)
  sd["model_ema.num_updates"] = np.int32(0)
  sched = schedule_lib.Schedule.create("linear", 1000, 0.0015, 0.0205)
  sd.update({k: np.asarray(getattr(sched, k)) for k in convert.SCHEDULE_BUFFERS})
  return sd


def _count(sd: dict, prefix: str) -> tuple[int, int]:
  keys = [k for k in sd if k.startswith(prefix)]
  return len(keys), sum(int(np.prod(sd[k].shape)) for k in keys)


def test_full_size_state_dict_is_the_reference():
  sd = _full_state_dict()
  assert len(sd) == 652
  assert _count(sd, "model.diffusion_model.") == (216, UNET_PARAMS)
  assert _count(sd, "first_stage_model.") == (205, VQ_PARAMS)
  assert _count(sd, "cond_stage_model.") == (1, 546)
  assert _count(sd, "model_ema.")[0] == 218


def test_full_size_config_inferred():
  sd = _full_state_dict()
  assert infer_config.detect_kind(sd) == "ldm"
  node, notes = infer_config.infer_model_config(sd, num_heads=8)
  # [32, 16, 8] are compared with ds in {1, 2, 4}: none matches, so the
  # UNet has attention only in its middle block and infers as [].
  reference = yaml.safe_load(yaml.safe_dump(FULL_CONFIG))
  reference["params"]["unet_config"]["params"]["attention_resolutions"] = []
  _compare(node, reference, notes)

  # The inferred config builds the very same tensors.
  ldm = build.build_model(node)
  rebuilt = convert.to_torch_state_dict(
      {part: _zeros_like_shapes(build.param_shapes(getattr(ldm, part)))
       for part in convert.LDM_PREFIXES}, "ldm")
  assert {k: v.shape for k, v in rebuilt.items()} == {
      k: sd[k].shape for k in rebuilt}
  assert _count(rebuilt, "model.diffusion_model.")[1] == UNET_PARAMS
  assert _count(rebuilt, "first_stage_model.")[1] == VQ_PARAMS


@pytest.mark.parametrize("part,kind", [("unet", "unet"), ("first_stage", "vq")])
def test_full_size_standalone(part, kind):
  prefix = convert.LDM_PREFIXES[part]
  sd = {k[len(prefix):]: v for k, v in _full_state_dict().items()
        if k.startswith(prefix)}
  assert infer_config.detect_kind(sd) == kind
  node, notes = infer_config.infer_model_config(sd)
  reference = FULL_CONFIG["params"][f"{part}_config"]
  if kind == "unet":
    assert "num_heads" in _noted(notes)
    reference = yaml.safe_load(yaml.safe_dump(reference))
    reference["params"]["attention_resolutions"] = []
  _compare(node, reference, notes)
