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
import pathlib
import sys

import jax
import numpy as np

from segldm_jax import errors
from segldm_jax.config import cli
from segldm_jax.data import masks as masks_lib
from segldm_jax.data import palette as palette_lib
from segldm_jax.data import viz
from segldm_jax.diffusion import samplers
from segldm_jax.eval import miou
from segldm_jax.inference import generation
from segldm_jax.inference import region_edit
from segldm_jax.inference import trained_model
from segldm_jax.runtime import compilation_cache
from segldm_jax.runtime import xla_cpu


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", type=pathlib.Path)
  ap.add_argument("--masks", type=pathlib.Path,
                  help="PNG label map or folder of them (default: the dataset)")
  ap.add_argument("--palette", default=None,
                  help="masks painted in colours: coco-stuff, ade20k, "
                  "cityscapes or a palette file (default: the run's "
                  "data.palette; grey PNGs hold class ids)")
  ap.add_argument("--palette_tolerance", type=float, default=30.0,
                  help="RGB distance a painted colour may snap over")
  ap.add_argument("--unknown_colours", choices=("error", "ignore"),
                  default="error", help="pixels no palette colour is near: "
                  "an error, or \"don't care\"")
  ap.add_argument("--legend", default=None, metavar="PALETTE",
                  help="write a swatch sheet of PALETTE to paint with "
                  "(to --out, default legend.png) and exit")
  ap.add_argument("--height", type=int, default=None,
                  help="resize --masks to this height (keeps the aspect "
                  "ratio without --width)")
  ap.add_argument("--width", type=int, default=None)
  ap.add_argument("--num_masks", type=int, default=None,
                  help="masks taken from the dataset (default: config)")
  ap.add_argument("--num_samples", type=int, default=1, help="per mask")
  ap.add_argument("--sampler", choices=samplers.SAMPLERS, default=None)
  ap.add_argument("--steps", type=int, default=None, help="on a 1000-step "
                  "schedule: " + "; ".join(
                      f"{n} {samplers.describe_steps(n, 1000)}"
                      for n in samplers.SAMPLERS))
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
                  help="shorter output side in pixels (default: the "
                  "training size for dataset masks, the file's for --masks)")
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
  if args.workdir is None and args.legend is None:
    ap.error("--workdir is required (or --legend PALETTE)")
  if (args.edit_image is None) != (args.edit_labels is None) or (
      args.edit_image is not None and args.masks is None):
    ap.error("an edit needs --edit_image PHOTO, --masks ITS_LABELS.png and "
             "--edit_labels EDITED.png")
  return args


def _tag(opts: dict, shape: tuple[int, int], train_size: int,
         large_method: str) -> str:
  """Names the output folder after how the samples were made."""
  tag = f"{opts['sampler']}{opts['steps']}"
  if opts["guidance_scale"] != 1.0:
    tag += f"_cfg{opts['guidance_scale']:g}"
  if shape != (train_size, train_size):
    tag += (f"_{shape[0]}px" if shape[0] == shape[1]
            else f"_{shape[0]}x{shape[1]}px") + f"_{large_method}"
  return tag


def _read_masks(path: pathlib.Path, args, model
                ) -> tuple[list[str], np.ndarray]:
  """Label maps as ids at the size the flags ask for."""
  spec = (None if args.palette is None else masks_lib.painted_spec(
      model.num_classes, args.palette, args.palette_tolerance,
      args.unknown_colours))
  names, labels = masks_lib.read_masks(path, model.config.data, spec)
  return names, masks_lib.size_masks(
      names, labels, model.geometry.step_px, size=args.size,
      height=args.height, width=args.width)


def _legend(name: str, out: pathlib.Path | None) -> int:
  try:
    colours, names = palette_lib.named(name)
  except ValueError as e:
    raise errors.InputError(f"--legend: {e}") from None
  path = viz.save_png(viz.legend(colours, names), out or "legend.png")
  print(json.dumps({"legend": name, "classes": len(names), "out": str(path)}))
  return 0


@cli.main_exits
def main(argv=None) -> int:
  args = parse_args(argv)
  if args.legend is not None:
    return _legend(args.legend, args.out)
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  model = trained_model.load(args.workdir, use_ema=args.ema,
                            conv=xla_cpu.preferred_conv())
  compilation_cache.setup(model.config.get("compilation_cache_dir"))
  geometry = model.geometry
  opts = model.sample_options(sampler=args.sampler, steps=args.steps,
                              eta=args.eta, guidance_scale=args.guidance_scale)
  summary = {"workdir": str(model.workdir), "step": model.step,
             "seed": args.seed, "ema": args.ema, **opts}
  key, source = jax.random.key(args.seed), None
  if args.masks is not None:
    names, labels = _read_masks(args.masks, args, model)
  elif model.has_dataset:
    size = masks_lib.target_size((geometry.image, geometry.image),
                                 geometry.step_px, size=args.size)[0]
    names, labels, source = masks_lib.dataset_masks(
        model.config.data, size, args.num_masks or int(
            model.config.get("sample", {}).get("num_masks", 8)),
        seed=model.config.get("seed", 0))
  else:
    raise errors.InputError(f"{model.workdir} has no dataset in its config "
                            "(a converted checkpoint?); pass --masks PATH")
  shape = labels.shape[1:]
  large_method = ("tiles" if max(shape) > geometry.image
                  and args.large == "tiles" else "direct")
  tag = _tag(opts, shape, geometry.image, large_method)

  if args.edit_image is not None:  # one photo: regenerate a region
    _, new = _read_masks(args.edit_labels, args, model)
    if len(labels) != 1 or len(new) != 1 or new.shape != labels.shape:
      raise errors.InputError("an edit takes one --masks file and one "
                              "--edit_labels file of the same size")
    summary.update(edit_image=str(args.edit_image), **region_edit.regenerate_and_save(
        model, masks_lib.read_photo(args.edit_image, shape), labels[0],
        new[0], margin=args.edit_margin or 2 * model.ldm.downsample_factor,
        num_samples=args.num_samples, options=opts, key=key,
        out=args.out or model.workdir / f"edits_step{model.step}_{tag}",
        stem=args.edit_image.stem, names=(str(args.masks),
                                          str(args.edit_labels))))
    return _finish(summary, pathlib.Path(summary["out"]))

  if large_method == "tiles":
    tile = geometry.image // geometry.factor  # the training latent
    overlap = tile // 4 if args.tile_overlap is None else args.tile_overlap
    generate_fn = functools.partial(generation.generate_tiled, tile=tile,
                                    overlap=overlap, **opts)
    summary.update(size=list(shape), large="tiles", tile=tile,
                   tile_overlap=overlap)
  else:
    generate_fn = functools.partial(generation.generate, **opts)
    if shape != (geometry.image, geometry.image):
      summary.update(size=list(shape), large="direct")
  out = args.out or model.workdir / f"samples_step{model.step}_{tag}"
  images = generation.sample_in_batches(
      generate_fn, model.ldm, model.params, model.first_stage_params, labels,
      args.num_samples, args.batch_size, key, desc=tag)
  out.mkdir(parents=True, exist_ok=True)
  for name, per_mask in zip(names, images):
    for k, img in enumerate(per_mask):
      viz.save_png(img, out / f"{name}_{k}.png")
  viz.save_png(viz.mask_sample_grid(
      labels, images, palette_lib.for_data(model.config.data)),
               out / "grid.png")
  summary.update(masks=len(labels), samples=int(images.shape[0] *
                                                 images.shape[1]), out=str(out))
  if source is not None and model.config.data.source == "synthetic":
    pred = miou.segment_synthetic(images.reshape(-1, *images.shape[2:]),
                                  model.num_classes)
    summary["mask_miou"] = miou.mean_iou(
        pred, np.repeat(labels, args.num_samples, axis=0), model.num_classes)
  return _finish(summary, out)


def _finish(summary: dict, out: pathlib.Path) -> int:
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
