"""`evaluate.py --workdir`: sample a run's validation masks and score them.

The validation split is never read by training:
  folder     data.val_image_dir + data.val_mask_dir (same label settings)
  tfds       data.val_tfds_split (default "validation")
  synthetic  held-out scenes: scene family data.val_seed (default
             data.seed + 1000003), which training never renders
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import numpy as np
import tqdm

from segldm_jax import checkpoints
from segldm_jax import first_stage as first_stage_lib
from segldm_jax import palette as palette_lib
from segldm_jax import run_config
from segldm_jax import sampling
from segldm_jax import viz
from segldm_jax.data import pipeline
from segldm_jax.errors import CheckpointNotFoundError
from segldm_jax.errors import ConfigError
from segldm_jax.eval import inception
from segldm_jax.eval import lpips
from segldm_jax.eval import miou
from segldm_jax.eval import report
from segldm_jax.eval import segmenter as seg_lib
from segldm_jax.eval import weights
from segldm_jax.models import build

_HELD_OUT_SEED = 1_000_003
CACHE_DIR = "eval_cache"


def validation_data_config(config) -> Any:
  """The run's data config pointed at its validation split."""
  data = config.data.copy_and_resolve_references()
  kind = data.get("source")
  with data.unlocked():
    if kind == "folder":
      image_dir, mask_dir = data.get("val_image_dir"), data.get("val_mask_dir")
      if not image_dir or not mask_dir:
        raise ConfigError(
            "folder data needs a validation split to evaluate: set "
            "--config.data.val_image_dir and --config.data.val_mask_dir "
            "(pairs the training never reads)")
      data.image_dir, data.mask_dir = image_dir, mask_dir
    elif kind == "tfds":
      data.tfds_split = data.get("val_tfds_split") or "validation"
    elif kind == "synthetic":
      data.seed = int(data.get("val_seed") or
                      (data.get("seed") or 0) + _HELD_OUT_SEED)
    else:
      raise ConfigError(f"data.source {kind!r} has no validation split")
  return data


def _validation_pairs(config, n: int, size: int):
  data = validation_data_config(config)
  if data.get("source") == "synthetic":
    with data.unlocked():
      data.num_records = max(n, 1)
      data.image_size = size
  source = pipeline.make_source(data)
  n = min(n, len(source))
  ds = pipeline.make_dataset(source, image_size=size, batch_size=n,
                             seed=int(config.get("seed", 0)), train=False,
                             shard_index=0, shard_count=1,
                             drop_remainder=False)
  batch = next(iter(ds))
  return np.asarray(batch["image"]), np.asarray(batch["labels"])


def _sample(ldm, params, fs_params, labels, key, batch_size, opts, desc):
  out = []
  for b, start in enumerate(tqdm.trange(0, len(labels), batch_size,
                                        desc=desc)):
    out.append(np.asarray(sampling.generate(
        ldm, params, fs_params, labels[start:start + batch_size],
        jax.random.fold_in(key, b), **opts)))
  return np.concatenate(out)


def _segment_scores(kind: str, real, fake, labels, num_classes: int):
  if kind == "synthetic":
    segment = lambda x: miou.segment_synthetic(x, num_classes)  # noqa: E731
    score = lambda p: miou.mean_iou(p, labels, num_classes)  # noqa: E731
  elif kind == "ade20k":
    segment = seg_lib.load()
    score = lambda p: report.ade20k_miou(p, labels)  # noqa: E731
  else:
    return {}
  return {"miou": score(segment(fake)), "miou_real": score(segment(real)),
          "segmenter": kind}


def evaluate_workdir(workdir: pathlib.Path, *, num_images=None, sampler=None,
                     steps=None, guidance_scale=None, seed: int = 0,
                     diversity_masks: int = 4, diversity_samples: int = 3,
                     batch_size: int = 16, out=None) -> dict:
  """Samples validation masks with the EMA weights; writes eval.json and a
  picture; returns every figure and the protocol."""
  config = run_config.load(workdir)
  if "data" not in config:
    raise ConfigError(f"{workdir} has no dataset in its config (a converted "
                      "checkpoint?); evaluate folders with --real/--fake")
  eval_cfg = config.get("eval", {})
  sample_cfg = config.get("sample", {})
  size = int(config.data.image_size)
  n = int(num_images or eval_cfg.get("num_images", 64))
  real, labels = _validation_pairs(config, n, size)  # bad data fails first
  ldm = build.build_model(config.model)
  params, step = checkpoints.restore_params(workdir, ldm, use_ema=True)
  found = first_stage_lib.load_existing(config, workdir)
  if found is None:
    raise CheckpointNotFoundError(f"{workdir} has no first stage")
  opts = {
      "sampler": sampler or sample_cfg.get("sampler", "ddim"),
      "steps": int(steps or sample_cfg.get("steps", 50)),
      "eta": float(sample_cfg.get("eta", 0.0)),
      "guidance_scale": float(guidance_scale if guidance_scale is not None
                              else sample_cfg.get("guidance_scale", 1.0)),
      "mask_stages": int(math.log2(
          size // int(config.data.get("mask_size") or size))),
  }
  key = jax.random.key(seed)
  fake = _sample(ldm, params, found[1], labels, jax.random.fold_in(key, 0),
                 batch_size, opts, "sample")
  m = min(diversity_masks, len(labels))
  k = diversity_samples
  extra = _sample(ldm, params, found[1], np.repeat(labels[:m], k, axis=0),
                  jax.random.fold_in(key, 1), batch_size, opts,
                  "diversity samples").reshape(m, k, size, size, 3)

  extractor = inception.FeatureExtractor.load(batch_size)
  real_f = report.inception_features(list(real), extractor,
                                     workdir / CACHE_DIR, "real features")
  fake_f = report.inception_features(list(fake), extractor, None,
                                     "fake features")
  num_classes = int(config.data.num_classes)
  segmenter = eval_cfg.get("segmenter") or (
      "synthetic" if config.data.source == "synthetic" else "none")
  result = {
      "workdir": str(workdir), "step": step,
      **report.fid_kid(real_f, fake_f, kid_subset_size=min(1000, n)),
      "lpips_diversity": (report.lpips_diversity(list(extra)) if k >= 2
                          else None),
      **_segment_scores(segmenter, real, fake, labels, num_classes),
  }
  out_dir = (pathlib.Path(out).parent if out else
             workdir / f"eval_step{step}")
  out_dir.mkdir(parents=True, exist_ok=True)
  colours = palette_lib.palette(num_classes)
  # One row per mask: mask | real | sample | diversity samples.
  rows = [np.stack([palette_lib.colorize(labels[i], colours), real[i],
                    fake[i], *extra[i]]) for i in range(m)]
  picture = viz.save_png(viz.grid(rows), out_dir / "eval.png")
  result["protocol"] = {
      **report.PROTOCOL, "num_images": len(real), "resolution": size,
      "seed": seed, "ema": True, **opts,
      "diversity_masks": m, "diversity_samples": k,
      "validation": report.describe_data(validation_data_config(config)),
      "inception_sha256": extractor.weights_sha256,
      "lpips_sha256": weights.sha256(lpips.weights_file("alex")),
      "segmenter_sha256": (seg_lib.MODEL_SHA256 if segmenter == "ade20k"
                           else None),
  }
  result["picture"] = str(picture)
  report.write_json(result, pathlib.Path(out) if out else
                    out_dir / "eval.json")
  return result
