"""Region edits on the host: which latents to regenerate, and the seamless
paste of the result back into the photo.

An edit changes some pixels of a label map. Those pixels, grown by `margin`,
are the region; every latent cell the region touches is regenerated
(`generation.regenerate_region`), everything else keeps the photo's latents. The decoded
result is then pasted into the original photo with a weight that ramps from
0 at the region's border to 1 at `margin` pixels inside it, so the changed
pixels come wholly from the model, the pixels outside the region are the
photo's own, and the band between fades from one into the other.
"""

import pathlib
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from segldm_jax import errors
from segldm_jax.data import palette as palette_lib
from segldm_jax.data import viz
from segldm_jax.inference import generation


def _max_filter(mask: np.ndarray, radius: int) -> np.ndarray:
  """Square (2r+1) binary dilation of (B, H, W) bool masks, separable."""
  out = mask
  for axis in (1, 2):
    padded = np.pad(out, [(0, 0)] + [(radius, radius) if a == axis else (0, 0)
                                     for a in (1, 2)])
    n = out.shape[axis]
    grown = np.zeros_like(out)
    for d in range(2 * radius + 1):
      grown |= np.take(padded, np.arange(d, d + n), axis=axis)
    out = grown
  return out


def _erode(mask: np.ndarray) -> np.ndarray:
  """3x3 binary erosion. Outside the image counts as inside the region: an
  edit touching the border should not fade out towards it."""
  return ~_max_filter(~mask, 1)


def edit_masks(old_labels: np.ndarray, new_labels: np.ndarray, factor: int,
               margin: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (keep (B, H/f, W/f, 1) float32 latent mask, paste weight (B, H, W)).

  Args:
    old_labels, new_labels: (B, H, W) or (H, W) label maps of the photo
      before and after the edit; H, W divisible by `factor`.
    factor: the first stage's downsampling factor.
    margin: pixels the changed area grows by; also the width of the fade.

  keep is 1 where the photo's latent is kept. The paste weight is the share
  of the generated image: 0 outside the grown region, 1 on every changed
  pixel, a linear ramp over the `margin` pixels in between.
  """
  old, new = np.asarray(old_labels), np.asarray(new_labels)
  if old.shape != new.shape:
    raise ValueError(f"edited labels {new.shape} differ in shape from the "
                     f"original labels {old.shape}")
  if old.ndim == 2:
    old, new = old[None], new[None]
  b, h, w = old.shape
  if h % factor or w % factor:
    raise ValueError(f"label maps {h}x{w} are not divisible by the first "
                     f"stage's factor {factor}")
  if margin < 1:
    raise ValueError(f"margin must be >= 1 pixel, got {margin}")
  changed = old != new
  region = _max_filter(changed, margin)
  cells = region.reshape(b, h // factor, factor, w // factor, factor)
  regen = cells.any((2, 4))
  # Depth = how many 3x3 erosions a pixel survives (k of them = one
  # (2k+1)-square erosion), capped at margin.
  depth = np.zeros(region.shape, np.float32)
  inner = region
  for _ in range(margin):
    inner = _erode(inner)
    depth += inner
  weight = np.where(region, (1.0 + depth) / (1.0 + margin), 0.0)
  weight = np.minimum(weight, 1.0).astype(np.float32)
  keep = (~regen).astype(np.float32)[..., None]
  return keep, weight


def composite(original: np.ndarray, generated: np.ndarray,
              weight: np.ndarray) -> np.ndarray:
  """uint8 weight * generated + (1 - weight) * original, per pixel."""
  g = np.asarray(weight, np.float32)[..., None]
  out = g * np.asarray(generated, np.float32) + (1.0 - g) * np.asarray(
      original, np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def regenerate_changed_pixels(
    model, photo: np.ndarray, old: np.ndarray, new: np.ndarray, *,
    margin: int, num_samples: int, options: dict[str, Any], key: jax.Array,
    names: tuple[str, str] = ("the original labels", "the edited labels"),
    progress: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Regenerates the pixels whose label changed from `old` to `new` (one
  photo, (H, W) label maps), `num_samples` times.

  Args:
    model: a `trained_model.TrainedModel`.
    options: `generation.regenerate_region`'s keyword arguments (sampler, steps, ...).
    names: how messages call `old` and `new` (e.g. their files).
    progress: told (done, total) after each sample.

  Returns:
    (results uint8 (num_samples, H, W, 3), keep, paste weight) as
    `edit_masks` gives them.
  """
  keep, weight = edit_masks(old, new, model.ldm.downsample_factor, margin)
  if keep.min() == 1.0:
    raise errors.InputError(f"{names[1]} has the same labels as {names[0]}: "
                            "nothing to edit")

  def regenerate(photos, labels, keep, key):
    return generation.regenerate_region(
        model.ldm, model.params, model.first_stage_params, photos, labels,
        keep, key, **options)

  results = paste_samples(regenerate, photo, new, keep, weight, key,
                          num_samples, progress)
  return results, keep, weight


def paste_samples(regenerate: Callable[..., Any], photo: np.ndarray,
                  new: np.ndarray, keep: np.ndarray, weight: np.ndarray,
                  key: jax.Array, num_samples: int,
                  progress: Callable[[int, int], None] | None = None
                  ) -> np.ndarray:
  """`num_samples` edits of one photo -> uint8 (num_samples, H, W, 3): sample
  b is `regenerate(photo[None], new[None], keep, fold_in(key, b))` (a
  `generation.regenerate_region` program) pasted into the photo."""
  results = []
  for b in tqdm.trange(num_samples, desc="edit"):
    generated = np.asarray(regenerate(photo[None], new[None], keep,
                                      jax.random.fold_in(key, b)))
    results.append(composite(photo[None], generated, weight)[0])
    if progress is not None:
      progress(b + 1, num_samples)
  return np.stack(results)


def regenerate_and_save(model, photo: np.ndarray, old: np.ndarray,
                        new: np.ndarray, *, out: pathlib.Path, stem: str,
                        **kwargs) -> dict[str, Any]:
  """`regenerate_changed_pixels`, then writes each result and a strip (photo, old labels,
  new labels, results) to `out`; -> a summary."""
  results, keep, weight = regenerate_changed_pixels(model, photo, old, new,
                                                    **kwargs)
  out.mkdir(parents=True, exist_ok=True)
  for k, img in enumerate(results):
    viz.save_png(img, out / f"{stem}_edit_{k}.png")
  colours = palette_lib.for_data(model.config.data)
  strip = viz.grid([np.stack([photo, palette_lib.colorize(old, colours),
                              palette_lib.colorize(new, colours), *results])])
  viz.save_png(strip, out / f"{stem}_edit_strip.png")
  outside = weight[0] == 0
  return dict(edit_margin=kwargs["margin"],
              changed_pixels=int((old != new).sum()),
              regenerated_latents=int((keep == 0).sum()),
              kept_pixels=int(outside.sum()),
              max_error_outside=int(max(
                  np.abs(r.astype(int) - photo)[outside].max(initial=0)
                  for r in results)),
              samples=len(results), out=str(out))
