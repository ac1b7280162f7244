"""What verifying checkpoints costs: CRC-32 of torch zips, array manifests.

  .venv/bin/python benchmarks/integrity.py crc [--gib 1.94] [--runs 3]
  .venv/bin/python benchmarks/integrity.py manifest [--variant demo|reference]

`crc` writes a synthetic torch.save zip of `--gib` GiB (float32 storages of
64 MiB, written by tests/torch_files.py; no real checkpoint is needed, the
checksum does not care what the bytes are) and times `load_state_dict` with
the CRC check and with it switched off (the file is in the page cache: it was
just written), then the peak RSS of a load in a fresh process.

`manifest` builds the train state of a config variant (random init, no
training), then times a train-state save with and without the content
manifest, the restore with and without its check, and the hashing alone.
The last thing printed is a markdown snippet for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

_PROBE = """
import json, resource, sys, time
from segldm_jax.convert import torch_io
t = time.perf_counter()
sd = torch_io.load_state_dict(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t, "tensors": len(sd),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _machine() -> str:
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def crc(args) -> None:
  import torch_files as tf  # pylint: disable=g-import-not-at-top
  from segldm_jax.convert import torch_io  # pylint: disable=g-import-not-at-top

  if args.zlib:  # what a machine without the isal wheel gets
    import zlib  # pylint: disable=g-import-not-at-top
    torch_io._crc32 = zlib.crc32  # pylint: disable=protected-access
  chunk = 64 << 20
  n = max(1, round(args.gib * (1 << 30) / chunk))
  block = np.arange(chunk // 4, dtype=np.float32).tobytes()
  tensors = {f"model.t{i}": tf.Tensor(tf.Storage(
      dtype=np.float32, numel=chunk // 4, chunks=lambda: iter([block])),
                                      (chunk // 4,)) for i in range(n)}
  with tempfile.TemporaryDirectory(dir=args.dir) as d:
    path = pathlib.Path(d) / "big.ckpt"
    tf.save_torch(path, {"state_dict": tensors})
    size = path.stat().st_size
    verify = torch_io._Archive.verify  # pylint: disable=protected-access
    times = {}
    for label, check in (("with CRC", True), ("without CRC", False)):
      torch_io._Archive.verify = verify if check else (lambda self, obj: None)
      runs = []
      for _ in range(args.runs):
        t = time.perf_counter()
        torch_io.load_state_dict(path)
        runs.append(time.perf_counter() - t)
      times[label] = statistics.median(runs)
    torch_io._Archive.verify = verify
    probe = json.loads(subprocess.run(
        [sys.executable, "-c", _PROBE, str(path)], check=True,
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    ).stdout)
  cost = times["with CRC"] - times["without CRC"]
  print(f"| {size / 2**30:.2f} GiB, {n} storages | {times['without CRC']:.2f} s | "
        f"{times['with CRC']:.2f} s | {cost:.2f} s ({size / 2**30 / cost:.1f} "
        f"GiB/s) | {probe['peak'] / 2**20:.0f} MiB |")
  crc_impl = "zlib" if args.zlib else torch_io._crc32.__module__  # pylint: disable=protected-access
  print(f"machine: {_machine()}; CRC from {crc_impl}")


def manifest(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from configs import seg_f4  # pylint: disable=g-import-not-at-top
  from segldm_jax.checkpoint import store  # pylint: disable=g-import-not-at-top
  from segldm_jax.training import ldm_step  # pylint: disable=g-import-not-at-top
  from segldm_jax.checkpoint import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from segldm_jax.checkpoint import saved_shapes  # pylint: disable=g-import-not-at-top
  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top

  config = seg_f4.get_config(args.variant)
  shapes = saved_shapes.ldm_param_shapes(build.build_model(config.model))
  rng = np.random.default_rng(0)
  # Random values when saving (compression sees real entropy); hashing costs
  # the same whatever the values.
  params = jax.tree.map(lambda s: jnp.asarray(
      rng.standard_normal(s.shape, np.float32)) if args.save else
                        jnp.ones(s.shape, s.dtype), shapes)
  optimizer = ldm_step.make_optimizer(config.train)
  state = ldm_step.init_state(params, optimizer)
  tree = {"params": state.params, "ema_params": state.ema,
          "opt_state": state.opt_state}
  leaves = jax.tree.leaves(tree)
  nbytes = sum(x.nbytes for x in leaves)

  def median(fn):
    runs = []
    for _ in range(args.runs):
      t = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - t)
    return statistics.median(runs)

  if args.on_device:  # the accelerator path (jitted per shape), on CPU
    manifest_lib._host_copy = lambda x: None  # pylint: disable=protected-access
  first = time.perf_counter()
  manifest_lib.make(tree)
  first = time.perf_counter() - first
  hashing = median(lambda: manifest_lib.make(tree))
  row = {"variant": args.variant, "on_device": args.on_device,
         "arrays": len(leaves),
         "GiB": nbytes / 2**30, "hash_first_s": first, "hash_s": hashing}
  if args.save:
    abstract = jax.eval_shape(lambda p: ldm_step.init_state(p, optimizer),
                              shapes)
    mesh = sharding.make_mesh([("data", -1)])
    shardings = sharding.shardings_from_rules(abstract, mesh, [(".*", "replicate")])
    real_make = manifest_lib.make
    train_cfg = mlc.ConfigDict({"keep_checkpoints": 100, "keep_period": 0})
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
      counter = iter(range(1, 1000))
      for label, on in (("with", True), ("without", False)):
        manifest_lib.make = real_make if on else (lambda t: {})
        mgr = store.train_checkpoint_manager(pathlib.Path(d) / label,
                                                   train_cfg)

        def save(mgr=mgr):
          store.save_train_state(mgr, next(counter), state)
          mgr.wait_until_finished()

        row[f"save_{label}_s"] = median(save)
        step = mgr.latest_step()
        row[f"restore_{label}_s"] = median(
            lambda mgr=mgr, step=step: jax.block_until_ready(
                store.restore_train_state(mgr, step, abstract, shardings,
                                                optimizer.init)))
        mgr.close()
      manifest_lib.make = real_make
  print(json.dumps(row))
  print(f"machine: {_machine()}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({jax.device_count()} device(s))")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="what", required=True)
  c = sub.add_parser("crc")
  c.add_argument("--gib", type=float, default=1.94)
  c.add_argument("--runs", type=int, default=3)
  c.add_argument("--dir", default=None, help="where the file goes (a disk)")
  c.add_argument("--zlib", action="store_true", help="zlib's CRC, not ISA-L's")
  m = sub.add_parser("manifest")
  m.add_argument("--variant", default="demo")
  m.add_argument("--runs", type=int, default=3)
  m.add_argument("--save", action="store_true",
                 help="also time saves and restores with and without it")
  m.add_argument("--dir", default=None, help="where the saves go (a disk)")
  m.add_argument("--on-device", action="store_true",
                 help="hash with the jitted reduction accelerators use")
  args = ap.parse_args()
  {"crc": crc, "manifest": manifest}[args.what](args)


if __name__ == "__main__":
  main()
