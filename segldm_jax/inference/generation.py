"""Masks in, images out: conditioning, a compiled sampler, decoding.

Three programs, each one compiled function of (params, masks, key); the
guidance scale of `generate` and `edit` is an input too (`guidance_input`),
so a new scale reuses the compiled program:

* `generate`: the reference's sampling, plus classifier-free guidance on the
  mask (`guidance_scale`); ignore-label pixels condition on nothing, so a
  partial mask leaves them free.
* `regenerate_region`: regenerate the latent cells marked in `keep == 0` of
  a real image under an edited mask, keeping the rest (the original sampler's `mask`/`x0`).
* `generate_tiled`: masks larger than the training size, denoised and decoded
  in overlapping tiles of the training size blended by distance to the tile
  border, so memory stays that of one tile.
"""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from segldm_jax.data.pixel_range import images_to_model_range, model_range_to_images
from segldm_jax.diffusion import samplers
from segldm_jax.models.ldm import LatentDiffusion

# The guidance scale is an input of `generate`'s and `edit`'s programs, not a
# constant: one program per (shapes, sampler, steps) serves every scale.
_STATIC = ("ldm", "sampler", "steps", "eta", "mask_stages")


def guidance_input(guidance_scale: float) -> np.float32 | None:
  """How a guidance scale enters a program: None for 1 (no guidance: the
  model runs once per step, not twice), else a float32 input."""
  return None if float(guidance_scale) == 1.0 else np.float32(guidance_scale)


def _guidance_as_input(jitted):
  """`jitted(..., guidance_scale=s)` with s passed as `guidance_input(s)`;
  `.lower` alike (for callers that keep compiled programs themselves)."""
  @functools.wraps(jitted)
  def run(*args, guidance_scale: float = 1.0, **kwargs):
    return jitted(*args, guidance_scale=guidance_input(guidance_scale),
                  **kwargs)

  run.lower = lambda *args, guidance_scale=1.0, **kwargs: jitted.lower(
      *args, guidance_scale=guidance_input(guidance_scale), **kwargs)
  return run


def _model_fn(ldm, unet_params, c, scale: jax.Array | None):
  """`ldm.model_fn` with the guidance scale a traced input: the guided
  function is built for a stand-in scale and its scale leaf (the last)
  replaced, so its arithmetic stays the model's own."""
  if scale is None:
    return ldm.model_fn(unet_params, c)
  guided = ldm.model_fn(unet_params, c, 2.0)
  leaves, treedef = jax.tree_util.tree_flatten(guided)
  # (params, conditioning, scale): the scale is the one leaf more, a scalar
  assert len(leaves) == len(jax.tree_util.tree_leaves((unet_params, c))) + 1
  assert np.shape(leaves[-1]) == (), treedef
  return jax.tree_util.tree_unflatten(
      treedef, leaves[:-1] + [jnp.asarray(scale, jnp.float32)])


def _run_sampler(model_fn, ldm, x_T, key, sampler, steps, eta, **mask_kw):
  kwargs = {"eta": eta} if sampler == "ddim" else {}
  return samplers.sample(sampler, model_fn, ldm.schedule(), x_T,
                         num_steps=steps, key=key, **kwargs, **mask_kw)


@_guidance_as_input
@functools.partial(jax.jit, static_argnames=_STATIC)
def generate(ldm: LatentDiffusion, params, first_stage_params,
             labels: jax.Array, key: jax.Array, *, sampler: str = "ddim", steps: int = 50,
             eta: float = 0.0, mask_stages: int = 0,
             guidance_scale: float = 1.0) -> jax.Array:
  """Label maps (B, H, W) uint8 -> images (B, H, W, 3) uint8.

  params: {"unet", "cond_stage"} (pass the EMA UNet to sample with EMA).
  The whole chain (conditioning, `steps` denoising steps, VQ decode) is one
  compiled program; the same key gives the same images. Pixels with the
  ignore id (255) get zero conditioning: "don't care".
  """
  c = ldm.condition(params["cond_stage"], labels, mask_stages)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, (*c.shape[:3], ldm.latent_channels))
  z = _run_sampler(_model_fn(ldm, params["unet"], c, guidance_scale), ldm,
                   x_T, k_loop, sampler, steps, eta)
  return model_range_to_images(ldm.decode(first_stage_params, z))


# ---------------------------------------------------------------------------
# Region edits.
# ---------------------------------------------------------------------------


@_guidance_as_input
@functools.partial(jax.jit, static_argnames=_STATIC)
def regenerate_region(ldm: LatentDiffusion, params, first_stage_params,
                      images: jax.Array, labels: jax.Array, keep: jax.Array,
                      key: jax.Array, *, sampler: str = "ddim",
                      steps: int = 50, eta: float = 0.0, mask_stages: int = 0,
                      guidance_scale: float = 1.0) -> jax.Array:
  """Regenerates the region `keep == 0` of real images under new labels.

  Args:
    images: uint8 (B, H, W, 3), the photos to edit.
    labels: uint8 (B, H, W), the edited label maps (the whole map conditions
      the model, so the new region fits its surroundings).
    keep: float (B, h, w, 1) at latent resolution, 1 = keep the image's
      latent (see `region_edit.edit_masks`).

  Before every model call the kept latents are reset to the image's latent
  noised to the current level (the original `mask`/`x0` inpainting), and
  after the last step they are put back exactly. Returns uint8 images; the
  pixels outside the region are decoded from the kept latents, i.e. a VQ
  reconstruction (`region_edit.composite` restores the photo's own pixels).
  """
  z0 = ldm.encode(first_stage_params,
                  images_to_model_range(images))
  c = ldm.condition(params["cond_stage"], labels, mask_stages)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, z0.shape)
  keep = keep.astype(jnp.float32)
  z = _run_sampler(_model_fn(ldm, params["unet"], c, guidance_scale), ldm,
                   x_T, k_loop, sampler, steps, eta, mask=keep, x0=z0)
  z = keep * z0 + (1.0 - keep) * z
  return model_range_to_images(ldm.decode(first_stage_params, z))


# ---------------------------------------------------------------------------
# Larger than training: tiles.
# ---------------------------------------------------------------------------


def tile_starts(size: int, tile: int, min_overlap: int) -> tuple[int, ...]:
  """Start offsets of the fewest `tile`-wide windows covering `size` with at
  least `min_overlap` shared between neighbours, spread evenly."""
  if tile < 1 or not 0 <= min_overlap < tile:
    raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got "
                     f"tile={tile}, overlap={min_overlap}")
  if size <= tile:
    return (0,)
  n = math.ceil((size - min_overlap) / (tile - min_overlap))
  return tuple(round(i * (size - tile) / (n - 1)) for i in range(n))


def tile_weights(tile: int) -> np.ndarray:
  """(tile, tile) float32 blending weights: distance to the tile border (1 at
  the edge pixels, growing to the centre), so each tile's edge, where its
  zero padding shows, counts least and no seam is left."""
  ramp = np.minimum(np.arange(1, tile + 1), np.arange(tile, 0, -1))
  return np.outer(ramp, ramp).astype(np.float32)


def _tiled_sum(fn, x: jax.Array, rows: Sequence[int], cols: Sequence[int],
               tile: int, out_scale: int, out_channels: int) -> jax.Array:
  """sum over tiles of weights * fn(tile offset) / sum of weights.

  `fn(i, j)` returns (B, tile*out_scale, tile*out_scale, out_channels) for the
  tile at latent offset (i, j). Tiles run one after another (`lax.scan`), so
  only one tile's activations are alive at a time.
  """
  b, h, w = x.shape[:3]
  size = tile * out_scale
  wt = tile_weights(size)
  total = np.zeros((h * out_scale, w * out_scale), np.float32)
  for i in rows:
    for j in cols:
      total[i * out_scale:i * out_scale + size,
            j * out_scale:j * out_scale + size] += wt
  offsets = jnp.asarray([(i, j) for i in rows for j in cols], jnp.int32)
  wt = jnp.asarray(wt)[None, :, :, None]

  def body(acc, off):
    out = fn(off[0], off[1]).astype(jnp.float32) * wt
    at = (0, off[0] * out_scale, off[1] * out_scale, 0)
    region = jax.lax.dynamic_slice(acc, at, out.shape)
    return jax.lax.dynamic_update_slice(acc, region + out, at), None

  acc = jnp.zeros((b, h * out_scale, w * out_scale, out_channels), jnp.float32)
  acc, _ = jax.lax.scan(body, acc, offsets)
  return acc / jnp.asarray(total)[None, :, :, None]


def _tiled_denoise(ldm, tile, rows, cols, scale, unet_params, c, x_t, t):
  def one_tile(i, j):
    xt = jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_slice_in_dim(x_t, i, tile, 1), j, tile, 2)
    ct = jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_slice_in_dim(c, i, tile, 1), j, tile, 2)
    return ldm.model_fn(unet_params, ct, scale)(xt, t)
  return _tiled_sum(one_tile, x_t, rows, cols, tile, 1, x_t.shape[-1])


@functools.partial(jax.jit, static_argnames=_STATIC + ("guidance_scale",
                                                     "tile", "overlap"))
def generate_tiled(ldm: LatentDiffusion, params, first_stage_params,
                   labels: jax.Array, key: jax.Array, *, tile: int,
                   overlap: int, sampler: str = "ddim", steps: int = 50,
                   eta: float = 0.0, mask_stages: int = 0,
                   guidance_scale: float = 1.0) -> jax.Array:
  """`generate` for label maps larger than the model's training size.

  Args:
    tile: tile side at latent resolution (the training latent size).
    overlap: least overlap of neighbouring tiles, latent pixels.

  At every step the UNet runs on each tile in turn and the outputs are
  blended with `tile_weights` (blending outputs = blending the sampler's
  updates: every step is linear in the model output). The VQ decoder runs
  on the same tiles, its images blended the same way at pixel resolution.
  The conditioning is a per-pixel lookup plus area means, computed whole.
  """
  c = ldm.condition(params["cond_stage"], labels, mask_stages)
  h, w = c.shape[1:3]
  rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, (*c.shape[:3], ldm.latent_channels))
  model = jax.tree_util.Partial(
      functools.partial(_tiled_denoise, ldm, tile, rows, cols, guidance_scale),
      params["unet"], c)
  z = _run_sampler(model, ldm, x_T, k_loop, sampler, steps, eta)

  def decode_tile(i, j):
    zt = jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_slice_in_dim(z, i, tile, 1), j, tile, 2)
    return ldm.decode(first_stage_params, zt)

  images = _tiled_sum(decode_tile, z, rows, cols, tile, ldm.downsample_factor,
                      3)
  return model_range_to_images(images)


def sample_in_batches(generate_fn, ldm: LatentDiffusion, params, first_stage_params,
                      labels: np.ndarray, num_samples: int, batch_size: int,
                      key: jax.Array, desc: str = "sample",
                      progress: Callable[[int, int], None] | None = None
                      ) -> np.ndarray:
  """`num_samples` images per label map -> uint8 (N, num_samples, H, W, 3).

  `generate_fn` is `generate` or `generate_tiled` with its options bound. Each map
  is repeated `num_samples` times and cut into batches in a fixed order,
  batch b keyed by fold_in(key, b): the same key and batch size give the
  same images. `progress(done, total)` is told each finished batch.
  """
  rep = np.repeat(labels, num_samples, axis=0)
  starts = range(0, len(rep), batch_size)
  images = []
  for b, start in enumerate(tqdm.tqdm(starts, desc=desc)):
    images.append(np.asarray(generate_fn(ldm, params, first_stage_params,
                                         rep[start:start + batch_size],
                                         jax.random.fold_in(key, b))))
    if progress is not None:
      progress(b + 1, len(starts))
  return np.concatenate(images).reshape(len(labels), num_samples,
                                        *images[0].shape[1:])
