"""The frozen first stage a run already has: found, checked and loaded.

Order of preference: `first_stage.checkpoint` (a model directory, e.g. a
converted vq-f4; relative paths may be relative to the workdir), then a
first stage this workdir trained before. A run that has neither trains one
or starts from random weights: `training.first_stage_setup.prepare`.
"""

import pathlib

from absl import logging

from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import run_config
from segldm_jax.models import build


def _resolve(path: str, workdir: pathlib.Path) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_absolute() and not p.exists() and (workdir / p).exists():
    return workdir / p
  return p


def load_existing(config, workdir: pathlib.Path, **build_kw):
  """The configured or previously trained first stage, or None.

  `build_kw` (e.g. conv) goes to the model builder."""
  own = workdir / workdir_files.FIRST_STAGE_DIR
  checkpoint = config.get("first_stage", {}).get("checkpoint")
  if checkpoint:
    path = _resolve(checkpoint, workdir)
    logging.info("first stage: %s", path)
    return store.load_model_dir(path, **build_kw)
  if (own / workdir_files.MODEL_FILE).is_file():
    logging.info("first stage: trained earlier in this workdir (%s)", own)
    return store.load_model_dir(own, **build_kw)
  return None


def check(config, workdir: pathlib.Path) -> None:
  """Start-up check of the first stage `load_existing` would load: it is a
  model directory, its weights match its model.yaml, it is a VQ, and its
  latents fit the LDM config. Reads metadata only.

  Raises:
    errors.ConfigError: one line naming the first stage and the problem.
  """
  checkpoint = config.get("first_stage", {}).get("checkpoint")
  own = workdir / workdir_files.FIRST_STAGE_DIR
  if checkpoint:
    path = _resolve(checkpoint, workdir)
    what = f"first_stage.checkpoint={checkpoint}"
  elif (own / workdir_files.MODEL_FILE).is_file():
    path, what = own, f"the first stage trained earlier in {own}"
  else:
    return
  try:
    node = store.check_model_dir(path)
  except (OSError, ValueError) as e:  # not found, mismatch, bad model.yaml
    raise errors.ConfigError(f"{what}: {e}") from None
  if node.get("target") not in build.VQ_TARGETS:
    raise errors.ConfigError(
        f"{what} holds a {node.get('target')}, not a VQ first stage; "
        "convert the VQ (e.g. vq-f4/model.ckpt) and pass its directory")
  trial = config.copy_and_resolve_references()
  with trial.unlocked():
    trial.model.params.first_stage_config = node
  try:
    run_config.geometry(trial)
  except errors.ConfigError as e:
    raise errors.ConfigError(f"with {what}: {e}") from None
