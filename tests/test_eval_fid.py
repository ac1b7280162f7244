"""FID Inception port, TorchScript reading, FID and KID."""

import zipfile

import numpy as np
import pytest

from segldm_jax.convert import torch_io
from segldm_jax.eval import fid
from segldm_jax.eval import inception


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  return dict(np.load(fixtures_dir / "fid_inception_reference.npz"))


@pytest.fixture(scope="module")
def extractor():
  # lru_cached: every test module gets the same compiled programs.
  return inception.FeatureExtractor.load(batch_size=8)


def _relative(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_torchscript_module_tree():
  tree = torch_io.flatten_module(
      torch_io.load_torchscript(inception.weights_path()))
  assert tree["net.layers.conv.weight"].shape == (32, 3, 3, 3)
  assert tree["net.layers.conv.stride"] == 2
  # torch.jit._pickle.build_intlist, rebuilt as a plain list.
  assert tree["net.layers.mixed_4.tower.conv_1.padding"] == [0, 3]
  assert sum(isinstance(v, np.ndarray) for v in tree.values()) == 376


def test_torchscript_refusals(tmp_path):
  # The plain checkpoint reader still refuses a TorchScript module by name.
  with pytest.raises(torch_io.CheckpointError,
                     match="'__torch__.wrap_net.WrapNet', which is not"):
    torch_io.load_checkpoint(inception.weights_path())
  # A TorchScript archive whose pickle calls os.system: refused by name,
  # nothing executed.
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("out_jit_module/data.pkl",
                b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    zf.writestr("out_jit_module/constants.pkl", b"\x80\x02).")
    zf.writestr("out_jit_module/code/__torch__/m.py", b"")
  with pytest.raises(torch_io.CheckpointError) as info:
    torch_io.load_torchscript(path)
  assert str(info.value) == (
      f"{path}: pickle refers to 'os.system', which is not a tensor or plain "
      "container; refusing to load (nothing was executed)")


def test_features_from_network_inputs(extractor, reference):
  feats = extractor.from_inputs(reference["inputs_299"])
  assert feats.shape == (2, 2048)
  # Float32 port vs PyTorch: measured 1.2e-6.
  assert _relative(feats, reference["features"][:2]) < 1e-4


def test_features_through_the_protocol(extractor, reference):
  feats = extractor(reference["images"])
  assert _relative(feats, reference["features"]) < 1e-3  # measured 2.3e-6
  # The resize + 2x-1 alone, against PyTorch's network input.
  inputs = np.asarray(inception.preprocess(reference["images"][:2]))
  assert np.abs(inputs - reference["inputs_299"]).max() < 1e-4


def test_bilinear_matches_torch_semantics():
  # Shrinking 4 -> 2 without antialiasing blends pixel pairs (0,1), (2,3);
  # growing 2 -> 4 clamps the source at 0: torch gives [a, .75a+.25b, ...].
  np.testing.assert_allclose(inception._bilinear_matrix(4, 2),
                             [[.5, .5, 0, 0], [0, 0, .5, .5]])
  np.testing.assert_allclose(inception._bilinear_matrix(2, 4),
                             [[1, 0], [.75, .25], [.25, .75], [0, 1]])


def test_fid_of_a_set_with_itself_is_zero(reference):
  feats = reference["features"]
  assert abs(fid.fid(feats, feats)) < 1e-6
  s = fid.stats(feats[:, :256])  # the covariance route (D x D SVD)
  assert abs(fid.fid(s, s)) < 1e-6


def _random_rotation(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def test_fid_of_gaussians_matches_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  q = _random_rotation(rng, d)
  a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  # Shared eigenvectors: tr sqrt(S1 S2) = sum sqrt(a b).
  expected = ((mu1 - mu2)**2).sum() + ((np.sqrt(a) - np.sqrt(b))**2).sum()
  got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-10)
  # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
  s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
  s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
  m = s1 @ s2
  expected = (np.trace(s1) + np.trace(s2) -
              2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m))) + 1.0)
  got = fid.frechet_distance([1.0, 0], s1, [0, 0], s2)
  assert got == pytest.approx(expected, rel=1e-12)


def test_fid_routes_agree():
  # Features -> N1 x N2 SVD; Stats -> Cholesky factors (full rank) or the
  # eigh root (rank-deficient); all the same number.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 32)) * rng.uniform(0.2, 2, 32) + 1
  y = rng.normal(size=(30, 32)) * rng.uniform(0.2, 2, 32)
  z = rng.normal(size=(300, 32))
  assert fid.fid(x, y) == pytest.approx(
      fid.fid(fid.stats(x), fid.stats(y)), rel=1e-10)
  small = fid.stats(x[:10])  # rank 9 < 32: no Cholesky
  assert fid.fid(x[:10], z) == pytest.approx(
      fid.fid(small, fid.stats(z)), rel=1e-10)


def _mmd_by_definition(x, y):
  k = lambda a, b: (a @ b / len(a) + 1)**3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return (xx + yy) / (m * (m - 1)) - 2 * xy / m**2


def test_kid_is_the_unbiased_mmd():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) + 0.5
  # Subsets as large as the sets hold every sample (in some order).
  mean, std = fid.kid(x, y, num_subsets=3, subset_size=10)
  assert mean == pytest.approx(_mmd_by_definition(x, y), rel=1e-12)
  assert std == pytest.approx(0, abs=1e-12)
  # Unbiased: two samples of one distribution average to ~0, unlike FID.
  a, b = rng.normal(size=(2, 400, 8))
  mean, std = fid.kid(a, b, num_subsets=20, subset_size=100)
  assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3
