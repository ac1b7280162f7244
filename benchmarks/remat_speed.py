r"""Train-step time with each `train.remat` policy, alternating in one process.

The policies' steps are compiled side by side and run in turn, run by run,
so that drift and other load on the machine hit them alike; each figure is
the median over `--repeats` runs of `--iters` steps, as wall time and as this
process's CPU time (the work done, whatever else runs on the machine).

  python benchmarks/remat_speed.py --size demo --batch 8 --dtype float32 \
      --remat none,block,dots_saveable --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", choices=("tiny", "demo", "seg_f4"), default="demo")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--remat", default="none,block,dots_saveable")
  ap.add_argument("--encode_chunks", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--iters", type=int, default=4)
  args = ap.parse_args(argv)
  from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.use_xnnpack_convolutions()  # as train.py
  from benchmarks import bench  # pylint: disable=g-import-not-at-top

  remats = args.remat.split(",")
  runs = {r: bench.jax_workloads(args.size, args.batch, args.dtype, 1,
                                 ("train",), r, args.encode_chunks)[0]["train"]
          for r in remats}
  for run in runs.values():
    run(1)  # first-call allocations
  wall = {r: [] for r in remats}
  cpu = {r: [] for r in remats}
  for i in range(args.repeats):
    for r in remats if i % 2 == 0 else remats[::-1]:
      c0 = time.process_time()
      wall[r].append(runs[r](args.iters) / args.iters)
      cpu[r].append((time.process_time() - c0) / args.iters)
  base = remats[0]
  print(f"{args.size}, batch {args.batch}, {args.dtype}, encode_chunks "
        f"{args.encode_chunks}; ms per step, median of {args.repeats} runs of "
        f"{args.iters}")
  print(f"| remat | wall ms | CPU ms | CPU vs {base} |\n|---|---:|---:|---:|")
  for r in remats:
    w, c = statistics.median(wall[r]), statistics.median(cpu[r])
    print(f"| {r} | {1e3 * w:.1f} | {1e3 * c:.1f} | "
          f"**{c / statistics.median(cpu[base]):.2f}x** |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
