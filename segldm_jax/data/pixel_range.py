"""Pixel conversions between host batches and the model (jittable).

uint8 images travel from the host; the networks see float32 in [-1, 1]
(taming's convention), and samples go back to uint8.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def images_to_model_range(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [-1, 1] (pixel / 127.5 - 1, as taming).

  Written as (x - 127.5) / 127.5: XLA turns the division into a multiply by
  the reciprocal, and this form still maps 0 and 255 to exactly -1 and 1.
  """
  return (images.astype(jnp.float32) - 127.5) / 127.5


def model_range_to_images(images: jax.Array) -> jax.Array:
  """[-1, 1] model outputs -> uint8 pixels (rounded, clipped)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
