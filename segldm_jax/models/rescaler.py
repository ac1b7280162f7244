"""SpatialRescaler: the trainable conditioning stage of the segmentation LDM."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segldm_jax.models import layers


def _halve_nearest(x: jax.Array) -> jax.Array:
  # torch nearest with scale 0.5 reads source pixel 2*i.
  b, h, w, c = x.shape
  return x[:, : h // 2 * 2 : 2, : w // 2 * 2 : 2]


# torch `F.interpolate(scale_factor=0.5, align_corners=False)` samples at
# 2i + 0.5, i.e. exactly the mean of each 2x2 cell (floor for odd sizes).
_HALVE = {"bilinear": layers.avg_pool2, "nearest": _halve_nearest}


class SpatialRescaler(nn.Module):
  """`n_stages` halvings, then a bias-free 1x1 map `in_channels -> out_channels`.

  On a one-hot mask two bilinear stages give each latent pixel the class
  fractions of its 4x4 cell, so the rescaler sees areas, not hard labels.
  """
  n_stages: int = 1
  in_channels: int = 3
  out_channels: int | None = None
  method: str = "bilinear"
  multiplier: float = 0.5
  bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.n_stages < 0:
      raise ValueError(f"SpatialRescaler.n_stages must be >= 0, got {self.n_stages}")
    if self.method not in _HALVE or self.multiplier != 0.5:
      raise NotImplementedError(
          f"SpatialRescaler supports method in {sorted(_HALVE)} with multiplier "
          f"0.5; got method={self.method!r}, multiplier={self.multiplier}")
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"SpatialRescaler expects {self.in_channels} channels, "
                       f"got input of shape {x.shape}")
    for _ in range(self.n_stages):
      x = _HALVE[self.method](x)
    if self.out_channels is not None:
      x = nn.Dense(self.out_channels, use_bias=self.bias, dtype=self.dtype,
                   name="channel_mapper")(x)
    return x
