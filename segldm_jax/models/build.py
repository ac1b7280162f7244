"""Build the Flax networks from LDM-style configs (`target` + `params`).

The YAML that ships beside a latent-diffusion `model.ckpt` is the model
description users already have, so it is also ours: converted checkpoints
store it, and `build_model` turns any supported node into Flax modules. Options
that would change the computed function but are not implemented are refused by
name rather than ignored.
"""

import dataclasses
import functools
import pathlib
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import yaml

from segldm_jax.errors import ModelConfigError

from segldm_jax.models.autoencoder import VQModel
from segldm_jax.models.ldm import LatentDiffusion
from segldm_jax.models.rescaler import SpatialRescaler
from segldm_jax.models.unet import UNetModel

VQ_TARGETS = ("ldm.models.autoencoder.VQModelInterface",
              "ldm.models.autoencoder.VQModel", "taming.models.vqgan.VQModel")
RESCALER_TARGET = "ldm.modules.encoders.modules.SpatialRescaler"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"

# Keys that carry no meaning for the computed function (bookkeeping, training
# scripts, memory tricks), mapped to the values that are safe to ignore
# (None = any value).
_UNET_INERT = {"image_size": None, "use_checkpoint": None, "use_fp16": None,
               "legacy": None, "dims": 2, "use_spatial_transformer": False,
               "context_dim": None, "num_classes": None, "n_embed": None,
               "transformer_depth": None}
_VQ_INERT = {"lossconfig": None, "ckpt_path": None, "ignore_keys": None,
             "image_key": None, "colorize_nlabels": None, "monitor": None,
             "batch_resize_range": None, "scheduler_config": None,
             "lr_g_factor": None, "remap": None, "sane_index_shape": None,
             "use_ema": None}
_DDCONFIG_INERT = {"double_z": False, "give_pre_end": False, "tanh_out": False,
                   "resamp_with_conv": True}
# Diffusion settings we implement, with the reference defaults.
_LDM_DEFAULTS = {
    "timesteps": 1000, "beta_schedule": "linear", "linear_start": 1e-4,
    "linear_end": 2e-2, "cosine_s": 8e-3, "loss_type": "l2",
    "parameterization": "eps", "l_simple_weight": 1.0,
    "original_elbo_weight": 0.0, "scale_factor": 1.0, "use_ema": True,
    "conditioning_key": None, "concat_mode": True, "image_size": 256,
    "channels": 3, "cond_stage_trainable": False, "num_timesteps_cond": 1,
    "scale_by_std": False, "learn_logvar": False, "logvar_init": 0.0,
    "v_posterior": 0.0,
}
_LDM_INERT = {
    "log_every_t": None, "first_stage_key": None, "cond_stage_key": None,
    "monitor": None, "clip_denoised": None, "ckpt_path": None,
    "ignore_keys": None, "load_only_unet": None, "use_positional_encodings": None,
    "cond_stage_forward": None, "scheduler_config": None, "given_betas": None,
}


def _check_keys(where: str, params: Mapping[str, Any], known: set[str],
                inert: Mapping[str, Any]) -> None:
  for key, value in params.items():
    if key in known:
      continue
    if key not in inert:
      raise ModelConfigError(f"{where}: unknown option {key!r}={value!r}; supported: "
                        f"{', '.join(sorted(known))}")
    safe = inert[key]
    if safe is not None and value != safe and value is not None:
      raise ModelConfigError(f"{where}: option {key}={value!r} is not supported "
                        f"(only {key}={safe!r})")


def _fields(cls) -> set[str]:
  # dtype, conv and remat say how to compute, not what (train.compute_dtype,
  # the backend's convolutions, train.remat): set by code, not by configs.
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name",
                                                      "dtype", "conv", "remat"}


def build_vq(params: Mapping[str, Any], **kw) -> VQModel:
  params = dict(params)
  dd = dict(params.pop("ddconfig"))
  _check_keys("first stage", params, {"embed_dim", "n_embed"}, _VQ_INERT)
  _check_keys("first stage ddconfig", dd, _fields(VQModel) | {"in_channels"},
              _DDCONFIG_INERT)
  for k in _DDCONFIG_INERT:
    dd.pop(k, None)
  dd["ch_mult"] = tuple(dd["ch_mult"])
  dd["attn_resolutions"] = tuple(dd.get("attn_resolutions", ()))
  return VQModel(embed_dim=params["embed_dim"], n_embed=params["n_embed"],
                 **dd, **kw)


def build_rescaler(params: Mapping[str, Any], **kw) -> SpatialRescaler:
  _check_keys("SpatialRescaler", params, _fields(SpatialRescaler), {})
  kw.pop("conv", None)  # no 3x3 convolutions
  return SpatialRescaler(**params, **kw)


def build_unet(params: Mapping[str, Any], **kw) -> UNetModel:
  _check_keys("UNetModel", params, _fields(UNetModel), _UNET_INERT)
  p = {k: v for k, v in params.items() if k not in _UNET_INERT}
  for k in ("channel_mult", "attention_resolutions"):
    if k in p:
      p[k] = tuple(p[k])
  return UNetModel(**p, **kw)


def build_ldm(params: Mapping[str, Any], **kw) -> LatentDiffusion:
  params = dict(params)
  sub = {k: params.pop(k) for k in ("unet_config", "first_stage_config",
                                    "cond_stage_config")}
  _check_keys("LatentDiffusion", params, set(_LDM_DEFAULTS), _LDM_INERT)
  settings = dict(_LDM_DEFAULTS)
  settings.update({k: v for k, v in params.items() if k in _LDM_DEFAULTS})
  if settings.get("conditioning_key") is None:
    settings["conditioning_key"] = "concat" if settings["concat_mode"] else "crossattn"
  if settings["conditioning_key"] != "concat":
    raise ModelConfigError("LatentDiffusion: only conditioning_key 'concat' (the "
                      f"segmentation recipe) is supported, got "
                      f"{settings['conditioning_key']!r}")
  if settings["learn_logvar"]:
    raise ModelConfigError("LatentDiffusion: learn_logvar=True is not supported")
  if settings["num_timesteps_cond"] != 1:
    raise ModelConfigError("LatentDiffusion: num_timesteps_cond must be 1")
  ldm = LatentDiffusion(
      unet=build_model(sub["unet_config"], **kw),
      cond_stage=build_model(sub["cond_stage_config"], **kw),
      first_stage=build_model(sub["first_stage_config"], **kw),
      settings=flax.core.FrozenDict(settings))
  if not isinstance(ldm.unet, UNetModel) or not isinstance(
      ldm.first_stage, VQModel) or not isinstance(ldm.cond_stage, SpatialRescaler):
    raise ModelConfigError("LatentDiffusion: expected a UNetModel, a VQ first stage "
                      "and a SpatialRescaler cond stage")
  return ldm


_BUILDERS = {UNET_TARGET: build_unet, RESCALER_TARGET: build_rescaler,
             LDM_TARGET: build_ldm, **{t: build_vq for t in VQ_TARGETS}}


def build_model(node: Mapping[str, Any], **kw) -> nn.Module | LatentDiffusion:
  """`{"target": ..., "params": {...}}` -> Flax module (or LatentDiffusion).

  Extra keyword arguments (e.g. `dtype=jnp.bfloat16`) go to every module.
  """
  target = node.get("target")
  if target not in _BUILDERS:
    raise ModelConfigError(f"unsupported model target {target!r}; supported: "
                      f"{', '.join(sorted(_BUILDERS))}")
  return _BUILDERS[target](node.get("params", {}), **kw)


def load_model_config(path: str | pathlib.Path) -> dict:
  """Read an LDM-style YAML/JSON file and return its `model` node."""
  path = pathlib.Path(path)
  try:
    doc = yaml.safe_load(path.read_text())
  except (OSError, yaml.YAMLError) as e:
    raise ModelConfigError(f"{path}: cannot read model config: {e}") from None
  node = doc.get("model", doc) if isinstance(doc, dict) else None
  if not isinstance(node, dict) or "target" not in node:
    raise ModelConfigError(f"{path}: no `model.target` found; expected an LDM-style "
                      "config (model: {target: ..., params: ...})")
  return node


def example_inputs(module: nn.Module, batch: int = 1) -> tuple[jax.Array, ...]:
  """The smallest valid inputs of a network (for init and shape inference)."""
  if isinstance(module, VQModel):
    f = 2 ** (len(module.ch_mult) - 1)
    return (jnp.zeros((batch, f, f, module.in_channels)),)
  if isinstance(module, UNetModel):
    f = 2 ** (len(module.channel_mult) - 1)
    return (jnp.zeros((batch, f, f, module.in_channels)),
            jnp.zeros((batch,), jnp.int32))
  if isinstance(module, SpatialRescaler):
    f = 2 ** module.n_stages
    return (jnp.zeros((batch, f, f, module.in_channels)),)
  raise TypeError(f"no example inputs for {type(module).__name__}")


def init_params(module: nn.Module, rng: jax.Array):
  """Fresh parameters of a network, as one compiled program.

  Jitted because eager `init` dispatches every layer's initialiser and
  forward op on its own, and each distinct one compiles: about 170 programs
  for the tiny VQ, seconds of a CPU start-up even when read back from the
  compilation cache. The values are bit-identical to eager init's.
  """
  return _init_params_jit(module, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(module: nn.Module, rng: jax.Array):
  return module.init(rng, *example_inputs(module))["params"]


def param_shapes(module: nn.Module):
  """Parameter tree of ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(lambda: init_params(module, jax.random.key(0)))
