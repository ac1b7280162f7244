"""Train state, optimiser, EMA and the LDM train step (pure functions).

The step does what `LatentDiffusion.training_step` does, in two parts:
`make_encoder` encodes the image with the frozen first stage (not
quantised); `make_latent_train_step` conditions on the mask through the
trainable rescaler, noises at a uniform t, predicts, takes the l1/l2 loss,
then runs AdamW on UNet + rescaler and LitEma's warm-up EMA of the UNet
only. `make_train_step` is both as one function. The caller jits them with
shardings (`loop.jit_train_step`, `loop.jit_encoder`); nothing here knows
about devices.
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from segldm_jax.data import pixel_range as data_device
from segldm_jax.data.base import IGNORE_ID
from segldm_jax.diffusion import objective
from segldm_jax.models import build
from segldm_jax.models import unet as unet_lib
from segldm_jax.models.ldm import LatentDiffusion
from segldm_jax.training import trainable

Params = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data stream
  follows from the seed and `step`).

  params: {"unet", "cond_stage"} (trained); ema: {"unet"} (the rescaler has no
  EMA, as in the reference); ema_updates: LitEma's num_updates (warm-up);
  skipped: steps with a non-finite loss or gradient. With nonfinite="skip"
  their update was dropped; with "stop" the run stops at the first one (and
  must not save this state).
  """
  step: jax.Array
  params: Params
  ema: Params
  opt_state: Any
  ema_updates: jax.Array
  skipped: jax.Array


def learning_rate(train_cfg: Mapping[str, Any]) -> float:
  """The reference's `--scale_lr`: base_lr x (images per optimiser update)."""
  lr = float(train_cfg["base_learning_rate"])
  if train_cfg.get("scale_lr", True):
    lr *= int(train_cfg["batch_size"])
  return lr


LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(train_cfg: Mapping[str, Any]) -> optax.Schedule:
  """`learning_rate` after `warmup_steps` of linear warm-up; then constant
  (the reference) or, for short runs, cosine decay to 5% at `steps`."""
  peak = learning_rate(train_cfg)
  kind = train_cfg.get("lr_schedule", "constant")
  warmup = int(train_cfg.get("warmup_steps", 0))
  if kind not in LR_SCHEDULES:
    raise ValueError(f"train.lr_schedule={kind!r}; choose one of {LR_SCHEDULES}")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(int(train_cfg["steps"]), warmup + 1), 0.05 * peak)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak)], [warmup])
  return optax.constant_schedule(peak)


def make_optimizer(train_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """AdamW with torch's defaults and the LDM's weight decay 0.01 on every
  parameter (the reference passes a plain parameter list)."""
  parts = []
  if train_cfg.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(float(train_cfg["grad_clip_norm"])))
  constant = (train_cfg.get("lr_schedule", "constant") == "constant"
              and not train_cfg.get("warmup_steps", 0))
  # A plain float keeps the optimiser state free of a schedule counter.
  lr = learning_rate(train_cfg) if constant else lr_schedule(train_cfg)
  parts.append(optax.adamw(lr,
                           b1=train_cfg.get("adam_b1", 0.9),
                           b2=train_cfg.get("adam_b2", 0.999),
                           eps=train_cfg.get("adam_eps", 1e-8),
                           weight_decay=train_cfg.get("weight_decay", 0.01)))
  # train.trainable (issue 25): frozen parameters get no optimiser state.
  return trainable.wrap_optimizer(optax.chain(*parts), train_cfg)


def init_state(params: Params, optimizer: optax.GradientTransformation,
               ema_updates: int = 0) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    # A copy: the step donates the state, and one buffer
                    # cannot be donated twice.
                    ema={"unet": jax.tree.map(jnp.copy, params["unet"])},
                    opt_state=optimizer.init(params),
                    ema_updates=jnp.asarray(ema_updates, jnp.int32),
                    skipped=jnp.zeros((), jnp.int32))


def fresh_state_fn(ldm: LatentDiffusion, optimizer: optax.GradientTransformation
                   ) -> Callable[[jax.Array], TrainState]:
  """-> rng -> a new train state (random UNet and rescaler weights)."""
  def init(rng: jax.Array) -> TrainState:
    k_unet, k_cond = jax.random.split(rng)
    params = {"unet": build.init_params(ldm.unet, k_unet),
              "cond_stage": build.init_params(ldm.cond_stage, k_cond)}
    return init_state(params, optimizer)

  return init


def ema_decay(updates: jax.Array, max_decay: float) -> jax.Array:
  """LitEma: decay = min(max, (1 + n) / (10 + n)), n counted after increment."""
  n = updates.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def _tree_all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_encoder(ldm: LatentDiffusion, train_cfg: Mapping[str, Any]
                 ) -> Callable:
  """-> encode(image, first_stage_params) -> latents: the frozen first stage
  on a batch of uint8 images (B, H, W, 3), in `train.encode_chunks` chunks.

  train.py runs it as a program of its own before each step: nothing in
  it trains, and the step it feeds is then the UNet's and the rescaler's
  alone. For v5e:2x2 at 16 images per chip the two compile in 9 minutes on
  2 cores, where the one program had not finished in 50 (BENCHMARKS.md).
  """
  chunks = int(train_cfg.get("encode_chunks", 1))

  def encode(image: jax.Array, first_stage_params) -> jax.Array:
    x = data_device.images_to_model_range(image)
    # Frozen: no gradient, and its activations are freed as it goes.
    return jax.lax.stop_gradient(
        encode_in_chunks(ldm, first_stage_params, x, chunks))

  return encode


def make_latent_train_step(ldm: LatentDiffusion,
                           optimizer: optax.GradientTransformation,
                           train_cfg: Mapping[str, Any], mask_stages: int = 0,
                           gather_weights: Callable | None = None
                           ) -> Callable:
  """-> step(state, batch, rng) -> (state, metrics), the program train.py
  runs each step: batch = {"latents": (B, h, w, C) from `make_encoder`,
  "labels": uint8 (B, H, W)}, and optionally "pinned": {"t": (B,),
  "noise": (B, h, w, C)}, the timesteps and noise to use instead of drawing
  them (a test seam: the trajectory parity test replays the original's
  draws; without it the program is the one train.py always compiled).

  With `grad_accum` = k the batch is processed as k interleaved
  micro-batches (rows i, i+k, ...) so each stays spread over all devices.
  `mask_stages` area-halvings bring image-size labels to data.mask_size
  first. `cond_drop_prob` = p replaces each sample's conditioning by zeros
  with probability p (classifier-free guidance; 0 = the reference);
  `region_drop_prob` = q marks a random rectangle of each sample's mask
  "don't care" with probability q, so partial masks are in-distribution.
  `remat` (none | block | dots_saveable, see unet.REMAT_POLICIES) trades a
  second UNet forward in the backward pass for the memory of its
  activations; the parameters and the update are the same.
  `gather_weights` (params -> params, from `loop.gather_weights`) places
  the compute-dtype weights for the forward pass: whole on every device
  under FSDP (see there); None leaves placement to XLA.
  """
  parts = _StepParts(ldm, optimizer, train_cfg, mask_stages, gather_weights)

  def step(state: TrainState, batch, rng):
    step_key = jax.random.fold_in(rng, state.step)
    k_t, k_noise, k_drop = jax.random.split(step_key, 3)
    z = batch["latents"]
    t, noise = parts.draw_t_and_noise(batch, z, k_t, k_noise)
    keep, labels = parts.drop_condition(step_key, batch["labels"], z.shape[0])
    loss, loss_parts, grads = parts.accumulate_gradients(
        state.params, (z, labels, t, noise, keep), k_drop)
    finite = jnp.isfinite(loss) & _tree_all_finite(grads)
    new, decay = parts.update_with_ema(state, grads)
    new = parts.guard_nonfinite(state, new, finite)
    metrics = {**loss_parts, "finite": finite,
               "grad_norm": optax.global_norm(grads), "ema_decay": decay,
               "skipped": new.skipped}
    return new, metrics

  return step


def make_train_step(ldm: LatentDiffusion, optimizer: optax.GradientTransformation,
                    train_cfg: Mapping[str, Any], mask_stages: int = 0
                    ) -> Callable:
  """-> step(state, batch, first_stage_params, rng) -> (state, metrics):
  `make_encoder` and `make_latent_train_step` as one function, on
  batch = {"image": uint8 (B, H, W, 3), "labels", optionally "pinned"}.

  The reference's `training_step` whole, for tests and benchmarks that
  take one program; train.py compiles the two parts as two programs. The
  same operations in the same order either way.
  """
  encode = make_encoder(ldm, train_cfg)
  latent_step = make_latent_train_step(ldm, optimizer, train_cfg, mask_stages)

  def step(state: TrainState, batch, first_stage_params, rng):
    latents = encode(batch["image"], first_stage_params)
    return latent_step(state, with_latents(batch, latents), rng)

  return step


def with_latents(batch: Mapping[str, Any], latents) -> dict[str, Any]:
  """A train batch with its images replaced by their latents: what the
  latent step takes."""
  return {**{k: v for k, v in batch.items() if k != "image"},
          "latents": latents}


class _StepParts:
  """The train step's parts, each set up once from `train_cfg`; the step
  (`make_latent_train_step`) calls them in the order written here."""

  def __init__(self, ldm: LatentDiffusion,
               optimizer: optax.GradientTransformation,
               train_cfg: Mapping[str, Any], mask_stages: int,
               gather_weights: Callable | None = None):
    self.compute_dtype = jnp.dtype(train_cfg.get("compute_dtype", "float32"))
    remat = train_cfg.get("remat", "none")
    if (remat, self.compute_dtype) != (ldm.unet.remat, jnp.dtype(ldm.unet.dtype)):
      # The UNet's layers compute in their module dtype (flax promotes inputs
      # and kernels to it), so bf16 inputs alone would still run in float32.
      ldm = dataclasses.replace(
          ldm, unet=ldm.unet.clone(dtype=self.compute_dtype, remat=remat))
    self.ldm = ldm
    self.optimizer = optimizer
    self.train_cfg = train_cfg  # train.trainable: what keep_frozen keeps
    self.mask_stages = mask_stages
    self.schedule = ldm.schedule()
    self.accum = int(train_cfg.get("grad_accum", 1))
    self.max_decay = float(train_cfg.get("ema_decay", 0.9999))
    self.skip_nonfinite = train_cfg.get("nonfinite", "stop") == "skip"
    self.cond_drop = float(train_cfg.get("cond_drop_prob", 0.0))
    self.region_drop = float(train_cfg.get("region_drop_prob", 0.0))
    self.gather = gather_weights or (lambda params: params)
    self.grad_fn = jax.value_and_grad(self.loss, has_aux=True)

  def loss(self, params, z, labels, t, noise, keep, dropout_key):
    """The LDM's loss of one (micro-)batch -> (loss, its parts)."""
    params = {"cond_stage": self.gather(params["cond_stage"]),
              "unet": self.gather(
                  _cast_after(z, params["unet"], self.compute_dtype))}
    c = self.ldm.condition(params["cond_stage"], labels, self.mask_stages)
    if self.cond_drop > 0:
      # Classifier-free guidance: a dropped sample sees the all-zero
      # conditioning, exactly what an all-ignore mask gives (the rescaler
      # has no bias), so "unconditional" and "don't care" are one input.
      c = c * keep[:, None, None, None]
    x_t = objective.q_sample(self.schedule, z, t, noise)
    out = self.ldm.denoise(params["unet"], x_t.astype(self.compute_dtype), t,
                           c.astype(self.compute_dtype), train=True,
                           rngs={"dropout": dropout_key})
    settings = self.ldm.settings
    loss, parts = objective.diffusion_loss(
        self.schedule, out.astype(jnp.float32), z, t, noise,
        loss_type=settings["loss_type"],
        l_simple_weight=settings["l_simple_weight"],
        original_elbo_weight=settings["original_elbo_weight"])
    parts = {k: v for k, v in parts.items() if k != "loss_simple_per_sample"}
    return loss, parts

  def draw_t_and_noise(self, batch, z: jax.Array, k_t: jax.Array,
                       k_noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Timesteps and noise, drawn for the whole batch (so splitting it into
    micro-batches changes memory, not the update), or the batch's "pinned"
    ones (parity tests; a trace-time switch)."""
    if "pinned" in batch:
      return (batch["pinned"]["t"].astype(jnp.int32),
              batch["pinned"]["noise"].astype(jnp.float32))
    t = jax.random.randint(k_t, (z.shape[0],), 0, self.schedule.num_timesteps)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    return t, noise

  def drop_condition(self, step_key: jax.Array, labels: jax.Array,
                     batch_size: int) -> tuple[jax.Array, jax.Array]:
    """-> (keep: 1.0 for a sample that keeps its conditioning, 0.0 for one
    dropped for classifier-free guidance; the labels, a random box of some
    masks made "don't care" when `region_drop_prob` > 0)."""
    if self.cond_drop > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(step_key, 1),
                                  1.0 - self.cond_drop, (batch_size,))
      keep = keep.astype(jnp.float32)
    else:  # the reference recipe: no random draw; `loss` ignores keep
      keep = jnp.ones((batch_size,), jnp.float32)
    if self.region_drop > 0:
      labels = drop_regions(jax.random.fold_in(step_key, 2), labels,
                            self.region_drop)
    return keep, labels

  def accumulate_gradients(self, params, inputs: tuple[jax.Array, ...],
                           k_drop: jax.Array):
    """-> (loss, its parts, gradients), averaged over `grad_accum`
    micro-batches (rows j, j + k, ...) taken in turn."""
    if self.accum == 1:
      (loss, parts), grads = self.grad_fn(params, *inputs, k_drop)
      return loss, parts, grads

    def body(carry, inp):
      i, *xs = inp
      (l, p), g = self.grad_fn(params, *xs, jax.random.fold_in(k_drop, i))
      return jax.tree.map(jnp.add, carry, (l, p, g)), None

    zero = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), _zero_parts(), params))
    total, _ = jax.lax.scan(body, zero, (
        jnp.arange(self.accum),
        *(micro_batches(x, self.accum) for x in inputs)))
    return jax.tree.map(lambda x: x / self.accum, total)

  def update_with_ema(self, state: TrainState, grads
                      ) -> tuple[TrainState, jax.Array]:
    """AdamW on UNet + rescaler, then LitEma's warm-up EMA of the UNet ->
    (the next state, the EMA decay used)."""
    updates, opt_state = self.optimizer.update(grads, state.opt_state,
                                               state.params)
    params = optax.apply_updates(state.params, updates)
    n = state.ema_updates + 1
    decay = ema_decay(n, self.max_decay)
    ema = {"unet": jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p),
                                state.ema["unet"], params["unet"])}
    # train.trainable (issue 25): frozen parameters and their EMA stay as they were.
    params, ema = trainable.keep_frozen(self.train_cfg, state, params, ema)
    new = state.replace(step=state.step + 1, params=params, ema=ema,
                        opt_state=opt_state, ema_updates=n)
    return new, decay

  def guard_nonfinite(self, state: TrainState, new: TrainState,
                      finite: jax.Array) -> TrainState:
    """`new`, counting a non-finite step in `skipped`; with nonfinite=skip
    such a step's update is dropped."""
    if not self.skip_nonfinite:
      return new.replace(skipped=state.skipped + (~finite).astype(jnp.int32))
    # A non-finite loss or gradient never reaches the parameters: keep the
    # old state (the step counter still advances, so the data stays
    # aligned). Selecting costs a pass over the state, and copies, since the
    # old state stays live next to the donated new one (BENCHMARKS.md), so
    # "stop" runs go without.
    kept = state.replace(step=state.step + 1, skipped=state.skipped + 1)
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)


def _cast_after(x: jax.Array, params, dtype):
  """`params` cast to `dtype`, not before `x` (the latents) exists.

  XLA:CPU casts every UNet weight to bf16 (and back to float32, for its
  float32 convolutions) at the start of the step, where those copies of
  the reference UNet then wait through the frozen encoder's peak
  (BENCHMARKS.md, the bf16 step's memory). Multiplied
  by a 1 computed from `x` first (`unet.one_after`), they cannot be made
  earlier. The 1 is exact while `x` is finite (the loss is not, otherwise),
  so the weights are the same; float32 steps are left as they are.
  """
  if dtype == jnp.float32:
    return params
  one = unet_lib.one_after(x)
  return jax.tree.map(lambda p: (p * one.astype(p.dtype)).astype(dtype),
                      params)


def micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B / k, ...), micro-batch j = rows j, j + k, ...: each
  one spans all devices of a batch-sharded array."""
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def encode_in_chunks(ldm: LatentDiffusion, first_stage_params, image: jax.Array,
                     chunks: int = 1) -> jax.Array:
  """`ldm.encode` on `chunks` micro-batches in turn; the same latents (each
  image is encoded alone either way), a `chunks`-th of the temporaries."""
  if chunks == 1:
    return ldm.encode(first_stage_params, image)
  z = jax.lax.map(lambda x: ldm.encode(first_stage_params, x),
                  micro_batches(image, chunks))
  return jnp.swapaxes(z, 0, 1).reshape(image.shape[0], *z.shape[2:])


def drop_regions(key: jax.Array, labels: jax.Array, prob: float) -> jax.Array:
  """With probability `prob` per sample, one random rectangle (each side
  1/4 to 3/4 of the map's) of the label map becomes IGNORE_ID."""
  b, h, w = labels.shape
  k_on, k_size, k_pos = jax.random.split(key, 3)
  on = jax.random.bernoulli(k_on, prob, (b, 1, 1))
  frac = jax.random.uniform(k_size, (b, 2), minval=0.25, maxval=0.75)
  size = jnp.round(frac * jnp.asarray([h, w])).astype(jnp.int32)
  start = jnp.floor(jax.random.uniform(k_pos, (b, 2)) *
                    (jnp.asarray([h, w]) - size + 1)).astype(jnp.int32)
  ys = jnp.arange(h)[None, :, None]
  xs = jnp.arange(w)[None, None, :]
  inside = ((ys >= start[:, 0, None, None]) &
            (ys < (start + size)[:, 0, None, None]) &
            (xs >= start[:, 1, None, None]) &
            (xs < (start + size)[:, 1, None, None]))
  return jnp.where(on & inside, jnp.asarray(IGNORE_ID, labels.dtype), labels)


def _zero_parts():
  return {"loss": jnp.zeros(()), "loss_simple": jnp.zeros(()),
          "loss_vlb": jnp.zeros(())}


def log_record(metrics: Mapping[str, Any], lr: float) -> dict[str, float | int]:
  """The scalars logged for a step, from the step's (host) metrics (the
  loop adds images_per_sec and, in skip mode, bad_records)."""
  return {"loss": float(metrics["loss"]),
          "loss_simple": float(metrics["loss_simple"]),
          "loss_vlb": float(metrics["loss_vlb"]), "lr": float(lr),
          "grad_norm": float(metrics["grad_norm"]),
          "ema_decay": float(metrics["ema_decay"]),
          "skipped_steps": int(metrics["skipped"])}
