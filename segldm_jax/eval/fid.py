"""FID and KID from Inception features, in float64 numpy (no scipy).

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The trace of the matrix square root is computed without `sqrtm`, as a sum of
singular values. With any factors S_i = F_i F_i^T, S1 S2 is similar to
(F1^T F2)(F1^T F2)^T, so the square roots of its eigenvalues are the singular
values of F1^T F2 and tr((S1 S2)^(1/2)) = sum(svd(F1^T F2)). Factors used:
Cholesky (full-rank covariances), else the symmetric root from `eigh`; and
when features are at hand and N < D, the centred features themselves
(F_i = X_i^T / sqrt(N_i - 1)), which makes it an N1 x N2 problem.
Why singular values: they are perfectly conditioned (Weyl: each moves by at
most the 2-norm of the rounding error, ~1e-16 |S|), whereas square roots of
the eigenvalues of S1 S2 (what `sqrtm` routes amount to) amplify the ~1e-16
rounding of the zero eigenvalues of rank-deficient covariances to ~1e-8 each,
2048 times over. So FID(x, x) is 0 to ~1e-12 at any N.

KID (Binkowski et al. 2018) = unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets (as torch-fidelity
and clean-fid do); unbiased, so usable with few samples, unlike FID.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stats:
  """Mean and covariance (float64) of a feature set, and its size."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int


def stats(features: np.ndarray) -> Stats:
  """Mean and unbiased covariance (ddof=1, as pytorch-fid's `np.cov`)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
  return Stats(x.mean(0), np.cov(x, rowvar=False), len(x))


def _factor(sigma: np.ndarray) -> np.ndarray:
  """F with F F^T = sigma: Cholesky, or the symmetric root (tiny negative
  eigenvalues from rounding clipped to 0) when sigma is singular."""
  sigma = (sigma + sigma.T) / 2
  try:
    return np.linalg.cholesky(sigma)
  except np.linalg.LinAlgError:
    w, v = np.linalg.eigh(sigma)
    return v * np.sqrt(np.maximum(w, 0.0))


def _nuclear_norm(a: np.ndarray) -> float:
  return float(np.linalg.svd(a, compute_uv=False).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for covariances (see the module docstring)."""
  return _nuclear_norm(_factor(sigma1).T @ _factor(sigma2))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein squared) distance of two Gaussians."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"stats differ in shape: {mu1.shape}/{sigma1.shape} vs "
                     f"{mu2.shape}/{sigma2.shape}")
  diff = mu1 - mu2
  value = (diff @ diff + np.trace(sigma1) + np.trace(sigma2) -
           2.0 * trace_sqrt_product(sigma1, sigma2))
  return float(value)


def fid(a: Stats | np.ndarray, b: Stats | np.ndarray) -> float:
  """FID between two feature sets (features (N, D) or their `Stats`).

  Given features with N1 * N2 < D * D, works on the centred features (an
  N1 x N2 SVD instead of D x D ones); same value, far less time.
  """
  if isinstance(a, Stats) or isinstance(b, Stats):
    a = a if isinstance(a, Stats) else stats(a)
    b = b if isinstance(b, Stats) else stats(b)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
  x1, x2 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  dim = x1.shape[-1]
  if len(x1) * len(x2) >= dim * dim:
    return fid(stats(x1), stats(x2))
  for x in (x1, x2):
    if x.ndim != 2 or len(x) < 2 or x.shape[1] != dim:
      raise ValueError(f"need (N >= 2, D) features of one D, got shapes "
                       f"{x1.shape} and {x2.shape}")
  mu1, mu2 = x1.mean(0), x2.mean(0)
  c1 = (x1 - mu1) / np.sqrt(len(x1) - 1)  # c^T c is the covariance
  c2 = (x2 - mu2) / np.sqrt(len(x2) - 1)
  diff = mu1 - mu2
  return float(diff @ diff + (c1 * c1).sum() + (c2 * c2).sum() -
               2.0 * _nuclear_norm(c1 @ c2.T))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0)**3


def kid(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID: mean and standard deviation of the unbiased MMD^2 over subsets.

  Each subset draws `min(subset_size, N1, N2)` rows of each set without
  replacement (NumPy's PCG64 with `seed`, so the figure is reproducible).
  """
  x1 = np.asarray(features1, np.float64)
  x2 = np.asarray(features2, np.float64)
  m = min(subset_size, len(x1), len(x2))
  if m < 2:
    raise ValueError(f"KID needs at least 2 samples per set, got {len(x1)} "
                     f"and {len(x2)}")
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for i in range(num_subsets):
    x = x1[rng.choice(len(x1), m, replace=False)]
    y = x2[rng.choice(len(x2), m, replace=False)]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (
        m * (m - 1))
    values[i] = within - 2.0 * kxy.mean()
  return float(values.mean()), float(values.std())
