"""Every fixture case made by the original PyTorch code, reproduced by the port.

Cases are discovered in the fixture folder (`tests/fixtures`, or the folder
named by SEGLDM_FIXTURES): each `NAME.yaml` with `NAME.ckpt` and `NAME.npz`.
The case's YAML `target` picks what is computed; the checkpoint is converted
with the project's own converter (no torch). Nothing here depends on a case's
name, so a new case in the same format is tested as it is dropped in.
Tolerances are those of the fixtures' README.
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segldm_jax import convert
from segldm_jax.diffusion import objective
from segldm_jax.diffusion import samplers
from segldm_jax.models import build

FIXTURES = pathlib.Path(os.environ.get(
    "SEGLDM_FIXTURES", pathlib.Path(__file__).parent / "fixtures"))
MODULE_TOL = dict(rtol=1e-4, atol=1e-4)
# DDIM chains amplify round-off (first step divides by sqrt(abar_901)):
# compare relative to the tensor's largest magnitude.
CHAIN_RTOL = 1e-3


def _cases() -> list[str]:
  return sorted(p.stem for p in FIXTURES.glob("*.yaml")
                if p.with_suffix(".ckpt").exists() and p.with_suffix(".npz").exists())


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def _stack_nhwc(a: np.ndarray) -> np.ndarray:
  """(steps, B, C, H, W) -> (steps, B, H, W, C)."""
  return np.transpose(a, (0, 1, 3, 4, 2))


@functools.cache
def _case(name: str):
  conv = convert.convert_checkpoint(FIXTURES / f"{name}.ckpt",
                                    FIXTURES / f"{name}.yaml")
  ref = dict(np.load(FIXTURES / f"{name}.npz"))
  info_path = FIXTURES / f"{name}.json"
  info = json.loads(info_path.read_text()) if info_path.exists() else {}
  return conv, ref, info


# --- what each kind of network computes, keyed like the reference arrays ----


def _vq_outputs(conv, ref, info):
  model, v = conv.model, {"params": conv.params}
  x = _nhwc(ref["x"])
  h = model.apply(v, x, method="encode")
  quant, emb_loss, indices = model.apply(v, h, method=lambda m, z: m.quantize(z))
  return {
      "enc_out": model.apply(v, x, method=lambda m, x: m.encoder(x)),
      "h": h, "quant": quant, "emb_loss": emb_loss,
      "indices": np.asarray(indices).reshape(-1),
      "indices_bhw": indices,
      "dec": model.apply(v, h, method="decode"),
      "dec_noq": model.apply(v, h, True, method="decode"),
  }


def _rescaler_outputs(conv, ref, info):
  # Each output `out_S` is the rescaler applied to its input `x_S` / `mask_S`.
  outs = {}
  for key in ref:
    if key.startswith("out_"):
      suffix = key[len("out_"):]
      src = next(k for k in (f"x_{suffix}", f"mask_{suffix}") if k in ref)
      outs[key] = conv.model.apply({"params": conv.params}, _nhwc(ref[src]))
  return outs


def _unet_outputs(conv, ref, info):
  out, state = conv.model.apply({"params": conv.params}, _nhwc(ref["x"]),
                                jnp.asarray(ref["timesteps"]),
                                mutable=["intermediates"])
  inter = state["intermediates"]
  return {"out": out, "t_emb": inter["t_emb"][0], "emb": inter["emb"][0]}


def _ldm_outputs(conv, ref, info):
  ldm, p = conv.model, conv.params
  sched = ldm.schedule()
  s = ldm.settings
  z = ldm.encode(p["first_stage"], _nhwc(ref["x"]))
  c = ldm.cond_stage.apply({"params": p["cond_stage"]}, _nhwc(ref["mask"]))
  t = jnp.asarray(ref["t"])
  noise = _nhwc(ref["noise"])
  x_noisy = objective.q_sample(sched, z, t, noise)
  quant, _, _ = ldm.first_stage.apply(
      {"params": p["first_stage"]}, z / ldm.scale_factor,
      method=lambda m, h: m.quantize(h))
  outs = {"z": z, "c": c, "x_noisy": x_noisy, "first_stage_quant_of_z": quant,
          "unet_input": jnp.concatenate([x_noisy, c], -1)}
  outs.update({f"sched_{k}": getattr(sched, k) for k in
               (r[len("sched_"):] for r in ref if r.startswith("sched_"))})

  num_steps = info.get("ddim_steps_requested", len(ref["ddim_timesteps"]))
  ts = samplers.ddim_timesteps(sched.num_timesteps, num_steps)
  alphas, alphas_prev, sigmas = samplers.ddim_parameters(sched, ts, 0.0)
  outs.update(ddim_timesteps=ts, ddim_alphas=alphas,
              ddim_alphas_prev=alphas_prev, ddim_sigmas=sigmas,
              ddim_sqrt_one_minus_alphas=np.sqrt(1.0 - np.asarray(alphas)))

  weights = {"": p["unet"]}
  if conv.ema is not None:
    weights["_ema"] = conv.ema["unet"]
  for tag, unet in weights.items():
    model_out = ldm.denoise(unet, x_noisy, t, c)
    loss, parts = objective.diffusion_loss(
        sched, model_out, z, t, noise, loss_type=s["loss_type"],
        l_simple_weight=s["l_simple_weight"],
        original_elbo_weight=s["original_elbo_weight"])
    outs[f"model_out{tag}"] = model_out
    outs[f"loss{tag}"] = loss
    for part in ("loss", "loss_simple", "loss_vlb"):
      outs[f"lossdict{tag}_{part}"] = parts[part]
    if not tag:
      outs["loss_simple_per_sample"] = parts["loss_simple_per_sample"]

    sample, inter = samplers.ddim_sample(
        ldm.model_fn(unet, c), sched, _nhwc(ref["x_T"]), num_steps=num_steps, eta=0.0,
        return_intermediates=True)
    d = f"ddim{tag}_"
    outs[d + "samples"] = sample
    outs[d + "x_inter"] = inter["x_inter"]
    outs[d + "pred_x0"] = inter["pred_x0"]
    # Decode the reference samples: the decoder is tested, not the chain.
    ref_samples = _nhwc(ref[d + "samples"])
    outs[d + "decoded"] = ldm.decode(p["first_stage"], ref_samples)
    outs[d + "decoded_noq"] = ldm.decode(p["first_stage"], ref_samples, True)
  return outs


_OUTPUTS = {**{t: _vq_outputs for t in build.VQ_TARGETS},
            build.RESCALER_TARGET: _rescaler_outputs,
            build.UNET_TARGET: _unet_outputs,
            build.LDM_TARGET: _ldm_outputs}
# Reference arrays that are inputs or bookkeeping, not outputs to compare.
_INPUTS = {"x", "labels", "mask_onehot", "x_float", "x_odd", "timesteps",
           "mask_labels", "mask", "t", "noise", "x_T", "scale_factor",
           "tie_margin", "quant_exact_codebook_rows"}


@functools.cache
def _outputs(name: str) -> dict:
  conv, ref, info = _case(name)
  return _OUTPUTS[conv.node["target"]](conv, ref, info)


def _compare_keys(name: str) -> list[str]:
  with np.load(FIXTURES / f"{name}.npz") as ref:
    return [k for k in ref.files if k not in _INPUTS]


_PAIRS = [(case, key) for case in _cases() for key in _compare_keys(case)]


def test_fixture_folder_has_cases():
  assert _cases(), f"no fixture cases (NAME.yaml/.ckpt/.npz) in {FIXTURES}"


@pytest.mark.parametrize("case,key", _PAIRS, ids=[f"{c}:{k}" for c, k in _PAIRS])
def test_matches_reference(case, key):
  _, ref, _ = _case(case)
  outs = _outputs(case)
  assert key in outs, f"{case}: the port computes no {key!r}"
  ours = np.asarray(outs[key])
  want = ref[key]
  if want.ndim == 5:
    want = _stack_nhwc(want)
  elif want.ndim == 4:
    want = _nhwc(want)
  assert ours.shape == want.shape, (ours.shape, want.shape)
  if np.issubdtype(want.dtype, np.integer):
    np.testing.assert_array_equal(ours, want)
  elif key.startswith(("ddim_samples", "ddim_x_inter", "ddim_pred_x0",
                       "ddim_ema_samples", "ddim_ema_x_inter",
                       "ddim_ema_pred_x0")):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(ours, want, rtol=0, atol=CHAIN_RTOL * scale)
  else:
    np.testing.assert_allclose(ours, want, **MODULE_TOL)
