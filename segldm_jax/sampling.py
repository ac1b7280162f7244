"""Masks in, images out: conditioning, a compiled sampler, decoding."""

import functools

import jax
import jax.numpy as jnp

from segldm_jax.diffusion import samplers
from segldm_jax.models.ldm import LatentDiffusion


@functools.partial(jax.jit, static_argnames=("ldm", "sampler", "steps", "eta",
                                             "mask_stages"))
def generate(ldm: LatentDiffusion, params, first_stage_params, labels: jax.Array,
             key: jax.Array, *, sampler: str = "ddim", steps: int = 50,
             eta: float = 0.0, mask_stages: int = 0) -> jax.Array:
  """Label maps (B, H, W) uint8 -> images (B, H, W, 3) uint8.

  params: {"unet", "cond_stage"} (pass the EMA UNet to sample with EMA).
  The whole chain (conditioning, `steps` denoising steps, VQ decode) is one
  compiled program; the same key gives the same images.
  """
  c = ldm.cond_stage.apply({"params": params["cond_stage"]}, labels,
                           mask_stages, method="from_labels")
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, (*c.shape[:3], ldm.latent_channels))
  kwargs = {"eta": eta} if sampler == "ddim" else {}
  z = samplers.sample(sampler, ldm.model_fn(params["unet"], c), ldm.schedule(),
                      x_T, num_steps=steps, key=k_loop, **kwargs)
  images = ldm.decode(first_stage_params, z)
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
