"""The evaluation figures of two image sets, as `evaluate.py` reports them.

  FID, KID           FID Inception pool3 features (inception.py, fid.py)
  mIoU               a segmenter's labels of the generated images against the
                     masks they came from, beside the same segmenter's score on
                     the real images of those masks (the ceiling)
  LPIPS diversity    mean pairwise LPIPS among samples of one mask

Features of a real set are cached by content hash (of the decoded pixels and
the protocol), so re-evaluating against the same real images skips them.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
import tqdm

from segldm_jax.data import folder as folder_lib
from segldm_jax.data import masks as masks_lib
from segldm_jax.data.base import IGNORE_ID
from segldm_jax.errors import UserError
from segldm_jax.eval import fid as fid_lib
from segldm_jax.eval import inception
from segldm_jax.eval import miou

PROTOCOL = {
    "features": "FID Inception-v3 pool3 (2048), pytorch-fid protocol: uint8 "
                "-> [0,1] -> bilinear 299x299 (align_corners=False, no "
                "antialias) -> 2x-1",
    "fid": "Frechet distance of Gaussians, unbiased covariances (ddof=1)",
    "kid": "unbiased MMD^2, kernel (x.y/2048+1)^3, mean/std over subsets",
    "lpips_diversity": "LPIPS-alex, mean over pairs of samples of one mask, "
                       "then over masks",
}
_CACHE_VERSION = 1


class EvalInputError(UserError, ValueError):
  """Evaluation inputs that do not fit together (names the folder)."""


def read_image_folder(root: str | pathlib.Path) -> tuple[list[str],
                                                         list[np.ndarray]]:
  """(keys, RGB uint8 images) of every image under root, sorted by key
  (relative path without extension)."""
  files = folder_lib.scan_tree(str(root), folder_lib.IMAGE_EXTENSIONS, "image")
  keys = sorted(files)
  return keys, [folder_lib.read_image(files[k]) for k in tqdm.tqdm(
      keys, desc=f"read {pathlib.Path(root).name}", leave=False)]


def read_mask_folder(root: str | pathlib.Path) -> dict[str, np.ndarray]:
  """{key: raw stored label values (H, W) uint8} of every PNG under root."""
  files = folder_lib.scan_tree(str(root), folder_lib.MASK_EXTENSIONS, "mask")
  out = {}
  for key, path in files.items():
    with Image.open(path) as im:
      out[key] = np.asarray(im.convert("L") if im.mode not in ("L", "P")
                            else im).astype(np.uint8)
  return out


def content_hash(images: Iterable[np.ndarray]) -> str:
  digest = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
  for im in images:
    digest.update(repr(im.shape).encode())
    digest.update(np.ascontiguousarray(im).tobytes())
  return digest.hexdigest()


def inception_features(images: Sequence[np.ndarray],
                       extractor: inception.FeatureExtractor,
                       cache_dir: str | pathlib.Path | None = None,
                       desc: str = "features") -> np.ndarray:
  """(N, 2048) features; images of one size go through in batches."""
  cache = None
  if cache_dir is not None:
    key = content_hash(images)[:24]
    cache = pathlib.Path(cache_dir) / (
        f"inception_{extractor.weights_sha256[:12]}_{key}.npy")
    if cache.is_file():
      return np.load(cache)
  out = np.empty((len(images), inception.FEATURES), np.float32)
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i, im in enumerate(images):
    by_shape.setdefault(im.shape, []).append(i)
  bar = tqdm.tqdm(total=len(images), desc=desc, unit="img")
  for idx in by_shape.values():
    done = 0
    for feats in extractor.batches(np.stack([images[i] for i in idx])):
      out[idx[done:done + len(feats)]] = feats
      done += len(feats)
      bar.update(len(feats))
  bar.close()
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
  return out


def fid_kid(real: np.ndarray, fake: np.ndarray, kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
  kid, kid_std = fid_lib.kid(real, fake, kid_subsets, kid_subset_size, seed)
  return {"fid": fid_lib.fid(real, fake), "kid": kid, "kid_std": kid_std,
          "num_real": len(real), "num_fake": len(fake)}


def ade20k_miou(pred: np.ndarray, target: np.ndarray) -> float:
  """mIoU over the 150 ADE20K classes present in prediction or target;
  target 0 (unlabeled) and IGNORE_ID pixels are skipped."""
  target = np.where(np.asarray(target) == 0, IGNORE_ID, target)
  ious = miou.iou_per_class(pred, target, 151, IGNORE_ID)[1:]
  return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def diversity_groups(keys: Sequence[str]) -> dict[str, list[int]]:
  """Samples named `<mask>_<k>` (as sample.py writes them) grouped by mask;
  only groups of two or more."""
  groups: dict[str, list[int]] = {}
  for i, key in enumerate(keys):
    m = re.fullmatch(r"(.+)_(\d+)", key)
    if m:
      groups.setdefault(m.group(1), []).append(i)
  return {k: v for k, v in groups.items() if len(v) >= 2}


def lpips_diversity(groups: Iterable[np.ndarray], net: str = "alex") -> float:
  """Mean over masks of the mean pairwise LPIPS among that mask's samples."""
  from segldm_jax.eval import lpips  # pylint: disable=g-import-not-at-top
  model = lpips.load(net)
  values = [model.diversity(g) for g in tqdm.tqdm(list(groups),
                                                  desc="lpips diversity")]
  return float(np.mean(values)) if values else float("nan")


def segment_all(segment: Callable[[np.ndarray], np.ndarray],
                images: Sequence[np.ndarray], desc: str) -> list[np.ndarray]:
  return [segment(im[None])[0] for im in tqdm.tqdm(images, desc=desc)]


def folder_report(real_dir, fake_dir, masks_dir=None, *, segmenter="ade20k",
                  num_classes: int | None = None, cache_dir=None,
                  batch_size: int = 50, kid_subset_size: int = 1000,
                  segmenter_backend: str = "litert") -> dict:
  """Every figure for `evaluate.py --real A --fake B [--masks M]`.

  `segmenter`: "ade20k" (the shipped ADE20K model; masks hold ADE20K ids;
  run by `segmenter_backend`, see segmenter.py), or your own callable
  `uint8 (N, H, W, 3) -> labels (N, H, W)` in the masks' id space, scored
  over `num_classes` classes (mask value IGNORE_ID skipped).
  """
  real_keys, real = read_image_folder(real_dir)
  fake_keys, fake = read_image_folder(fake_dir)
  for name, images in (("--real", real), ("--fake", fake)):
    if len(images) < 2:
      raise EvalInputError(f"{name} needs at least 2 images, found "
                           f"{len(images)}")
  extractor = inception.FeatureExtractor.load(batch_size)
  real_f = inception_features(real, extractor, cache_dir, "real features")
  fake_f = inception_features(fake, extractor, None, "fake features")
  result = {"real": str(real_dir), "fake": str(fake_dir),
            **fid_kid(real_f, fake_f, kid_subset_size=kid_subset_size)}
  groups = diversity_groups(fake_keys)
  if groups:
    result["lpips_diversity"] = lpips_diversity(
        [np.stack([fake[i] for i in g]) for g in groups.values()
         if len({fake[i].shape for i in g}) == 1])
    result["diversity_masks"] = len(groups)
  if masks_dir is not None:
    result.update(_mask_scores(masks_dir, real_keys, real, fake_keys, fake,
                               segmenter, num_classes, segmenter_backend))
  result["protocol"] = {**PROTOCOL,
                        "inception_sha256": extractor.weights_sha256}
  return result


def _mask_scores(masks_dir, real_keys, real, fake_keys, fake, segmenter,
                 num_classes, backend):
  from segldm_jax.eval import segmenter as seg_lib  # pylint: disable=g-import-not-at-top
  if callable(segmenter):
    if not num_classes:
      raise EvalInputError("a custom segmenter needs num_classes")
    seg = segmenter
    score = lambda p, t: miou.mean_iou(p, t, num_classes)  # noqa: E731
    about = {"name": getattr(segmenter, "__name__", "custom")}
  elif segmenter == "ade20k":
    seg, score = seg_lib.load(backend), ade20k_miou
    about = seg.about()
  else:
    raise EvalInputError(f"segmenter {segmenter!r}: use 'ade20k' or pass an "
                         "images -> labels callable")
  masks = read_mask_folder(masks_dir)

  def matched(keys, images):
    pairs = []
    for key, im in zip(keys, images):
      m = masks.get(key)
      if m is None:
        g = re.fullmatch(r"(.+)_(\d+)", key)
        m = masks.get(g.group(1)) if g else None
      if m is not None:
        pairs.append((im, m))
    return pairs

  out = {}
  for name, keys, images in (("fake", fake_keys, fake),
                             ("real", real_keys, real)):
    pairs = matched(keys, images)
    if not pairs:
      if name == "fake":
        raise EvalInputError(f"--masks {masks_dir}: no mask matches a --fake "
                             "image by relative path (or <mask>_<k> name)")
      continue
    preds = segment_all(seg, [p[0] for p in pairs], f"segment {name}")
    targets = [masks_lib.resize_labels(p[1], *pr.shape)
               for p, pr in zip(pairs, preds)]
    out[f"miou_{name}"] = score(np.concatenate([p.ravel() for p in preds]),
                                np.concatenate([t.ravel() for t in targets]))
    out[f"miou_{name}_images"] = len(pairs)
  out["segmenter"] = about
  return out


def json_safe(tree):
  """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  if isinstance(tree, np.generic):
    tree = tree.item()
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def write_json(result: dict, path: str | pathlib.Path) -> None:
  pathlib.Path(path).write_text(json.dumps(json_safe(result), indent=2) +
                                "\n")
