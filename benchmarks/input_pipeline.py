r"""Images/s of the folder input pipeline per CPU core, and workers to feed a GPU.

Runs the training pipeline of train.py (`pipeline.make_dataset`: shuffle,
JPEG + label PNG decode, resize of the shorter side, random crop and flip,
batch) on a folder dataset, in this process with one decode thread, and
counts images per second of this process's CPU time: the work one core does,
whatever else runs on the machine. Then a short run with `--workers` grain
worker processes checks the wall-clock rate scales with them.

  python benchmarks/input_pipeline.py --data ../shared/data/sflckr \
      --size 256 --batch 16 --batches 40 --feed 202

`--feed R`: the train step's images/s to keep fed (BENCHMARKS.md: the
reference train step on one H100, batch 16 bf16); prints the grain workers
(`data.num_workers`) that rate needs at the measured per-core rate.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _dataset(args, num_workers: int, num_threads: int):
  import grain  # pylint: disable=g-import-not-at-top

  from segldm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.make_source({
      "source": "folder", "image_dir": os.path.join(args.data, "images"),
      "mask_dir": os.path.join(args.data, "segmentations"),
      "num_classes": 182})
  return pipeline.make_dataset(
      source, image_size=args.size, batch_size=args.batch, seed=0,
      train=True, shard_index=0, shard_count=1, num_workers=num_workers,
      read_options=grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=2 * args.batch))


def per_core(args) -> dict:
  """One decode thread, no workers: images per CPU-second of this process."""
  it = iter(_dataset(args, 0, 1))
  next(it)  # warm-up: imports, file listing, the first prefetch
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  images = args.batches * args.batch
  assert batch["image"].shape == (args.batch, args.size, args.size, 3)
  return {"images": images, "cpu_s": cpu, "wall_s": wall,
          "per_core": images / cpu, "wall_rate": images / wall}


def with_workers(args) -> dict:
  it = iter(_dataset(args, args.workers, 1))
  for _ in range(args.workers * 2):  # every worker started and producing
    next(it)
  wall0 = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  wall = time.perf_counter() - wall0
  return {"workers": args.workers, "wall_rate": args.batches * args.batch / wall}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data", default=os.path.join(ROOT, "tests/data/sflckr"),
                  help="folder with images/ and segmentations/")
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--workers", type=int, default=2,
                  help="grain workers for the scaling check (0: skip it)")
  ap.add_argument("--feed", type=float, default=202.0,
                  help="train images/s to feed (H100, BENCHMARKS.md)")
  args = ap.parse_args(argv)
  r = per_core(args)
  print(f"{args.data}: {r['images']} images at {args.size} px, batch "
        f"{args.batch}, 1 decode thread: {r['cpu_s']:.1f} CPU s, "
        f"{r['wall_s']:.1f} wall s -> **{r['per_core']:.1f} images/s per "
        f"core** ({r['wall_rate']:.1f} images/s wall)")
  if args.workers:
    w = with_workers(args)
    print(f"{w['workers']} grain workers: {w['wall_rate']:.1f} images/s wall "
          f"({w['wall_rate'] / r['per_core']:.2f} cores' worth, on "
          f"{os.cpu_count()} cores)")
  need = math.ceil(args.feed / r["per_core"])
  print(f"to feed {args.feed:.0f} images/s: data.num_workers >= {need} "
        f"({args.feed / r['per_core']:.1f} cores of decode)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
