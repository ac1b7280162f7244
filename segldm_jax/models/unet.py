"""openaimodel `UNetModel` (the LDM denoiser), NHWC.

Submodule names follow the reference's state_dict: `input_blocks_{k}_{j}`,
`middle_block_{j}`, `output_blocks_{k}_{j}`, `time_embed_{0,2}`, `out_{0,2}`.

`remat` (train.remat) recomputes each residual and attention block's
activations in the backward pass instead of keeping them: flax's `nn.remat`
keeps the module names, so the parameter tree is the same with or without;
`_after_its_gradient` makes each recomputation wait for the backward pass.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segldm_jax.models import layers

Dtype = Any
# torch's GroupNorm default; the VQ autoencoder uses 1e-6.
_EPS = 1e-5


def _convs_and_dots_saveable(prim, *_, **__) -> bool:
  # Convolutions and matrix products are what costs time to recompute; the
  # GroupNorms (float32), SiLUs and adds around them are what fills memory.
  return prim.name in ("conv_general_dilated", "dot_general")


# train.remat: what a block keeps for the backward pass. "block" keeps only
# its inputs and recomputes the rest; "dots_saveable" keeps the outputs of
# its convolutions and matrix products and recomputes norms and activations.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": _convs_and_dots_saveable,
}


def one_after(x: jax.Array) -> jax.Array:
  """A float32 1 that XLA can only compute once `x` exists: multiplying by
  it orders work after `x` where optimisation barriers are dropped (XLA:CPU
  removes them before scheduling). Exact while `x` is finite."""
  return x.reshape(-1)[0].astype(jnp.float32) * 0 + 1


def _after_its_gradient(block: nn.Module, *args, static=()) -> jax.Array:
  """`block(*args, *static)` (an `nn.remat` module) whose recomputation in
  the backward pass cannot start before the gradient of its output exists.

  `jax.checkpoint` puts an optimisation barrier on the saved inputs alone,
  so XLA may schedule the recomputation as soon as those exist. XLA:CPU
  also drops optimisation barriers before scheduling, and its scheduler
  moved every block's recomputed forward (with the float32 copies of its
  bf16 activations) into the forward pass, where all of them stayed live
  until the backward pass reached them: remat saved no memory on CPU
  (BENCHMARKS.md). Here the saved values and the output's gradient pass one
  barrier together, and, for backends that drop the barrier, the saved
  values are also multiplied by a 1 computed from the gradient: a data
  dependence no scheduler can reorder, at the price of one fused multiply.
  That 1 is exact while the gradient is finite (a non-finite one makes the
  block's bias gradients, and so the step, non-finite either way), so the
  values are the same and only the schedule changes. (A conditional, the
  other way to wait on an operand, ran the CPU step several times slower:
  BENCHMARKS.md.)
  """
  def call(mdl, *xs):
    return mdl(*xs, *static)

  def backward(vjp_fn, g):
    saved, tree = jax.tree.flatten(vjp_fn)
    saved, g = jax.lax.optimization_barrier((saved, g))
    one = one_after(g)
    saved = [x * one.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
             else x for x in saved]
    return jax.tree.unflatten(tree, saved)(g)

  return nn.custom_vjp(call, forward_fn=lambda mdl, *xs: nn.vjp(call, mdl, *xs),
                       backward_fn=backward)(block, *args)


def timestep_embedding(t: jax.Array, dim: int,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (B,) -> (B, dim): cos first, then sin, float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period)
                  * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """Residual block conditioned on the time embedding.

  With `use_scale_shift_norm` the embedding gives (scale, shift), scale first,
  applied as GN(h) * (1 + scale) + shift; otherwise it is added before GN.
  `resample` ("down" | "up") resamples between in_layers' activation and conv.
  """
  out_channels: int
  use_scale_shift_norm: bool = False
  resample: str | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    h = nn.silu(layers.group_norm(x, _EPS, "in_layers_0"))
    if self.resample == "down":
      h, x = layers.avg_pool2(h), layers.avg_pool2(x)
    elif self.resample == "up":
      h, x = layers.upsample_nearest(h), layers.upsample_nearest(x)
    h = layers.conv3x3(self.out_channels, self.dtype, "in_layers_2",
                       conv=self.conv)(h)

    width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    e = nn.Dense(width, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
    e = e[:, None, None, :].astype(h.dtype)
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = layers.group_norm(h, _EPS, "out_layers_0") * (1 + scale) + shift
    else:
      h = layers.group_norm(h + e, _EPS, "out_layers_0")
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = layers.conv3x3(self.out_channels, self.dtype, "out_layers_3",
                      zero_init=True, conv=self.conv)(h)

    if x.shape[-1] != self.out_channels:
      x = nn.Dense(self.out_channels, dtype=self.dtype, name="skip_connection")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over pixels, legacy QKV channel order.

  The reference's fused qkv projection packs channels per head as
  [q_h | k_h | v_h] (QKVAttentionLegacy); with `new_order` they are
  [all q | all k | all v].
  """
  num_heads: int
  new_order: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    d = c // self.num_heads
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(
        layers.group_norm(x, _EPS, "norm"))
    if self.new_order:
      qkv = qkv.reshape(b, hh, ww, 3, self.num_heads, d)
      q, k, v = (qkv[..., i, :, :].reshape(b, hh, ww, c) for i in range(3))
    else:
      qkv = qkv.reshape(b, hh, ww, self.num_heads, 3, d)
      q, k, v = (qkv[..., i, :].reshape(b, hh, ww, c) for i in range(3))
    h = layers.spatial_attention(q, k, v, self.num_heads)
    return x + nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                        name="proj_out")(h)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with symmetric padding 1 (flax "SAME" would shift the
  grid on even sizes), or a 2x2 average pool without `conv_resample`."""
  use_conv: bool
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.use_conv:
      return layers.avg_pool2(x)
    return layers.conv3x3(x.shape[-1], self.dtype, "op", stride=2, conv=self.conv)(x)


class Upsample(nn.Module):
  use_conv: bool
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.upsample_nearest(x)
    if self.use_conv:
      x = layers.conv3x3(x.shape[-1], self.dtype, "conv", conv=self.conv)(x)
    return x


class UNetModel(nn.Module):
  """The LDM denoiser with the hyper-parameters of openaimodel's UNetModel.

  `attention_resolutions` are downsampling rates (1, 2, 4, ...), not pixel
  sizes; `num_head_channels`, when set, overrides `num_heads`.
  """
  in_channels: int
  out_channels: int
  model_channels: int
  num_res_blocks: int
  attention_resolutions: Sequence[int]
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  num_heads: int = -1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  conv_resample: bool = True
  dropout: float = 0.0
  use_new_attention_order: bool = False
  dtype: Dtype = jnp.float32
  conv: str = "xla"  # 3x3 convolutions: "xla" or "winograd" (layers.conv3x3)
  remat: str = "none"  # a key of REMAT_POLICIES; not part of the model config

  def _heads(self, ch: int, upsample: bool = False) -> int:
    if self.num_head_channels != -1:
      return ch // self.num_head_channels
    if upsample and self.num_heads_upsample != -1:
      return self.num_heads_upsample
    return self.num_heads

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array,
               train: bool = False) -> jax.Array:
    """x (B, H, W, in_channels) NHWC, timesteps (B,) -> (B, H, W,
    out_channels).

    This is long because it mirrors the reference's UNetModel one-to-one:
    where openaimodel builds input_blocks, middle_block and output_blocks in
    __init__ and walks them in forward, one pass here builds and runs them,
    each block named `input_blocks_k_j` / `output_blocks_k_j` after its
    torch key. Read beside the reference (and the converter's key mapping)
    it matches line by line; split up, the block counter k, the rate ds and
    the skip stack would be spread over several functions.
    """
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError("UNetModel needs num_heads or num_head_channels")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"UNetModel.remat={self.remat!r}; choose one of "
                       f"{', '.join(REMAT_POLICIES)}")
    res_cls, attn_cls = ResBlock, AttentionBlock
    if self.remat != "none":
      policy = REMAT_POLICIES[self.remat]
      # static_argnums counts self: ResBlock(x, emb, train) has train at 3.
      res_cls = nn.remat(ResBlock, static_argnums=(3,), policy=policy)
      attn_cls = nn.remat(AttentionBlock, policy=policy)
    dt = self.dtype
    t_emb = timestep_embedding(timesteps, self.model_channels)
    self.sow("intermediates", "t_emb", t_emb)
    emb = nn.Dense(4 * self.model_channels, dtype=dt, name="time_embed_0")(t_emb)
    emb = nn.Dense(4 * self.model_channels, dtype=dt,
                   name="time_embed_2")(nn.silu(emb))
    self.sow("intermediates", "emb", emb)

    def run(block, *xs, static=()):
      if self.remat == "none":
        return block(*xs, *static)
      return _after_its_gradient(block, *xs, static=static)

    def res(ch, name, resample=None):
      block = res_cls(ch, self.use_scale_shift_norm, resample, self.dropout,
                      dt, name=name, conv=self.conv)
      return lambda h, emb, train: run(block, h, emb, static=(train,))

    def attn(ch, name, upsample=False):
      block = attn_cls(self._heads(ch, upsample), self.use_new_attention_order,
                       dt, name=name)
      return lambda h: run(block, h)

    h = layers.conv3x3(self.model_channels, dt, "input_blocks_0_0",
                       conv=self.conv)(x.astype(dt))
    skips = [h]
    k, ds, last = 1, 1, len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      ch = mult * self.model_channels
      for _ in range(self.num_res_blocks):
        h = res(ch, f"input_blocks_{k}_0")(h, emb, train)
        if ds in self.attention_resolutions:
          h = attn(ch, f"input_blocks_{k}_1")(h)
        skips.append(h)
        k += 1
      if level != last:
        if self.resblock_updown:
          h = res(ch, f"input_blocks_{k}_0", "down")(h, emb, train)
        else:
          h = Downsample(self.conv_resample, dt, name=f"input_blocks_{k}_0",
                         conv=self.conv)(h)
        skips.append(h)
        k, ds = k + 1, ds * 2

    h = res(h.shape[-1], "middle_block_0")(h, emb, train)
    h = attn(h.shape[-1], "middle_block_1")(h)
    h = res(h.shape[-1], "middle_block_2")(h, emb, train)

    k = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      ch = mult * self.model_channels
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(ch, f"output_blocks_{k}_0")(h, emb, train)
        j = 1
        if ds in self.attention_resolutions:
          h = attn(ch, f"output_blocks_{k}_1", upsample=True)(h)
          j = 2
        # The upsampler is the last child of each level's last block, so its
        # index (1 or 2) depends on whether that block has attention.
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{k}_{j}"
          if self.resblock_updown:
            h = res(ch, name, "up")(h, emb, train)
          else:
            h = Upsample(self.conv_resample, dt, name=name, conv=self.conv)(h)
          ds //= 2
        k += 1

    h = nn.silu(layers.group_norm(h, _EPS, "out_0"))
    return layers.conv3x3(self.out_channels, dt, "out_2", zero_init=True,
                          conv=self.conv)(h)
