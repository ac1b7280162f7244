r"""Turn segmentation masks into images with a trained or converted model.

  python sample.py --workdir DIR [--masks PATH] [--num_samples 2]
      [--sampler ddim|ddpm|dpmpp_2m] [--steps 50] [--eta 0] [--seed 0]
      [--batch_size 8] [--out DIR/samples] [--no-ema]

Restores the newest checkpoint of DIR (EMA UNet weights by default) and the
saved config. Masks come from `--masks` (a PNG file or a folder of them:
grayscale class ids, or palette colours with the config's data.palette) or
from the config's dataset. Writes one PNG per sample, a grid beside the
colourised masks, and, for the built-in synthetic source, the mask-adherence
mIoU of the samples.
"""

import argparse
import json
import math
import pathlib
import sys

import jax
import numpy as np
from PIL import Image
import tqdm

from segldm_jax import checkpoints
from segldm_jax import evaluate
from segldm_jax import first_stage as first_stage_lib
from segldm_jax import run_config
from segldm_jax import sampling
from segldm_jax import viz
from segldm_jax import xla_cpu
from segldm_jax.data import folder as folder_lib
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
  return ap.parse_args(argv)


def _read_masks(path: pathlib.Path, config, size: int):
  """PNG file or folder -> (names, labels (N, size, size) uint8)."""
  files = sorted(path.rglob("*.png")) if path.is_dir() else [path]
  if not files:
    sys.exit(f"--masks {path}: no PNG label maps found")
  spec = labels_lib.LabelSpec.create(
      config.data.num_classes, ignore_label=config.data.get("ignore_label"),
      palette=config.data.get("palette") or None,
      remap=config.data.get("remap") or None)
  out = []
  for f in files:
    labels = folder_lib.read_mask(str(f), spec)
    h, w = labels.shape
    scale = size / min(h, w)  # shorter side to `size`, then centre crop
    img = Image.fromarray(labels).resize(
        (max(size, round(w * scale)), max(size, round(h * scale))),
        Image.NEAREST)
    a = np.asarray(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    out.append(a[y:y + size, x:x + size])
  return [f.stem for f in files], np.stack(out)


def main(argv=None) -> int:
  args = parse_args(argv)
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  workdir = args.workdir.absolute()
  try:
    config = run_config.load(workdir)
  except run_config.ConfigError as e:
    sys.exit(f"error: {e}")
  ldm = build.build_model(config.model)
  num_classes = int(ldm.cond_stage.in_channels)
  if "data" not in config:
    if args.masks is None:
      sys.exit(f"error: {workdir} has no dataset in its config (a converted "
               "checkpoint?); pass --masks PATH")
    config.data = {"num_classes": num_classes, "image_size": (
        int(config.model.params.image_size) * ldm.downsample_factor)}
  size = int(config.data.image_size)
  mask_stages = int(math.log2(size // int(config.data.get("mask_size") or size)))

  params, step = checkpoints.restore_params(workdir, ldm, use_ema=args.ema)
  found = first_stage_lib.load_existing(config, workdir)
  if found is None:
    sys.exit(f"error: {workdir} has no first stage (first_stage/ or "
             "first_stage.checkpoint in config.json)")
  fs_params = found[1]

  source = None
  if args.masks is not None:
    names, labels = _read_masks(args.masks, config, size)
  else:
    source = pipeline.make_source(config.data)
    n = args.num_masks or int(config.get("sample", {}).get("num_masks", 8))
    ds = pipeline.make_dataset(source, image_size=size, batch_size=n,
                               seed=config.get("seed", 0), train=False,
                               shard_index=0, shard_count=1,
                               drop_remainder=False)
    labels = next(iter(ds))["labels"]
    names = [f"mask{i:04d}" for i in range(len(labels))]

  sample_cfg = config.get("sample", {})
  sampler = args.sampler or sample_cfg.get("sampler", "ddim")
  steps = args.steps or int(sample_cfg.get("steps", 50))
  eta = args.eta if args.eta is not None else float(sample_cfg.get("eta", 0.0))
  out = args.out or workdir / f"samples_step{step}_{sampler}{steps}"
  out.mkdir(parents=True, exist_ok=True)

  # Each mask repeated num_samples times; batches in a fixed order, keyed by
  # (seed, batch index): the same seed and batch size give the same images.
  rep = np.repeat(labels, args.num_samples, axis=0)
  key = jax.random.key(args.seed)
  images = []
  for b, start in enumerate(tqdm.trange(0, len(rep), args.batch_size,
                                        desc=f"{sampler} x{steps}")):
    chunk = rep[start:start + args.batch_size]
    images.append(np.asarray(sampling.generate(
        ldm, params, fs_params, chunk, jax.random.fold_in(key, b),
        sampler=sampler, steps=steps, eta=eta, mask_stages=mask_stages)))
  images = np.concatenate(images).reshape(len(labels), args.num_samples,
                                          size, size, 3)
  for name, per_mask in zip(names, images):
    for k, img in enumerate(per_mask):
      viz.save_png(img, out / f"{name}_{k}.png")
  viz.save_png(viz.mask_sample_grid(labels, images, num_classes),
               out / "grid.png")
  summary = {"workdir": str(workdir), "step": step, "sampler": sampler,
             "steps": steps, "eta": eta, "seed": args.seed,
             "ema": args.ema, "masks": len(labels),
             "samples": int(images.shape[0] * images.shape[1]), "out": str(out)}
  if source is not None and config.data.source == "synthetic":
    pred = evaluate.segment_synthetic(images.reshape(-1, size, size, 3),
                                      num_classes)
    summary["mask_miou"] = float(evaluate.mean_iou(pred, rep, num_classes))
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
