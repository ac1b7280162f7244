"""Small building blocks shared by the autoencoder and the UNet (NHWC).

Module names inside the networks are chosen so that a Flax parameter path is the
PyTorch state_dict key with each numeric index glued to the name before it
(`encoder.down.0.block.1.norm1.weight` -> `encoder/down_0/block_1/norm1/scale`);
`segldm_jax.convert` relies on that rule and nothing else.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segldm_jax.models import winograd

Dtype = Any


class GroupNorm32(nn.Module):
  """torch.nn.GroupNorm(32, C): statistics per (sample, group of contiguous
  channels), biased variance in two passes (as torch, accurate when the
  mean is large), then a per-channel affine. Parameters `scale` and `bias`
  as flax's GroupNorm.

  Written out because flax's `use_fast_variance=False` path ran several
  times slower on CPU than these two fused reductions (BENCHMARKS.md, the
  CPU section's GroupNorm line), for the same result (5e-7).
  """
  epsilon: float
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    g = x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = (*range(1, g.ndim - 2), g.ndim - 1)  # spatial + within-group
    mean = jnp.mean(g, axes, keepdims=True)
    d = g - mean
    var = jnp.mean(d * d, axes, keepdims=True)
    y = (d * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return y * scale + bias


def group_norm(x: jax.Array, epsilon: float, name: str) -> jax.Array:
  """GroupNorm over 32 contiguous channel groups, computed in float32.

  Called inside a compact method, so the norm's parameters live at `name`
  directly. The reference normalises in float32 (`GroupNorm32`), so bf16
  compute keeps exact statistics; the result returns in the input dtype.
  """
  y = GroupNorm32(epsilon=epsilon, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


# How a 3x3 convolution is computed; the parameters are the same either way.
# "winograd" takes F(2x2, 3x3) where it measured faster on CPU and XLA's
# convolution elsewhere (see winograd.py); the entry points choose it for the
# CPU backend (xla_cpu.preferred_conv).
CONV_IMPLS = {"xla": lax.conv_general_dilated,
              "winograd": winograd.conv_general_dilated}


def conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1,
            padding=((1, 1), (1, 1)), zero_init: bool = False,
            conv: str = "xla") -> nn.Conv:
  """3x3 convolution with explicit padding (never "SAME": the two Downsample
  flavours pad differently). `zero_init` mirrors openaimodel's zero_module;
  `conv` names one of CONV_IMPLS."""
  if conv not in CONV_IMPLS:
    raise ValueError(f"conv={conv!r}; use one of {sorted(CONV_IMPLS)}")
  kw = {"kernel_init": nn.initializers.zeros} if zero_init else {}
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name,
                 conv_general_dilated=CONV_IMPLS[conv], **kw)


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2: each pixel becomes a 2x2 block (exact, no resize)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 mean with stride 2; odd trailing rows/columns are dropped (floor)."""
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def spatial_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      num_heads: int) -> jax.Array:
  """Softmax attention over all pixels, heads split from the channel axis.

  q, k, v: (B, H, W, C) with channel = head * d + c (head-major, as both
  reference attention blocks reassemble their output). Softmax runs in float32.
  """
  b, h, w, c = q.shape
  d = c // num_heads
  shape = (b, h * w, num_heads, d)
  out = jax.nn.dot_product_attention(
      q.reshape(shape), k.reshape(shape), v.reshape(shape),
      scale=d ** -0.5, implementation="xla")
  return out.reshape(b, h, w, c).astype(q.dtype)
