"""Checks a run config before anything is built, and saves/loads it.

Every failure is one line (`errors.ConfigError`) that names the key, the
value, and the value that would work. `geometry` and `validate` only read
the config; `resolve` is the one place that writes the sizes that follow
from others (the LDM's latent `image_size`, `channels`) into it.
"""

import dataclasses
import json
import math
import pathlib
import shlex
from typing import Any

import ml_collections as mlc

from segldm_jax import formatting
from segldm_jax.checkpoint import workdir_files
from segldm_jax.errors import ConfigError

_SOURCES = ("folder", "tfds", "synthetic")
_REMAT = ("none", "block", "dots_saveable")  # unet.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Sizes in pixels that the config's parts must agree on."""
  image: int        # data.image_size: the training images' side
  mask: int         # the masks' side as the dataset delivers them
  latent: int       # image / factor: the UNet's input side
  factor: int       # the first stage's downsampling factor (4 for VQ-f4)
  mask_stages: int  # extra 2x2 averages for masks below image size
  unet_levels: int  # the UNet's halvings

  @property
  def step_px(self) -> int:
    """Sample sides must be multiples of this (first stage x UNet x mask)."""
    return self.factor * 2 ** (self.mask_stages + self.unet_levels)


def geometry(config: mlc.ConfigDict) -> Geometry:
  """The run's sizes, after checking that they agree (reads only).

  The mask enters at image resolution (data.mask_size defaults to
  data.image_size) and the rescaler's `n_stages` halvings must bring it to the
  latent size; the UNet sees `concat([latent, rescaled mask])`.
  """
  p = config.model.params
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
        f"data.num_classes={config.data.num_classes}; they must be equal: set "
        f"--config.{pre}cond_stage_config.params.in_channels="
        f"{config.data.num_classes}")
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
  return Geometry(image=image, mask=mask, latent=latent, factor=factor,
                  mask_stages=int(math.log2(image // mask)),
                  unet_levels=len(unet.channel_mult) - 1)


def resolve(config: mlc.ConfigDict) -> Geometry:
  """Validates, then writes the derived bookkeeping sizes of the LDM config
  (latent `image_size`, `channels`), as the reference's YAML holds them."""
  g = validate(config)
  p = config.model.params
  with config.unlocked():
    p.image_size = g.latent
    p.unet_config.params.image_size = g.latent
    p.channels = int(p.first_stage_config.params.embed_dim)
  return g


def validate(config: mlc.ConfigDict) -> Geometry:
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
  if config.data.source == "folder":
    from segldm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.folder_dirs(config.data)  # a named dataset needs data.root
  if config.data.source == "tfds" and not config.data.tfds_name:
    raise ConfigError("data.source='tfds' needs data.tfds_name")
  t = config.train
  if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} must be a positive "
                      f"multiple of train.grad_accum={t.grad_accum}")
  if t.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.nonfinite={t.nonfinite!r}; use 'stop' or 'skip'")
  if not 0.0 <= float(t.get("region_drop_prob", 0.0)) <= 1.0:
    raise ConfigError(f"train.region_drop_prob={t.region_drop_prob} must be "
                      "in [0, 1]: e.g. 0.25 to teach partial masks, 0 = off")
  if not 0.0 <= float(t.get("cond_drop_prob", 0.0)) < 1.0:
    raise ConfigError(f"train.cond_drop_prob={t.cond_drop_prob} must be in "
                      "[0, 1): 0.1 for classifier-free guidance, 0 = reference")
  if t.get("lr_schedule", "constant") not in ("constant", "cosine"):
    raise ConfigError(f"train.lr_schedule={t.lr_schedule!r}; use 'constant' "
                      "or 'cosine'")
  if t.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"train.compute_dtype={t.compute_dtype!r}; use "
                      "'float32' or 'bfloat16'")
  if t.get("eval_every") and config.get("eval", {}).get("num_images", 1) < 2:
    raise ConfigError("train.eval_every needs eval.num_images >= 2 (FID "
                      "needs a covariance); e.g. --config.eval.num_images=64")
  chunks = int(t.get("encode_chunks", 1))
  if chunks < 1 or t.batch_size % chunks:
    raise ConfigError(f"train.encode_chunks={chunks} must be a positive "
                      f"divisor of train.batch_size={t.batch_size}")
  remat = t.get("remat", "none")
  if remat not in _REMAT:
    raise ConfigError(f"train.remat={remat!r}; use one of {', '.join(_REMAT)} "
                      "(block: least memory, none: fastest)")
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


def check_mesh(config: mlc.ConfigDict, processes: int) -> None:
  """The mesh fits the devices and the batch splits over it (at start-up,
  before any work that would be lost)."""
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  try:
    mesh = sharding.make_mesh(config.mesh)
  except (TypeError, ValueError) as e:  # make_mesh names the fix
    raise ConfigError(f"{e} (--config.mesh)") from None
  batch_devices = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
  check_batch_fits_mesh(config, batch_devices, processes)


# Settings a resumed run must share with the run that wrote the workdir:
# they shape the saved tensors, or the meaning of what was learned. Keys
# missing on either side (a converted workdir has no `data`) are skipped.
_RESUME_KEYS = ("data.num_classes", "data.image_size", "data.mask_size",
                "model.params.timesteps", "model.params.linear_start",
                "model.params.linear_end", "model.params.conditioning_key",
                "model.params.parameterization")
_RESUME_SUBTREES = ("model.params.cond_stage_config.params",
                    "model.params.unet_config.params")
_DERIVED = ("model.params.unet_config.params.image_size",)
# Keys that validate() requires equal: a fix for one must name both.
_TIED = {f"{_RESUME_SUBTREES[0]}.in_channels": "data.num_classes",
         "data.num_classes": f"{_RESUME_SUBTREES[0]}.in_channels"}
MISSING = object()


def get_key(tree: Any, dotted: str) -> Any:
  """config['a']['b'] for 'a.b', or MISSING."""
  for part in dotted.split("."):
    if not hasattr(tree, "keys") or part not in tree.keys():
      return MISSING
    tree = tree[part]
  return tree


def _leaves(tree: Any, prefix: str) -> list[str]:
  """Dotted paths of `tree`'s non-mapping values (lists are values)."""
  if not hasattr(tree, "keys"):
    return [prefix]
  return [leaf for k in tree.keys()
          for leaf in _leaves(tree[k], f"{prefix}.{k}")]


def cli_value(value: Any) -> str:
  """How to write `value` after `--config.key=` in a shell."""
  return shlex.quote(value if isinstance(value, str) else repr(value))


def resume_differences(config: mlc.ConfigDict, saved: Any
                       ) -> list[tuple[str, Any, Any]]:
  """-> [(key, saved value, this run's value)] over the settings a resumed
  run must keep (`_RESUME_KEYS`, every key under `_RESUME_SUBTREES`)."""
  keys = list(_RESUME_KEYS)
  for subtree in _RESUME_SUBTREES:
    node = get_key(saved, subtree)
    if node is not MISSING:
      keys += [k for k in _leaves(node, subtree) if k not in _DERIVED]
  diffs = []
  for key in keys:
    old, new = get_key(saved, key), get_key(config, key)
    if old is MISSING or new is MISSING:
      continue
    old, new = formatting.plain(old), formatting.plain(new)
    if old != new:
      diffs.append((key, old, new))
  return diffs


def check_resume(config: mlc.ConfigDict, workdir: pathlib.Path,
                 step: int) -> None:
  """A run resuming `workdir` at `step` keeps the model and data settings
  of the run that wrote it (its config.json); otherwise one line naming the
  first differing key, both values and the overrides that would work."""
  try:
    saved = json.loads((workdir / workdir_files.CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return  # Nothing to compare: the tensors are still checked on restore.
  diffs = resume_differences(config, saved)
  if not diffs:
    return
  key, old, new = diffs[0]
  fix = {k: v for k, v, _ in diffs}
  for k, v, _ in diffs:
    tied = _TIED.get(k)
    if tied and tied not in fix and get_key(config, tied) not in (MISSING, v):
      fix[tied] = v  # e.g. a converted workdir's config.json has no `data`
  fixes = " ".join(f"--config.{k}={cli_value(v)}"
                   for k, v in list(fix.items())[:6])
  more = f" (and {len(fix) - 6} more)" if len(fix) > 6 else ""
  raise ConfigError(
      f"workdir {workdir} ({workdir_files.CHECKPOINTS_DIR}/{step}) was trained "
      f"with {key}={old!r}; this config has {new!r}: pass {fixes}{more} or "
      "use a new --workdir")


def save(config: mlc.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(workdir) / workdir_files.CONFIG_FILE
  path.write_text(config.to_json_best_effort(indent=2) + "\n")
  return path


def load(workdir: str | pathlib.Path) -> mlc.ConfigDict:
  path = pathlib.Path(workdir) / workdir_files.CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"{path} not found: is {workdir} a workdir made by "
                      "train.py or convert_torch_ckpt.py?")
  return mlc.ConfigDict(json.loads(path.read_text()))
