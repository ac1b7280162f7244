r"""Fine-tuning the demo model onto another class set, against training from
scratch (issue 25; BENCHMARKS.md "Fine-tuning against training from scratch").

  python train.py --config configs/seg_f4.py:demo --workdir workdirs/demo
  python benchmarks/finetune_vs_scratch.py --source workdirs/demo \
      --out runs/ft_bench [--num_classes 8 --steps 300 --every 50 --num_masks 32
      --scratch_steps 1200 --scratch_every 150]

Both arms train the demo recipe on the synthetic scenes with --num_classes
classes, named by their colours: with 8, four of the demo's 16 colours come
back (at other ids) and four are new. Both use the source's first stage, the
same seed (so the same batches, timesteps and noise), the same warm-up and
the same number of steps:

  finetune  --config.init_from=SOURCE: the demo's UNet (EMA) and, by name,
            the shared classes' rescaler rows; the new classes start from
            the mean row;
  scratch   a random UNet and rescaler, as any new run.

The fine-tune's step 0 (the mapped source, untrained) is scored too, from a
0-step run. Prints one JSON line per arm and step: the training loss (mean
of the logged steps since the previous row) and the mask mIoU of samples
from --num_masks held-out masks (sample.py's protocol: the demo's sampler,
steps and guidance scale; the synthetic scenes' colour segmenter).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from segldm_jax.checkpoint import store
from segldm_jax.data import masks as masks_lib
from segldm_jax.eval import miou
from segldm_jax.inference import trained_model
from segldm_jax.runtime import xla_cpu


def _train(workdir: pathlib.Path, args, steps: int, *extra: str
           ) -> subprocess.Popen:
  log = open(workdir.parent / f"{workdir.name}.log", "a")  # pylint: disable=consider-using-with
  return subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), "--config",
       str(ROOT / "configs/seg_f4.py:demo"), "--workdir", str(workdir),
       f"--config.data.num_classes={args.num_classes}",
       f"--config.train.steps={steps}",
       f"--config.train.checkpoint_every={args.every}",
       f"--config.train.keep_checkpoints={steps // args.every + 1}",
       f"--config.train.warmup_steps={args.warmup}", "--config.train.log_every=10",
       "--config.train.sample_every=0", f"--config.seed={args.seed}", *extra],
      stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


def _score(workdir: pathlib.Path, step: int, args) -> float:
  """Mask mIoU of the checkpoint at `step`; kept in OUT/scores.json, so a
  longer rerun scores only what is new."""
  cache = args.out / "scores.json"
  scores = json.loads(cache.read_text()) if cache.is_file() else {}
  key = f"{workdir.name}/{step}/{args.num_masks}/{args.sample_seed}"
  if key not in scores:
    scores[key] = _sample_miou(workdir, step, args)
    cache.write_text(json.dumps(scores, indent=1) + "\n")
  return scores[key]


def _sample_miou(workdir: pathlib.Path, step: int, args) -> float:
  model = trained_model.load(workdir, conv=xla_cpu.preferred_conv())
  params, _ = store.restore_params(workdir, model.ldm, step=step)
  model = dataclasses.replace(model, params=params, step=step)
  _, labels, _ = masks_lib.dataset_masks(
      model.config.data, model.geometry.image, args.num_masks,
      seed=model.config.seed)
  images = model.sample(labels, seed=args.sample_seed, batch_size=16)
  pred = miou.segment_synthetic(images[:, 0], model.num_classes)
  return float(miou.mean_iou(pred, labels, model.num_classes))


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--source", type=pathlib.Path, required=True)
  ap.add_argument("--out", type=pathlib.Path, required=True)
  ap.add_argument("--num_classes", type=int, default=8)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--every", type=int, default=50)
  ap.add_argument("--scratch_steps", type=int, default=0,
                  help="train the scratch arm further, to see where it "
                       "catches up; scored every --scratch_every")
  ap.add_argument("--scratch_every", type=int, default=150)
  ap.add_argument("--warmup", type=int, default=50)
  ap.add_argument("--num_masks", type=int, default=32)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--sample_seed", type=int, default=0)
  args = ap.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  source = args.source.absolute()
  first_stage = f"--config.first_stage.checkpoint={source / 'first_stage'}"
  classes = ("--config.model.params.cond_stage_config.params.in_channels="
             f"{args.num_classes}")
  arms = {"finetune": ("--config.init_from=" + str(source),),
          "scratch": (first_stage, classes)}
  # The arms train side by side (one core each on a 2-core machine).
  # (A finished arm is resumed at its last step and does nothing.)
  scratch_steps = max(args.steps, args.scratch_steps)
  steps = {"finetune": args.steps, "scratch": scratch_steps}
  procs = {name: _train(args.out / name, args, steps[name], *extra)
           for name, extra in arms.items()}
  zero = args.out / "finetune_step0"
  procs["finetune_step0"] = _train(zero, args, 0, *arms["finetune"])
  for name, proc in procs.items():
    if proc.wait():
      sys.exit(f"{name} failed: see {args.out / name}.log")
  print(json.dumps({"arm": "finetune", "step": 0, "loss": None,
                    "mask_miou": round(_score(zero, 0, args), 4)}), flush=True)
  for name in arms:
    losses = _losses(args.out / name)
    scored = [*range(args.every, args.steps + 1, args.every),
              *range(args.steps + args.scratch_every, steps[name] + 1,
                     args.scratch_every)]
    for prev, step in zip([0, *scored], scored):
      window = [v for s, v in losses.items() if prev < s <= step]
      print(json.dumps({"arm": name, "step": step,
                        "loss": round(float(np.mean(window)), 4),
                        "mask_miou": round(_score(args.out / name, step, args),
                                           4)}), flush=True)


if __name__ == "__main__":
  main()
