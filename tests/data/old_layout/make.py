"""Regenerates tests/data/old_layout/ with the code of commit 01cfa7b, the
last commit before the package was split into packages by role (778c96d).
tests/test_old_workdirs.py loads these files with today's code.

Run it with the OLD code, from a checkout of 01cfa7b (it refuses anything
else), with any Python that has the requirements installed:

  git worktree add --detach ../old 01cfa7b       # from the repository root
  cd ../old && python "$OLDPWD/tests/data/old_layout/make.py"

It writes, beside this file (or --out):
  trained/    train.py's workdir after 20 steps of tiny_config.py (the tiny
              recipe made smaller) on the synthetic scenes with a random
              first stage: config.json, checkpoints/20 (params, EMA, AdamW
              state, manifest, meta), first_stage/, metrics.jsonl, run.lock.
              Left out: tensorboard/ (train.py writes it; nothing reads it).
  converted/  convert_torch_ckpt.py --no-ema's workdir of that run exported
              by export_torch_ckpt.py (a CompVis-style model.ckpt +
              config.yaml whose UNet is the run's EMA): config.json without
              a data node, checkpoints/20 (params, meta, manifest; no EMA,
              no optimiser state), first_stage/ (model.yaml, manifest.json),
              report.txt. The reference fixture ldm_tiny.ckpt converts to
              8.5 MB of incompressible weights, too much for git; this is
              1.2 MB (1.7 MB with the EMA kept as a second UNet: left out,
              the trained workdir has the EMA's layout).
  expected.npz  the masks and what the old `segldm_jax.load(dir).sample()`
              made of them (uint8), per case in expected.json.
  expected.json the cases (workdir, use_ema, sample options), the step and
              first-stage facts each model reported, and the commit.
Everything runs on the CPU (JAX_PLATFORMS=cpu, one device), in a temporary
compilation cache.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

OLD_COMMIT = "01cfa7b"
HERE = pathlib.Path(__file__).resolve().parent

# train.py's flags, as tests/test_train_e2e.py runs the tiny recipe, for 20
# steps at lr 1e-3 (base 5e-4 x batch 2): the UNet's zero-initialised output
# layer must have moved for its weights to show in the samples (after 2
# steps at the tiny recipe's 2e-6 the samples were the decoded noise, the
# same whatever the UNet), and the EMA, 20 steps into LitEma's warm-up, is
# far enough behind the live weights to draw other pictures. One checkpoint.
STEPS = 20
TRAIN_FLAGS = [
    "--config.data.source=synthetic", "--config.data.num_records=32",
    "--config.first_stage.allow_random_init=True",
    "--config.train.batch_size=2", "--config.train.log_every=1",
    "--config.train.base_learning_rate=5e-4",
    "--config.train.sample_every=0", f"--config.train.steps={STEPS}",
    f"--config.train.checkpoint_every={STEPS}"]

# (name, workdir, use_ema, sample options): DDIM eta 0 at 5 steps (the tiny
# recipe's), one compiled program for all (the two models have one
# architecture); each case samples every mask. The converted workdir has no
# EMA: use_ema falls back to its only UNet, the run's EMA.
DDIM = dict(sampler="ddim", steps=5, eta=0.0, guidance_scale=1.0)
CASES = [("trained_ema", "trained", True, DDIM),
         ("trained_live", "trained", False, DDIM),
         ("converted", "converted", True, DDIM)]
NUM_SAMPLES = 2
SEED = 3

# Run by the old code (cwd = the old checkout, so `import segldm_jax` is
# the old package): samples each case and saves the results.
_SAMPLE = r"""
import json, pathlib, sys
import numpy as np
import segldm_jax
here = pathlib.Path.cwd() / "segldm_jax"
assert pathlib.Path(segldm_jax.__file__).parent == here, segldm_jax.__file__
assert (here / "trained_model.py").exists(), "not the old layout"
out = pathlib.Path(sys.argv[1])
spec = json.loads(sys.argv[2])
masks = np.load(out / "masks.npy")
arrays, facts = {"masks": masks}, {}
for name, workdir, use_ema, options in spec["cases"]:
  model = segldm_jax.load(out / workdir, use_ema=use_ema)
  arrays[name] = model.sample(masks, num_samples=spec["num_samples"],
                              seed=spec["seed"], **options)
  facts[workdir] = {"step": model.step, "num_classes": model.num_classes,
                    "has_dataset": model.has_dataset}
np.savez_compressed(out / "expected.npz", **arrays)
(out / "facts.json").write_text(json.dumps(facts))
"""


def masks():
  """Two 32x32 label maps of the 182 classes: regions, and a "don't care"
  (255) box in the second."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.zeros((32, 32), np.uint8)
  a[:, 16:] = 7
  a[20:, :] = 120
  b = np.repeat(np.arange(4, dtype=np.uint8)[:, None] * 40 + 3, 8, 0)
  b = np.repeat(b, 32, 1)
  b[8:20, 10:26] = 255
  return np.stack([a, b])


def _run(cmd, cwd, env):
  print("+", " ".join(map(str, cmd)), flush=True)
  r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env)
  if r.returncode:
    sys.exit(f"failed ({r.returncode}): {cmd}")


def _drop_folder_from_texts(folder: pathlib.Path, tmp: pathlib.Path) -> None:
  """Paths under `tmp` become relative in the text files orbax and the
  converter write (commit markers, config.json's `converted_from`): they
  only inform, and the repository keeps no machine's paths."""
  for path in folder.rglob("*"):
    if path.suffix in (".txt", ".json") and path.is_file():
      text = path.read_text()
      if str(tmp) in text:
        path.write_text(text.replace(f"{tmp}/", ""))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--old_repo", type=pathlib.Path, default=pathlib.Path.cwd(),
                  help="checkout of 01cfa7b (default: the current folder)")
  ap.add_argument("--out", type=pathlib.Path, default=HERE)
  args = ap.parse_args()
  old = args.old_repo.resolve()
  head = subprocess.run(["git", "-C", str(old), "rev-parse", "HEAD"],
                        capture_output=True, text=True, check=True).stdout
  if not head.startswith(OLD_COMMIT) or not (
      old / "segldm_jax" / "trained_model.py").exists():
    sys.exit(f"{old} is at {head.strip()}, not {OLD_COMMIT}: run this from "
             "a checkout of the commit before the move")

  import numpy as np  # pylint: disable=g-import-not-at-top
  out = args.out.resolve()
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="old_layout_"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             XDG_CACHE_HOME=str(tmp / "cache"))
  py = sys.executable
  try:
    _run([py, "train.py", "--config", HERE / "tiny_config.py",
          "--workdir", tmp / "trained", *TRAIN_FLAGS], old, env)
    _run([py, "export_torch_ckpt.py", tmp / "trained", "--out", tmp / "torch"],
          old, env)
    _run([py, "convert_torch_ckpt.py", tmp / "torch" / "model.ckpt",
          "--config", tmp / "torch" / "config.yaml",
          "--out", tmp / "converted", "--no-ema"], old, env)
    for name in ("trained", "converted"):
      shutil.rmtree(out / name, ignore_errors=True)
      shutil.copytree(tmp / name, out / name,
                      ignore=shutil.ignore_patterns("tensorboard", "samples",
                                                    "previews"))
      _drop_folder_from_texts(out / name, tmp)
    np.save(out / "masks.npy", masks())
    spec = {"cases": CASES, "num_samples": NUM_SAMPLES, "seed": SEED}
    _run([py, "-c", _SAMPLE, out, json.dumps(spec)], old, env)
    facts = json.loads((out / "facts.json").read_text())
    (out / "expected.json").write_text(json.dumps(
        {"commit": head.strip(), **spec, "models": facts}, indent=1) + "\n")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("masks.npy", "facts.json"):
      (out / name).unlink(missing_ok=True)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
