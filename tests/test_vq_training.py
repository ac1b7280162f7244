"""Tests for VQ first-stage training: loss, step, dead-code restarts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import seg_f4
from segldm_jax.data.synthetic import SyntheticSource
from segldm_jax.models.build import build_model, init_params
from segldm_jax.training import vq_trainer as vqt

N_EMBED = 16
BETA = 0.25  # VectorQuantizer's default


def _tiny_node(n_embed: int = N_EMBED) -> dict:
  return {"target": "ldm.models.autoencoder.VQModelInterface",
          "params": {"embed_dim": 3, "n_embed": n_embed, "ddconfig": {
              "double_z": False, "z_channels": 3, "resolution": 32,
              "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
              "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


@pytest.fixture(scope="module")
def model():
  return build_model(_tiny_node())


@pytest.fixture(scope="module")
def params(model):
  return init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  source = SyntheticSource(4, 32, 8, seed=3)
  return np.stack([source[i]["image"] for i in range(4)])


def _to_float(images: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _hand_quantise(model, params, x):
  """Encoder output, nearest codes (numpy argmin) and their vectors."""
  z = np.asarray(model.apply({"params": params}, x, method=model.encode),
                 np.float64)
  book = np.asarray(vqt.codebook(params), np.float64)
  d = ((z[..., None, :] - book) ** 2).sum(-1)
  idx = d.argmin(-1)
  return z, idx, book


def test_loss_matches_hand_computation(model, params, images):
  x = _to_float(images)
  loss_fn = jax.jit(lambda p, x: vqt.vq_loss(model, p, x, codebook_weight=0.5,
                                              mse_weight=0.3))
  loss, m = loss_fn(params, images)
  z, idx, book = _hand_quantise(model, params, x)
  e = book[idx]
  # Forward value of the straight-through latent is the code itself.
  x_rec = np.asarray(model.apply({"params": params}, jnp.asarray(e, jnp.float32),
                                 True, method=model.decode), np.float64)
  err = x_rec - np.asarray(x, np.float64)
  l1, mse = np.abs(err).mean(), (err ** 2).mean()
  q = (1.0 + BETA) * ((e - z) ** 2).mean()  # legacy: 1 * commit + beta * book
  np.testing.assert_allclose(float(m["rec_l1"]), l1, rtol=1e-5)
  np.testing.assert_allclose(float(m["rec_mse"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(m["codebook"]), q, rtol=1e-4)
  np.testing.assert_allclose(float(loss), l1 + 0.3 * mse + 0.5 * q, rtol=1e-5)
  clipped = ((np.clip(x_rec, -1, 1) - np.asarray(x, np.float64)) ** 2).mean()
  np.testing.assert_allclose(float(m["psnr"]), 10 * np.log10(4 / clipped),
                             rtol=1e-5)
  counts = np.bincount(idx.ravel(), minlength=N_EMBED)
  np.testing.assert_allclose(float(m["codes_used"]),
                             (counts > 0).sum() / N_EMBED)
  p = counts[counts > 0] / idx.size
  np.testing.assert_allclose(float(m["perplexity"]),
                             np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
  # uint8 and [-1, 1] float input are the same batch.
  loss_f, _ = loss_fn(params, x)
  np.testing.assert_allclose(float(loss_f), float(loss), rtol=1e-6)


def test_codebook_gradient_comes_only_from_codebook_term(model, params, images):
  x = _to_float(images)
  w = 2.0
  grad_fn = jax.jit(jax.grad(lambda p, w: vqt.vq_loss(
      model, p, x, codebook_weight=w)[0]))
  grads = grad_fn(params, w)
  z, idx, book = _hand_quantise(model, params, x)
  # d/de_k of w * beta * mean((e - sg z)^2): the reconstruction's straight-
  # through path adds nothing.
  expected = np.zeros_like(book)
  np.add.at(expected, idx.ravel(), (book[idx] - z).reshape(-1, 3))
  expected *= w * BETA * 2.0 / z.size
  got = np.asarray(vqt.codebook(grads))
  assert np.abs(expected).max() > 1e-4
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
  # Without the codebook term the codebook gets exactly nothing, while the
  # encoder still learns through the straight-through estimator.
  grads0 = grad_fn(params, 0.0)
  assert np.all(np.asarray(vqt.codebook(grads0)) == 0.0)
  enc = np.asarray(grads0["encoder"]["conv_in"]["kernel"])
  assert np.abs(enc).max() > 1e-5


def test_step_decreases_loss_on_fixed_batch(model, images):
  optimizer = vqt.vq_optimizer(3e-3)
  state = vqt.create_vq_train_state(model, optimizer, jax.random.key(1))
  step = jax.jit(vqt.make_vq_train_step(model, optimizer), donate_argnums=0)
  losses = []
  for _ in range(12):
    state, m = step(state, images)
    losses.append(float(m["loss"]))
  assert int(state.step) == 12
  assert np.all(np.isfinite(losses))
  # The curve is noisy (lr 3e-3 on one batch; the second step jumps up):
  # the last five average ~0.45x the first five.
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def _far_codebook_state(model, params, optimizer):
  """Code 0 near the latents, all others 100 away; all just used."""
  book = np.full((N_EMBED, 3), 100.0, np.float32)
  book[0] = 0.0
  params = vqt.with_codebook(params, jnp.asarray(book))
  state = vqt.create_vq_train_state(model, optimizer, jax.random.key(7),
                                    params=params)
  return state.replace(code_age=jnp.zeros((N_EMBED,), jnp.int32))


def test_dead_code_restart_revives_codes(model, params, images):
  optimizer = optax.sgd(0.0)  # isolate the restart from learning
  step = jax.jit(vqt.make_vq_train_step(model, optimizer, dead_code_steps=2))
  state = _far_codebook_state(model, params, optimizer)

  state, m1 = step(state, images)
  assert float(m1["codes_used"]) == 1.0 / N_EMBED
  assert int(m1["restarted"]) == 0  # unused for 1 step only
  np.testing.assert_array_equal(state.code_age, [0] + [1] * (N_EMBED - 1))

  state, m2 = step(state, images)
  assert int(m2["restarted"]) == N_EMBED - 1
  np.testing.assert_array_equal(state.code_age, np.zeros(N_EMBED))
  book = np.asarray(vqt.codebook(state.params))
  z = np.asarray(model.apply({"params": state.params}, _to_float(images),
                             method=model.encode)).reshape(-1, 3)
  # Every revived code is one of this batch's encoder outputs, all distinct.
  dist = np.abs(book[1:, None] - z[None]).max(-1).min(-1)
  assert dist.max() < 1e-4  # jit vs eager rounding
  assert len(np.unique(book[1:], axis=0)) == N_EMBED - 1

  state, m3 = step(state, images)
  assert float(m3["codes_used"]) >= 8.0 / N_EMBED
  assert int(m3["restarted"]) == 0


def test_dead_code_restart_is_deterministic(model, params, images):
  optimizer = optax.sgd(0.0)
  step = jax.jit(vqt.make_vq_train_step(model, optimizer, dead_code_steps=1))
  state = _far_codebook_state(model, params, optimizer)
  a, _ = step(state, images)
  b, _ = step(state, images)
  np.testing.assert_array_equal(vqt.codebook(a.params), vqt.codebook(b.params))
  other = state.replace(rng=jax.random.key_data(jax.random.key(8)))
  c, _ = step(other, images)
  assert not np.array_equal(vqt.codebook(a.params), vqt.codebook(c.params))
  # The next step draws from a different key (fold_in of the step count).
  a2, _ = step(a.replace(params=state.params), images)
  assert not np.array_equal(vqt.codebook(a2.params)[1:],
                            vqt.codebook(a.params)[1:])


def test_restarts_off_leaves_codebook_to_the_optimizer(model, params, images):
  optimizer = optax.sgd(0.0)
  step = jax.jit(vqt.make_vq_train_step(model, optimizer,
                                        restart_dead_codes=False))
  state = vqt.create_vq_train_state(model, optimizer, jax.random.key(0),
                                    params=params)
  new, m = step(state, images)
  assert int(m["restarted"]) == 0
  np.testing.assert_array_equal(vqt.codebook(new.params),
                                vqt.codebook(params))


def test_demo_config_builds_f4_with_3_channel_latents():
  demo = seg_f4.get_config("demo")
  model = build_model(demo.model.params.first_stage_config.to_dict())
  assert model.downsample_factor == 4
  assert model.embed_dim == 3 and model.resolution == 64
  z = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method=model.encode)[0])
  assert z.shape == (1, 16, 16, 3)


def test_log_record_names_the_step_metrics():
  """What train_first_stage logs per log step (as "first_stage/KEY")."""
  metrics = {"loss": np.float32(0.5), "rec_l1": np.float32(0.25),
             "rec_mse": np.float32(0.125), "codebook": np.float32(0.0625),
             "psnr": np.float32(12.5), "perplexity": np.float32(7.0),
             "codes_used": np.float32(0.5), "restarted": np.int32(3)}
  assert vqt.vq_log_record(metrics, 1e-3) == {
      "loss": 0.5, "l1": 0.25, "mse": 0.125, "codebook_loss": 0.0625,
      "psnr": 12.5, "perplexity": 7.0, "codes_used": 0.5,
      "codes_restarted": 3, "lr": 1e-3}
