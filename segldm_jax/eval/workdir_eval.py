"""`evaluate.py --workdir`: sample a run's validation masks and score them.

The validation split is never read by training:
  folder     data.val_image_dir + data.val_mask_dir (same label settings)
  tfds       data.tfds_val_split
  synthetic  held-out scenes: scene family data.val_seed (default
             data.seed + 1000003), which training never renders
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any

import jax
import numpy as np

from segldm_jax.config import run_config
from segldm_jax.data import labels as labels_lib
from segldm_jax.data import palette as palette_lib
from segldm_jax.data import pipeline
from segldm_jax.data import viz
from segldm_jax.data.base import IGNORE_ID
from segldm_jax.errors import ConfigError
from segldm_jax.eval import inception
from segldm_jax.eval import lpips
from segldm_jax.eval import miou
from segldm_jax.eval import report
from segldm_jax.eval import segmenter as seg_lib
from segldm_jax.eval import weights
from segldm_jax.inference import generation
from segldm_jax.inference import trained_model

_HELD_OUT_SEED = 1_000_003
CACHE_DIR = "eval_cache"


def validation_data_config(config) -> Any:
  """The run's data config for its validation split: the folder and TFDS
  sources name it (`pipeline.make_source(..., split="val")` reads it); the
  synthetic source holds out a scene family training never renders."""
  data = config.data.copy_and_resolve_references()
  kind = data.get("source")
  if kind == "synthetic":
    with data.unlocked():
      data.seed = int(data.get("val_seed") or
                      (data.get("seed") or 0) + _HELD_OUT_SEED)
  elif not pipeline.has_val_split(data):
    keys = ("--config.data.val_image_dir and --config.data.val_mask_dir"
            if kind == "folder" else "--config.data.tfds_val_split")
    raise ConfigError(f"{kind} data needs a validation split to evaluate: "
                      f"set {keys} (data the training never reads)")
  return data


def describe_validation(config) -> dict:
  """The fields that say which images were scored: the validation split's
  folders (root applied) or TFDS split, or the held-out scene family."""
  data = validation_data_config(config)
  kind = data.get("source")
  out = {"source": kind}
  if kind == "folder":
    out["image_dir"], out["mask_dir"] = pipeline.folder_dirs(data, "val")
  elif kind == "tfds":
    out.update(tfds_name=data.get("tfds_name"),
               tfds_split=data.get("tfds_val_split"))
  elif kind == "synthetic":
    out["seed"] = data.get("seed")
  out["num_classes"] = data.get("num_classes")
  return out


def _validation_pairs(config, n: int, size: int):
  data = validation_data_config(config)
  if data.get("source") == "synthetic":
    with data.unlocked():
      data.num_records = max(n, 1)
      data.image_size = size
    source = pipeline.make_source(data)
  else:
    source = pipeline.make_source(data, split="val")
  n = min(n, len(source))
  ds = pipeline.make_dataset(source, image_size=size, batch_size=n,
                             seed=int(config.get("seed", 0)), train=False,
                             shard_index=0, shard_count=1,
                             drop_remainder=False)
  batch = next(iter(ds))
  return np.asarray(batch["image"]), np.asarray(batch["labels"])


def _sample(ldm, params, fs_params, labels, key, batch_size, opts, desc,
            per_mask: int = 1) -> np.ndarray:
  """-> uint8 (N, per_mask, H, W, 3) samples of the label maps."""
  return generation.sample_in_batches(
      functools.partial(generation.generate, **opts), ldm, params, fs_params,
      labels, per_mask, batch_size, key, desc=desc)


def segmenter_kind(config) -> str:
  """eval.segmenter, or by data: the synthetic scenes' exact segmenter, the
  ADE20K one for `data.dataset=ade20k`, else none (no built-in segmenter
  for the labels)."""
  kind = config.get("eval", {}).get("segmenter")
  if not kind:
    data = config.data
    kind = ("synthetic" if data.get("source") == "synthetic" else
            "ade20k" if data.get("dataset") == "ade20k" else "none")
  if kind not in ("synthetic", "ade20k", "none"):
    raise ConfigError(f"eval.segmenter={kind!r}: use synthetic, ade20k, none "
                      "or '' (by data)")
  return kind


def ade20k_ids(data) -> np.ndarray:
  """uint8 lookup table: the run's class id -> ADE20K id (what the ADE20K
  segmenter predicts: 1..150, 0 "other"). It inverts data.remap: the ade20k
  variant trains on stored 1..150 as classes 0..149; without a remap the
  classes are the stored ids. IGNORE_ID stays IGNORE_ID (not scored)."""
  lut = np.arange(256, dtype=np.uint8)
  remap = labels_lib.load_remap(data.remap) if data.get("remap") else {}
  for stored, cls in remap.items():
    if cls != IGNORE_ID:
      lut[cls] = stored
  n = int(data.num_classes)
  if int(lut[:n].max()) >= seg_lib.NUM_CLASSES:
    raise ConfigError(
        f"eval.segmenter=ade20k scores ADE20K labels (ids 0..150), but the "
        f"data has {n} classes up to id {int(lut[:n].max())}: use it on "
        "ADE20K data only")
  return lut


def _segment_scores(kind: str, real, fake, labels, num_classes: int,
                    backend: str = "litert"):
  """`labels`: class ids; for "ade20k", ADE20K ids (`ade20k_ids`)."""
  if kind == "synthetic":
    segment = lambda x: miou.segment_synthetic(x, num_classes)  # noqa: E731
    score = lambda p: miou.mean_iou(p, labels, num_classes)  # noqa: E731
  elif kind == "ade20k":
    segment = seg_lib.load(backend)
    score = lambda p: report.ade20k_miou(p, labels)  # noqa: E731
  else:
    return {}
  return {"miou": score(segment(fake)), "miou_real": score(segment(real)),
          "segmenter": kind}


class Evaluator:
  """The validation masks and real features of a run, scored on demand.

  Built once (reads the validation split, caches the real features); each
  call samples the masks with the given weights and returns every figure.
  `train.py` calls it every `train.eval_every` steps with the EMA weights;
  `evaluate.py --workdir` once with the restored ones.
  """

  def __init__(self, config, workdir: pathlib.Path, *, num_images=None,
               sampler=None, steps=None, guidance_scale=None, seed: int = 0,
               diversity_masks=None, diversity_samples=None,
               batch_size=None, segmenter_backend=None):
    if "data" not in config:
      raise ConfigError(f"{workdir} has no dataset in its config (a "
                        "converted checkpoint?); evaluate folders with "
                        "--real/--fake")
    ev = config.get("eval", {})
    sample_cfg = config.get("sample", {})
    self.config, self.workdir, self.seed = config, workdir, seed
    self.size = size = int(config.data.image_size)
    n = int(num_images or ev.get("num_images", 64))
    self.real, self.labels = _validation_pairs(config, n, size)
    self.batch_size = int(batch_size or ev.get("batch_size", 16))
    self.m = min(int(diversity_masks or ev.get("diversity_masks", 4)),
                 len(self.labels))
    self.k = int(diversity_samples or ev.get("diversity_samples", 3))
    self.opts = {
        "sampler": sampler or sample_cfg.get("sampler", "ddim"),
        "steps": int(steps or sample_cfg.get("steps", 50)),
        "eta": float(sample_cfg.get("eta", 0.0)),
        "guidance_scale": float(guidance_scale if guidance_scale is not None
                                else sample_cfg.get("guidance_scale", 1.0)),
        "mask_stages": run_config.geometry(config).mask_stages,
    }
    self.num_classes = int(config.data.num_classes)
    self.segmenter = segmenter_kind(config)
    # What the segmenter's output is compared with, in its own ids.
    self.seg_labels = (ade20k_ids(config.data)[self.labels]
                       if self.segmenter == "ade20k" else self.labels)
    # Checked now, so that a typo fails before any sampling.
    self.segmenter_backend = seg_lib.check_backend(
        segmenter_backend or ev.get("segmenter_backend") or "litert")
    self.extractor = inception.FeatureExtractor.load(self.batch_size)
    self.real_features = report.inception_features(
        list(self.real), self.extractor, workdir / CACHE_DIR,
        "real features")

  def __call__(self, ldm, params, fs_params, step: int,
               picture: pathlib.Path | None = None) -> dict:
    key = jax.random.key(self.seed)
    fake = _sample(ldm, params, fs_params, self.labels,
                   jax.random.fold_in(key, 0), self.batch_size, self.opts,
                   "sample")[:, 0]
    extra = _sample(ldm, params, fs_params, self.labels[:self.m],
                    jax.random.fold_in(key, 1), self.batch_size, self.opts,
                    "diversity samples", per_mask=self.k)
    fake_f = report.inception_features(list(fake), self.extractor, None,
                                       "fake features")
    result = {
        "workdir": str(self.workdir), "step": step,
        **report.fid_kid(self.real_features, fake_f,
                         kid_subset_size=min(1000, len(fake))),
        "lpips_diversity": (report.lpips_diversity(list(extra))
                            if self.k >= 2 else None),
        **_segment_scores(self.segmenter, self.real, fake, self.seg_labels,
                          self.num_classes, self.segmenter_backend),
    }
    if picture is not None:
      colours = palette_lib.for_data(self.config.data)
      # One row per mask: mask | real | sample | diversity samples.
      rows = [np.stack([palette_lib.colorize(self.labels[i], colours),
                        self.real[i], fake[i], *extra[i]])
              for i in range(self.m)]
      result["picture"] = str(viz.save_png(viz.grid(rows), picture))
    result["protocol"] = {
        **report.PROTOCOL, "num_images": len(self.real),
        "resolution": self.size, "seed": self.seed, "ema": True, **self.opts,
        "diversity_masks": self.m, "diversity_samples": self.k,
        "validation": describe_validation(self.config),
        "inception_sha256": self.extractor.weights_sha256,
        "lpips_sha256": weights.sha256(lpips.weights_file("alex")),
        "segmenter": (seg_lib.load(self.segmenter_backend).about()
                      if self.segmenter == "ade20k" else
                      {"name": self.segmenter}
                      if self.segmenter != "none" else None),
    }
    return result


def scalars(result: dict) -> dict[str, float]:
  """The figures training logs: eval/fid, eval/kid, eval/miou,
  eval/lpips_diversity (those present and finite)."""
  return {f"eval/{k}": float(result[k])
          for k in ("fid", "kid", "miou", "lpips_diversity")
          if result.get(k) is not None and math.isfinite(result[k])}


def evaluate_workdir(workdir: pathlib.Path, *, out=None, conv: str = "xla",
                     **kwargs) -> dict:
  """Samples validation masks with the EMA weights; writes eval.json and a
  picture; returns every figure and the protocol. kwargs: `Evaluator`'s;
  `conv`: how 3x3 convolutions run (layers.CONV_IMPLS)."""
  config = run_config.load(workdir)
  evaluator = Evaluator(config, workdir, **kwargs)  # bad data fails first
  model = trained_model.load(workdir, use_ema=True, conv=conv)
  out = (pathlib.Path(out) if out
         else workdir / f"eval_step{model.step}" / "eval.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  result = evaluator(model.ldm, model.params, model.first_stage_params,
                     model.step, picture=out.parent / "eval.png")
  report.write_json(result, out)
  return result


def for_training(config, workdir: pathlib.Path, ldm, fs_params):
  """-> `step, state -> {eval/...: value}` every `train.eval_every` steps
  (None when off), scoring the EMA UNet on the validation split."""
  if not config.train.get("eval_every"):
    return None
  evaluator = Evaluator(config, workdir)

  def scores(step: int, state) -> dict[str, float]:
    params = {"unet": state.ema["unet"],
              "cond_stage": state.params["cond_stage"]}
    return scalars(evaluator(ldm, params, fs_params, step))

  return scores
