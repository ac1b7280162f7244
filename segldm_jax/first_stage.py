"""The frozen first stage of a run: loaded, trained here (demo), or random.

Order of preference: `first_stage.checkpoint` (a model directory, e.g. a
converted vq-f4; relative paths may be relative to the workdir), then a
first stage this workdir trained before, then training one now when
`first_stage.train_steps > 0` (the demo), then random weights when
`first_stage.allow_random_init` (smoke tests only).
"""

import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from segldm_jax import autoencoder_training as ae
from segldm_jax import checkpoints
from segldm_jax import parallel
from segldm_jax import run_config
from segldm_jax import viz
from segldm_jax.data import check as data_check
from segldm_jax.data import pipeline
from segldm_jax.data.device import images_to_model_range
from segldm_jax.models import build


def _resolve(path: str, workdir: pathlib.Path) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_absolute() and not p.exists() and (workdir / p).exists():
    return workdir / p
  return p


def load_existing(config, workdir: pathlib.Path):
  """The configured or previously trained first stage, or None."""
  own = workdir / checkpoints.FIRST_STAGE_DIR
  checkpoint = config.get("first_stage", {}).get("checkpoint")
  if checkpoint:
    path = _resolve(checkpoint, workdir)
    logging.info("first stage: %s", path)
    return checkpoints.load_model_dir(path)
  if (own / checkpoints.MODEL_FILE).is_file():
    logging.info("first stage: trained earlier in this workdir (%s)", own)
    return checkpoints.load_model_dir(own)
  return None


def check(config, workdir: pathlib.Path) -> None:
  """Start-up check of the first stage `load_existing` would load: it is a
  model directory, its weights match its model.yaml, it is a VQ, and its
  latents fit the LDM config. Reads metadata only.

  Raises:
    run_config.ConfigError: one line naming the first stage and the problem.
  """
  checkpoint = config.get("first_stage", {}).get("checkpoint")
  own = workdir / checkpoints.FIRST_STAGE_DIR
  if checkpoint:
    path = _resolve(checkpoint, workdir)
    what = f"first_stage.checkpoint={checkpoint}"
  elif (own / checkpoints.MODEL_FILE).is_file():
    path, what = own, f"the first stage trained earlier in {own}"
  else:
    return
  try:
    node = checkpoints.check_model_dir(path)
  except (OSError, ValueError) as e:  # not found, mismatch, bad model.yaml
    raise run_config.ConfigError(f"{what}: {e}") from None
  if node.get("target") not in build.VQ_TARGETS:
    raise run_config.ConfigError(
        f"{what} holds a {node.get('target')}, not a VQ first stage; "
        "convert the VQ (e.g. vq-f4/model.ckpt) and pass its directory")
  trial = config.copy_and_resolve_references()
  with trial.unlocked():
    trial.model.params.first_stage_config = node
  try:
    run_config.geometry(trial)
  except run_config.ConfigError as e:
    raise run_config.ConfigError(f"with {what}: {e}") from None


def prepare(config, workdir: pathlib.Path, mesh, source):
  """-> (VQModel, params, LDM-style node of the first stage)."""
  own = workdir / checkpoints.FIRST_STAGE_DIR
  fs = config.first_stage
  found = load_existing(config, workdir)
  if found is not None:
    module, params, node = found
  elif fs.train_steps > 0:
    node = config.model.params.first_stage_config.to_dict()
    module = build.build_model(node)
    params = train(module, config, mesh, source, own, node)
  elif fs.allow_random_init:
    node = config.model.params.first_stage_config.to_dict()
    module = build.build_model(node)
    params = build.init_params(module, jax.random.key(config.seed + 1))
    logging.warning("first stage: RANDOM weights (first_stage.allow_random_init)")
    # Saved, so sample.py and resumed runs see the same weights.
    checkpoints.save_model_dir(own, node, jax.device_get(params))
  else:
    raise SystemExit("first_stage.checkpoint is empty; see configs/seg_f4.py")
  if not isinstance(module, build.VQModel):
    raise SystemExit(f"first stage must be a VQ model, got {node.get('target')}")
  return module, params, node


def train(module, config, mesh, source, out: pathlib.Path, node: dict):
  """Trains a VQ autoencoder on the run's images and saves it to `out`."""
  fs = config.first_stage
  batch = fs.train_batch_size
  optimizer = ae.vq_optimizer(fs.learning_rate, decay_steps=fs.train_steps,
                              warmup_steps=fs.warmup_steps,
                              b1=fs.adam_b1, b2=fs.adam_b2)
  step_fn = ae.make_vq_train_step(
      module, optimizer, mse_weight=fs.mse_weight,
      quantize_warmup_steps=fs.quantize_warmup_steps)
  crop_rng = np.random.default_rng([config.seed, 1])
  repl = parallel.replicated(mesh)
  state = jax.jit(lambda k: ae.create_vq_train_state(module, optimizer, k),
                  out_shardings=repl)(jax.random.key(config.seed + 1))
  step_fn = jax.jit(step_fn, in_shardings=(repl, parallel.batch_sharding(mesh)),
                    out_shardings=(repl, repl), donate_argnums=(0,))
  data = iter(pipeline.make_dataset(
      source, image_size=config.data.image_size,
      batch_size=batch // jax.process_count(), seed=config.seed + 1,
      num_workers=config.data.num_workers,
      bad_records=config.data.get("bad_records", "error")))
  data = map(data_check.BadRecordLog(source), data)  # warns on skipped ones
  bar = tqdm.tqdm(range(fs.train_steps), desc="first stage (VQ)",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  for i in bar:
    local = next(data)["image"]
    if fs.train_crop:  # one window per step, the same in every process
      y, x = crop_rng.integers(0, np.array(local.shape[1:3]) - fs.train_crop + 1)
      local = local[:, y:y + fs.train_crop, x:x + fs.train_crop]
    images = parallel.global_batch({"image": local}, mesh)["image"]
    if i == 0:
      step_fn = parallel.compile_for_all(step_fn, state, images,
                                         name="vq_step_compiled")
    state, m = step_fn(state, images)
    if i % 25 == 0 or i == fs.train_steps - 1:
      m = jax.device_get(m)
      bar.set_postfix(l1=f"{float(m['rec_l1']):.4f}",
                      psnr=f"{float(m['psnr']):.1f}")
  params = jax.device_get(state.params)
  checkpoints.save_model_dir(out, node, params)
  if jax.process_index() == 0:
    images = next(data)["image"][:8]
    rec, _, _ = module.apply({"params": params}, (images / 127.5 - 1.0))
    rec = np.clip(np.round((np.asarray(rec) + 1) * 127.5), 0, 255).astype(np.uint8)
    viz.save_png(viz.grid([images, rec]), out / "reconstructions.png")
  return params


def std_scale_factor(module, params, images: jax.Array, workdir: pathlib.Path,
                     start_step: int) -> float:
  """`scale_by_std` as the reference does it: 1 / std of the first batch's
  pre-quantisation latents, measured once when a run starts and then kept
  (config.json holds it for resumed runs and for sample.py).

  Diffusion's noise schedule assumes latents of unit scale; a VQ's latents
  are whatever its training made them (the demo VQ's: std ~0.77).
  """
  if start_step > 0:
    return float(run_config.load(workdir).model.params.scale_factor)

  @jax.jit
  def latent_std(params, images):
    h = module.apply({"params": params}, images_to_model_range(images),
                     method="encode")
    return jnp.std(h.astype(jnp.float32))

  scale = 1.0 / float(latent_std(params, images))
  logging.info("scale_by_std: latent std %.4f, scale_factor %.4f",
               1.0 / scale, scale)
  return scale


def preview_labels(source, config, geometry) -> np.ndarray:
  """The same few masks every time (centre crops of the first records)."""
  n = int(config.sample.num_masks)
  ds = pipeline.make_dataset(source, image_size=geometry["image"],
                             batch_size=n, seed=config.seed, train=False,
                             shard_index=0, shard_count=1, drop_remainder=False,
                             bad_records=config.data.get("bad_records",
                                                         "error"))
  return next(iter(ds))["labels"]
