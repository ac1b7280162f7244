"""Runs a TFLite flatbuffer's graph as a JAX function (the ops we need).

The flatbuffer is parsed with the `tflite` package's generated schema classes
(pure Python, no TensorFlow); constants become float32 numpy arrays (int8
weight-only quantised tensors are dequantised with their per-channel scales
and zero points); the operators are replayed in file order with jax.lax.
Supported: CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, ADD, MUL, CONCATENATION,
AVERAGE_POOL_2D, RESIZE_BILINEAR, SPACE_TO_BATCH_ND, BATCH_TO_SPACE_ND,
with their fused activations. Anything else is refused by name when loading.

Numerics: float32. A CONV_2D whose weights are stored int8 (no DEQUANTIZE op
in front) is a "dynamic range" (hybrid) op: LiteRT quantises its input
activations to int8 on the fly. With `dynamic_range=True` (the default) we
emulate that: each pixel's channel vector is quantised asymmetrically to
int8 (min/max including 0, 255 steps, round half to even, as XNNPACK's qd8
conversion), dequantised, and convolved in float with the dequantised
weights, which is exact for the integer products. Against LiteRT 2.3.0 this
raises pixel agreement on the reference photos from 99.37% (pure float) to
99.66%; per-image quantisation (TFLite's built-in hybrid kernel) does worse
(see BENCHMARKS.md / the report in tests/test_eval_segmenter.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from segldm_jax.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST


class TFLiteError(UserError, ValueError):
  """A TFLite file cannot be read or uses an operator we do not run."""


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]
  options: dict[str, Any]


@dataclasses.dataclass
class Graph:
  """Operators in execution order, constants by tensor index, and the
  graph's input / output tensor indices."""
  ops: list[Op]
  constants: dict[int, np.ndarray]
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]
  names: dict[int, str]
  # Constants stored as int8/uint8 (dequantised in `constants`).
  quantized: frozenset[int] = frozenset()


_OPTIONS = {  # op -> (options class name, fields read)
    "CONV_2D": ("Conv2DOptions", ("Padding", "StrideH", "StrideW",
                                  "DilationHFactor", "DilationWFactor",
                                  "FusedActivationFunction")),
    "DEPTHWISE_CONV_2D": ("DepthwiseConv2DOptions",
                          ("Padding", "StrideH", "StrideW", "DepthMultiplier",
                           "DilationHFactor", "DilationWFactor",
                           "FusedActivationFunction")),
    "ADD": ("AddOptions", ("FusedActivationFunction",)),
    "MUL": ("MulOptions", ("FusedActivationFunction",)),
    "CONCATENATION": ("ConcatenationOptions",
                      ("Axis", "FusedActivationFunction")),
    "AVERAGE_POOL_2D": ("Pool2DOptions", ("Padding", "StrideH", "StrideW",
                                          "FilterHeight", "FilterWidth",
                                          "FusedActivationFunction")),
    "RESIZE_BILINEAR": ("ResizeBilinearOptions",
                        ("AlignCorners", "HalfPixelCenters")),
    "SPACE_TO_BATCH_ND": (None, ()),
    "BATCH_TO_SPACE_ND": (None, ()),
    "DEQUANTIZE": (None, ()),
}
_NUMPY_TYPES = {"FLOAT32": np.float32, "INT32": np.int32, "INT8": np.int8,
                "UINT8": np.uint8, "INT64": np.int64, "INT16": np.int16}


def _enum_names(enum_cls: type) -> dict[int, str]:
  return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def _constant(model, tensor, type_name: str) -> np.ndarray | None:
  buffer = model.Buffers(tensor.Buffer())
  if buffer is None or buffer.DataLength() == 0:
    return None
  raw = buffer.DataAsNumpy().tobytes()
  shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if (
      tensor.ShapeLength()) else ()
  value = np.frombuffer(raw, _NUMPY_TYPES[type_name]).reshape(shape)
  quant = tensor.Quantization()
  if type_name in ("INT8", "UINT8") and quant is not None and (
      quant.ScaleLength()):
    scale = quant.ScaleAsNumpy().astype(np.float32)
    zero = quant.ZeroPointAsNumpy().astype(np.float32)
    axis = quant.QuantizedDimension() if scale.size > 1 else 0
    bshape = [1] * value.ndim
    if scale.size > 1:
      bshape[axis] = scale.size
    value = ((value.astype(np.float32) - zero.reshape(bshape)) *
             scale.reshape(bshape))
  return value


def load(path: str | os.PathLike[str]) -> Graph:
  """Parses a single-subgraph TFLite file into a `Graph`."""
  import tflite  # pylint: disable=g-import-not-at-top  (generated schema)

  try:
    data = open(path, "rb").read()
  except OSError as err:
    raise TFLiteError(f"{path}: cannot read ({err})") from None
  if data[4:8] != b"TFL3":
    raise TFLiteError(f"{path}: not a TFLite flatbuffer (no TFL3 magic)")
  model = tflite.Model.GetRootAsModel(data, 0)
  if model.SubgraphsLength() != 1:
    raise TFLiteError(f"{path}: {model.SubgraphsLength()} subgraphs; only "
                      "single-subgraph models are supported")
  graph = model.Subgraphs(0)
  op_names = _enum_names(tflite.BuiltinOperator)
  type_names = _enum_names(tflite.TensorType)
  codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
  constants, names, quantized = {}, {}, set()
  for i in range(graph.TensorsLength()):
    tensor = graph.Tensors(i)
    names[i] = tensor.Name().decode()
    type_name = type_names[tensor.Type()]
    if type_name not in _NUMPY_TYPES:
      raise TFLiteError(f"{path}: tensor {names[i]!r} has type {type_name}")
    value = _constant(model, tensor, type_name)
    if value is not None:
      constants[i] = value
      if type_name in ("INT8", "UINT8"):
        quantized.add(i)
  ops = []
  for i in range(graph.OperatorsLength()):
    op = graph.Operators(i)
    code = codes[op.OpcodeIndex()]
    kind = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()),
                        "CUSTOM")
    if kind not in _OPTIONS:
      raise TFLiteError(f"{path}: operator {i} is {kind}, which this runner "
                        "does not implement")
    cls_name, fields = _OPTIONS[kind]
    options = {}
    if cls_name:
      table = op.BuiltinOptions()
      opts = getattr(tflite, cls_name)()
      opts.Init(table.Bytes, table.Pos)
      options = {f: getattr(opts, f)() for f in fields}
    ops.append(Op(kind, tuple(int(t) for t in op.InputsAsNumpy()),
                  tuple(int(t) for t in op.OutputsAsNumpy()), options))
  return Graph(ops, constants, tuple(int(t) for t in graph.InputsAsNumpy()),
               tuple(int(t) for t in graph.OutputsAsNumpy()), names,
               frozenset(quantized))


# ----------------------------------------------------------------------------
# Operators.
# ----------------------------------------------------------------------------

_ACTIVATIONS: dict[int, Callable[[jax.Array], jax.Array]] = {
    0: lambda x: x,
    1: jax.nn.relu,
    2: lambda x: jnp.clip(x, -1.0, 1.0),
    3: lambda x: jnp.clip(x, 0.0, 6.0),
}
_PADDING = {0: "SAME", 1: "VALID"}


def _activation(options: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
  code = options.get("FusedActivationFunction", 0)
  if code not in _ACTIVATIONS:
    raise TFLiteError(f"fused activation {code} is not implemented")
  return _ACTIVATIONS[code]


def _conv(x, w, b, o, depthwise: bool):
  if depthwise:  # [1, H, W, C * mult] -> HWIO with groups = C
    kernel = jnp.transpose(w, (1, 2, 0, 3))
    groups = x.shape[-1]
  else:  # OHWI -> HWIO
    kernel = jnp.transpose(w, (1, 2, 3, 0))
    groups = 1
  y = jax.lax.conv_general_dilated(
      x, kernel, (o["StrideH"], o["StrideW"]), _PADDING[o["Padding"]],
      rhs_dilation=(o["DilationHFactor"], o["DilationWFactor"]),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, precision=_HIGHEST)
  if b is not None:
    y = y + b
  return _activation(o)(y)


def _space_to_batch(x, block, pad):
  bh, bw = (int(v) for v in block)
  x = jnp.pad(x, ((0, 0), tuple(int(v) for v in pad[0]),
                  tuple(int(v) for v in pad[1]), (0, 0)))
  n, h, w, c = x.shape
  x = x.reshape(n, h // bh, bh, w // bw, bw, c)
  x = x.transpose(2, 4, 0, 1, 3, 5)
  return x.reshape(bh * bw * n, h // bh, w // bw, c)


def _batch_to_space(x, block, crops):
  bh, bw = (int(v) for v in block)
  nb, h, w, c = x.shape
  n = nb // (bh * bw)
  x = x.reshape(bh, bw, n, h, w, c).transpose(2, 3, 0, 4, 1, 5)
  x = x.reshape(n, h * bh, w * bw, c)
  (t, b), (l, r) = ((int(v) for v in p) for p in crops)
  return x[:, t:h * bh - b, l:w * bw - r]


def _resize_taps(in_size: int, out_size: int, align_corners: bool,
                 half_pixel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TFLite RESIZE_BILINEAR along one axis: for each output index the two
  source indices and the weight of the second (a 2-tap gather, far cheaper
  than a dense (out, in) matrix on 151-channel logits)."""
  if align_corners and out_size > 1:
    scale = (in_size - 1) / (out_size - 1)
  else:
    scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = np.maximum((dst + 0.5) * scale - 0.5, 0.0) if half_pixel else (
      dst * scale)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def _lerp(x, axis: int, taps):
  lo, hi, frac = taps
  shape = [1] * x.ndim
  shape[axis] = len(frac)
  frac = jnp.asarray(frac).reshape(shape)
  return (jnp.take(x, lo, axis=axis) * (1.0 - frac) +
          jnp.take(x, hi, axis=axis) * frac)


def _resize(x, size, o):
  oh, ow = (int(v) for v in size)
  _, h, w, _ = x.shape
  if (h, w) == (oh, ow):
    return x
  x = _lerp(x, 1, _resize_taps(h, oh, o["AlignCorners"],
                               o["HalfPixelCenters"]))
  return _lerp(x, 2, _resize_taps(w, ow, o["AlignCorners"],
                                  o["HalfPixelCenters"]))


def _avg_pool(x, o):
  window = (1, o["FilterHeight"], o["FilterWidth"], 1)
  strides = (1, o["StrideH"], o["StrideW"], 1)
  padding = _PADDING[o["Padding"]]
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
  count = jax.lax.reduce_window(jnp.ones_like(x[:1, ..., :1]), 0.0,
                                jax.lax.add, window, strides, padding)
  return _activation(o)(total / count)


def _quantize_per_pixel(x: jax.Array) -> jax.Array:
  """int8 round trip of each pixel's channels (asymmetric, range incl. 0)."""
  lo = jnp.minimum(jnp.min(x, axis=-1, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(x, axis=-1, keepdims=True), 0.0)
  scale = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0)
  zero = jnp.clip(jnp.round(-128.0 - lo / scale), -128, 127)
  q = jnp.clip(jnp.round(x / scale) + zero, -128, 127)
  return (q - zero) * scale


def run(graph: Graph, constants: dict[int, Any], x: jax.Array,
        dynamic_range: bool = True) -> jax.Array:
  """Evaluates the graph on input `x` (batch first); returns its output.

  `constants` is `graph.constants` (passed separately so it can be a jit
  argument / live on the device). `dynamic_range`: emulate the int8
  activation quantisation of hybrid convolutions (module docstring).
  """
  values: dict[int, Any] = dict(constants)
  values[graph.inputs[0]] = x
  # Shape-like constants (sizes, paddings) are read as numpy, not traced.
  static = graph.constants
  for op in graph.ops:
    ins = [values.get(i) if i >= 0 else None for i in op.inputs]
    o = op.options
    if (dynamic_range and op.kind == "CONV_2D" and
        op.inputs[1] in graph.quantized):
      ins[0] = _quantize_per_pixel(ins[0])
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
      out = _conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, o,
                  op.kind == "DEPTHWISE_CONV_2D")
    elif op.kind == "DEQUANTIZE":
      out = ins[0]  # constants are dequantised when loaded
    elif op.kind == "ADD":
      out = _activation(o)(ins[0] + ins[1])
    elif op.kind == "MUL":
      out = _activation(o)(ins[0] * ins[1])
    elif op.kind == "CONCATENATION":
      axis = o["Axis"]
      out = _activation(o)(jnp.concatenate(ins, axis=axis))
    elif op.kind == "AVERAGE_POOL_2D":
      out = _avg_pool(ins[0], o)
    elif op.kind == "RESIZE_BILINEAR":
      out = _resize(ins[0], static[op.inputs[1]], o)
    elif op.kind == "SPACE_TO_BATCH_ND":
      out = _space_to_batch(ins[0], static[op.inputs[1]],
                            static[op.inputs[2]])
    elif op.kind == "BATCH_TO_SPACE_ND":
      out = _batch_to_space(ins[0], static[op.inputs[1]],
                            static[op.inputs[2]])
    else:  # load() refuses these; kept for safety.
      raise TFLiteError(f"operator {op.kind} is not implemented")
    values[op.outputs[0]] = out
  return values[graph.outputs[0]]
