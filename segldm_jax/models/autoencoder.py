"""VQ first stage (taming `Encoder`/`Decoder`/`VectorQuantizer2`), NHWC.

`VQModel` has the semantics of latent-diffusion's `VQModelInterface`:
`encode` returns the pre-quantisation latent (after `quant_conv`), `decode`
snaps it to the codebook first unless `force_not_quantize`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segldm_jax.models import layers

Dtype = Any
# taming's `Normalize` uses 1e-6, unlike the UNet's 1e-5.
_EPS = 1e-6


class ResnetBlock(nn.Module):
  """norm-SiLU-conv twice; 1x1 `nin_shortcut` only where the width changes."""
  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = nn.silu(layers.group_norm(x, _EPS, "norm1"))
    h = layers.conv3x3(self.out_channels, self.dtype, "conv1", conv=self.conv)(h)
    h = nn.silu(layers.group_norm(h, _EPS, "norm2"))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv3x3(self.out_channels, self.dtype, "conv2", conv=self.conv)(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Dense(self.out_channels, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over pixels with a residual connection."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    h = layers.group_norm(x, _EPS, "norm")
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in "qkv")
    h = layers.spatial_attention(q, k, v, num_heads=1)
    return x + nn.Dense(c, dtype=self.dtype, name="proj_out")(h)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding right/bottom by one.

  Not flax "SAME": for odd sizes SAME pads both sides; taming pads (0, 1).
  """
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv3x3(x.shape[-1], self.dtype, "conv", stride=2,
                          padding=((0, 1), (0, 1)), conv=self.conv)(x)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.upsample_nearest(x)
    return layers.conv3x3(x.shape[-1], self.dtype, "conv", conv=self.conv)(x)


class MidBlock(nn.Module):
  """block_1 -> attn_1 -> block_2; present at every resolution config."""
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.dropout, self.dtype, name="block_1",
                    conv=self.conv)(x, train)
    x = AttnBlock(self.dtype, name="attn_1")(x)
    return ResnetBlock(c, self.dropout, self.dtype, name="block_2",
                       conv=self.conv)(x, train)


class Level(nn.Module):
  """One resolution level: res blocks (each followed by attention if asked)
  and an optional resampler, named like taming's `down[i]` / `up[i]`."""
  out_channels: int
  num_blocks: int
  use_attn: bool
  resample: str | None  # "downsample", "upsample" or None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, self.dtype,
                      name=f"block_{i}", conv=self.conv)(x, train)
      if self.use_attn:
        x = AttnBlock(self.dtype, name=f"attn_{i}")(x)
    if self.resample == "downsample":
      x = Downsample(self.dtype, name="downsample", conv=self.conv)(x)
    elif self.resample == "upsample":
      x = Upsample(self.dtype, name="upsample", conv=self.conv)(x)
    return x


class _Coder(nn.Module):
  """The hyper-parameters taming's Encoder and Decoder share (`ddconfig`)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)


class Encoder(_Coder):
  z_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = layers.conv3x3(self.ch, self.dtype, "conv_in", conv=self.conv)(x)
    # Attention placement follows the configured resolution, not the input's.
    res = self.resolution
    last = len(self.ch_mult) - 1
    for i, mult in enumerate(self.ch_mult):
      h = Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                "downsample" if i != last else None, self.dropout, self.dtype,
                name=f"down_{i}", conv=self.conv)(h, train)
      res = res // 2 if i != last else res
    h = MidBlock(self.dropout, self.dtype, name="mid", conv=self.conv)(h, train)
    h = nn.silu(layers.group_norm(h, _EPS, "norm_out"))
    return layers.conv3x3(self.z_channels, self.dtype, "conv_out",
                          conv=self.conv)(h)


class Decoder(_Coder):
  out_ch: int = 3

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    levels = len(self.ch_mult)
    h = layers.conv3x3(self.ch * self.ch_mult[-1], self.dtype, "conv_in",
                       conv=self.conv)(z)
    h = MidBlock(self.dropout, self.dtype, name="mid", conv=self.conv)(h, train)
    res = self.resolution // 2 ** (levels - 1)
    # Runs from the lowest resolution up, but `up_i` is indexed by level
    # (0 = full resolution), as taming builds its list by prepending.
    for i in reversed(range(levels)):
      h = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                res in self.attn_resolutions, "upsample" if i != 0 else None,
                self.dropout, self.dtype, name=f"up_{i}", conv=self.conv)(h, train)
      res = res * 2 if i != 0 else res
    h = nn.silu(layers.group_norm(h, _EPS, "norm_out"))
    return layers.conv3x3(self.out_ch, self.dtype, "conv_out",
                          conv=self.conv)(h)


class VectorQuantizer(nn.Module):
  """Nearest-codebook quantiser (`VectorQuantizer2`, legacy loss weighting)."""
  n_embed: int
  embed_dim: int
  beta: float = 0.25

  def setup(self):
    init = nn.initializers.uniform(scale=2.0 / self.n_embed)
    self.embedding = nn.Embed(
        self.n_embed, self.embed_dim,
        embedding_init=lambda k, s, d: init(k, s, d) - 1.0 / self.n_embed)

  def codes(self, z: jax.Array) -> jax.Array:
    """Codebook indices (B, H, W); argmin takes the first index on ties."""
    e = self.embedding.embedding.astype(jnp.float32)
    z = z.astype(jnp.float32)
    # |z|^2 + |e|^2 - 2 z.e, the reference's expansion (same rounding on ties).
    d = (jnp.sum(z ** 2, -1, keepdims=True) + jnp.sum(e ** 2, -1)
         - 2.0 * jnp.einsum("bhwc,nc->bhwn", z, e,
                            precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1)

  def lookup(self, indices: jax.Array) -> jax.Array:
    return self.embedding(indices)

  def __call__(self, z: jax.Array):
    """Returns (quantised z with straight-through gradient, loss, indices)."""
    indices = self.codes(z)
    e = self.lookup(indices).astype(z.dtype)
    sg = jax.lax.stop_gradient
    # legacy=True: commitment term weight 1, codebook term weight beta.
    loss = jnp.mean((sg(e) - z) ** 2) + self.beta * jnp.mean((e - sg(z)) ** 2)
    return z + sg(e - z), loss, indices


class VQModel(nn.Module):
  """VQ-f autoencoder with the hyper-parameters of an LDM `ddconfig`."""
  embed_dim: int
  n_embed: int
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  in_channels: int = 3
  out_ch: int = 3
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult),
                  num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions),
                  resolution=self.resolution, dropout=self.dropout,
                  dtype=self.dtype, conv=self.conv)
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.decoder = Decoder(out_ch=self.out_ch, **common)
    self.quant_conv = nn.Dense(self.embed_dim, dtype=self.dtype)
    self.post_quant_conv = nn.Dense(self.z_channels, dtype=self.dtype)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Image in [-1, 1] (B, H, W, in) -> pre-quantisation latent."""
    return self.quant_conv(self.encoder(x, train))

  def decode(self, h: jax.Array, force_not_quantize: bool = False,
             train: bool = False) -> jax.Array:
    if not force_not_quantize:
      h, _, _ = self.quantize(h)
    return self.decoder(self.post_quant_conv(h), train)

  def decode_code(self, indices: jax.Array) -> jax.Array:
    """Codebook indices (B, h, w) -> image."""
    return self.decoder(self.post_quant_conv(self.quantize.lookup(indices)))

  def __call__(self, x: jax.Array, train: bool = False):
    """Reconstruction for autoencoder training: (x_rec, codebook loss, codes)."""
    quant, loss, indices = self.quantize(self.encode(x, train))
    return self.decoder(self.post_quant_conv(quant), train), loss, indices
