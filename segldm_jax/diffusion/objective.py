"""Forward noising and the training loss of `LatentDiffusion.p_losses`.

Reference: CompVis/latent-diffusion @ a506df5, `ldm/models/diffusion/ddpm.py`
(`DDPM.q_sample`, `DDPM.get_loss`, `LatentDiffusion.p_losses`). Arrays are
channels-last (NHWC) here; every reduction is over all non-batch axes, so the
layout does not change any value.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from segldm_jax.diffusion.schedule import Schedule, gather_at

LOSS_TYPES = ("l1", "l2")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise (float32 buffers).

  Args:
    schedule: the noise schedule.
    x0: clean latents (B, ...), e.g. NHWC.
    t: int timesteps (B,).
    noise: standard normal noise, same shape as x0.
  """
  if x0.shape != noise.shape:
    raise ValueError(f"x0 {x0.shape} and noise {noise.shape} differ in shape")
  x0 = x0.astype(jnp.float32)
  noise = noise.astype(jnp.float32)
  return (gather_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          gather_at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def diffusion_loss(schedule: Schedule, model_out: jax.Array, x0: jax.Array,
                   t: jax.Array, noise: jax.Array, *, loss_type: str = "l1",
                   l_simple_weight: float = 1.0,
                   original_elbo_weight: float = 0.0,
                   logvar: Optional[jax.Array] = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`LatentDiffusion.p_losses` given the model output.

  Args:
    schedule: the noise schedule; its `parameterization` picks the target
      (noise for "eps", x0 for "x0").
    model_out: model prediction, shape of x0 (may be bf16; math is float32).
    x0: clean latents.
    t: int timesteps (B,).
    noise: the noise used to build x_t.
    loss_type: "l1" (|target - out|) or "l2" (squared error).
    l_simple_weight: weight of the simple loss.
    original_elbo_weight: weight of the VLB term (0: only logged).
    logvar: optional per-timestep log-variance (T,); None means zeros, the
      original's default (learn_logvar False, logvar_init 0).

  Returns:
    (loss, parts) with parts `loss`, `loss_simple`, `loss_vlb` (scalars) and
    `loss_simple_per_sample` (B,).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(
        f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  if not model_out.shape == x0.shape == noise.shape:
    raise ValueError(f"model_out {model_out.shape}, x0 {x0.shape} and noise "
                     f"{noise.shape} must have the same shape")
  if t.shape != x0.shape[:1]:
    raise ValueError(f"t must have shape {x0.shape[:1]}, got {t.shape}")
  target = noise if schedule.parameterization == "eps" else x0
  diff = target.astype(jnp.float32) - model_out.astype(jnp.float32)
  err = jnp.abs(diff) if loss_type == "l1" else jnp.square(diff)
  per_sample = jnp.mean(err, axis=tuple(range(1, err.ndim)))
  if logvar is None:
    logvar_t = jnp.zeros_like(per_sample)
  else:
    logvar_t = jnp.take(jnp.asarray(logvar, jnp.float32), t, axis=0)
  loss = l_simple_weight * jnp.mean(per_sample / jnp.exp(logvar_t) + logvar_t)
  # The original recomputes the same per-sample loss for the VLB term.
  loss_vlb = jnp.mean(jnp.take(schedule.lvlb_weights, t, axis=0) * per_sample)
  loss = loss + original_elbo_weight * loss_vlb
  parts = {
      "loss": loss,
      "loss_simple": jnp.mean(per_sample),
      "loss_vlb": loss_vlb,
      "loss_simple_per_sample": per_sample,
  }
  return loss, parts
