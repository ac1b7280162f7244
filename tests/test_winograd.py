"""F(2x2, 3x3) Winograd convolutions: values, gradients, where they apply."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from segldm_jax.models import layers
from segldm_jax.models import winograd

_NHWC = ("NHWC", "HWIO", "NHWC")


def _direct(x, w, precision=None):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=_NHWC, precision=precision)


def _inputs(shape, cout, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32)
  w = jax.random.normal(kw, (3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])
  return x, w


@pytest.mark.parametrize("shape,cout", [((2, 8, 8, 64), 32),
                                        ((1, 6, 10, 5), 7),  # not square
                                        ((3, 2, 2, 1), 1)])  # one tile
def test_matches_the_direct_convolution(shape, cout):
  x, w = _inputs(shape, cout)
  exact = np.asarray(_direct(x, w, lax.Precision.HIGHEST), np.float64)
  y = np.asarray(jax.jit(winograd.conv3x3)(x, w))
  assert y.shape == exact.shape
  # Float32 rounding of the transforms only (outputs are ~1 in size).
  np.testing.assert_allclose(y, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cout", [8, 64])
def test_gradients_match_the_direct_convolutions(cout):
  x, w = _inputs((2, 8, 8, 64), cout, seed=1)
  ct = jax.random.normal(jax.random.key(2), (2, 8, 8, cout))
  loss = lambda f: lambda x, w: jnp.vdot(f(x, w), ct)
  gx, gw = jax.jit(jax.grad(loss(winograd.conv3x3), (0, 1)))(x, w)
  ex, ew = jax.jit(jax.grad(loss(_direct), (0, 1)))(x, w)
  np.testing.assert_array_equal(gw, ew)  # d/dkernel: the same program
  if cout < winograd.MIN_IN_CHANNELS:  # d/dx: direct too
    np.testing.assert_array_equal(gx, ex)
  else:  # d/dx: a Winograd convolution of the cotangent
    np.testing.assert_allclose(gx, ex, atol=1e-5 * np.abs(ex).max(), rtol=0)
    assert not np.array_equal(gx, ex)


def test_odd_sides_are_refused_with_the_shapes():
  x, w = _inputs((1, 7, 8, 4), 4)
  with pytest.raises(ValueError, match=r"even sides; got input \(1, 7, 8, 4\)"):
    winograd.conv3x3(x, w)


@pytest.mark.parametrize("shape,expected", [
    ((8, 16, 16, 64), True), ((8, 8, 8, 256), True),
    ((8, 4, 4, 128), False),   # 4x4 maps: too few tiles
    ((8, 16, 16, 32), False),  # 32 channels: the products run poorly
    ((8, 15, 15, 128), False),  # odd sides
])
def test_worthwhile_where_measured_faster(shape, expected):
  assert winograd.worthwhile(shape, (3, 3, shape[-1], 64)) is expected


def test_conv3x3_layer_takes_the_path_and_keeps_its_parameters():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
  conv = layers.conv3x3(32, jnp.float32, "c", conv="winograd")
  params = conv.init(jax.random.key(1), x)
  # The default is XLA's convolution, with the very same parameters.
  direct = layers.conv3x3(32, jnp.float32, "c")
  assert "winograd" not in str(jax.make_jaxpr(direct.apply)(params, x).jaxpr)
  with pytest.raises(ValueError, match="conv='fft'; use one of"):
    layers.conv3x3(32, jnp.float32, "c", conv="fft")
  assert jax.tree.map(jnp.shape, params) == {
      "params": {"kernel": (3, 3, 64, 32), "bias": (32,)}}
  jaxpr = jax.make_jaxpr(conv.apply)(params, x).jaxpr
  assert "conv_general_dilated" not in str(jaxpr)
  assert "winograd_conv3x3" in str(jaxpr)
  k, b = params["params"]["kernel"], params["params"]["bias"]
  np.testing.assert_allclose(jax.jit(conv.apply)(params, x),
                             _direct(x, k, lax.Precision.HIGHEST) + b,
                             atol=2e-5)


@pytest.mark.parametrize("kwargs", [
    {"strides": (2, 2)}, {"padding": ((0, 1), (0, 1))}, {"padding": "SAME"},
    {"kernel_dilation": (2, 2)}, {"feature_group_count": 2},
    {"dtype": jnp.bfloat16},
])
def test_other_convolutions_stay_direct(kwargs):
  x = jnp.ones((1, 8, 8, 64), kwargs.pop("dtype", jnp.float32))
  conv = nn.Conv(64, (3, 3), conv_general_dilated=winograd.conv_general_dilated,
                 **{"padding": ((1, 1), (1, 1)), "dtype": x.dtype, **kwargs})
  params = conv.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(conv.apply)(params, x).jaxpr)
  assert "conv_general_dilated" in jaxpr and "winograd" not in jaxpr
