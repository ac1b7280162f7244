"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for CPU.

On this project's CPU shapes both frameworks' convolution kernels (XNNPACK
here, oneDNN under PyTorch) run the direct algorithm at about what the
cores' FMA units allow (BENCHMARKS.md), so going faster takes fewer
multiplications. F(2x2, 3x3) (Lavin & Gray, 2016) makes every 2x2 output
tile from a 4x4 input tile with 16 products per channel pair instead of 36:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (per channel pair, * elementwise)

The input and kernel transforms are additions; the 16 elementwise products,
summed over input channels, are 16 independent matrix products; the output
transform is additions again. XLA fuses the transforms with the ops around
them (GroupNorm, SiLU, residual adds), and inside a sampling loop it hoists
the kernel transform out of the loop, since the parameters do not change.

The gain needs enough channels for the matrix products to run well and
enough tiles to pay for the transforms, so `conv_general_dilated` takes this
path only where it measured faster (`benchmarks/winograd_layers.py`): stride
1, padding 1, even sides of at least 8, at least 64 input channels, float32,
CPU backend. There the demo UNet forward gets faster (BENCHMARKS.md).
It has lax.conv_general_dilated's signature, so it plugs into nn.Conv and
leaves the parameter tree (and checkpoint conversion) untouched. Results
differ from the direct convolution by float32 rounding (~3e-6 on unit-scale
activations; the fixtures allow 1e-4).
"""

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# F(2x2, 3x3) on the interpolation points 0, 1, -1, infinity.
B_T = np.array([[1, 0, -1, 0],
                [0, 1, 1, 0],
                [0, -1, 1, 0],
                [0, 1, 0, -1]])
G = np.array([[1, 0, 0],
              [.5, .5, .5],
              [.5, -.5, .5],
              [0, 0, 1]])
A_T = np.array([[1, 1, 1, 0],
                [0, 1, -1, -1]])
TILE = 2  # output pixels per tile side
_TAPS = 4  # input pixels per tile side (TILE + 3 - 1)

# Where the direct convolution stays faster on CPU (measured, BENCHMARKS.md).
MIN_SIDE = 8
MIN_IN_CHANNELS = 64
_NHWC = ("NHWC", "HWIO", "NHWC")


def _combine(parts: Sequence[jax.Array], coefficients) -> jax.Array:
  """sum_k c_k * parts[k] with the zero terms left out and +-1 as +-."""
  out = None
  for c, part in zip(coefficients, parts):
    if c == 0:
      continue
    term = part if c == 1 else -part if c == -1 else c * part
    out = term if out is None else out + term
  return out


def _input_tiles(x: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
  """B^T along `axis` of the padded input: 4 arrays with `tiles` rows each.

  Tile i starts at padded row 2i; its tap k is row 2i + k.
  """
  taps = [lax.slice_in_dim(x, k, k + TILE * (tiles - 1) + 1, TILE, axis)
          for k in range(_TAPS)]
  return [_combine(taps, row) for row in B_T]


def _direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=_NHWC)


@jax.jit
def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The F(2x2, 3x3) forward. A named call in the jaxpr, so FLOP counters
  can count it as the convolution it stands for (benchmarks/flops.py)."""
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  th, tw = h // TILE, w // TILE
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # (4, 4, b, th, tw, cin): transformed tiles, one (i, j) frequency per slab.
  v = jnp.stack([jnp.stack(_input_tiles(rows, 2, tw))
                 for rows in _input_tiles(xp, 1, th)])
  v = v.reshape(_TAPS * _TAPS, b * th * tw, cin)
  g = jnp.asarray(G, kernel.dtype)
  u = jnp.einsum("ik,klcd,jl->ijcd", g, kernel, g)
  u = u.reshape(_TAPS * _TAPS, cin, cout)
  m = jnp.einsum("pnc,pcd->pnd", v, u, preferred_element_type=x.dtype)
  m = m.reshape(_TAPS, _TAPS, b, th, tw, cout)
  rows = [_combine(list(m), a) for a in A_T]  # A^T over the first axis
  y = jnp.stack([jnp.stack([_combine(list(r), a) for a in A_T])
                 for r in rows])  # (2, 2, b, th, tw, cout)
  return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, cout)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Same as a 3x3, stride 1, padding 1 convolution of NHWC `x` by HWIO
  `kernel`, by F(2x2, 3x3). The spatial sides must be even.

  The backward pass is written out: d/dx is again a 3x3 convolution, by
  F(2x2, 3x3) where worthwhile; d/dkernel is the direct convolution's.
  Differentiated through the transforms instead, the demo train step ran
  slower on CPU, not faster (BENCHMARKS.md).
  """
  _, h, w, cin = x.shape
  if kernel.shape != (3, 3, cin, kernel.shape[-1]) or h % TILE or w % TILE:
    raise ValueError(f"conv3x3 needs a (3, 3, {cin}, C) kernel and even "
                     f"sides; got input {x.shape}, kernel {kernel.shape}")
  return winograd_conv3x3(x, kernel)


def _conv3x3_fwd(x, kernel):
  return conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  # d/dx is the same kind of convolution: g by the kernel turned 180 degrees
  # with its channel axes swapped.
  turned = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  if worthwhile(g.shape, turned.shape):
    gx = conv3x3(g, turned)
  else:
    (gx,) = jax.linear_transpose(lambda x: _direct(x, kernel), x)(g)
  # d/dkernel correlates x with g: the direct convolution's transpose.
  # (Through the Winograd transforms instead, the demo train step ran
  # slower: BENCHMARKS.md.)
  (gk,) = jax.linear_transpose(lambda k: _direct(x, k), kernel)(g)
  return gx, gk


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def worthwhile(x_shape, kernel_shape) -> bool:
  """Whether F(2x2, 3x3) beats the direct convolution for these shapes on
  CPU (the caller decides the backend: layers.conv3x3's `conv`)."""
  _, h, w, cin = x_shape
  return (tuple(kernel_shape[:2]) == (3, 3)
          and h % TILE == 0 and w % TILE == 0 and min(h, w) >= MIN_SIDE
          and cin >= MIN_IN_CHANNELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated, by F(2x2, 3x3) where `worthwhile`."""
  plain = (tuple(window_strides) == (1, 1)
           and not isinstance(padding, str)
           and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
           and all(d in (None, 1) for d in (*(lhs_dilation or ()),
                                            *(rhs_dilation or ())))
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None
           and lhs.dtype == rhs.dtype == jnp.float32  # bf16 adds lose bits
           and lhs.ndim == 4
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                         dimension_numbers))
  if plain and worthwhile(lhs.shape, rhs.shape):
    return conv3x3(lhs, rhs)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
