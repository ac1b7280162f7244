"""Trains the demo VQ-f4 on synthetic scenes and reports its quality.

Trains `--steps` steps (the learning rate decays over them) on random draws
from a pool of `--num-records` scenes (as the demo's data source), stopping
early after `--seconds` if given; compilation is timed separately. Then
evaluates on 64 held-out scenes per class count in `--eval-classes` (other
seeds): PSNR, codes used, reconstruction mIoU under the synthetic-scene
segmenter (the ceiling for the LDM's mask adherence) and the latent std (what
an LDM `scale_factor` would normalise). Writes a PNG grid: originals in the
odd rows, reconstructions below them.

Defaults are the demo config's (configs/seg_f4.py:demo).

Run: .venv/bin/python benchmarks/demo_vq.py --out vq_demo.png
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import queue

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from configs import seg_f4  # noqa: E402
from segldm_jax.data.synthetic import SyntheticSource  # noqa: E402
from segldm_jax.eval.miou import mean_iou, segment_synthetic  # noqa: E402
from segldm_jax.models.build import build_model  # noqa: E402
from segldm_jax.runtime import xla_cpu  # noqa: E402
from segldm_jax.training import vq_trainer as vqt  # noqa: E402

EVAL_IMAGES = 64


def _parse() -> argparse.Namespace:
  demo = seg_f4.get_config("demo")
  settings = demo.first_stage
  node = demo.model.params.first_stage_config.params.to_dict()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=settings.train_steps)
  p.add_argument("--seconds", type=float, default=0.0,
                 help="stop early after this much training time (0 = off)")
  p.add_argument("--batch", type=int, default=settings.train_batch_size)
  p.add_argument("--lr", type=float, default=settings.learning_rate)
  p.add_argument("--warmup", type=int, default=settings.warmup_steps)
  p.add_argument("--constant-lr", action="store_true",
                 help="no cosine decay over --steps")
  p.add_argument("--ch", type=int, default=node["ddconfig"]["ch"])
  p.add_argument("--ch-mult", default=",".join(
      map(str, node["ddconfig"]["ch_mult"])))
  p.add_argument("--num-res-blocks", type=int,
                 default=node["ddconfig"]["num_res_blocks"])
  p.add_argument("--n-embed", type=int, default=node["n_embed"])
  p.add_argument("--mse-weight", type=float, default=settings.mse_weight)
  p.add_argument("--codebook-weight", type=float,
                 default=1.0)
  p.add_argument("--dead-code-steps", type=int,
                 default=32)
  p.add_argument("--no-restart", action="store_true")
  p.add_argument("--quantize-warmup", type=int,
                 default=settings.quantize_warmup_steps)
  p.add_argument("--num-classes", type=int, default=demo.data.num_classes)
  p.add_argument("--num-records", type=int, default=demo.data.num_records)
  p.add_argument("--eval-classes", default=f"{demo.data.num_classes},182",
                 help="class counts whose scenes the mIoU is measured on")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--b1", type=float, default=settings.adam_b1)
  p.add_argument("--b2", type=float, default=settings.adam_b2)
  p.add_argument("--crop", type=int, default=settings.train_crop,
                 help="train on random crops of this size (0 = whole images)")
  p.add_argument("--out", default="")
  return p.parse_args()


def _batches(source: SyntheticSource, batch: int, seed: int, crop: int,
             stop: threading.Event, out: queue.Queue) -> None:
  """Renders random draws from the pool in a thread (~1.3 ms per scene)."""
  rng = np.random.default_rng(seed)
  while not stop.is_set():
    imgs = np.stack([source[int(i)]["image"]
                     for i in rng.integers(0, len(source), batch)])
    if crop:
      y, x = rng.integers(0, imgs.shape[1] - crop + 1, 2)
      imgs = imgs[:, y:y + crop, x:x + crop]
    while not stop.is_set():
      try:
        out.put(imgs, timeout=0.1)
        break
      except queue.Full:
        pass


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def main() -> None:
  args = _parse()
  node = seg_f4.get_config("demo").model.params.first_stage_config.to_dict()
  node["params"]["n_embed"] = args.n_embed
  dd = node["params"]["ddconfig"]
  dd.update(ch=args.ch, ch_mult=[int(c) for c in args.ch_mult.split(",")],
            num_res_blocks=args.num_res_blocks)
  model = build_model(node, conv=xla_cpu.preferred_conv())
  size = dd["resolution"]

  optimizer = vqt.vq_optimizer(
      args.lr, warmup_steps=args.warmup,
      decay_steps=0 if args.constant_lr else args.steps,
      b1=args.b1, b2=args.b2)
  state = vqt.create_vq_train_state(model, optimizer,
                                    jax.random.key(args.seed))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  step = jax.jit(vqt.make_vq_train_step(
      model, optimizer, codebook_weight=args.codebook_weight,
      mse_weight=args.mse_weight, restart_dead_codes=not args.no_restart,
      dead_code_steps=args.dead_code_steps,
      quantize_warmup_steps=args.quantize_warmup), donate_argnums=0)

  train_src = SyntheticSource(args.num_records, size, args.num_classes,
                              seed=args.seed)
  stop, batches = threading.Event(), queue.Queue(maxsize=8)
  feeder = threading.Thread(target=_batches,
                            args=(train_src, args.batch, args.seed, args.crop, stop,
                                  batches), daemon=True)
  feeder.start()

  t0 = time.perf_counter()
  state, m = step(state, batches.get())
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  print(f"params {n_params / 1e6:.2f}M  compile+1st step {compile_s:.1f}s",
        flush=True)

  t0, cpu0 = time.perf_counter(), time.process_time()
  last_log = t0
  n = 1
  while True:
    elapsed = time.perf_counter() - t0
    if n >= args.steps or (args.seconds and elapsed >= args.seconds):
      break
    state, m = step(state, batches.get())
    n += 1
    if time.perf_counter() - last_log > 20:
      m = jax.device_get(m)
      last_log = time.perf_counter()
      print(f"step {n:5d} t={last_log - t0:6.1f}s l1 {m['rec_l1']:.4f} "
            f"psnr {m['psnr']:.2f} cb {m['codebook']:.4f} used "
            f"{m['codes_used']:.3f} ppl {m['perplexity']:.0f} restarted "
            f"{m['restarted']}", flush=True)
  jax.block_until_ready(state)
  train_s = time.perf_counter() - t0
  stop.set()
  cpu_s = time.process_time() - cpu0
  print(f"trained {n} steps in {train_s:.1f}s (+{compile_s:.1f}s compile): "
        f"{(n - 1) / train_s:.2f} step/s at batch {args.batch}; process CPU "
        f"{cpu_s / (n - 1):.3f}s/step, load avg {os.getloadavg()[0]:.1f}")

  # Held-out evaluation on other scene families.
  recon = jax.jit(lambda p, x: model.apply({"params": p}, x))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                            method=model.encode))
  grid_rows = []
  for k, classes in enumerate(int(c) for c in args.eval_classes.split(",")):
    src = SyntheticSource(EVAL_IMAGES, size, classes, seed=10_000 + k)
    recs = [src[i] for i in range(EVAL_IMAGES)]
    imgs = np.stack([r["image"] for r in recs])
    labels = np.stack([r["labels"] for r in recs])
    x = imgs.astype(np.float32) / 127.5 - 1.0
    x_rec, _, idx = recon(state.params, x)
    rec8 = _to_uint8(x_rec)
    mse = np.mean((rec8.astype(np.float64) - imgs) ** 2)
    psnr = 10 * np.log10(255.0 ** 2 / mse)
    used = np.unique(np.asarray(idx)).size / args.n_embed
    miou_rec = mean_iou(segment_synthetic(rec8, classes), labels, classes)
    miou_orig = mean_iou(segment_synthetic(imgs, classes), labels, classes)
    z = np.asarray(encode(state.params, x))
    print(f"held-out {EVAL_IMAGES} @ {classes} classes: PSNR {psnr:.2f} dB, "
          f"codes used {used:.3f}, mIoU recon {miou_rec:.3f} (originals "
          f"{miou_orig:.3f}), latent std {z.std():.3f} mean {z.mean():.3f}")
    grid_rows += [np.concatenate(list(imgs[:8]), 1),
                  np.concatenate(list(rec8[:8]), 1)]
  if args.out:
    Image.fromarray(np.concatenate(grid_rows, 0)).resize(
        (8 * size * 2, len(grid_rows) * size * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
