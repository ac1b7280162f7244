"""A trained or converted model loaded from its workdir, ready to sample.

`sample.py`, the benchmarks and Python users start here: the saved config,
the networks it builds, the newest weights (EMA UNet by default) and the
frozen first stage, with the sizes that samples must respect.
"""

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.config import run_config
from segldm_jax.diffusion import samplers
from segldm_jax.inference import first_stage
from segldm_jax.inference import generation
from segldm_jax.inference import region_edit
from segldm_jax.models import build
from segldm_jax.models.ldm import LatentDiffusion


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """`segldm_jax.load(...)`: sample masks, edit photos, read the config."""
  workdir: pathlib.Path
  config: mlc.ConfigDict
  ldm: LatentDiffusion
  params: dict[str, Any]    # {"unet" (EMA when asked and saved), "cond_stage"}
  first_stage_params: Any
  step: int
  geometry: run_config.Geometry
  has_dataset: bool         # False for a converted checkpoint's workdir

  @property
  def num_classes(self) -> int:
    return int(self.ldm.cond_stage.in_channels)

  def sample_options(self, *, sampler: str | None = None,
                     steps: int | None = None, eta: float | None = None,
                     guidance_scale: float | None = None) -> dict[str, Any]:
    """Keyword arguments of `generation.generate`: the given values, else the
    run's `sample` config, else the reference's defaults (DDIM 50, eta 0).
    Steps the sampler cannot run here are an InputError naming those it
    can (`samplers.check_steps`)."""
    cfg = self.config.get("sample", {})
    pick = lambda given, key, default: (  # noqa: E731
        given if given is not None else cfg.get(key, default))
    options = dict(sampler=pick(sampler, "sampler", "ddim"),
                   steps=int(steps or cfg.get("steps", 50)),
                   eta=float(pick(eta, "eta", 0.0)),
                   mask_stages=self.geometry.mask_stages,
                   guidance_scale=float(pick(guidance_scale, "guidance_scale",
                                             1.0)))
    try:
      samplers.check_steps(options["sampler"], options["steps"],
                           self.num_timesteps)
    except ValueError as e:
      raise errors.InputError(str(e)) from None
    return options

  @property
  def num_timesteps(self) -> int:
    return int(self.ldm.settings["timesteps"])

  def check_size(self, labels: np.ndarray) -> None:
    step = self.geometry.step_px
    h, w = labels.shape[-2:]
    if h % step or w % step:
      raise errors.InputError(
          f"label maps are {h}x{w}; sides must be multiples of {step} (the "
          "first stage's factor x the UNet's and the mask's halvings)")

  def sample(self, masks, *, num_samples: int = 1, seed: int = 0,
             batch_size: int = 8, progress=None, **options) -> np.ndarray:
    """Label maps (N, H, W) or (H, W) of class ids (255 = "don't care")
    -> uint8 images (N, num_samples, H, W, 3). `options`: sampler, steps,
    eta, guidance_scale (else the run's `sample` config); `progress(done,
    total)` is told each finished batch."""
    labels = np.asarray(masks, np.uint8)
    labels = labels[None] if labels.ndim == 2 else labels
    self.check_size(labels)
    generate_fn = functools.partial(generation.generate,
                                    **self.sample_options(**options))
    return generation.sample_in_batches(
        generate_fn, self.ldm, self.params, self.first_stage_params, labels,
        num_samples, batch_size, jax.random.key(seed), progress=progress)

  def edit(self, photo, labels, new_labels, *, num_samples: int = 1,
           margin: int | None = None, seed: int = 0, progress=None,
           **options) -> np.ndarray:
    """Regenerates the region whose labels changed (grown by `margin`
    pixels, default 2 x the first stage's factor) and keeps the rest of the
    photo exactly -> uint8 (num_samples, H, W, 3)."""
    labels, new_labels = (np.asarray(m, np.uint8) for m in (labels, new_labels))
    self.check_size(labels)
    results, _, _ = region_edit.regenerate_changed_pixels(
        self, np.asarray(photo, np.uint8), labels, new_labels,
        margin=margin or 2 * self.ldm.downsample_factor,
        num_samples=num_samples, options=self.sample_options(**options),
        key=jax.random.key(seed), progress=progress)
    return results


def load(workdir: str | pathlib.Path, use_ema: bool = True,
         conv: str = "xla") -> TrainedModel:
  """`conv`: how 3x3 convolutions run (layers.CONV_IMPLS; the scripts pass
  xla_cpu.preferred_conv()). Raises errors.UserError (one line) for a
  workdir that is not one."""
  workdir = pathlib.Path(workdir).absolute()
  config = run_config.load(workdir)
  ldm = build.build_model(config.model, conv=conv)
  has_dataset = "data" in config
  if not has_dataset:  # a converted checkpoint: the sizes its model implies
    config.data = {"num_classes": int(ldm.cond_stage.in_channels),
                   "image_size": (int(config.model.params.image_size)
                                  * ldm.downsample_factor)}
  geometry = run_config.geometry(config)
  params, step = store.restore_params(workdir, ldm, use_ema=use_ema)
  found = first_stage.load_existing(config, workdir, conv=conv)
  if found is None:
    raise errors.CheckpointNotFoundError(
        f"{workdir} has no first stage (first_stage/ or "
        "first_stage.checkpoint in config.json)")
  return TrainedModel(workdir=workdir, config=config, ldm=ldm, params=params,
                      first_stage_params=found[1], step=step,
                      geometry=geometry, has_dataset=has_dataset)
