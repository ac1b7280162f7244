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

  def from_labels(self, labels: jax.Array, mask_stages: int = 0) -> jax.Array:
    """Same as `self(one_hot(labels))`, without materialising the one-hot.

    `mask_stages` extra 2x2 area averages stand for a dataset that delivers
    masks at a lower resolution as class fractions (data.mask_size < image).

    The halvings are linear and the 1x1 map is a per-pixel linear map, so they
    commute: look up each label's kernel row, then halve. A 182-class one-hot
    at 256x256 is 48 MB per image in float32; this reads 3 channels. Ids
    >= in_channels (the ignore id) map to zeros, like an all-zero one-hot.
    """
    if self.out_channels is None:
      x = jax.nn.one_hot(labels, self.in_channels, dtype=self.dtype)
      for _ in range(mask_stages):
        x = layers.avg_pool2(x)
      return self(x)
    mapper = self.variables["params"]["channel_mapper"]
    table = jnp.concatenate(
        [mapper["kernel"], jnp.zeros((1, self.out_channels), mapper["kernel"].dtype)])
    x = table[jnp.minimum(labels.astype(jnp.int32), self.in_channels)]
    x = x.astype(self.dtype)
    for _ in range(mask_stages):
      x = layers.avg_pool2(x)
    for _ in range(self.n_stages):
      x = _HALVE[self.method](x)
    if self.bias:
      x = x + mapper["bias"].astype(self.dtype)
    return x
