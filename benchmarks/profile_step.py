r"""A jax.profiler trace of the train step, summarised: where the time goes.

Runs `--steps` train steps of benchmarks/bench.py's workload under
`jax.profiler.trace` (a Perfetto trace, viewable at ui.perfetto.dev or in
TensorBoard's profile plugin) and prints the device ops by total time,
grouped into kinds (convolution, matmul, attention, fusion, copy,
reduction, collective), and the share of the step the device was busy.

  python benchmarks/profile_step.py --size seg_f4 --batch 16 \
      --dtype bfloat16 --steps 5 --out runs/profile
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks import bench  # noqa: E402  (after the path)

# Op-name fragments -> kind (first match wins; names as XLA/cuDNN give them).
KINDS = (("flash", "attention"), ("fmha", "attention"),
         ("attention", "attention"), ("conv", "convolution"),
         ("gemm", "matmul"), ("dot", "matmul"), ("cublas", "matmul"),
         ("nvjet", "matmul"), ("all-reduce", "collective"),
         ("all-gather", "collective"), ("reduce-scatter", "collective"),
         ("copy", "copy"), ("transpose", "copy"), ("memcpy", "copy"),
         ("memset", "copy"), ("reduce", "reduction"), ("fusion", "fusion"))


def kind(name: str) -> str:
  low = name.lower()
  return next((k for frag, k in KINDS if frag in low), "other")


def _host_op(name: str) -> bool:
  """On CPU: an XLA op, not a Python frame ($...) or a runtime wrapper."""
  return not (name.startswith("$") or "::" in name or " " in name
              or name.startswith(("PjitFunction", "ParseArguments")))


def summarise(trace_file: str, top: int = 20) -> dict:
  """Device-side op time from a Perfetto/Chrome trace JSON."""
  with gzip.open(trace_file, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"]["name"] for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  # GPU/TPU streams are their own processes; on CPU, XLA's ops run on the
  # host threads (named by the thunk or fusion).
  device = [p for p, n in pids.items() if "/device:" in n]
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and (e["pid"] in device if device else _host_op(e["name"]))]
  by_name = collections.Counter()
  by_kind = collections.Counter()
  for e in ops:
    by_name[e["name"]] += e["dur"]
    by_kind[kind(e["name"])] += e["dur"]
  span = ((max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops))
          if ops else 0)
  return {"device_processes": [pids[p] for p in device],
          "busy_us": sum(by_kind.values()), "span_us": span,
          "by_kind": by_kind.most_common(),
          "top_ops": by_name.most_common(top)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  bench.add_train_step_args(ap)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--top", type=int, default=20)
  ap.add_argument("--out", default="runs/profile")
  ap.add_argument("--json", default="", help="also write the summary here")
  args = ap.parse_args(argv)
  from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.use_xnnpack_convolutions()
  import jax  # pylint: disable=g-import-not-at-top

  runs, info, _ = bench.jax_workloads(
      args.size, args.batch, args.dtype, 1, ("train",), args.remat,
      args.encode_chunks)
  runs["train"](2)  # compile, allocate, autotune outside the trace
  t0 = time.perf_counter()
  with jax.profiler.trace(args.out, create_perfetto_trace=True):
    seconds = runs["train"](args.steps)
  wall = time.perf_counter() - t0
  files = sorted(glob.glob(os.path.join(args.out, "**", "*perfetto_trace*"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise SystemExit(f"no Perfetto trace under {args.out}")
  s = summarise(files[-1], args.top)
  step_ms = 1e3 * seconds / args.steps
  print(f"{args.size}, batch {args.batch}, {args.dtype}, remat {args.remat}, "
        f"{info['device']}: {args.steps} steps, {step_ms:.1f} ms a step "
        f"({wall:.1f} s traced); trace {files[-1]}")
  busy = s["busy_us"] / 1e3 / args.steps
  print(f"device ops {busy:.1f} ms a step = {100 * busy / step_ms:.0f}% of "
        f"the step (streams: {', '.join(s['device_processes']) or 'host'})")
  print("| kind | ms / step | share |\n|---|---:|---:|")
  for k, us in s["by_kind"]:
    print(f"| {k} | {us / 1e3 / args.steps:.2f} | "
          f"{100 * us / max(s['busy_us'], 1):.1f}% |")
  print(f"\n| top {args.top} ops | ms / step |\n|---|---:|")
  for name, us in s["top_ops"]:
    print(f"| `{name[:90]}` | {us / 1e3 / args.steps:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"step_ms": step_ms, **s}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
