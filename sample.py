r"""Turn segmentation masks into images with a trained or converted model.

  python sample.py --workdir DIR [--masks PATH] [--num_samples 2]
      [--sampler ddim|ddpm|dpmpp_2m] [--steps 50] [--eta 0] [--seed 0]
      [--guidance_scale 2] [--size 128 [--large tiles|direct]]
      [--batch_size 8] [--out DIR/samples] [--no-ema]
  python sample.py --workdir DIR --edit_image PHOTO --masks ITS_LABELS.png \
      --edit_labels EDITED_LABELS.png

Restores the newest checkpoint of DIR (EMA UNet weights by default) and the
saved config. Masks come from `--masks` (a PNG file or a folder of them:
grayscale class ids, or palette colours with the config's data.palette) or
from the config's dataset. Pixels with the dataset's ignore label (or 255)
are "don't care": the model fills them freely. Writes one PNG per sample, a
grid beside the colourised masks, and, for the built-in synthetic source, the
mask-adherence mIoU of the samples.

* `--guidance_scale s`: classifier-free guidance on the mask (s > 1 follows
  it more closely; needs a model trained with train.cond_drop_prob > 0).
* `--size S` larger than the training size: `--large direct` (default)
  runs the fully convolutional networks on the whole map (memory grows with
  the area); `--large tiles` denoises and decodes overlapping training-size
  tiles blended by distance to their border, so memory stays that of a
  training-size sample.
* `--edit_image`: regenerates only the pixels whose label differs between
  `--masks` and `--edit_labels` (grown by `--edit_margin`), keeps the rest of
  the photo, and fades between the two over the margin.
"""

import argparse
import functools
import json
import math
import pathlib
import sys

import jax
import numpy as np
from PIL import Image
import tqdm

from segldm_jax import errors
from segldm_jax import checkpoints
from segldm_jax import editing
from segldm_jax import evaluate
from segldm_jax import first_stage as first_stage_lib
from segldm_jax import palette as palette_lib
from segldm_jax import run_config
from segldm_jax import sampling
from segldm_jax import viz
from segldm_jax import xla_cpu
from segldm_jax import compilation_cache
from segldm_jax.data import folder as folder_lib
from segldm_jax.data import base as data_base
from segldm_jax.data import labels as labels_lib
from segldm_jax.data import pipeline
from segldm_jax.diffusion import samplers
from segldm_jax.models import build


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, type=pathlib.Path)
  ap.add_argument("--masks", type=pathlib.Path,
                  help="PNG label map or folder of them (default: the dataset)")
  ap.add_argument("--num_masks", type=int, default=None,
                  help="masks taken from the dataset (default: config)")
  ap.add_argument("--num_samples", type=int, default=1, help="per mask")
  ap.add_argument("--sampler", choices=samplers.SAMPLERS, default=None)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--eta", type=float, default=None, help="DDIM eta")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--out", type=pathlib.Path, default=None)
  ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                  help="sample with the EMA UNet when saved (default)")
  ap.add_argument("--guidance_scale", type=float, default=None,
                  help="classifier-free guidance on the mask (1 = off; "
                  "default: the config's sample.guidance_scale)")
  ap.add_argument("--size", type=int, default=None,
                  help="output side in pixels (default: the training size)")
  ap.add_argument("--large", choices=("direct", "tiles"), default="direct",
                  help="how a --size above the training size is sampled: "
                  "the whole map at once (memory grows with the area) or "
                  "training-size tiles (memory of one tile)")
  ap.add_argument("--tile_overlap", type=int, default=None,
                  help="least tile overlap, latent pixels (default: tile/4)")
  ap.add_argument("--edit_image", type=pathlib.Path,
                  help="photo to edit; --masks is its label map")
  ap.add_argument("--edit_labels", type=pathlib.Path,
                  help="the edited label map (with --edit_image)")
  ap.add_argument("--edit_margin", type=int, default=None,
                  help="pixels the changed area grows by and fades over "
                  "(default: 2 x the first stage's factor)")
  args = ap.parse_args(argv)
  if (args.edit_image is None) != (args.edit_labels is None) or (
      args.edit_image is not None and args.masks is None):
    ap.error("an edit needs --edit_image PHOTO, --masks ITS_LABELS.png and "
             "--edit_labels EDITED.png")
  return args


def _fit(array: np.ndarray, size: int, resample) -> np.ndarray:
  """Shorter side to `size`, then the centre size x size crop."""
  h, w = array.shape[:2]
  scale = size / min(h, w)
  img = Image.fromarray(array).resize(
      (max(size, round(w * scale)), max(size, round(h * scale))), resample)
  a = np.asarray(img)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def _label_spec(config) -> labels_lib.LabelSpec:
  # 255 is never a class id, so it always means "don't care" here.
  ignore = config.data.get("ignore_label")
  return labels_lib.LabelSpec.create(
      config.data.num_classes,
      ignore_label=data_base.IGNORE_ID if ignore is None else ignore,
      palette=config.data.get("palette") or None,
      remap=config.data.get("remap") or None)


def _read_masks(path: pathlib.Path, config, size: int):
  """PNG file or folder -> (names, labels (N, size, size) uint8)."""
  files = sorted(path.rglob("*.png")) if path.is_dir() else [path]
  if not files:
    sys.exit(f"--masks {path}: no PNG label maps found")
  spec = _label_spec(config)
  try:
    out = [_fit(folder_lib.read_mask(str(f), spec), size, Image.NEAREST)
           for f in files]
  except data_base.DataError as e:
    sys.exit(f"error: {e}")
  return [f.stem for f in files], np.stack(out)


def main(argv=None) -> int:
  args = parse_args(argv)
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  workdir = args.workdir.absolute()
  try:
    config = run_config.load(workdir)
  except run_config.ConfigError as e:
    sys.exit(f"error: {e}")
  compilation_cache.setup(config.get("compilation_cache_dir"))
  ldm = build.build_model(config.model)
  num_classes = int(ldm.cond_stage.in_channels)
  if "data" not in config:
    if args.masks is None:
      sys.exit(f"error: {workdir} has no dataset in its config (a converted "
               "checkpoint?); pass --masks PATH")
    config.data = {"num_classes": num_classes, "image_size": (
        int(config.model.params.image_size) * ldm.downsample_factor)}
  train_size = int(config.data.image_size)
  mask_stages = int(math.log2(
      train_size // int(config.data.get("mask_size") or train_size)))
  size = args.size or train_size
  unet_levels = len(config.model.params.unet_config.params.channel_mult) - 1
  step_px = ldm.downsample_factor * 2 ** (mask_stages + unet_levels)
  if size % step_px:
    sys.exit(f"error: --size {size} is not a multiple of {step_px} (the "
             "first stage's factor x the UNet's and the mask's halvings); "
             f"use {size // step_px * step_px or step_px}")

  try:
    params, step = checkpoints.restore_params(workdir, ldm, use_ema=args.ema)
  except errors.CheckpointMismatchError as e:
    sys.exit(f"error: {e}")
  found = first_stage_lib.load_existing(config, workdir)
  if found is None:
    sys.exit(f"error: {workdir} has no first stage (first_stage/ or "
             "first_stage.checkpoint in config.json)")
  fs_params = found[1]

  sample_cfg = config.get("sample", {})
  opts = dict(
      sampler=args.sampler or sample_cfg.get("sampler", "ddim"),
      steps=args.steps or int(sample_cfg.get("steps", 50)),
      eta=(args.eta if args.eta is not None
           else float(sample_cfg.get("eta", 0.0))),
      mask_stages=mask_stages,
      guidance_scale=(args.guidance_scale if args.guidance_scale is not None
                      else float(sample_cfg.get("guidance_scale", 1.0))))
  tag = f"{opts['sampler']}{opts['steps']}"
  if opts["guidance_scale"] != 1.0:
    tag += f"_cfg{opts['guidance_scale']:g}"
  summary = {"workdir": str(workdir), "step": step, "seed": args.seed,
             "ema": args.ema, **opts}
  key = jax.random.key(args.seed)
  if args.edit_image is not None:
    out = args.out or workdir / f"edits_step{step}_{tag}"
    return _edit(args, config, ldm, params, fs_params, size, opts, key, out,
                 summary)

  source = None
  if args.masks is not None:
    names, labels = _read_masks(args.masks, config, size)
  else:
    data = config.data.copy_and_resolve_references()
    data.image_size = size  # the synthetic source renders at this size
    source = pipeline.make_source(data)
    n = args.num_masks or int(sample_cfg.get("num_masks", 8))
    ds = pipeline.make_dataset(source, image_size=size, batch_size=n,
                               seed=config.get("seed", 0), train=False,
                               shard_index=0, shard_count=1,
                               drop_remainder=False)
    labels = next(iter(ds))["labels"]
    names = [f"mask{i:04d}" for i in range(len(labels))]

  tiled = size > train_size and args.large == "tiles"
  if tiled:
    tile = train_size // ldm.downsample_factor  # the training latent
    overlap = tile // 4 if args.tile_overlap is None else args.tile_overlap
    run = functools.partial(sampling.generate_tiled, tile=tile,
                            overlap=overlap, **opts)
    tag += f"_{size}px_tiles"
    summary.update(size=size, large="tiles", tile=tile, tile_overlap=overlap)
  else:
    run = functools.partial(sampling.generate, **opts)
    if size != train_size:
      tag += f"_{size}px_direct"
      summary.update(size=size, large="direct")
  out = args.out or workdir / f"samples_step{step}_{tag}"
  out.mkdir(parents=True, exist_ok=True)

  # Each mask repeated num_samples times; batches in a fixed order, keyed by
  # (seed, batch index): the same seed and batch size give the same images.
  rep = np.repeat(labels, args.num_samples, axis=0)
  images = []
  for b, start in enumerate(tqdm.trange(0, len(rep), args.batch_size,
                                        desc=tag)):
    chunk = rep[start:start + args.batch_size]
    images.append(np.asarray(run(ldm, params, fs_params, chunk,
                                 jax.random.fold_in(key, b))))
  images = np.concatenate(images).reshape(len(labels), args.num_samples,
                                          size, size, 3)
  for name, per_mask in zip(names, images):
    for k, img in enumerate(per_mask):
      viz.save_png(img, out / f"{name}_{k}.png")
  viz.save_png(viz.mask_sample_grid(labels, images, num_classes),
               out / "grid.png")
  summary.update(masks=len(labels),
                 samples=int(images.shape[0] * images.shape[1]), out=str(out))
  if source is not None and config.data.source == "synthetic":
    pred = evaluate.segment_synthetic(images.reshape(-1, size, size, 3),
                                      num_classes)
    summary["mask_miou"] = float(evaluate.mean_iou(pred, rep, num_classes))
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps(summary))
  return 0


def _edit(args, config, ldm, params, fs_params, size, opts, key, out,
          summary) -> int:
  """Region edit of one photo; writes the results and a picture strip."""
  try:
    photo = _fit(folder_lib.read_image(str(args.edit_image)), size,
                 Image.BICUBIC)
  except data_base.DataError as e:
    sys.exit(f"error: {e}")
  _, old = _read_masks(args.masks, config, size)
  _, new = _read_masks(args.edit_labels, config, size)
  if len(old) != 1 or len(new) != 1:
    sys.exit("error: an edit takes one --masks file and one --edit_labels file")
  margin = args.edit_margin or 2 * ldm.downsample_factor
  keep, weight = editing.edit_masks(old, new, ldm.downsample_factor, margin)
  if keep.min() == 1.0:
    sys.exit(f"error: {args.edit_labels} has the same labels as {args.masks}: "
             "nothing to edit")
  n = args.num_samples
  results = []
  for b in tqdm.trange(n, desc="edit"):
    gen = np.asarray(sampling.edit(
        ldm, params, fs_params, photo[None], new, keep,
        jax.random.fold_in(key, b), **opts))
    results.append(editing.composite(photo[None], gen, weight)[0])
  out.mkdir(parents=True, exist_ok=True)
  stem = args.edit_image.stem
  for k, img in enumerate(results):
    viz.save_png(img, out / f"{stem}_edit_{k}.png")
  colours = palette_lib.palette(int(config.data.num_classes))
  strip = viz.grid([np.stack([photo, palette_lib.colorize(old[0], colours),
                              palette_lib.colorize(new[0], colours),
                              *results])])
  viz.save_png(strip, out / f"{stem}_edit_strip.png")
  summary.update(edit_image=str(args.edit_image), edit_margin=margin,
                 changed_pixels=int((old != new).sum()),
                 regenerated_latents=int((keep == 0).sum()),
                 kept_pixels=int((weight[0] == 0).sum()),
                 max_error_outside=int(max(
                     np.abs(r.astype(int) - photo)[weight[0] == 0].max(
                         initial=0) for r in results)),
                 samples=n, out=str(out))
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
