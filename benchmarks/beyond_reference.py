r"""Figures and numbers for guidance, partial masks, region edits and tiles.

  python benchmarks/beyond_reference.py --workdir workdirs/demo_cfg \
      [--out docs/images] [--num_masks 64] [--scales 1,1.5,2,3]

Needs a demo workdir trained with classifier-free guidance, e.g.
  python train.py --config configs/seg_f4.py:demo --workdir workdirs/demo_cfg
(the demo config drops the mask with probability 0.1). Prints JSON lines:
mask mIoU per guidance scale and seed (synthetic held-out masks, the same
masks and seeds for every scale), and for 4x-area tiled sampling the
compiled peak memory against a training-size sample, the seam ratio
(gradient energy across tile seams / across other lines of the same phase;
also for the untiled sample, whose ratio there is the baseline) and the mask
mIoU of both.
Writes one PNG per feature into --out (the README shows them).
"""

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from segldm_jax.checkpoint import store
from segldm_jax.config import run_config
from segldm_jax.data import base as data_base
from segldm_jax.data import palette as palette_lib
from segldm_jax.data import pipeline
from segldm_jax.data import viz
from segldm_jax.eval import miou as evaluate
from segldm_jax.eval import seams
from segldm_jax.inference import first_stage
from segldm_jax.inference import generation
from segldm_jax.inference import region_edit
from segldm_jax.models import build
from segldm_jax.runtime import xla_cpu


def _labels_and_images(config, size: int, n: int, offset: int = 0):
  data = config.data.copy_and_resolve_references()
  data.image_size = size
  ds = pipeline.make_dataset(pipeline.make_source(data), image_size=size,
                             batch_size=n + offset, seed=config.seed,
                             train=False, shard_index=0, shard_count=1,
                             drop_remainder=False)
  batch = next(iter(ds))
  return batch["labels"][offset:], batch["image"][offset:]


def _peak_bytes(fn, *args) -> int:
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return (m.temp_size_in_bytes + m.argument_size_in_bytes +
          m.output_size_in_bytes - m.alias_size_in_bytes)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", type=pathlib.Path, required=True)
  ap.add_argument("--out", type=pathlib.Path,
                  default=pathlib.Path("docs/images"))
  ap.add_argument("--num_masks", type=int, default=64)
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--scales", default="1,1.5,2,3")
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--parts", default="guidance,partial,edit,large")
  args = ap.parse_args(argv)
  parts = set(args.parts.split(","))
  xla_cpu.use_xnnpack_convolutions()

  config = run_config.load(args.workdir)
  ldm = build.build_model(config.model, conv=xla_cpu.preferred_conv())
  params, _ = store.restore_params(args.workdir, ldm)
  fs = first_stage.load_existing(config, args.workdir,
                                     conv=xla_cpu.preferred_conv())[1]
  size = int(config.data.image_size)
  k = int(config.data.num_classes)
  colours = palette_lib.palette(k)
  opts = dict(sampler=config.sample.sampler, steps=int(config.sample.steps),
              eta=float(config.sample.eta))
  args.out.mkdir(parents=True, exist_ok=True)

  def run(labels, key, **kw):
    fn = kw.pop("fn", generation.generate)
    outs = [np.asarray(fn(ldm, params, fs, labels[i:i + args.batch_size],
                          jax.random.fold_in(key, i), **opts, **kw))
            for i in range(0, len(labels), args.batch_size)]
    return np.concatenate(outs)

  # --- guidance: mIoU per scale ------------------------------------------
  labels, _ = _labels_and_images(config, size, args.num_masks)
  scales = [float(s) for s in args.scales.split(",")]
  shown = {}
  for seed in (int(s) for s in args.seeds.split(",") if "guidance" in parts):
    for s in scales:
      images = run(labels, jax.random.key(seed), guidance_scale=s)
      miou = evaluate.mean_iou(evaluate.segment_synthetic(images, k), labels, k)
      print(json.dumps({"guidance_scale": s, "seed": seed,
                        "masks": len(labels), "mask_miou": round(miou, 4)}),
            flush=True)
      if seed == 0:
        shown[s] = images[:8]
  if shown:
    rows = [palette_lib.colorize(labels[:8], colours)] + [
        shown[s] for s in scales if s in (1.0, 2.0)]
    viz.save_png(viz.grid(rows), args.out / "guidance.png")
  if "partial" in parts:
    _partial(run, labels, size, colours, args.out)
  if "edit" in parts:
    _edit(ldm, params, fs, config, size, k, colours, opts, args)
  if "large" in parts:
    _large(ldm, params, fs, config, size, k, colours, opts, run, args)
  return 0


def _partial(run, labels, size, colours, out):

  """Partial masks: the right half "don't care"."""
  partial = labels[:6].copy()
  partial[:, :, size // 2:] = data_base.IGNORE_ID
  images = run(np.repeat(partial, 2, 0), jax.random.key(0), guidance_scale=2.0)
  viz.save_png(viz.grid([palette_lib.colorize(partial, colours),
                         images[0::2], images[1::2]]),
               out / "partial_mask.png")


def _edit(ldm, params, fs, config, size, k, colours, opts, args):
  """Region edit: a real scene of the source, a square changes class."""
  old, photos = _labels_and_images(config, size, 6, offset=args.num_masks)
  new = old.copy()
  for i in range(len(new)):  # paint a square of a class not nearby
    cls = (int(np.bincount(old[i].ravel()).argmax()) + 5) % k
    new[i, size // 4:size // 2 + 4, size // 4:size // 2 + 8] = cls
  keep, weight = region_edit.edit_masks(old, new, ldm.downsample_factor,
                                    2 * ldm.downsample_factor)
  gen = np.concatenate([np.asarray(generation.regenerate_region(
      ldm, params, fs, photos[i:i + 1], new[i:i + 1], keep[i:i + 1],
      jax.random.key(i), **opts, guidance_scale=2.0)) for i in range(len(new))])
  edited = region_edit.composite(photos, gen, weight)
  outside = weight == 0
  pred = evaluate.segment_synthetic(edited, k)
  changed = old != new
  print(json.dumps({
      "edit": len(new), "max_error_outside": int(
          np.abs(edited.astype(int) - photos)[outside].max()),
      "kept_pixel_fraction": round(float(outside.mean()), 3),
      "changed_pixels_following_new_label": round(
          float((pred[changed] == new[changed]).mean()), 3)}), flush=True)
  viz.save_png(viz.grid([photos, palette_lib.colorize(old, colours),
                         palette_lib.colorize(new, colours), edited]),
               args.out / "region_edit.png")


def _large(ldm, params, fs, config, size, k, colours, opts, run, args):
  """4x area: tiles against direct (memory, seams, mask adherence)."""
  big_size, tile = 2 * size, size // ldm.downsample_factor
  overlap = tile // 4
  big, _ = _labels_and_images(config, big_size, 8)
  tiled_fn = functools.partial(generation.generate_tiled, tile=tile,
                               overlap=overlap)
  tiled = run(big, jax.random.key(0), fn=tiled_fn, guidance_scale=2.0)
  direct = run(big, jax.random.key(0), guidance_scale=2.0)
  starts = generation.tile_starts(big_size // ldm.downsample_factor, tile,
                                overlap)
  f = ldm.downsample_factor
  rows = sorted({s * f for s in starts if s} |
                {(s + tile) * f for s in starts if (s + tile) * f < big_size})
  unet = config.model.params.unet_config.params
  period = f * 2 ** (len(unet.channel_mult) - 1)  # the networks' stride
  b = 1
  mem = {name: _peak_bytes(
      lambda p, q, l, key, fn=fn: fn(ldm, p, q, l, key, **opts),
      params, fs, jax.ShapeDtypeStruct((b, s, s), jnp.uint8),
      jax.random.key(0))
         for name, fn, s in (("train_size", generation.generate, size),
                             ("tiles_4x", tiled_fn, big_size),
                             ("direct_4x", generation.generate, big_size))}
  miou = {name: round(evaluate.mean_iou(evaluate.segment_synthetic(x, k), big,
                                        k), 4)
          for name, x in (("tiles", tiled), ("direct", direct))}
  seam_tiles = seams.seam_ratio(tiled, rows, period)
  seam_direct = seams.seam_ratio(direct, rows, period)
  print(json.dumps({
      "size": big_size, "tile": tile, "overlap": overlap, "seams": rows,
      "seam_ratio_tiles": round(seam_tiles, 3),
      "seam_ratio_direct_same_lines": round(seam_direct, 3),
      # What tiling adds at its seams (tests/test_guidance_edit_tiles.py
      # holds it to <= 1.10 on the fixture model).
      "seam_excess": round(seam_tiles / seam_direct, 3),
      "peak_bytes_batch1": mem,
      "tiles_over_train_size": round(mem["tiles_4x"] / mem["train_size"], 3),
      "mask_miou": miou}), flush=True)
  viz.save_png(viz.grid([palette_lib.colorize(big[:4], colours), direct[:4],
                         tiled[:4]]), args.out / "large.png")


if __name__ == "__main__":
  sys.exit(main())
