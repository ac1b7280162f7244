"""The concat-conditioned latent diffusion model: three networks, one function.

`LatentDiffusion` holds the (stateless) Flax modules and the diffusion
settings; its methods take the parameter dicts explicitly, so they can be
called inside any jitted step with whatever sharding the params have.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from segldm_jax.diffusion.schedule import Schedule

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
  """UNet + SpatialRescaler + VQ first stage, with the LDM's settings.

  `settings` holds the LatentDiffusion params of the config with the
  reference defaults filled in (timesteps, beta schedule, loss_type,
  parameterization, scale_factor, ...).
  """
  unet: nn.Module
  cond_stage: nn.Module
  first_stage: nn.Module
  settings: Mapping[str, Any]

  @property
  def latent_channels(self) -> int:
    return self.first_stage.embed_dim

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.first_stage.ch_mult) - 1)

  @property
  def scale_factor(self) -> float:
    return float(self.settings["scale_factor"])

  def schedule(self) -> Schedule:
    s = self.settings
    return Schedule.create(s["beta_schedule"], s["timesteps"], s["linear_start"],
                           s["linear_end"], s["cosine_s"],
                           parameterization=s["parameterization"])

  def encode(self, first_stage_params: Params, image: jax.Array) -> jax.Array:
    """Image in [-1, 1] -> scaled pre-quantisation latent (the LDM's z)."""
    h = self.first_stage.apply({"params": first_stage_params}, image,
                               method="encode")
    return h * self.scale_factor

  def decode(self, first_stage_params: Params, z: jax.Array,
             force_not_quantize: bool = False) -> jax.Array:
    """Latent -> image; snaps to the codebook first, as the reference does."""
    return self.first_stage.apply({"params": first_stage_params},
                                  z / self.scale_factor, force_not_quantize,
                                  method="decode")

  def condition(self, cond_params: Params, labels: jax.Array,
                mask_stages: int = 0) -> jax.Array:
    """Integer label maps (B, H, W) -> conditioning at latent resolution.

    The one way both training and sampling condition on a mask: the
    rescaler's lookup form of `rescaler(one_hot(labels))`, so the one-hot is
    never materialised. Ignore-id pixels (255) condition on nothing.
    `mask_stages` extra halvings stand for data.mask_size < image size.
    """
    return self.cond_stage.apply({"params": cond_params}, labels, mask_stages,
                                 method="from_labels")

  def model_fn(self, unet_params: Params, c: jax.Array,
               guidance_scale: float = 1.0) -> jax.tree_util.Partial:
    """`(x_t, t) -> model output` for the samplers, with params and the
    conditioning as traced leaves (so a sampler compiles once per shape).

    guidance_scale s != 1: classifier-free guidance on the mask,
    uncond + s * (cond - uncond), where "uncond" is the all-zero conditioning
    the model saw for dropped masks (train.cond_drop_prob). Both passes run
    as one batch of 2B.
    """
    if guidance_scale == 1.0:
      return jax.tree_util.Partial(self._denoise_given, unet_params, c)
    return jax.tree_util.Partial(self._denoise_guided, unet_params, c,
                                 jnp.asarray(guidance_scale, jnp.float32))

  def _denoise_given(self, unet_params, c, x_t, t):
    return self.denoise(unet_params, x_t, t, c)

  def _denoise_guided(self, unet_params, c, scale, x_t, t):
    out = self.denoise(unet_params, jnp.concatenate([x_t, x_t]),
                       jnp.concatenate([t, t]),
                       jnp.concatenate([c, jnp.zeros_like(c)]))
    cond, uncond = jnp.split(out.astype(jnp.float32), 2)
    return uncond + scale * (cond - uncond)

  def denoise(self, unet_params: Params, x_t: jax.Array, t: jax.Array,
              c: jax.Array, train: bool = False, rngs=None) -> jax.Array:
    """The model output (eps or x0) for noisy latents and conditioning."""
    return self.unet.apply({"params": unet_params},
                           jnp.concatenate([x_t, c.astype(x_t.dtype)], axis=-1),
                           t, train, rngs=rngs)
