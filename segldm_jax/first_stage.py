"""The frozen first stage of a run: loaded, trained here (demo), or random.

Order of preference: `first_stage.checkpoint` (a model directory, e.g. a
converted vq-f4; relative paths may be relative to the workdir), then a
first stage this workdir trained before, then training one now when
`first_stage.train_steps > 0` (the demo), then random weights when
`first_stage.allow_random_init` (smoke tests only).
"""

import pathlib

from absl import logging
import jax
import jax.numpy as jnp

from segldm_jax import checkpoints
from segldm_jax import errors
from segldm_jax import layout
from segldm_jax import parallel
from segldm_jax import run_config
from segldm_jax import vq_training
from segldm_jax.data.device import images_to_model_range
from segldm_jax.models import build


def _resolve(path: str, workdir: pathlib.Path) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_absolute() and not p.exists() and (workdir / p).exists():
    return workdir / p
  return p


def load_existing(config, workdir: pathlib.Path, **build_kw):
  """The configured or previously trained first stage, or None.

  `build_kw` (e.g. conv) goes to the model builder."""
  own = workdir / layout.FIRST_STAGE_DIR
  checkpoint = config.get("first_stage", {}).get("checkpoint")
  if checkpoint:
    path = _resolve(checkpoint, workdir)
    logging.info("first stage: %s", path)
    return checkpoints.load_model_dir(path, **build_kw)
  if (own / layout.MODEL_FILE).is_file():
    logging.info("first stage: trained earlier in this workdir (%s)", own)
    return checkpoints.load_model_dir(own, **build_kw)
  return None


def check(config, workdir: pathlib.Path) -> None:
  """Start-up check of the first stage `load_existing` would load: it is a
  model directory, its weights match its model.yaml, it is a VQ, and its
  latents fit the LDM config. Reads metadata only.

  Raises:
    errors.ConfigError: one line naming the first stage and the problem.
  """
  checkpoint = config.get("first_stage", {}).get("checkpoint")
  own = workdir / layout.FIRST_STAGE_DIR
  if checkpoint:
    path = _resolve(checkpoint, workdir)
    what = f"first_stage.checkpoint={checkpoint}"
  elif (own / layout.MODEL_FILE).is_file():
    path, what = own, f"the first stage trained earlier in {own}"
  else:
    return
  try:
    node = checkpoints.check_model_dir(path)
  except (OSError, ValueError) as e:  # not found, mismatch, bad model.yaml
    raise errors.ConfigError(f"{what}: {e}") from None
  if node.get("target") not in build.VQ_TARGETS:
    raise errors.ConfigError(
        f"{what} holds a {node.get('target')}, not a VQ first stage; "
        "convert the VQ (e.g. vq-f4/model.ckpt) and pass its directory")
  trial = config.copy_and_resolve_references()
  with trial.unlocked():
    trial.model.params.first_stage_config = node
  try:
    run_config.geometry(trial)
  except errors.ConfigError as e:
    raise errors.ConfigError(f"with {what}: {e}") from None


def prepare(config, workdir: pathlib.Path, mesh, source, **build_kw):
  """-> (VQModel, params, LDM-style node of the first stage); `build_kw`
  (e.g. conv) goes to the model builder."""
  own = workdir / layout.FIRST_STAGE_DIR
  fs = config.first_stage
  # Every process must see the workdir as it was before any of them writes
  # a first stage into it: a late process would otherwise find process 0's
  # model.yaml without its weights and take another branch.
  parallel.barrier("first_stage:look")
  found = load_existing(config, workdir, **build_kw)
  if found is not None:
    module, params, node = found
  elif fs.train_steps > 0:
    node = config.model.params.first_stage_config.to_dict()
    module = build.build_model(node, **build_kw)
    params = vq_training.train_first_stage(
        module, config, mesh, source, own, node)
  elif fs.allow_random_init:
    node = config.model.params.first_stage_config.to_dict()
    module = build.build_model(node, **build_kw)
    params = build.init_params(module, jax.random.key(config.seed + 1))
    logging.warning("first stage: RANDOM weights (first_stage.allow_random_init)")
    # Saved, so sample.py and resumed runs see the same weights.
    checkpoints.save_model_dir(own, node, jax.device_get(params))
  else:
    raise errors.ConfigError(
        "first_stage.checkpoint is empty; see configs/seg_f4.py")
  if not isinstance(module, build.VQModel):
    raise errors.ConfigError(
        f"first stage must be a VQ model, got {node.get('target')}")
  return module, params, node


def std_scale_factor(module, params, images: jax.Array, workdir: pathlib.Path,
                     resuming: bool) -> float:
  """`scale_by_std` as the reference does it: 1 / std of the first batch's
  pre-quantisation latents, measured once when a run starts and then kept
  (config.json holds it for resumed runs and for sample.py).

  Diffusion's noise schedule assumes latents of unit scale; a VQ's latents
  are whatever its training made them (the demo VQ's: std ~0.77).
  """
  if resuming:  # also a converted workdir at step 0: the file's value
    return float(run_config.load(workdir).model.params.scale_factor)

  @jax.jit
  def latent_std(params, images):
    h = module.apply({"params": params}, images_to_model_range(images),
                     method="encode")
    return jnp.std(h.astype(jnp.float32))

  scale = 1.0 / float(latent_std(params, images))
  logging.info("scale_by_std: latent std %.4f, scale_factor %.4f",
               1.0 / scale, scale)
  return scale
