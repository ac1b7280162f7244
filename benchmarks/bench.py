r"""Speed, memory and FLOPs of segldm-jax, side by side with a PyTorch peer.

One command measures, for a model size and batch:
  train    the full train step (frozen VQ encode, rescaler, UNet forward and
           backward, AdamW, EMA), images/s
  ddim     DDIM sampling, `--ddim_steps` UNet calls then the VQ decode, images/s
  dpmpp    DPM-Solver++(2M), `--dpmpp_steps` UNet calls then the decode; the
           peer runs its DDIM loop with as many steps (the same UNet calls:
           the solvers' own arithmetic is a few elementwise ops a step)
  encode   VQ encode, images/s
  decode   VQ decode (quantise + decoder), images/s
plus compile time, peak memory (host RSS on CPU, device memory on GPU), FLOPs
per train step (XLA's cost analysis and an analytic count of convolutions and
matmuls) and MFU against a peak printed beside it.

The peer (`--peer`, needs benchmarks/requirements-torch.txt) is what a PyTorch
user would pick: diffusers' UNet2DModel and VQModel with the same channels,
blocks, attention placement and input channels, torch.optim.AdamW, the same
EMA and the same DDIM update (benchmarks/torch_peer.py). Each framework runs in
its own worker process (so peak memory is its own); the parent alternates
them, run by run, and reports medians with min-max and the ratio JAX/PyTorch.

  python benchmarks/bench.py --size demo --batch 8 --peer --repeats 5
  python benchmarks/bench.py --size seg_f4 --batch 64 --dtype bfloat16 --peer
  python benchmarks/bench.py --size tiny --batch 1 --smoke   # CI: no timing

Sizes: `demo` = the demo config's UNet and VQ with 182-class masks squeezed
to 3 channels (UNet input 6 = 3 latent + 3 mask, latents 3x16x16 from 64x64
images); `seg_f4` = the reference recipe (256x256 images, latents 3x64x64);
`tiny` = the test-size variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

WORKLOADS = ("train", "ddim", "dpmpp", "encode", "decode")
DEFAULT_WORKLOADS = ("train", "ddim", "encode", "decode")
# Iterations per timed run, by size: a run lasts about a second or more.
ITERS = {"tiny": 2, "demo": 8, "seg_f4": 4}


# ------------------------------------------------------------------------- #
#                        Model sizes (shared by both sides)                 #
# ------------------------------------------------------------------------- #

def add_train_step_args(ap, remat_help: str = "train.remat") -> None:
  """The train-step settings the memory and profile scripts share."""
  ap.add_argument("--size", choices=("tiny", "demo", "seg_f4"),
                  default="seg_f4")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                  default="bfloat16")
  ap.add_argument("--remat", default="none", help=remat_help)
  ap.add_argument("--encode_chunks", type=int, default=1,
                  help="train.encode_chunks: the VQ encoder's micro-batches")

def size_config(size: str):
  """The LDM node of a size, as a ConfigDict (configs/seg_f4.py)."""
  from configs import seg_f4  # pylint: disable=g-import-not-at-top
  variant = {"demo": "demo", "seg_f4": "reference", "tiny": "tiny"}[size]
  config = seg_f4.get_config(variant)
  p = config.model.params
  if size == "demo":  # the benchmark's fixed workload: 182 classes -> 3
    config.data.num_classes = 182
    p.cond_stage_config.params.in_channels = 182
    p.cond_stage_config.params.out_channels = 3
    p.unet_config.params.in_channels = p.channels + 3
  return config


def architecture(config) -> dict:
  """Plain numbers both workers build their models from."""
  p = config.model.params
  unet = p.unet_config.params.to_dict()
  dd = p.first_stage_config.params.ddconfig.to_dict()
  return {
      "image_size": int(config.data.image_size),
      "num_classes": int(p.cond_stage_config.params.in_channels),
      "cond_channels": int(p.cond_stage_config.params.out_channels),
      "rescaler_stages": int(p.cond_stage_config.params.n_stages),
      "latent_channels": int(p.channels),
      "latent_size": int(p.image_size),
      "timesteps": int(p.timesteps),
      "linear_start": float(p.linear_start), "linear_end": float(p.linear_end),
      "unet": unet,
      "vq": {"ch": dd["ch"], "ch_mult": list(dd["ch_mult"]),
             "num_res_blocks": dd["num_res_blocks"],
             "z_channels": dd["z_channels"],
             "embed_dim": int(p.first_stage_config.params.embed_dim),
             "n_embed": int(p.first_stage_config.params.n_embed)},
      "lr": float(config.train.base_learning_rate) * 8,
      "weight_decay": float(config.train.weight_decay),
  }


# ------------------------------------------------------------------------- #
#                                The JAX side                               #
# ------------------------------------------------------------------------- #
def jax_workloads(size: str, batch: int, dtype: str, ddim_steps: int,
                  names=WORKLOADS, remat: str = "none", encode_chunks: int = 1,
                  dpmpp_steps: int = 25):
  """-> ({name: run(n) -> seconds}, info, memory()) for the named workloads."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import flops  # pylint: disable=g-import-not-at-top
  from segldm_jax.inference import generation  # pylint: disable=g-import-not-at-top
  from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
  from segldm_jax.training import ldm_step  # pylint: disable=g-import-not-at-top
  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top

  config = size_config(size)
  config.train.compute_dtype = dtype
  config.train.batch_size = batch
  config.train.remat = remat
  config.train.encode_chunks = encode_chunks
  arch = architecture(config)
  ldm = build.build_model(config.model, dtype=jnp.float32,
                          conv=xla_cpu.preferred_conv())
  rng = np.random.default_rng(0)
  hw = arch["image_size"]
  batch_np = {
      "image": rng.integers(0, 256, (batch, hw, hw, 3), dtype=np.uint8),
      "labels": rng.integers(0, arch["num_classes"], (batch, hw, hw),
                             dtype=np.uint8)}
  data = jax.device_put(batch_np)
  key = jax.random.key(0)
  k_fs, k_unet, k_cond = jax.random.split(key, 3)
  fs_params = build.init_params(ldm.first_stage, k_fs)
  optimizer = ldm_step.make_optimizer(config.train)
  state = ldm_step.init_state(
      {"unet": build.init_params(ldm.unet, k_unet),
       "cond_stage": build.init_params(ldm.cond_stage, k_cond)}, optimizer)
  step = ldm_step.make_train_step(ldm, optimizer, config.train)

  info = {"framework": "jax", "jax": jax.__version__,
          "device": str(jax.devices()[0].device_kind),
          "platform": jax.devices()[0].platform, "compile_s": {}}

  def compiled(name, fn, *args, **jit_kw):
    t0 = time.perf_counter()
    out = jax.jit(fn, **jit_kw).lower(*args).compile()
    info["compile_s"][name] = time.perf_counter() - t0
    return out

  def timed(fn, *args):
    def run(n):
      t0 = time.perf_counter()
      for _ in range(n):
        out = fn(*args)
      jax.block_until_ready(out)
      return time.perf_counter() - t0
    return run

  info["params_unet"] = sum(x.size for x in jax.tree.leaves(state.params["unet"]))
  params = {"unet": state.ema["unet"], "cond_stage": state.params["cond_stage"]}
  params = jax.tree.map(jnp.copy, params)  # not donated with the state
  image = jnp.asarray(batch_np["image"], jnp.float32) / 127.5 - 1.0
  runs = {}
  if "train" in names:
    train = compiled("train", step, state, data, fs_params, key,
                     donate_argnums=(0,))
    info["flops_train_xla"] = flops.xla_flops(train)
    jaxpr = jax.make_jaxpr(step)(state, data, fs_params, key).jaxpr
    info["flops_train_analytic"] = flops.count_jaxpr(jaxpr, model=False)
    info["flops_train_model"] = flops.count_jaxpr(jaxpr)
    box = {"state": state}

    def run_train(n):
      t0 = time.perf_counter()
      s = box["state"]
      for _ in range(n):
        s, m = train(s, data, fs_params, key)
      jax.block_until_ready((s, m))
      box["state"] = s
      return time.perf_counter() - t0
    runs["train"] = run_train
  # Sampling computes the UNet in the compute dtype too (parameters stay
  # float32; the peer samples under autocast).
  sampler_ldm = dataclasses.replace(ldm,
                                    unet=ldm.unet.clone(dtype=jnp.dtype(dtype)))
  for name, sampler, steps in (("ddim", "ddim", ddim_steps),
                               ("dpmpp", "dpmpp_2m", dpmpp_steps)):
    if name not in names:
      continue
    sample = functools.partial(generation.generate, sampler_ldm,
                               sampler=sampler, steps=steps, eta=0.0)
    program = compiled(name, sample, params, fs_params, data["labels"], key)
    info[f"flops_{name}_analytic"] = flops.analytic_flops(
        sample, params, fs_params, data["labels"], key)
    runs[name] = timed(program, params, fs_params, data["labels"], key)
  if "encode" in names:
    encode = compiled("encode", ldm.encode, fs_params, image)
    runs["encode"] = timed(encode, fs_params, image)
  if "decode" in names:
    z = jax.jit(ldm.encode)(fs_params, image)
    decode = compiled("decode", ldm.decode, fs_params, z)
    runs["decode"] = timed(decode, fs_params, z)

  def memory():
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      return {"peak_device_bytes": stats["peak_bytes_in_use"]}
    return {}

  return runs, info, memory


# ------------------------------------------------------------------------- #
#                      Worker: one framework, one process                   #
# ------------------------------------------------------------------------- #
def _peak_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def worker(args) -> None:
  """Builds and compiles, says `ready`, then times what stdin asks for."""
  if args.worker == "jax":
    from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
    xla_cpu.use_xnnpack_convolutions()  # as train.py and sample.py
    runs, info, memory = jax_workloads(args.size, args.batch, args.dtype,
                                       args.ddim_steps, args.workloads,
                                       args.remat, args.encode_chunks,
                                       args.dpmpp_steps)
  else:
    try:
      from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise SystemExit(f"--peer needs torch and diffusers ({e}): pip install "
                       "-r benchmarks/requirements-torch.txt") from e
    runs, info, memory = torch_peer.workloads(
        architecture(size_config(args.size)), args.batch, args.dtype,
        args.ddim_steps, args.threads, args.dpmpp_steps)
  for name in args.workloads:  # warm-up: first calls allocate, autotune...
    runs[name](1)
  print(json.dumps({"ready": info}), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "run":
      seconds = runs[cmd[1]](int(cmd[2]))
      print(json.dumps({"seconds": seconds}), flush=True)
    elif cmd[0] == "quit":
      print(json.dumps({"memory": {"peak_rss_bytes": _peak_rss_bytes(),
                                   **memory()}}), flush=True)
      return


class Worker:
  """The parent's handle on a worker process (JSON lines over pipes)."""

  def __init__(self, framework: str, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework,
           "--size", args.size, "--batch", str(args.batch), "--dtype",
           args.dtype, "--ddim_steps", str(args.ddim_steps),
           "--dpmpp_steps", str(args.dpmpp_steps), "--remat", args.remat,
           "--encode_chunks", str(args.encode_chunks),
           "--threads", str(args.threads),
           "--workloads", ",".join(args.workloads)]
    self.framework = framework
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    self.info = self._read()["ready"]

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"the {self.framework} worker died (exit "
                       f"{self.proc.wait()}); its error is above")
    return json.loads(line)

  def ask(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> dict:
    memory = self.ask("quit")["memory"]
    self.proc.wait()
    return memory


# ------------------------------------------------------------------------- #
#                          Peak FLOP/s assumed for MFU                      #
# ------------------------------------------------------------------------- #
# Dense peaks from the vendors' data sheets (no sparsity).
GPU_PEAK = {"H100": {"bfloat16": 989e12, "float32": 494e12},  # SXM; f32 = TF32
            "H200": {"bfloat16": 989e12, "float32": 494e12}}


def peak_flops(info: dict, dtype: str, cores: int) -> tuple[float, str]:
  if info["platform"] == "gpu":
    for name, peaks in GPU_PEAK.items():
      if name in info["device"]:
        return peaks[dtype], f"{name} {dtype} dense data-sheet peak"
    return float("nan"), f"unknown GPU {info['device']}"
  # CPU: cores x clock x FLOPs per cycle (2 FMA pipes x 8 float32 lanes x 2).
  mhz = 0.0
  flags = ""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("cpu MHz") and not mhz:
        mhz = float(line.split(":")[1])
      if line.startswith("flags") and not flags:
        flags = line
  per_cycle = 32 if " avx2" in flags or " avx512f" in flags else 16
  return (cores * mhz * 1e6 * per_cycle,
          f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} float32 "
          "FLOP/cycle (2 FMA x 256-bit)")


# ------------------------------------------------------------------------- #
#                                  Report                                   #
# ------------------------------------------------------------------------- #
def _stats(values):
  return statistics.median(values), min(values), max(values)


def _fmt(v):
  med, lo, hi = v
  return f"{med:.1f} [{lo:.1f}-{hi:.1f}]"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", choices=("tiny", "demo", "seg_f4"), default="demo")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--ddim_steps", type=int, default=50)
  ap.add_argument("--dpmpp_steps", type=int, default=25)
  ap.add_argument("--remat", default="none",
                  choices=("none", "block", "dots_saveable"),
                  help="train.remat of the JAX train step")
  ap.add_argument("--encode_chunks", type=int, default=1,
                  help="train.encode_chunks of the JAX train step")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--iters", type=int, default=0,
                  help="iterations per timed run (0: by size)")
  ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                  type=lambda s: tuple(s.split(",")),
                  help=f"comma-separated subset of {','.join(WORKLOADS)}")
  ap.add_argument("--peer", action="store_true", help="also run PyTorch")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                  help="torch CPU threads")
  ap.add_argument("--smoke", action="store_true",
                  help="build, compile, count FLOPs, run each once; no timing")
  ap.add_argument("--json", default="", help="also write the results here")
  ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  unknown = set(args.workloads) - set(WORKLOADS)
  if unknown:
    ap.error(f"unknown workload(s) {sorted(unknown)}; choose from {WORKLOADS}")
  if args.worker:
    worker(args)
    return 0

  workers = [Worker("jax", args)]
  if args.peer:
    workers.append(Worker("torch", args))
  iters = args.iters or ITERS[args.size]
  per_run = {"train": iters, "ddim": 1, "dpmpp": 1, "encode": iters,
             "decode": iters}
  results = {w.framework: {k: [] for k in args.workloads} for w in workers}
  repeats = 0 if args.smoke else args.repeats  # smoke: the warm-up call only
  for r in range(repeats):
    # Alternate who goes first, so drift (thermal, caches) hits both alike.
    order = workers if r % 2 == 0 else workers[::-1]
    for name in args.workloads:
      for w in order:
        time.sleep(0.2)  # the other's worker threads stop spinning first
        s = w.ask(f"run {name} {per_run[name]}")["seconds"]
        results[w.framework][name].append(per_run[name] * args.batch / s)
  memory = {w.framework: w.close() for w in workers}

  info = workers[0].info
  peak, peak_desc = peak_flops(info, args.dtype, os.cpu_count() or 1)
  report = {"size": args.size, "batch": args.batch, "dtype": args.dtype,
            "ddim_steps": args.ddim_steps, "dpmpp_steps": args.dpmpp_steps,
            "remat": args.remat, "encode_chunks": args.encode_chunks, "repeats": repeats,
            "iters_per_run": per_run,
            "workers": {w.framework: w.info for w in workers},
            "memory": memory, "peak_flops": peak, "peak_assumed": peak_desc}
  if args.smoke:
    print(json.dumps(report, indent=1))
    return 0

  report["images_per_sec"] = {f: {k: _stats(v) for k, v in r.items()}
                              for f, r in results.items()}
  print(f"\n{args.size}, batch {args.batch}, {args.dtype}, {info['device']}; "
        f"images/s, median [min-max] of {repeats} runs")
  head = "| workload | JAX |" + (" PyTorch | JAX / PyTorch |" if args.peer else "")
  print(head)
  print("|" + " --- |" * (head.count("|") - 1))
  for name in args.workloads:
    row = f"| {name} | {_fmt(report['images_per_sec']['jax'][name])} |"
    if args.peer:
      t = report["images_per_sec"]["torch"][name]
      ratio = report["images_per_sec"]["jax"][name][0] / t[0]
      row += f" {_fmt(t)} | **{ratio:.2f}x** |"
    print(row)
  print(f"\ncompile s: {json.dumps({k: round(v, 1) for k, v in info['compile_s'].items()})}")
  if "train" in args.workloads:
    train_ips = report["images_per_sec"]["jax"]["train"][0]
    achieved = info["flops_train_model"] * train_ips / args.batch
    report["train_tflops"] = achieved / 1e12
    report["mfu"] = achieved / peak
    print(f"train step FLOPs: model (conv + matmul, convolutions as the "
          f"direct algorithm) {info['flops_train_model'] / 1e9:.2f} G; "
          f"as compiled (Winograd where used): analytic "
          f"{info['flops_train_analytic'] / 1e9:.2f} G, XLA cost analysis "
          f"{info['flops_train_xla'] / 1e9:.2f} G (ratio "
          f"{info['flops_train_xla'] / info['flops_train_analytic']:.3f})")
    print(f"achieved {achieved / 1e12:.3f} TFLOP/s = MFU "
          f"{100 * report['mfu']:.1f}% of {peak / 1e12:.3f} TFLOP/s "
          f"({peak_desc})")
  for f, m in memory.items():
    print(f"peak memory {f}: " + ", ".join(
        f"{k} {v / 2**20:.0f} MiB" for k, v in m.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
