"""On-device conversions of host batches (jittable; use inside the step).

Labels travel from the host as small uint8 ids; the one-hot exists only on
the device (a 182-class float32 one-hot of a 256x256 image is 48 MB).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def one_hot_labels(labels: jax.Array, num_classes: int,
                   dtype=jnp.float32) -> jax.Array:
  """(..., H, W) int ids -> (..., H, W, num_classes).

  Ignored pixels (``IGNORE_ID`` = 255, or any id outside
  ``0..num_classes-1``) become all-zero vectors: ``jax.nn.one_hot`` already
  does that for out-of-range ids.
  """
  return jax.nn.one_hot(labels.astype(jnp.int32), num_classes, dtype=dtype)


def images_to_model_range(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [-1, 1] (pixel / 127.5 - 1, as taming).

  Written as (x - 127.5) / 127.5: XLA turns the division into a multiply by
  the reciprocal, and this form still maps 0 and 255 to exactly -1 and 1.
  """
  return (images.astype(jnp.float32) - 127.5) / 127.5
