"""Checks a run config before anything is built, and saves/loads it.

Every failure is one line that names the key, the value, and the value that
would work. Sizes that follow from others (the LDM's latent `image_size`,
`channels`) are derived rather than checked.
"""

import json
import math
import pathlib
from typing import Any

import ml_collections as mlc

from segldm_jax import checkpoints

_SOURCES = ("folder", "tfds", "synthetic")


class ConfigError(ValueError):
  """A run config is contradictory or incomplete."""


def _p(config) -> Any:
  return config.model.params


def geometry(config: mlc.ConfigDict) -> dict[str, int]:
  """Validates and returns {image, mask, latent, factor} sizes.

  The mask enters at image resolution (data.mask_size defaults to
  data.image_size) and the rescaler's `n_stages` halvings must bring it to the
  latent size; the UNet sees `concat([latent, rescaled mask])`.
  """
  p = _p(config)
  vq = p.first_stage_config.params
  rescaler = p.cond_stage_config.params
  unet = p.unet_config.params
  pre = "model.params."
  factor = 2 ** (len(vq.ddconfig.ch_mult) - 1)
  image = int(config.data.image_size)
  if image % factor:
    raise ConfigError(
        f"data.image_size={image} is not divisible by the first stage's "
        f"downsampling factor {factor}; use {image // factor * factor or factor}")
  latent = image // factor
  mask = int(config.data.get("mask_size") or image)
  stages = int(rescaler.n_stages)
  if mask // 2 ** stages != latent:
    want = math.log2(mask / latent) if mask >= latent else -1
    fix = (f"set {pre}cond_stage_config.params.n_stages={int(want)}"
           if want == int(want) and want >= 0 else
           f"set data.mask_size to {latent * 2 ** stages}")
    hint = (" (masks already at the latent size need no halving; the "
            "reference keeps masks at image resolution with n_stages=2)"
            if mask == latent else "")
    raise ConfigError(
        f"the rescaler turns {mask}x{mask} masks into "
        f"{mask // 2 ** stages}x{mask // 2 ** stages} "
        f"({pre}cond_stage_config.params.n_stages={stages}) but the latent is "
        f"{latent}x{latent} (data.image_size={image} / factor {factor}); "
        f"{fix}{hint}")
  if int(rescaler.in_channels) != int(config.data.num_classes):
    raise ConfigError(
        f"{pre}cond_stage_config.params.in_channels={rescaler.in_channels} but "
        f"data.num_classes={config.data.num_classes}; they must be equal")
  cond_ch = rescaler.get("out_channels") or rescaler.in_channels
  want_in = int(vq.embed_dim) + int(cond_ch)
  if int(unet.in_channels) != want_in:
    raise ConfigError(
        f"{pre}unet_config.params.in_channels={unet.in_channels} but the UNet "
        f"sees latent ({vq.embed_dim}) + conditioning ({cond_ch}) channels; "
        f"use {want_in}")
  if int(unet.out_channels) != int(vq.embed_dim):
    raise ConfigError(
        f"{pre}unet_config.params.out_channels={unet.out_channels} but the "
        f"latent has {vq.embed_dim} channels; use {vq.embed_dim}")
  levels = 2 ** (len(unet.channel_mult) - 1)
  if latent % levels:
    raise ConfigError(
        f"the latent size {latent} is not divisible by {levels} (the UNet "
        f"halves it {len(unet.channel_mult) - 1} times, "
        f"{pre}unet_config.params.channel_mult={list(unet.channel_mult)}); "
        f"use data.image_size={latent // levels * levels * factor or levels * factor}")
  # Derived, not checked: bookkeeping sizes of the LDM config.
  p.image_size = latent
  unet.image_size = latent
  p.channels = int(vq.embed_dim)
  return {"image": image, "mask": mask, "latent": latent, "factor": factor}


def validate(config: mlc.ConfigDict) -> dict[str, int]:
  """All start-up checks that need no devices and no files; -> geometry."""
  if config.data.source not in _SOURCES:
    raise ConfigError(f"data.source={config.data.source!r}; use one of "
                      f"{', '.join(_SOURCES)}")
  if config.data.source == "folder" and not (config.data.image_dir and
                                             config.data.mask_dir):
    raise ConfigError("data.source='folder' needs data.image_dir and "
                      "data.mask_dir (--config.data.image_dir=DIR "
                      "--config.data.mask_dir=DIR), or use "
                      "--config.data.source=synthetic")
  if config.data.source == "tfds" and not config.data.tfds_name:
    raise ConfigError("data.source='tfds' needs data.tfds_name")
  t = config.train
  if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} must be a positive "
                      f"multiple of train.grad_accum={t.grad_accum}")
  if t.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.nonfinite={t.nonfinite!r}; use 'stop' or 'skip'")
  if t.get("lr_schedule", "constant") not in ("constant", "cosine"):
    raise ConfigError(f"train.lr_schedule={t.lr_schedule!r}; use 'constant' "
                      "or 'cosine'")
  if t.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"train.compute_dtype={t.compute_dtype!r}; use "
                      "'float32' or 'bfloat16'")
  if not config.first_stage.checkpoint and not (
      config.first_stage.allow_random_init or config.first_stage.train_steps):
    raise ConfigError(
        "first_stage.checkpoint is empty: convert the pretrained VQ with "
        "`python convert_torch_ckpt.py vq-f4/model.ckpt --config "
        "vq-f4/config.yaml --out checkpoints/vq-f4` and pass "
        "--config.first_stage.checkpoint=checkpoints/vq-f4")
  return geometry(config)


def check_batch_fits_mesh(config: mlc.ConfigDict, batch_devices: int,
                          processes: int) -> None:
  micro = config.train.batch_size // config.train.grad_accum
  if micro % batch_devices:
    fix = batch_devices * config.train.grad_accum
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} (micro-batch {micro}) "
        f"does not split over the mesh's {batch_devices} batch devices "
        f"(mesh={list(map(tuple, config.mesh))}); use a multiple of {fix}")
  if config.train.batch_size % processes:
    raise ConfigError(f"train.batch_size={config.train.batch_size} does not "
                      f"split over {processes} processes")


def save(config: mlc.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(workdir) / checkpoints.CONFIG_FILE
  path.write_text(config.to_json_best_effort(indent=2) + "\n")
  return path


def load(workdir: str | pathlib.Path) -> mlc.ConfigDict:
  path = pathlib.Path(workdir) / checkpoints.CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"{path} not found: is {workdir} a workdir made by "
                      "train.py or convert_torch_ckpt.py?")
  return mlc.ConfigDict(json.loads(path.read_text()))
