r"""FID Inception feature extraction speed, JAX vs PyTorch on the same file.

  python benchmarks/eval_speed.py [--batch 16] [--repeats 3] [--peer PYTHON]

Measures images/s of pool3 feature extraction from uint8 256x256 images
(resize to 299 included) with segldm_jax.eval.inception after compilation,
and, with `--peer /path/to/python` (an interpreter that has torch), the same
with `torch.jit.load(default_1.pt)` on the same inputs (PyTorch runs in its
own process; segldm-jax never imports torch). Also prints the agreement of
the two feature sets. With `--segmenter`, the ADE20K segmenter's agreement
with the LiteRT reference fixture and its images/s, for each backend of
`--segmenter_backends` (default litert,jax).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

_PEER = textwrap.dedent(r"""
    import json, sys, time
    import numpy as np, torch
    torch.set_num_threads(int(sys.argv[4]))
    net = torch.jit.load(sys.argv[1]).eval()
    images = np.load(sys.argv[2])
    b, repeats = int(sys.argv[3]), int(sys.argv[5])
    def run():
      out = []
      with torch.no_grad():
        for s in range(0, len(images), b):
          x = torch.from_numpy(images[s:s + b]).permute(0, 3, 1, 2).float()
          x = torch.nn.functional.interpolate(x / 255, size=(299, 299),
              mode="bilinear", align_corners=False)
          out.append(net(2 * x - 1).numpy())
      return np.concatenate(out)
    feats = run()  # warm-up
    times = []
    for _ in range(repeats):
      t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    np.save(sys.argv[6], feats)
    print(json.dumps({"torch": torch.__version__, "seconds": times}))
""")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--images", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--peer", default=None, help="python with torch")
  ap.add_argument("--segmenter", action="store_true")
  ap.add_argument("--segmenter_backends", default="litert,jax",
                  help="comma-separated: litert, jax")
  args = ap.parse_args()

  from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.use_xnnpack_convolutions()
  import jax  # pylint: disable=g-import-not-at-top
  from segldm_jax.eval import inception  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  ref = np.load(os.path.join(ROOT, "tests/fixtures/fid_inception_reference.npz"))
  images = ref["images"][rng.integers(0, 8, args.images)]
  ex = inception.FeatureExtractor.load(args.batch)
  t = time.perf_counter()
  feats = ex(images)  # compile + first run
  first = time.perf_counter() - t
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    ex(images)
    times.append(time.perf_counter() - t)
  result = {"device": str(jax.devices()[0]), "batch": args.batch,
            "images": args.images, "jax_first_call_s": round(first, 1),
            "jax_img_s": [round(args.images / s, 2) for s in times]}
  if args.peer:
    with tempfile.TemporaryDirectory() as tmp:
      np.save(os.path.join(tmp, "x.npy"), images)
      out = os.path.join(tmp, "f.npy")
      threads = str(len(os.sched_getaffinity(0)))
      r = subprocess.run(
          [args.peer, "-c", _PEER, str(inception.weights_path()),
           os.path.join(tmp, "x.npy"), str(args.batch), threads,
           str(args.repeats), out], capture_output=True, text=True,
          check=True)
      peer = json.loads(r.stdout.strip().splitlines()[-1])
      pf = np.load(out)
    result.update(torch=peer["torch"], torch_threads=int(threads),
                  torch_img_s=[round(args.images / s, 2)
                               for s in peer["seconds"]],
                  max_rel_diff=float(np.abs(feats - pf).max() /
                                     np.abs(pf).max()))
  if args.segmenter:
    for backend in args.segmenter_backends.split(","):
      result[f"segmenter_{backend}"] = _segmenter(backend)
  print(json.dumps(result))


def _segmenter(backend: str) -> dict:
  """images/s of the ADE20K segmenter on the fixture's four 513x513 photos
  (after a first call that compiles / warms up) and its agreement with the
  reference labels."""
  from segldm_jax.eval import segmenter  # pylint: disable=g-import-not-at-top
  ref = np.load(os.path.join(
      ROOT, "tests/fixtures/ade20k_segmenter_reference.npz"))
  seg = segmenter.load(backend)
  seg.labels_513(ref["images_513"][:1])  # compile / warm up
  t = time.perf_counter()
  labels = seg.labels_513(ref["images_513"])
  dt = time.perf_counter() - t
  agree = labels == ref["labels"]
  margin = ref["top2_margin"].astype(np.float32)
  return {"about": seg.about(), "img_s": round(len(labels) / dt, 3),
          "agreement": round(float(agree.mean()), 5),
          "agreement_per_image": [round(float(a.mean()), 5) for a in agree],
          "disagree_margin_gt_0_01": int((~agree & (margin > 0.01)).sum()),
          "max_margin_disagreeing": (float(margin[~agree].max())
                                     if (~agree).any() else None)}


if __name__ == "__main__":
  main()
