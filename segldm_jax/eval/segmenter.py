"""ADE20K segmenter (DeepLabV3 + MobileNetV2, TFLite) for mIoU.

The file `assets/deeplabv3_mobilenetv2_ade20k.tflite` ships with the project
(provenance in `assets/ade20k_segmenter.md`). Two backends run it:

  litert  (default) the LiteRT runtime (`ai-edge-litert`, one thread), which
          produced the reference labels: its XNNPACK hybrid kernels quantise
          activations on the fly, and only the runtime itself reproduces
          that arithmetic. Exact: every pixel of the reference fixture, on
          one CPU core (batch 1 per invoke).
  jax     `tflite_graph` replays the graph with jax.lax, jitted, so it runs
          on the accelerator beside the sampler. It emulates the hybrid
          kernels' quantisation but not their exact rounding: 99.6% of the
          reference's pixels, and slower than LiteRT on CPU (both in
          BENCHMARKS.md).

Protocol (the reference's): the image resized to 513x513 with PIL bilinear,
x / 127.5 - 1, argmax of the 151 logits (0 = "other", k = ADE20K class k,
the ids of ADE20K annotation PNGs). Labels go back to the image's size by
nearest-neighbour resampling, so they compare with the mask pixel for pixel.

Other label sets (COCO-Stuff, Cityscapes): pass your own `images -> labels`
callable wherever a segmenter is taken (`evaluate.py` / `eval.run`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import pathlib

import numpy as np
from PIL import Image

from segldm_jax.data import masks as masks_lib
from segldm_jax.errors import ConfigError
from segldm_jax.errors import InputError
from segldm_jax.errors import MissingPackageError
from segldm_jax.eval import weights

ASSETS = pathlib.Path(__file__).parent / "assets"
MODEL_FILE = ASSETS / "deeplabv3_mobilenetv2_ade20k.tflite"
MODEL_SHA256 = (
    "9476784566f88bf0bdc3169f0012fb7d08857b325811d8c1aaf5ada1c0d4e4f9")
INPUT_SIZE = 513
NUM_CLASSES = 151  # 0 = other + the 150 ADE20K classes
BACKENDS = ("litert", "jax")
LITERT_PIN = "ai-edge-litert>=2.3,<3"  # as in requirements.txt


def class_names() -> list[str]:
  lines = (ASSETS / "labels.txt").read_text().splitlines()
  # "index<TAB>name" (the first line uses spaces).
  return [line.split(None, 1)[1] for line in lines if line.strip()]


def _check_model_file() -> None:
  digest = weights.sha256(MODEL_FILE)
  if digest != MODEL_SHA256:
    raise InputError(
        f"{MODEL_FILE}: sha256 {digest}, expected {MODEL_SHA256} (the "
        "shipped file was changed; reinstall segldm-jax)")


class ADE20KSegmenter:
  """`segmenter(images_uint8) -> labels_uint8` at the images' size.

  Subclasses say how a batch of 513x513 images becomes labels; `about`
  describes the backend for eval.json's protocol.
  """

  backend = ""

  def labels_513(self, images_513: np.ndarray) -> np.ndarray:
    """uint8 (N, 513, 513, 3), already resized -> uint8 (N, 513, 513)."""
    raise NotImplementedError

  def about(self) -> dict:
    return {"name": "ADE20K DeepLabV3+MobileNetV2 (TFLite)",
            "backend": self.backend, "sha256": MODEL_SHA256}

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    h, w = images.shape[1:3]
    resized = np.stack([
        im if im.shape[:2] == (INPUT_SIZE, INPUT_SIZE) else np.asarray(
            Image.fromarray(im).resize((INPUT_SIZE, INPUT_SIZE),
                                       Image.BILINEAR))
        for im in images])
    return np.stack([masks_lib.resize_labels(labels, h, w)
                     for labels in self.labels_513(resized)])


class LiteRTSegmenter(ADE20KSegmenter):
  """The LiteRT runtime, one thread, one interpreter reused (batch 1)."""

  backend = "litert"

  def __init__(self):
    try:
      from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise MissingPackageError(
          "the ADE20K segmenter's runtime (ai-edge-litert) is not installed; "
          f"run: pip install '{LITERT_PIN}' (or use the JAX port: "
          "--segmenter_backend jax)") from None
    _check_model_file()
    # One thread: the reference's setting (XNNPACK's results do not depend
    # on it, but its speed figure and the fixture were made so).
    self._interp = interpreter.Interpreter(model_path=str(MODEL_FILE),
                                           num_threads=1)
    self._interp.allocate_tensors()
    self._input = self._interp.get_input_details()[0]["index"]
    self._output = self._interp.get_output_details()[0]["index"]
    self.version = importlib.metadata.version("ai-edge-litert")

  def about(self) -> dict:
    return {**super().about(), "runtime": f"ai-edge-litert {self.version}"}

  def labels_513(self, images_513: np.ndarray) -> np.ndarray:
    out = np.empty(images_513.shape[:3], np.uint8)
    for i, im in enumerate(images_513):
      x = im[None].astype(np.float32) / np.float32(127.5) - np.float32(1)
      self._interp.set_tensor(self._input, x)
      self._interp.invoke()
      out[i] = self._interp.get_tensor(self._output)[0].argmax(-1)
    return out


class JaxSegmenter(ADE20KSegmenter):
  """The graph replayed in JAX (tflite_graph), jitted on the default
  device; `batch_size` images per call."""

  backend = "jax"

  def __init__(self, batch_size: int = 1, dynamic_range: bool = True):
    # pylint: disable=g-import-not-at-top  (jax only for this backend)
    import jax
    import jax.numpy as jnp
    from segldm_jax.eval import tflite_graph
    _check_model_file()
    graph = tflite_graph.load(MODEL_FILE)
    self.constants = jax.device_put(graph.constants)
    self.batch_size = batch_size

    def labels(consts, images):
      x = images.astype(jnp.float32) / 127.5 - 1.0
      logits = tflite_graph.run(graph, consts, x, dynamic_range)
      return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    self._labels = jax.jit(labels)

  def labels_513(self, images_513: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images_513), self.batch_size):
      out.append(np.asarray(self._labels(
          self.constants, images_513[start:start + self.batch_size])))
    return np.concatenate(out)


def check_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ConfigError(f"segmenter backend {backend!r} (eval.segmenter_backend"
                      f" / --segmenter_backend): use one of "
                      f"{', '.join(BACKENDS)}")
  return backend


def load(backend: str = "litert", batch_size: int = 1) -> ADE20KSegmenter:
  """The ADE20K segmenter on `backend` ("litert" or "jax"; batch_size is the
  JAX port's, LiteRT runs one image per invoke). Built once per setting."""
  check_backend(backend)
  return _load(backend, batch_size if backend == "jax" else 1)


@functools.lru_cache(maxsize=2)
def _load(backend: str, batch_size: int) -> ADE20KSegmenter:
  return LiteRTSegmenter() if backend == "litert" else JaxSegmenter(batch_size)
