"""evaluate.py on image folders: the pytorch-fid protocol end to end."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

import evaluate
from segldm_jax.eval import report


def _pytorch_fid_formula(f1, f2):
  """pytorch-fid's calculate_frechet_distance (scipy sqrtm, eps offset when
  singular), on the stats projected onto the span of the centred features:
  S = Q (Q^T S Q) Q^T exactly there, so the FID is unchanged and sqrtm runs
  on a small matrix."""
  f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
  mu1, mu2 = f1.mean(0), f2.mean(0)
  q, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)
  s1 = q.T @ np.cov(f1, rowvar=False) @ q
  s2 = q.T @ np.cov(f2, rowvar=False) @ q
  with warnings.catch_warnings():  # rank-deficient: scipy warns, still fine
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fixtures_dir):
  ref = np.load(fixtures_dir / "fid_inception_reference.npz")
  root = tmp_path_factory.mktemp("folders")
  for i, im in enumerate(ref["images"]):
    sub = root / ("real" if i < 4 else "fake")
    sub.mkdir(exist_ok=True)
    Image.fromarray(im).save(sub / f"img{i}.png")  # lossless
  return root, ref["features"]


def test_folder_fid_is_the_pytorch_fid_value(folders, tmp_path, capsys):
  root, features = folders
  out = tmp_path / "eval.json"
  args = ["--real", str(root / "real"), "--fake", str(root / "fake"),
          "--batch_size", "8", "--cache_dir", str(tmp_path / "cache"),
          "--out", str(out)]
  assert evaluate.main(args) == 0
  result = json.loads(out.read_text())
  want = _pytorch_fid_formula(features[:4], features[4:])
  # Features agree to ~2e-6 relative; FID is a smooth function of them.
  assert result["fid"] == pytest.approx(want, rel=1e-4)
  assert result["num_real"] == 4 and result["num_fake"] == 4
  assert result["protocol"]["inception_sha256"].startswith("7ff4a85c")
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["fid"] == result["fid"]
  # The real set's features are cached by content hash and reused.
  cached = list((tmp_path / "cache").glob("inception_*.npy"))
  assert len(cached) == 1
  np.save(cached[0], np.load(cached[0]) + 1.0)  # a tampered cache shows
  assert evaluate.main(args) == 0
  assert json.loads(out.read_text())["fid"] != pytest.approx(want, rel=1e-4)


def test_diversity_groups_follow_sample_py_names():
  groups = report.diversity_groups(["a_0", "a_1", "b_0", "c", "d_0", "d_1",
                                    "d_2"])
  assert groups == {"a": [0, 1], "d": [4, 5, 6]}


def test_empty_fake_folder_is_one_line(folders, tmp_path, capsys):
  root, _ = folders
  empty = tmp_path / "empty"
  empty.mkdir()
  assert evaluate.main(["--real", str(root / "real"), "--fake",
                        str(empty)]) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]  # after tqdm's
  assert err == (f"error: no image files (.jpg, .jpeg, .png, .webp, .bmp) "
                 f"found under {empty}")


def test_masks_give_miou_beside_the_real_ceiling(tmp_path):
  from segldm_jax.data.synthetic import SyntheticSource
  from segldm_jax.eval import miou
  source = SyntheticSource(4, 256, 5, seed=7)
  for sub in ("real", "fake", "masks"):
    (tmp_path / sub).mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    rec = source[i]
    Image.fromarray(rec["image"]).save(tmp_path / "real" / f"m{i}.png")
    noisy = np.clip(rec["image"] + rng.normal(0, 3, rec["image"].shape), 0,
                    255).astype(np.uint8)
    # sample.py's names: <mask>_<k>
    Image.fromarray(noisy).save(tmp_path / "fake" / f"m{i}_0.png")
    Image.fromarray(rec["labels"]).save(tmp_path / "masks" / f"m{i}.png")

  def synthetic(images):
    return miou.segment_synthetic(images, 5)

  result = report.folder_report(
      tmp_path / "real", tmp_path / "fake", tmp_path / "masks",
      segmenter=synthetic, num_classes=5, batch_size=8)
  assert result["miou_real"] == 1.0 and result["miou_real_images"] == 4
  assert 0.9 < result["miou_fake"] <= 1.0 and result["miou_fake_images"] == 4
  assert result["segmenter"] == {"name": "synthetic"}
  assert "lpips_diversity" not in result  # one sample per mask
