"""Preview pictures a run writes while it trains: fixed masks, sampled.

The same few masks every time (centre crops of the first records), so that
grids from successive steps can be compared side by side.
"""

import functools
import pathlib

import jax
import numpy as np

from segldm_jax.data import palette
from segldm_jax.data import pipeline
from segldm_jax.data import viz
from segldm_jax.inference import generation
from segldm_jax.runtime import distributed
from segldm_jax.runtime import sharding


def preview_labels(source, config, image_size: int) -> np.ndarray:
  """The same few masks every time (centre crops of the first records)."""
  n = int(config.sample.num_masks)
  ds = pipeline.make_dataset(source, image_size=image_size,
                             batch_size=n, seed=config.seed, train=False,
                             shard_index=0, shard_count=1, drop_remainder=False,
                             bad_records=config.data.get("bad_records",
                                                         "error"))
  return next(iter(ds))["labels"]


class PreviewSampler:
  """Samples the run's fixed preview masks with the EMA UNet and writes
  `samples/step_STEP.png` (masks above samples) and a TensorBoard image.

  The sampler is compiled once, on first use, by every process together.
  """

  def __init__(self, ldm, config, labels: np.ndarray, first_stage_params,
               mesh, workdir: pathlib.Path, writer, mask_stages: int,
               key: jax.Array):
    self._generate = jax.jit(functools.partial(
        generation.generate, ldm, sampler=config.sample.sampler,
        steps=config.sample.steps, eta=config.sample.eta,
        mask_stages=mask_stages,
        guidance_scale=float(config.sample.get("guidance_scale", 1.0))))
    self._labels = labels
    self._labels_dev = jax.device_put(labels, sharding.replicated(mesh))
    self._fs_params = first_stage_params
    self._colours = palette.for_data(config.data)
    self._workdir, self._writer, self._key = workdir, writer, key

  def __call__(self, step: int, state) -> None:
    params = {"unet": state.ema["unet"], "cond_stage": state.params["cond_stage"]}
    args = (params, self._fs_params, self._labels_dev, self._key)
    if not isinstance(self._generate, jax.stages.Compiled):
      self._generate = distributed.compile_for_all(
          self._generate, *args, name=f"sampler_compiled_{step}")
    images = np.asarray(self._generate(*args))
    if jax.process_index() == 0:
      grid = write_grid(self._labels, images, self._colours,
                        self._workdir / "samples" / f"step_{step:07d}.png")
      self._writer.write_images(step, {"samples": grid})


def write_grid(labels: np.ndarray, images: np.ndarray, colours: np.ndarray,
               path: pathlib.Path) -> np.ndarray:
  """Saves masks above their samples as one PNG; -> the grid."""
  grid = viz.mask_sample_grid(labels, images, colours)
  viz.save_png(grid, path)
  return grid
