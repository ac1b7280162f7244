"""The train step: exact accumulation, EMA warm-up, frozen first stage,
conditioning dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segldm_jax import convert
from segldm_jax.models import build
from segldm_jax.training import ldm_step

TRAIN = {"base_learning_rate": 1e-4, "batch_size": 4, "ema_decay": 0.9999}


@functools.cache
def _setup():
  ldm = build.build_model(build.load_model_config("tests/fixtures/ldm_tiny.yaml"))
  params = {"unet": build.init_params(ldm.unet, jax.random.key(0)),
            "cond_stage": build.init_params(ldm.cond_stage, jax.random.key(1))}
  fs = build.init_params(ldm.first_stage, jax.random.key(2))
  rs = np.random.RandomState(0)
  batch = {"image": rs.randint(0, 256, (4, 32, 32, 3)).astype(np.uint8),
           "labels": rs.randint(0, 5, (4, 32, 32)).astype(np.uint8)}
  return ldm, params, fs, batch


def _compiled(accum, nonfinite="stop", cond_drop_prob=0.0):
  # One key per program: _compiled(1) and _compiled(1, "stop") are the same.
  return _compiled_once(accum, nonfinite, cond_drop_prob)


@functools.cache
def _compiled_once(accum, nonfinite, cond_drop_prob):
  ldm = _setup()[0]
  cfg = dict(TRAIN, grad_accum=accum, nonfinite=nonfinite,
             cond_drop_prob=cond_drop_prob)
  opt = ldm_step.make_optimizer(cfg)
  return opt, jax.jit(ldm_step.make_train_step(ldm, opt, cfg))


def _run(accum, steps=1):
  _, params, fs, batch = _setup()
  opt, step = _compiled(accum)
  state = ldm_step.init_state(params, opt)
  for _ in range(steps):
    state, metrics = step(state, batch, fs, jax.random.key(7))
  return state, metrics


def test_grad_accumulation_is_exact():
  one, m1 = _run(accum=1)
  two, m2 = _run(accum=2)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
  # Adam's first moment is 0.1 x the gradient: compare gradients through it
  # (updates themselves divide by sqrt(v) and amplify round-off near zero).
  mu1, mu2 = (optax.tree_utils.tree_get(s.opt_state, "mu") for s in (one, two))
  for a, b in zip(jax.tree.leaves(mu1), jax.tree.leaves(mu2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_lr_scales_with_batch_and_adamw_decays_weights():
  assert ldm_step.learning_rate(TRAIN) == pytest.approx(4e-4)
  assert ldm_step.learning_rate(dict(TRAIN, scale_lr=False)) == 1e-4


def test_lr_schedules():
  peak = 4e-4
  const = ldm_step.lr_schedule(TRAIN)
  assert [float(const(n)) for n in (0, 10**6)] == pytest.approx([peak, peak])
  warm = ldm_step.lr_schedule(dict(TRAIN, warmup_steps=10))
  assert [float(warm(n)) for n in (0, 5, 10, 500)] == pytest.approx(
      [0.0, peak / 2, peak, peak])
  cos = ldm_step.lr_schedule(dict(TRAIN, lr_schedule="cosine", steps=100))
  # Half-way down a cosine from the peak to 5% of it, then held there.
  assert [float(cos(n)) for n in (0, 50, 100, 200)] == pytest.approx(
      [peak, 0.525 * peak, 0.05 * peak, 0.05 * peak])
  with pytest.raises(ValueError, match="lr_schedule='linear'"):
    ldm_step.lr_schedule(dict(TRAIN, lr_schedule="linear"))


def test_ema_follows_litema_warmup():
  # n = 1 after the first update: decay = min(0.9999, 2 / 11).
  state, metrics = _run(accum=1, steps=2)
  assert float(metrics["ema_decay"]) == pytest.approx(3 / 12)
  assert int(state.ema_updates) == 2
  np.testing.assert_allclose(ldm_step.ema_decay(jnp.asarray(10**6), 0.9999),
                             0.9999)


def test_first_stage_and_step_counter():
  ldm, params, fs, batch = _setup()
  state, _ = _run(accum=1, steps=3)
  assert int(state.step) == 3 and int(state.skipped) == 0
  assert set(state.params) == {"unet", "cond_stage"}  # first stage not trained
  # The rescaler trains (its 1x1 map moves), as cond_stage_trainable says.
  assert not np.allclose(state.params["cond_stage"]["channel_mapper"]["kernel"],
                         params["cond_stage"]["channel_mapper"]["kernel"])


def test_nonfinite_step_is_not_applied_when_skipping():
  _, params, fs, batch = _setup()
  opt, step = _compiled(1, "skip")
  state = ldm_step.init_state(params, opt)
  bad_fs = jax.tree.map(lambda x: x * jnp.nan, fs)  # NaN latents
  new, metrics = step(state, batch, bad_fs, jax.random.key(0))
  assert not bool(metrics["finite"]) and int(new.skipped) == 1
  assert int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_step_is_counted_when_stopping():
  """nonfinite=stop: no select over the state; train.py stops on the count
  before anything is saved (tests/test_train_e2e.py)."""
  _, params, fs, batch = _setup()
  opt, step = _compiled(1, "stop")
  state = ldm_step.init_state(params, opt)
  new, metrics = step(state, batch, fs, jax.random.key(0))
  assert bool(metrics["finite"]) and int(new.skipped) == 0
  bad_fs = jax.tree.map(lambda x: x * jnp.nan, fs)
  new, metrics = step(new, batch, bad_fs, jax.random.key(0))
  assert not bool(metrics["finite"]) and int(new.skipped) == 1
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(new.params))


def test_cond_drop_trains_the_unconditional_model():
  """Classifier-free guidance's training side: with every mask dropped the
  loss does not depend on the rescaler (its Adam moment stays exactly 0);
  without dropout (the reference step the tests above compiled) it does.
  The fixture's converted weights: a fresh UNet's zero output layer passes
  no gradient back to its input on the first step."""
  conv = convert.convert_checkpoint("tests/fixtures/ldm_tiny.ckpt",
                                    "tests/fixtures/ldm_tiny.yaml")
  params = {k: conv.params[k] for k in ("unet", "cond_stage")}
  batch = _setup()[3]

  def rescaler_moment(cond_drop_prob):
    opt, step = _compiled(1, "stop", cond_drop_prob)
    state, _ = step(ldm_step.init_state(params, opt), batch,
                    conv.params["first_stage"], jax.random.key(0))
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["cond_stage"]
    return float(optax.global_norm(mu))

  assert rescaler_moment(0.0) > 0.0
  assert rescaler_moment(1.0 - 1e-7) == 0.0
