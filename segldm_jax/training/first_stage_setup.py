"""A training run's frozen first stage: the one it already has, a VQ
trained now (the demo's `first_stage.train_steps`), or random weights
(`first_stage.allow_random_init`, smoke tests only); and the latent scale
the run measures once (`scale_by_std`). `set_up` does all of it for train.py.
"""

import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.data.pixel_range import images_to_model_range
from segldm_jax.inference import first_stage
from segldm_jax.models import build
from segldm_jax.runtime import distributed
from segldm_jax.runtime import sharding
from segldm_jax.training import vq_trainer


def set_up(config, workdir: pathlib.Path, mesh, source, first_batch,
           resuming: bool, **build_kw) -> Any:
  """-> the run's frozen first stage's params (`prepare`), replicated over
  `mesh`. config.model gets the first stage's node and, with scale_by_std,
  the scale factor (`std_scale_factor` of `first_batch`)."""
  module, params, node = prepare(config, workdir, mesh, source, **build_kw)
  params = jax.device_put(params, sharding.replicated(mesh))
  with config.unlocked():
    config.model.params.first_stage_config = node
    if config.model.params.get("scale_by_std", False):
      config.model.params.scale_factor = std_scale_factor(
          module, params, first_batch["image"], workdir, resuming)
  return params


def prepare(config, workdir: pathlib.Path, mesh, source, **build_kw):
  """-> (VQModel, params, LDM-style node of the first stage); `build_kw`
  (e.g. conv) goes to the model builder."""
  own = workdir / workdir_files.FIRST_STAGE_DIR
  fs = config.first_stage
  # Every process must see the workdir as it was before any of them writes
  # a first stage into it: a late process would otherwise find process 0's
  # model.yaml without its weights and take another branch.
  distributed.barrier("first_stage:look")
  found = first_stage.load_existing(config, workdir, **build_kw)
  if found is not None:
    module, params, node = found
  elif fs.train_steps > 0:
    node = config.model.params.first_stage_config.to_dict()
    module = build.build_model(node, **build_kw)
    params = vq_trainer.train_first_stage(
        module, config, mesh, source, workdir, node)
  elif fs.allow_random_init:
    node = config.model.params.first_stage_config.to_dict()
    module = build.build_model(node, **build_kw)
    params = build.init_params(module, jax.random.key(config.seed + 1))
    logging.warning("first stage: RANDOM weights (first_stage.allow_random_init)")
    # Saved, so sample.py and resumed runs see the same weights.
    store.save_model_dir(own, node, jax.device_get(params))
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
  are whatever its training made them (the demo VQ's: BENCHMARKS.md).
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
