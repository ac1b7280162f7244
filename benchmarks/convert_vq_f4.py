"""Time and peak memory of converting a full-size vq-f4 checkpoint.

Acceptance: a vq-f4 (55,322,782 parameters) converts in under 30 s on 2 CPU
cores with a peak RSS under 2x the checkpoint's file size.

The script writes a random float32 checkpoint in torch.save format (no torch
needed) with the keys and shapes of latent-diffusion's
models/first_stage_models/vq-f4/model.ckpt: a Lightning-style dict whose
state_dict holds the VQModel and the training loss of a trained VQGAN (LPIPS
VGG16 + its linear heads, the PatchGAN discriminator with BatchNorm), so the
file carries the dead weight the real one does. The config.yaml goes beside
it. Then it runs

  python convert_torch_ckpt.py model.ckpt --config config.yaml --out DIR

as a subprocess, N times (fresh --out each time), under `/usr/bin/time -v`
(or getrusage of a wrapper process when that is missing), and reports the
median wall time and peak RSS. A baseline run of
`python -c "import segldm_jax.convert"` shows what the imports alone cost.
The last thing printed is a markdown snippet for BENCHMARKS.md.

  .venv/bin/python benchmarks/convert_vq_f4.py [--runs 3] [--cpus 2] [--no-loss]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch_files  # noqa: E402  (tests/torch_files.py: torch.save without torch)

VQ_PARAMS = 55_322_782
CONFIG_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 3
    n_embed: 8192
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 3
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult:
      - 1
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 0
        disc_weight: 0.75
        codebook_weight: 1.0
"""


def _vq_shapes() -> dict[str, tuple[int, ...]]:
  """torch key -> shape of the vq-f4 VQModel, from the port's own model."""
  from segldm_jax import convert  # pylint: disable=g-import-not-at-top
  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top
  import yaml  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  node = yaml.safe_load(CONFIG_YAML)["model"]
  shapes = build.param_shapes(build.build_model(node))
  # Zero-strided stand-ins: the inverse mapping only needs shapes.
  fake = jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)
  sd = convert.to_torch_state_dict(fake, "vq")
  return {k: tuple(v.shape) for k, v in sd.items()}


def _loss_shapes() -> dict[str, tuple[int, ...]]:
  """taming's VQLPIPSWithDiscriminator: LPIPS(VGG16) + NLayerDiscriminator."""
  sd: dict[str, tuple[int, ...]] = {
      "loss.perceptual_loss.scaling_layer.shift": (1, 3, 1, 1),
      "loss.perceptual_loss.scaling_layer.scale": (1, 3, 1, 1),
  }
  vgg = {"slice1": [(0, 3, 64), (2, 64, 64)],
         "slice2": [(5, 64, 128), (7, 128, 128)],
         "slice3": [(10, 128, 256), (12, 256, 256), (14, 256, 256)],
         "slice4": [(17, 256, 512), (19, 512, 512), (21, 512, 512)],
         "slice5": [(24, 512, 512), (26, 512, 512), (28, 512, 512)]}
  for name, convs in vgg.items():
    for i, cin, cout in convs:
      sd[f"loss.perceptual_loss.net.{name}.{i}.weight"] = (cout, cin, 3, 3)
      sd[f"loss.perceptual_loss.net.{name}.{i}.bias"] = (cout,)
  for i, c in enumerate((64, 128, 256, 512, 512)):
    sd[f"loss.perceptual_loss.lin{i}.model.1.weight"] = (1, c, 1, 1)
  d = "loss.discriminator.main."
  sd.update({d + "0.weight": (64, 3, 4, 4), d + "0.bias": (64,)})
  for conv, bn, cin, cout in ((2, 3, 64, 128), (5, 6, 128, 256),
                              (8, 9, 256, 512)):
    sd[f"{d}{conv}.weight"] = (cout, cin, 4, 4)
    for b in ("weight", "bias", "running_mean", "running_var"):
      sd[f"{d}{bn}.{b}"] = (cout,)
    sd[f"{d}{bn}.num_batches_tracked"] = ()
  sd.update({d + "11.weight": (1, 512, 4, 4), d + "11.bias": (1,)})
  return sd


def _storage(shape: tuple[int, ...], seed: int,
             dtype=np.float32) -> torch_files.Tensor:
  """A tensor whose random bytes are generated while the zip is written."""
  numel = int(np.prod(shape))

  def chunks():
    rng = np.random.default_rng(seed)
    if dtype == np.int64:
      yield np.asarray([1000], np.int64).tobytes()
      return
    step = 1 << 20
    for start in range(0, numel, step):
      n = min(step, numel - start)
      yield (0.02 * rng.standard_normal(n, dtype=np.float32)).tobytes()

  storage = torch_files.Storage(dtype=dtype, numel=numel, chunks=chunks)
  return torch_files.Tensor(storage, shape)


def write_checkpoint(folder: pathlib.Path, with_loss: bool = True
                     ) -> tuple[pathlib.Path, int, int]:
  """-> (model.ckpt path, VQ parameter count, loss.* parameter count)."""
  vq, loss = _vq_shapes(), (_loss_shapes() if with_loss else {})
  n_vq = sum(int(np.prod(s)) for s in vq.values())
  assert n_vq == VQ_PARAMS, (n_vq, VQ_PARAMS)
  state_dict = {}
  for i, (key, shape) in enumerate({**vq, **loss}.items()):
    dtype = np.int64 if key.endswith("num_batches_tracked") else np.float32
    state_dict[key] = _storage(shape, i, dtype)
  ckpt = {"epoch": 30, "global_step": 1_000_000,
          "pytorch-lightning_version": "1.4.2", "state_dict": state_dict,
          "optimizer_states": [], "lr_schedulers": []}
  path = folder / "model.ckpt"
  torch_files.save_torch(path, ckpt)
  (folder / "config.yaml").write_text(CONFIG_YAML)
  n_loss = sum(int(np.prod(s)) for k, s in loss.items()
               if not k.endswith("num_batches_tracked"))
  return path, n_vq, n_loss


def _measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
  """-> (wall seconds, peak RSS in MB, stdout) of one subprocess run."""
  if shutil.which("time") or os.path.exists("/usr/bin/time"):
    full = ["/usr/bin/time", "-v", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(full, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                       proc.stderr).group(1))
    return wall, kb / 1024, proc.stdout
  # No /usr/bin/time: a fresh wrapper process reads getrusage of its child.
  wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); w = time.perf_counter() - t; "
             "m = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
             "print(f'@@ {w} {m}', file=sys.stderr); sys.exit(r.returncode)")
  proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  wall, kb = re.search(r"@@ (\S+) (\d+)", proc.stderr).groups()
  return float(wall), int(kb) / 1024, proc.stdout


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=False).stdout
    m = re.search(r"Model name:\s*(.+)", out)
    if m:
      return m.group(1).strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--cpus", type=int, default=2,
                  help="pin the conversion to this many cores (taskset), "
                       "when the machine has more; 0: no pinning")
  ap.add_argument("--no-loss", action="store_true",
                  help="leave out the loss.* tensors (file = VQ weights only)")
  ap.add_argument("--python", default=sys.executable)
  args = ap.parse_args()

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  pin: list[str] = []
  ncpu = os.cpu_count() or 1
  if args.cpus and ncpu > args.cpus and shutil.which("taskset"):
    pin = ["taskset", "-c", ",".join(str(c) for c in range(args.cpus))]
  cores = min(ncpu, args.cpus) if args.cpus else ncpu

  with tempfile.TemporaryDirectory(prefix="vq_f4_bench_") as tmp:
    tmp = pathlib.Path(tmp)
    t0 = time.perf_counter()
    ckpt, n_vq, n_loss = write_checkpoint(tmp, with_loss=not args.no_loss)
    size_mb = ckpt.stat().st_size / 2**20
    vq_mb = n_vq * 4 / 2**20
    print(f"wrote {ckpt} ({size_mb:.1f} MiB: VQ {n_vq:,} params = "
          f"{vq_mb:.1f} MiB, loss.* {n_loss:,} params) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    baselines = {}
    for what in ("segldm_jax.convert", "convert_torch_ckpt"):
      _, baselines[what], _ = _measure(
          [*pin, args.python, "-c", f"import {what}"], env)
      print(f"baseline (import {what}): peak RSS {baselines[what]:.0f} MiB",
            flush=True)
    cli_rss = baselines["convert_torch_ckpt"]

    walls, rss = [], []
    for i in range(args.runs):
      out = tmp / f"out{i}"
      cmd = [*pin, args.python, str(ROOT / "convert_torch_ckpt.py"), str(ckpt),
             "--config", str(tmp / "config.yaml"), "--out", str(out)]
      wall, peak, stdout = _measure(cmd, env)
      walls.append(wall)
      rss.append(peak)
      first = stdout.splitlines()[1] if len(stdout.splitlines()) > 1 else ""
      print(f"run {i + 1}: {wall:.1f} s, peak RSS {peak:.0f} MiB "
            f"({peak / size_mb:.2f}x file) [{first}]", flush=True)
      shutil.rmtree(out)

  wall, peak = statistics.median(walls), statistics.median(rss)
  ok = wall < 30 and peak < 2 * size_mb
  cmd_text = ("python convert_torch_ckpt.py model.ckpt --config config.yaml "
              "--out DIR")
  print()
  print("### Converting a full-size vq-f4 checkpoint "
        "(`benchmarks/convert_vq_f4.py`)")
  print()
  loss_text = (f" + LPIPS/discriminator `loss.*` {n_loss:,} params, ignored"
               if n_loss else ", no `loss.*` tensors")
  print(f"Command: `{cmd_text}` (random float32 weights with the real keys and "
        f"shapes: VQModel {n_vq:,} params{loss_text}), median of {args.runs} "
        f"runs, `JAX_PLATFORMS=cpu`.")
  print(f"Machine: {cores} cores{' (taskset)' if pin else ''} of "
        f"`{_cpu_model()}` (`nproc` = {ncpu}), Python "
        f"{platform.python_version()}.")
  print()
  print("| checkpoint file | VQ weights | wall time | peak RSS | "
        "peak / file | peak / VQ weights | imports alone | "
        "peak above imports |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  print(f"| {size_mb:.0f} MiB | {vq_mb:.0f} MiB | {wall:.1f} s | "
        f"{peak:.0f} MiB | {peak / size_mb:.2f}x | {peak / vq_mb:.2f}x | "
        f"{cli_rss:.0f} MiB | {peak - cli_rss:.0f} MiB "
        f"({(peak - cli_rss) / vq_mb:.2f}x VQ weights) |")
  print()
  print(f"Imports alone: `import segldm_jax.convert` "
        f"{baselines['segldm_jax.convert']:.0f} MiB, `import convert_torch_ckpt` "
        f"(everything the CLI loads: jax, flax, orbax) {cli_rss:.0f} MiB. The "
        f"checkpoint was just written, so it is read from the page cache.")
  print(f"Runs: {', '.join(f'{w:.1f} s / {r:.0f} MiB' for w, r in zip(walls, rss))}."
        f" Acceptance (< 30 s, < 2x file size): {'met' if ok else 'NOT met'}.")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
