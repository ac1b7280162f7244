"""Training the VQ first stage (`VQModel`) from scratch.

The loss is taming's `VQLPIPSWithDiscriminator` with the perceptual and
adversarial terms off: L1 reconstruction (+ optional MSE) plus
`codebook_weight` times the quantiser's own loss (legacy weighting, computed
by the model: commitment weight 1, codebook weight beta).

Codebook collapse is handled by dead-code restarts: every code remembers how
many steps ago it was last picked; codes unused for `dead_code_steps` steps
are overwritten with random encoder outputs of the current batch. A fresh
state marks every code as never used, so the first step also acts as a
data-driven codebook initialisation (all codes the first batch does not
pick start on encoder outputs instead of taming's near-zero init).

`make_vq_train_step` returns a pure, un-jitted `step(state, images)`; the
caller wraps it in `jax.jit` (with shardings / donation as it likes).
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.data import check as data_check
from segldm_jax.data import pipeline
from segldm_jax.data import viz
from segldm_jax.data.pixel_range import images_to_model_range
from segldm_jax.data.pixel_range import model_range_to_images
from segldm_jax.models.autoencoder import VQModel
from segldm_jax.models.build import init_params
from segldm_jax.runtime import distributed
from segldm_jax.runtime import sharding
from segldm_jax.training import loop
from segldm_jax.training import metrics as metrics_lib

Params = Any
Metrics = dict[str, jax.Array]
# Age given to codes that were never picked: restarted on the first step.
_NEVER_USED = 2**30


@flax.struct.dataclass
class VQTrainState:
  """Training state; every field is an array, so it shards and checkpoints.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the VQModel parameters.
    opt_state: the optax state.
    code_age: int32 (n_embed,), steps since each code was last picked.
    rng: uint32 raw key data (`jax.random.key_data`) for the restarts.
  """
  step: jax.Array
  params: Params
  opt_state: Any
  code_age: jax.Array
  rng: jax.Array


def create_vq_train_state(model: VQModel, optimizer: optax.GradientTransformation,
                          rng: jax.Array, params: Params | None = None
                          ) -> VQTrainState:
  """Initial state; `rng` (a typed key) seeds init (unless `params` given)."""
  init_key, restart_key = jax.random.split(rng)
  if params is None:
    params = init_params(model, init_key)
  return VQTrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=optimizer.init(params),
      code_age=jnp.full((model.n_embed,), _NEVER_USED, jnp.int32),
      rng=jax.random.key_data(restart_key))


def codebook(params: Params) -> jax.Array:
  """The (n_embed, embed_dim) codebook inside VQModel parameters."""
  return params["quantize"]["embedding"]["embedding"]


def with_codebook(params: Params, book: jax.Array) -> Params:
  """A shallow copy of `params` with the codebook replaced by `book`."""
  params = flax.core.unfreeze(params) if isinstance(
      params, flax.core.FrozenDict) else dict(params)
  params["quantize"] = {"embedding": {"embedding": book}}
  return params


def _forward(module: VQModel, x: jax.Array, train: bool, quantize):
  """`VQModel.__call__` that also returns the pre-quantisation latent;
  decodes `z` itself where `quantize` is False."""
  z = module.encode(x, train)
  quant, qloss, indices = module.quantize(z)
  quant = jnp.where(quantize, quant, z)
  x_rec = module.decoder(module.post_quant_conv(quant), train)
  return x_rec, qloss, indices, z


def _to_model_range(images: jax.Array) -> jax.Array:
  if images.dtype == jnp.uint8:
    return images_to_model_range(images)
  return images.astype(jnp.float32)


def _loss_and_aux(model: VQModel, params: Params, images: jax.Array, *,
                  codebook_weight: float, mse_weight: float,
                  rng: jax.Array | None, quantize=True):
  x = _to_model_range(images)
  train = rng is not None and model.dropout > 0
  rngs = {"dropout": rng} if train else {}
  x_rec, qloss, indices, z = model.apply(
      {"params": params}, x, train, quantize, method=_forward, rngs=rngs)
  x_rec = x_rec.astype(jnp.float32)
  err = x_rec - x
  rec_l1 = jnp.mean(jnp.abs(err))
  rec_mse = jnp.mean(err ** 2)
  qloss = qloss.astype(jnp.float32)
  q_weight = jnp.where(quantize, codebook_weight, 0.0)
  loss = rec_l1 + mse_weight * rec_mse + q_weight * qloss
  # PSNR of the image as it would be saved: clipped to the valid range.
  clipped_mse = jnp.mean((jnp.clip(x_rec, -1.0, 1.0) - x) ** 2)
  counts = jnp.bincount(indices.reshape(-1), length=model.n_embed)
  probs = counts / indices.size
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0))
  metrics = {
      "loss": loss, "rec_l1": rec_l1, "rec_mse": rec_mse, "codebook": qloss,
      # Range [-1, 1] has peak-to-peak 2, hence 4 / mse.
      "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(clipped_mse, 1e-10)),
      "perplexity": jnp.exp(entropy),
      "codes_used": jnp.mean((counts > 0).astype(jnp.float32)),
  }
  return loss, (metrics, counts, z)


def vq_loss(model: VQModel, params: Params, images: jax.Array, *,
            codebook_weight: float = 1.0, mse_weight: float = 0.0,
            rng: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Reconstruction + codebook loss of a batch.

  Args:
    model: the VQModel.
    params: its parameters.
    images: NHWC, float in [-1, 1] or uint8 (converted as taming does).
    codebook_weight: weight of the quantiser loss (taming's default 1.0).
    mse_weight: weight of an extra MSE term (0 = L1 only, as taming).
    rng: dropout key; None runs deterministically.

  Returns:
    (loss, metrics) with scalar metrics `loss`, `rec_l1`, `rec_mse`,
    `codebook`, `psnr` (dB, clipped reconstruction), `perplexity` (of the code
    histogram) and `codes_used` (fraction of the codebook picked in the batch).
  """
  loss, (metrics, _, _) = _loss_and_aux(
      model, params, images, codebook_weight=codebook_weight,
      mse_weight=mse_weight, rng=rng)
  return loss, metrics


def revive_dead_codes(book: jax.Array, dead: jax.Array, z: jax.Array,
                      key: jax.Array) -> jax.Array:
  """Moves the codes marked `dead` onto random encoder outputs.

  Args:
    book: (n_embed, d) codebook.
    dead: bool (n_embed,), the codes to re-seed.
    z: pre-quantisation latents of the batch, (..., d).
    key: typed key; the same key gives the same codebook.

  Returns:
    The new codebook; live codes are unchanged.
  """
  n = book.shape[0]
  candidates = jax.lax.stop_gradient(z).reshape(-1, book.shape[-1])
  m = candidates.shape[0]
  if m >= n:
    # Without replacement, so two revived codes never coincide.
    pick = jax.random.permutation(key, m)[:n]
  else:
    pick = jax.random.randint(key, (n,), 0, m)
  return jnp.where(dead[:, None], candidates[pick].astype(book.dtype), book)


def make_vq_train_step(
    model: VQModel, optimizer: optax.GradientTransformation, *,
    codebook_weight: float = 1.0, mse_weight: float = 0.0,
    restart_dead_codes: bool = True, dead_code_steps: int = 32,
    quantize_warmup_steps: int = 0, use_dropout: bool = False,
) -> Callable[[VQTrainState, jax.Array], tuple[VQTrainState, Metrics]]:
  """Builds `step(state, images) -> (state, metrics)`; NOT jitted.

  The step is a pure function of its arguments (randomness comes from
  `fold_in(state.rng, state.step)`), so wrap it as
  `jax.jit(step, donate_argnums=0)` or with shardings.

  Args:
    model: the VQModel.
    optimizer: any optax transformation (see `vq_optimizer`).
    codebook_weight: weight of the quantiser loss.
    mse_weight: weight of an extra MSE reconstruction term.
    restart_dead_codes: re-seed codes unused for `dead_code_steps` steps
      from random encoder outputs of the batch.
    dead_code_steps: steps without use after which a code is restarted.
    quantize_warmup_steps: for this many first steps the decoder sees the
      continuous latent (no codebook loss) and the whole codebook is
      re-seeded from the batch's latents every step, so quantisation starts
      from a codebook fitted to a latent that already uses all its
      dimensions. Without it, a thin direction of the initial latent can be
      quantised away for good (in 3-d latents: a lost colour axis).
    use_dropout: apply the model's dropout (if any) during training.

  Returns:
    The step. Metrics are those of `vq_loss` for the batch (before the
    update; PSNR is of the unquantised reconstruction during the warmup)
    plus `restarted`, the number of codes re-seeded.
  """
  if dead_code_steps < 1:
    raise ValueError(f"dead_code_steps must be >= 1, got {dead_code_steps}")
  if quantize_warmup_steps < 0:
    raise ValueError("quantize_warmup_steps must be >= 0, got "
                     f"{quantize_warmup_steps}")

  def step(state: VQTrainState, images: jax.Array
           ) -> tuple[VQTrainState, Metrics]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    restart_key, dropout_key = jax.random.split(key)
    quantize = state.step >= quantize_warmup_steps
    grad_fn = jax.value_and_grad(_loss_and_aux, argnums=1, has_aux=True)
    (_, (metrics, counts, z)), grads = grad_fn(
        model, state.params, images, codebook_weight=codebook_weight,
        mse_weight=mse_weight, rng=dropout_key if use_dropout else None,
        quantize=quantize)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Saturating add: never-used ages stay far from int32 overflow.
    age = jnp.where(counts > 0, 0, jnp.minimum(state.code_age + 1, _NEVER_USED))
    dead = jnp.zeros_like(age, bool)
    if restart_dead_codes:
      dead = age >= dead_code_steps
    if quantize_warmup_steps:
      dead = dead | ~quantize
    if restart_dead_codes or quantize_warmup_steps:
      book = revive_dead_codes(codebook(params), dead, z, restart_key)
      params = with_codebook(params, book)
      age = jnp.where(dead, 0, age)
    metrics = dict(metrics, restarted=jnp.sum(dead.astype(jnp.int32)))
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, code_age=age)
    return new_state, metrics

  return step


def vq_schedule(learning_rate: float, *, decay_steps: int = 0,
                warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup, then constant (`decay_steps=0`) or cosine decay to 5%
  of the peak at `decay_steps` (decaying gains ~1 dB PSNR in short runs)."""
  if decay_steps:
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1),
        learning_rate * 0.05)
  if warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps),
         optax.constant_schedule(learning_rate)], [warmup_steps])
  return optax.constant_schedule(learning_rate)


def vq_optimizer(learning_rate: float | optax.Schedule, *,
                 decay_steps: int = 0, warmup_steps: int = 0,
                 weight_decay: float = 0.0, b1: float = 0.5, b2: float = 0.9,
                 clip_norm: float | None = 1.0
                 ) -> optax.GradientTransformation:
  """AdamW with taming's betas (0.5, 0.9) and global-norm clipping.

  A float `learning_rate` goes through `vq_schedule`. Weight decay (off by
  default) skips the codebook, norms and biases: decay would pull codes
  towards the origin.
  """
  if not callable(learning_rate):
    learning_rate = vq_schedule(learning_rate, decay_steps=decay_steps,
                                warmup_steps=warmup_steps)

  def decay_mask(params):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return flax.traverse_util.unflatten_dict(
        {k: k[-1] == "kernel" for k in flat})

  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2,
                           weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


# --------------------------------------------------------------------------
# The demo's first stage: trained here, then frozen for the LDM.
# --------------------------------------------------------------------------


def train_first_stage(module, config, mesh, source, workdir: pathlib.Path,
                      node: dict):
  """Trains a VQ autoencoder on the run's images and saves it to
  WORKDIR/first_stage. Logged as the LDM's steps are (every
  `train.log_every` steps and the last), as "first_stage/..." records in
  metrics.jsonl (`vq_log_record`) and in TensorBoard's first_stage run."""
  fs = config.first_stage
  lr = vq_schedule(fs.learning_rate, decay_steps=fs.train_steps,
                   warmup_steps=fs.warmup_steps)
  optimizer = vq_optimizer(lr, b1=fs.adam_b1, b2=fs.adam_b2)
  repl = sharding.replicated(mesh)
  state = jax.jit(lambda k: create_vq_train_state(module, optimizer, k),
                  out_shardings=repl)(jax.random.key(config.seed + 1))
  step_fn = loop.jit_train_step(make_vq_train_step(
      module, optimizer, mse_weight=fs.mse_weight,
      quantize_warmup_steps=fs.quantize_warmup_steps), mesh, repl)
  data = iter(pipeline.make_dataset(
      source, image_size=config.data.image_size,
      batch_size=fs.train_batch_size // jax.process_count(),
      seed=config.seed + 1, num_workers=config.data.num_workers,
      bad_records=config.data.get("bad_records", "error")))
  bad_log = data_check.BadRecordLog(source)  # warns on skipped ones
  data = map(bad_log, data)
  crops = _crops(data, fs.train_crop, np.random.default_rng([config.seed, 1]),
                 mesh)
  writer = metrics_lib.MetricWriter(
      workdir, enabled=jax.process_index() == 0, series="first_stage")
  log = loop.ProgressLog(writer, "first stage (VQ)", total=fs.train_steps,
                         initial=0, batch_size=fs.train_batch_size,
                         log_every=config.train.log_every,
                         extra=loop.bad_record_counter(config, bad_log))
  for step in range(1, fs.train_steps + 1):
    images = next(crops)
    if step == 1:
      step_fn = distributed.compile_for_all(step_fn, state, images,
                                            name="vq_step_compiled")
    state, metrics = step_fn(state, images)
    log.advance()
    if log.due(step):  # device_get waits for the step
      record = vq_log_record(jax.device_get(metrics), lr(step - 1))
      log.write(step, record, l1=f"{record['l1']:.4f}",
                psnr=f"{record['psnr']:.1f}")
  log.close()
  params = jax.device_get(state.params)
  out = workdir / workdir_files.FIRST_STAGE_DIR
  store.save_model_dir(out, node, params)
  if jax.process_index() == 0:
    images = next(data)["image"][:8]
    rec, _, _ = module.apply({"params": params}, images_to_model_range(images))
    rec = np.asarray(model_range_to_images(rec))
    viz.save_png(viz.grid([images, rec]), out / "reconstructions.png")
  return params


def _crops(batches, crop: int, rng: np.random.Generator, mesh):
  """Global image batches, each cut to one random `crop`-square window
  (the same in every process: `rng` is), or whole (crop 0)."""
  for batch in batches:
    local = batch["image"]
    if crop:
      y, x = rng.integers(0, np.array(local.shape[1:3]) - crop + 1)
      local = local[:, y:y + crop, x:x + crop]
    yield sharding.global_batch({"image": local}, mesh)["image"]


def vq_log_record(metrics: Metrics, lr: float) -> dict[str, float | int]:
  """The scalars logged for a VQ step, from the step's (host) metrics (the
  loop adds images_per_sec and, in skip mode, bad_records)."""
  return {"loss": float(metrics["loss"]), "l1": float(metrics["rec_l1"]),
          "mse": float(metrics["rec_mse"]),
          "codebook_loss": float(metrics["codebook"]),
          "psnr": float(metrics["psnr"]),
          "perplexity": float(metrics["perplexity"]),
          "codes_used": float(metrics["codes_used"]),
          "codes_restarted": int(metrics["restarted"]), "lr": float(lr)}
