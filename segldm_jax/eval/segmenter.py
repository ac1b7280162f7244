"""ADE20K segmenter (DeepLabV3 + MobileNetV2, TFLite) run in JAX, for mIoU.

The file `assets/deeplabv3_mobilenetv2_ade20k.tflite` ships with the project
(provenance in `assets/ade20k_segmenter.md`); `tflite_graph` replays it with
jax.lax, so it runs jitted on CPU/GPU/TPU with the rest of the evaluation.

Protocol (the reference's): the image resized to 513x513 with PIL bilinear,
x / 127.5 - 1, argmax of the 151 logits (0 = "other", k = ADE20K class k,
the ids of ADE20K annotation PNGs). Labels go back to the image's size by
nearest-neighbour resampling, so they compare with the mask pixel for pixel.

Other label sets (COCO-Stuff, Cityscapes): pass your own `images -> labels`
callable wherever a segmenter is taken (`evaluate.py` / `eval.run`).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from segldm_jax.eval import tflite_graph

ASSETS = pathlib.Path(__file__).parent / "assets"
MODEL_FILE = ASSETS / "deeplabv3_mobilenetv2_ade20k.tflite"
MODEL_SHA256 = (
    "9476784566f88bf0bdc3169f0012fb7d08857b325811d8c1aaf5ada1c0d4e4f9")
INPUT_SIZE = 513
NUM_CLASSES = 151  # 0 = other + the 150 ADE20K classes


def class_names() -> list[str]:
  lines = (ASSETS / "labels.txt").read_text().splitlines()
  # "index<TAB>name" (the first line uses spaces).
  return [line.split(None, 1)[1] for line in lines if line.strip()]


class ADE20KSegmenter:
  """`segmenter(images_uint8) -> labels_uint8` at the images' size."""

  def __init__(self, batch_size: int = 1, dynamic_range: bool = True):
    self.graph = tflite_graph.load(MODEL_FILE)
    self.constants = jax.device_put(self.graph.constants)
    self.batch_size = batch_size
    graph = self.graph

    def labels(consts, images):
      x = images.astype(jnp.float32) / 127.5 - 1.0
      logits = tflite_graph.run(graph, consts, x, dynamic_range)
      return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    self._labels = jax.jit(labels)

  def labels_513(self, images_513: np.ndarray) -> np.ndarray:
    """uint8 (N, 513, 513, 3), already resized -> uint8 (N, 513, 513)."""
    out = []
    for start in range(0, len(images_513), self.batch_size):
      out.append(np.asarray(self._labels(
          self.constants, jnp.asarray(images_513[start:start +
                                                 self.batch_size]))))
    return np.concatenate(out)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    h, w = images.shape[1:3]
    resized = np.stack([
        im if im.shape[:2] == (INPUT_SIZE, INPUT_SIZE) else np.asarray(
            Image.fromarray(im).resize((INPUT_SIZE, INPUT_SIZE),
                                       Image.BILINEAR))
        for im in images])
    return resize_labels(self.labels_513(resized), h, w)


def resize_labels(labels: np.ndarray, h: int, w: int) -> np.ndarray:
  """uint8 (N, H', W') -> (N, h, w), nearest neighbour (PIL)."""
  if labels.shape[1:] == (h, w):
    return labels
  return np.stack([
      np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
      for lab in labels])


@functools.lru_cache(maxsize=1)
def load(batch_size: int = 1) -> ADE20KSegmenter:
  return ADE20KSegmenter(batch_size)
