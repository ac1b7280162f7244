"""Tests for segldm_jax.diffusion: schedule, loss and samplers.

Fixture values come from the original CompVis code (tests/fixtures/
ldm_tiny.npz, NCHW); samplers are also checked on an analytic Gaussian model
whose probability-flow ODE has a closed-form solution, and on a fixed
nonlinear pointwise MLP.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segldm_jax.diffusion import samplers
from segldm_jax.diffusion.objective import diffusion_loss, q_sample
from segldm_jax.diffusion.samplers import (ddim_parameters, ddim_sample,
                                           ddim_timesteps, ddpm_sample,
                                           dpmpp_2m_sample, sample,
                                           solver_grid)
from segldm_jax.diffusion.schedule import Schedule, make_betas

MU = np.array([1.5, -0.5, 0.25], np.float32)
STD = 0.5


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  with np.load(fixtures_dir / "ldm_tiny.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def sched():
  # ldm_tiny / semantic_synthesis256: linear, 1000 steps, 0.0015 -> 0.0205.
  return Schedule.create("linear", 1000, 0.0015, 0.0205)


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def gaussian_eps(schedule):
  """Exact E[eps | x_t] for data ~ N(MU, STD^2 I) (per channel)."""
  def fn(x, t):
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD**2 + 1 - a)
  return fn


def gaussian_ode_exact(schedule, x_T):
  """Probability-flow ODE from t = T-1 to t = 0: the standardised value
  (x - sqrt(a) mu) / sqrt(a s^2 + 1 - a) is constant along the path."""
  a_T, a_0 = schedule.alphas_cumprod[-1], schedule.alphas_cumprod[0]
  z = (x_T - jnp.sqrt(a_T) * MU) / jnp.sqrt(a_T * STD**2 + 1 - a_T)
  return jnp.sqrt(a_0) * MU + jnp.sqrt(a_0 * STD**2 + 1 - a_0) * z


def mlp_eps(schedule, seed=0, width=16):
  """Fixed random pointwise denoiser: x0 = W2 tanh(W1 x + b1 + w_t t/T) + b2."""
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(3, width)) / np.sqrt(3), jnp.float32)
  b1 = jnp.asarray(rng.normal(size=(width,)) * 0.3, jnp.float32)
  wt = jnp.asarray(rng.normal(size=(width,)) * 0.5, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(width, 3)) / 4, jnp.float32)
  b2 = jnp.asarray([0.5, -0.3, 0.1], jnp.float32)

  def fn(x, t):
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    tt = (t.astype(jnp.float32) / schedule.num_timesteps).reshape(-1, 1, 1, 1)
    x0 = jnp.tanh(x @ w1 + b1 + tt * wt) @ w2 + b2
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return fn


def rms(a, b):
  return float(jnp.sqrt(jnp.mean(jnp.square(a - b))))


def x_T_small():
  return jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3), jnp.float32)


# ---------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------


def test_schedule_matches_every_fixture_buffer(ref, sched):
  names = [k[len("sched_"):] for k in ref if k.startswith("sched_")]
  assert len(names) == 13 and "lvlb_weights" in names
  for name in names:
    got = np.asarray(getattr(sched, name))
    assert got.dtype == np.float32, name
    np.testing.assert_allclose(got, ref["sched_" + name], rtol=1e-6, atol=0,
                               err_msg=name)
  assert sched.alphas_cumprod[0] == pytest.approx(0.9985)
  assert sched.alphas_cumprod[-1] == pytest.approx(9.69e-5, rel=2e-3)


def test_make_betas_kinds():
  lin = make_betas("linear", 10, 1e-4, 4e-2)
  assert lin.dtype == np.float64
  np.testing.assert_allclose(np.sqrt(lin), np.linspace(1e-2, 0.2, 10),
                             rtol=1e-14)
  np.testing.assert_allclose(make_betas("sqrt_linear", 5, 0.1, 0.5),
                             [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-14)
  np.testing.assert_allclose(make_betas("sqrt", 3, 0.04, 0.16),
                             [0.2, 0.3162277660168379, 0.4], rtol=1e-14)
  cos = make_betas("cosine", 1000, cosine_s=8e-3)
  f = lambda u: math.cos((u + 8e-3) / (1 + 8e-3) * math.pi / 2)**2
  assert cos[0] == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-12)
  assert cos[500] == pytest.approx(1 - f(501 / 1000) / f(500 / 1000),
                                   rel=1e-12)
  assert cos[-1] == 0.999  # Clipped, as the original.


def test_schedule_validation():
  with pytest.raises(ValueError, match="'cosinus'"):
    Schedule.create("cosinus")
  with pytest.raises(ValueError, match="num_timesteps"):
    Schedule.create(num_timesteps=1)
  with pytest.raises(ValueError, match="'v'"):
    Schedule.create(parameterization="v")
  with pytest.raises(ValueError, match=r"betas\[0\] = 0.0"):
    Schedule.create("sqrt_linear", 10, 0.0, 0.1)
  with pytest.raises(ValueError, match="linear_start"):
    Schedule.create("linear", 10, -1e-4, 0.02)


def test_schedule_is_a_pytree_with_static_metadata(sched):
  leaves, treedef = jax.tree_util.tree_flatten(sched)
  assert len(leaves) == 13
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.num_timesteps == 1000 and rebuilt.parameterization == "eps"

  @jax.jit
  def f(s):
    assert s.num_timesteps == 1000  # Static: a Python int inside jit.
    return s.betas.sum()

  assert float(f(sched)) == pytest.approx(float(np.sum(sched.betas)),
                                          rel=1e-6)


def test_x0_parameterization_lvlb_weights():
  s = Schedule.create("linear", 1000, 0.0015, 0.0205, parameterization="x0")
  ac = np.asarray(s.alphas_cumprod)
  # The original's literal `0.5 * sqrt(ac) / (2. * 1 - ac)`.
  np.testing.assert_allclose(np.asarray(s.lvlb_weights)[1:],
                             (0.5 * np.sqrt(ac) / (2.0 - ac))[1:], rtol=1e-6)
  assert s.lvlb_weights[0] == s.lvlb_weights[1]


# ---------------------------------------------------------------------------
# q_sample and the loss.
# ---------------------------------------------------------------------------


def test_q_sample_matches_fixture(ref, sched):
  t = jnp.asarray(ref["t"], jnp.int32)
  got = q_sample(sched, nhwc(ref["z"]), t, nhwc(ref["noise"]))
  np.testing.assert_allclose(got, nhwc(ref["x_noisy"]), atol=1e-6)


def test_loss_matches_fixture(ref, sched):
  t = jnp.asarray(ref["t"], jnp.int32)
  loss, parts = diffusion_loss(sched, nhwc(ref["model_out"]), nhwc(ref["z"]),
                               t, nhwc(ref["noise"]), loss_type="l1")
  np.testing.assert_allclose(loss, ref["loss"], atol=1e-5)
  np.testing.assert_allclose(parts["loss"], ref["lossdict_loss"], atol=1e-5)
  np.testing.assert_allclose(parts["loss_simple"], ref["lossdict_loss_simple"],
                             atol=1e-5)
  np.testing.assert_allclose(parts["loss_vlb"], ref["lossdict_loss_vlb"],
                             atol=1e-5)
  np.testing.assert_allclose(parts["loss_simple_per_sample"],
                             ref["loss_simple_per_sample"], atol=1e-5)
  # EMA variant: same loss code, other model output.
  loss_ema, _ = diffusion_loss(sched, nhwc(ref["model_out_ema"]),
                               nhwc(ref["z"]), t, nhwc(ref["noise"]))
  np.testing.assert_allclose(loss_ema, ref["loss_ema"], atol=1e-5)


def test_loss_bf16_model_output_stays_float32(ref, sched):
  t = jnp.asarray(ref["t"], jnp.int32)
  out = nhwc(ref["model_out"]).astype(jnp.bfloat16)
  loss, parts = diffusion_loss(sched, out, nhwc(ref["z"]), t,
                               nhwc(ref["noise"]))
  assert loss.dtype == jnp.float32
  assert parts["loss_simple_per_sample"].dtype == jnp.float32
  np.testing.assert_allclose(loss, ref["loss"], atol=5e-3)


def test_loss_l2_logvar_and_elbo_weight(sched):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jax.random.normal(k1, (3, 4, 4, 2))
  noise = jax.random.normal(k2, x0.shape)
  out = jax.random.normal(k3, x0.shape)
  t = jnp.array([0, 17, 999], jnp.int32)
  logvar = jnp.linspace(-1.0, 1.0, 1000)
  loss, parts = diffusion_loss(sched, out, x0, t, noise, loss_type="l2",
                               l_simple_weight=2.0, original_elbo_weight=0.5,
                               logvar=logvar)
  per = np.mean((np.asarray(noise) - np.asarray(out))**2, axis=(1, 2, 3))
  lv = np.asarray(logvar)[[0, 17, 999]]
  vlb = np.mean(np.asarray(sched.lvlb_weights)[[0, 17, 999]] * per)
  expect = 2.0 * np.mean(per / np.exp(lv) + lv) + 0.5 * vlb
  np.testing.assert_allclose(parts["loss_simple_per_sample"], per, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_vlb"], vlb, rtol=1e-5)
  np.testing.assert_allclose(loss, expect, rtol=1e-5)
  # x0-parameterisation regresses x0, not the noise.
  s_x0 = Schedule.create("linear", 1000, 0.0015, 0.0205, parameterization="x0")
  _, p_x0 = diffusion_loss(s_x0, out, x0, t, noise)
  np.testing.assert_allclose(
      p_x0["loss_simple_per_sample"],
      np.mean(np.abs(np.asarray(x0) - np.asarray(out)), axis=(1, 2, 3)),
      rtol=1e-5)


def test_loss_validation(sched):
  x = jnp.zeros((2, 4, 4, 3))
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="'huber'"):
    diffusion_loss(sched, x, x, t, x, loss_type="huber")
  with pytest.raises(ValueError, match="same shape"):
    diffusion_loss(sched, x[..., :2], x, t, x)
  with pytest.raises(ValueError, match="t must have shape"):
    diffusion_loss(sched, x, x, t[:1], x)


# ---------------------------------------------------------------------------
# DDIM: timesteps, parameters, update rule.
# ---------------------------------------------------------------------------


def test_ddim_parameters_match_fixture(ref, sched):
  ts = ddim_timesteps(1000, 10)
  np.testing.assert_array_equal(ts, ref["ddim_timesteps"])
  alphas, alphas_prev, sigmas = ddim_parameters(sched, ts, 0.0)
  np.testing.assert_array_equal(alphas, ref["ddim_alphas"])
  np.testing.assert_array_equal(alphas_prev, ref["ddim_alphas_prev"])
  np.testing.assert_array_equal(sigmas, ref["ddim_sigmas"])
  np.testing.assert_allclose(jnp.sqrt(1 - alphas),
                             ref["ddim_sqrt_one_minus_alphas"], rtol=1e-6)
  # alphas_prev starts at abar[0] = 0.9985, not 1.
  assert float(alphas_prev[0]) == pytest.approx(0.9985)


def test_ddim_timesteps_can_exceed_request_and_eta_sigmas(sched):
  ts = ddim_timesteps(1000, 7)
  np.testing.assert_array_equal(ts, [1, 143, 285, 427, 569, 711, 853, 995])
  a, ap, sig = ddim_parameters(sched, ts, 1.0)
  a, ap = np.asarray(a, np.float64), np.asarray(ap, np.float64)
  np.testing.assert_allclose(
      sig, np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), rtol=1e-5)
  np.testing.assert_array_equal(ddim_timesteps(1000, 5, "quad"),
                                [1, 51, 201, 451, 801])
  x_T = x_T_small()
  x, inter = ddim_sample(gaussian_eps(sched), sched, x_T, num_steps=7,
                         return_intermediates=True)
  assert inter["x_inter"].shape == (9,) + x_T.shape
  np.testing.assert_array_equal(inter["x_inter"][-1], x)


def test_ddim_timesteps_errors():
  # The original would index abar[1000] here (IndexError).
  with pytest.raises(ValueError, match="timestep 1000"):
    ddim_timesteps(1000, 1000)
  with pytest.raises(ValueError, match="timestep 1000"):
    ddim_timesteps(1000, 300)  # 1000 // 300 == 3, and 999 + 1 == 1000.
  with pytest.raises(ValueError, match="'cubic'"):
    ddim_timesteps(1000, 10, "cubic")
  with pytest.raises(ValueError, match="num_steps"):
    ddim_timesteps(1000, 0)


def test_solver_grid():
  np.testing.assert_array_equal(solver_grid(1000, 5, "uniform"),
                                [0, 200, 400, 599, 799, 999])
  np.testing.assert_array_equal(solver_grid(1000, 5), [0, 40, 160, 360, 639,
                                                       999])
  for n in (1, 7, 100, 500, 999):
    g = solver_grid(1000, n)
    assert g.shape == (n + 1,) and g[0] == 0 and g[-1] == 999
    assert np.all(np.diff(g) >= 1)
  np.testing.assert_array_equal(ddim_timesteps(1000, 5, "solver_uniform"),
                                [200, 400, 599, 799, 999])
  with pytest.raises(ValueError, match="spacing"):
    solver_grid(1000, 5, "log")


def test_ddim_replays_fixture_chain(ref, sched):
  """Feeds the eps the original's UNet produced at each step (recovered from
  consecutive x_inter / pred_x0) and checks our loop reproduces the chain."""
  x_inter = np.asarray(ref["ddim_x_inter"]).transpose(0, 1, 3, 4, 2)
  pred_x0 = np.asarray(ref["ddim_pred_x0"]).transpose(0, 1, 3, 4, 2)
  ts = ddim_timesteps(1000, 10)[::-1]  # Sampling order.
  a = np.asarray(sched.alphas_cumprod)[ts]
  eps = np.stack([(x_inter[i] - np.sqrt(a[i]) * pred_x0[i + 1]) /
                  np.sqrt(1 - a[i]) for i in range(len(ts))])
  eps_table = jnp.asarray(eps)
  t_table = jnp.asarray(ts.copy(), jnp.int32)

  def replay(x, t):
    return eps_table[jnp.argmax(t_table == t[0])]

  x, inter = ddim_sample(replay, sched, jnp.asarray(x_inter[0]), num_steps=10,
                         eta=0.0, return_intermediates=True)
  scale = np.abs(x_inter).max()  # ~130: the untrained UNet's chain explodes.
  np.testing.assert_allclose(inter["x_inter"], x_inter, atol=1e-5 * scale)
  np.testing.assert_allclose(inter["pred_x0"], pred_x0, atol=1e-5 * scale)
  np.testing.assert_allclose(x, nhwc(ref["ddim_samples"]), atol=1e-5 * scale)


# ---------------------------------------------------------------------------
# Sampler accuracy on fixed models.
# ---------------------------------------------------------------------------


def test_full_resolution_ddim_matches_analytic_ode(sched):
  x_T = x_T_small()
  exact = gaussian_ode_exact(sched, x_T)
  fn = gaussian_eps(sched)
  full = ddim_sample(fn, sched, x_T, num_steps=999,
                     discretization="solver_uniform")
  # First-order Euler in sigma/alpha: the last index steps are coarse in
  # log-SNR, so 999 steps leave ~2e-3 RMS.
  assert rms(full, exact) < 4e-3
  assert float(jnp.max(jnp.abs(full - exact))) < 2e-2
  # A second-order solver converges to the exact ODE much faster.
  assert rms(dpmpp_2m_sample(fn, sched, x_T, num_steps=100), exact) < 1e-3
  assert rms(dpmpp_2m_sample(fn, sched, x_T, num_steps=999), exact) < 5e-4


@pytest.mark.parametrize("model", ["analytic", "mlp"])
def test_dpmpp_2m_needs_far_fewer_steps_than_ddim(sched, model):
  """Acceptance: 25 DPM++(2M) steps land closer to 1000-step DDIM than 25
  (and even 100) DDIM steps, from the same x_T with the same fixed model."""
  fn = gaussian_eps(sched) if model == "analytic" else mlp_eps(sched)
  x_T = x_T_small()
  ref_sol = ddim_sample(fn, sched, x_T, num_steps=999,
                        discretization="solver_uniform")
  err_dpm = rms(dpmpp_2m_sample(fn, sched, x_T, num_steps=25), ref_sol)
  err_ddim = rms(ddim_sample(fn, sched, x_T, num_steps=25), ref_sol)
  err_ddim_same_grid = rms(ddim_sample(fn, sched, x_T, num_steps=25,
                                       discretization="solver_quad"), ref_sol)
  err_ddim_100 = rms(ddim_sample(fn, sched, x_T, num_steps=100), ref_sol)
  assert err_dpm < 0.25 * err_ddim
  assert err_dpm < 0.5 * err_ddim_same_grid
  assert err_dpm < err_ddim_100
  assert err_dpm < 1e-2


def test_ddpm_matches_gaussian_statistics(sched):
  x_T = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  x = ddpm_sample(gaussian_eps(sched), sched, x_T, key=jax.random.PRNGKey(4))
  x = np.asarray(x).reshape(-1, 3)  # 4096 scalars per channel.
  np.testing.assert_allclose(x.mean(axis=0), MU, atol=0.03)
  np.testing.assert_allclose(x.std(axis=0), STD, atol=0.025)
  # Same key, same chain; another key, another chain.
  again = ddpm_sample(gaussian_eps(sched), sched, x_T,
                      key=jax.random.PRNGKey(4))
  np.testing.assert_array_equal(np.asarray(again).reshape(-1, 3), x)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "ddpm"])
def test_x0_parameterization_matches_equivalent_eps_model(sched, name):
  """A model predicting x0 = c everywhere is the eps model
  (x - sqrt(a) c) / sqrt(1 - a); both parameterisations must agree."""
  c = jnp.asarray(MU)

  def x0_model(x, t):
    return jnp.broadcast_to(c, x.shape)

  def eps_model(x, t):
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (x - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)

  kw = ({"key": jax.random.PRNGKey(2), "num_steps": 50} if name == "ddpm"
        else {"num_steps": 10})
  x_T = x_T_small()
  got = sample(name, x0_model, sched, x_T, parameterization="x0", **kw)
  want = sample(name, eps_model, sched, x_T, **kw)
  np.testing.assert_allclose(got, want, atol=2e-4)
  # Deterministic solvers recover the point mass c at t = 0 level.
  if name != "ddpm":
    a0 = sched.alphas_cumprod[0]
    assert rms(got, jnp.sqrt(a0) * c) < 0.1


def test_ddpm_truncated_chain_and_x0_parameterization(sched):
  """num_steps=1 is one p_sample at t=0: output = the x0 estimate itself
  (posterior_mean_coef1[0] = 1, coef2[0] = 0, no noise)."""
  x_T = x_T_small()
  target = jnp.full_like(x_T, 0.3)
  x, inter = ddpm_sample(lambda x, t: target, sched, x_T,
                         key=jax.random.PRNGKey(0), num_steps=1,
                         parameterization="x0", return_intermediates=True)
  np.testing.assert_allclose(x, target, atol=1e-6)
  assert inter["x_inter"].shape == (2,) + x_T.shape
  with pytest.raises(ValueError, match="PRNG key"):
    ddpm_sample(gaussian_eps(sched), sched, x_T, key=None)


def test_ddim_eta_noise_is_keyed(sched):
  fn = gaussian_eps(sched)
  x_T = x_T_small()
  a = ddim_sample(fn, sched, x_T, num_steps=10, eta=1.0,
                  key=jax.random.PRNGKey(0))
  b = ddim_sample(fn, sched, x_T, num_steps=10, eta=1.0,
                  key=jax.random.PRNGKey(0))
  c = ddim_sample(fn, sched, x_T, num_steps=10, eta=1.0,
                  key=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert rms(a, c) > 1e-2
  with pytest.raises(ValueError, match="PRNG key"):
    ddim_sample(fn, sched, x_T, num_steps=10, eta=1.0)


def test_ddim_inpainting_mask(sched):
  """eps = 0 model: DDIM just rescales x by sqrt(a_prev / a_t) per step, so
  the unmasked region ends at x_T * sqrt(abar_0 / abar_901) exactly, while the
  masked region is re-noised from x0 every step and ends near sqrt(abar_0) x0.
  """
  zero = lambda x, t: jnp.zeros_like(x)
  x_T = x_T_small()
  known = jnp.full_like(x_T, 2.0)
  mask = jnp.zeros(x_T.shape[:3] + (1,)).at[:, :, :4].set(1.0)
  key = jax.random.PRNGKey(5)
  out = ddim_sample(zero, sched, x_T, num_steps=10, mask=mask, x0=known,
                    key=key)
  ac = sched.alphas_cumprod
  free = x_T * jnp.sqrt(ac[0] / ac[901])
  np.testing.assert_allclose(out[:, :, 4:], free[:, :, 4:], rtol=1e-5)
  # Last step starts from q_sample(x0, t=1): noise std sqrt(1 - abar_1) ~ 0.055.
  dev = out[:, :, :4] - jnp.sqrt(ac[0]) * known[:, :, :4]
  assert float(jnp.max(jnp.abs(dev))) < 0.3
  assert 0.03 < float(jnp.std(dev)) < 0.08
  # An all-zero mask changes nothing.
  plain = ddim_sample(zero, sched, x_T, num_steps=10)
  none = ddim_sample(zero, sched, x_T, num_steps=10, mask=jnp.zeros_like(mask),
                     x0=known, key=key)
  np.testing.assert_allclose(none, plain, rtol=1e-6)
  with pytest.raises(ValueError, match="together"):
    ddim_sample(zero, sched, x_T, num_steps=10, mask=mask)
  with pytest.raises(ValueError, match="PRNG key"):
    ddim_sample(zero, sched, x_T, num_steps=10, mask=mask, x0=known)


# ---------------------------------------------------------------------------
# Compilation and dispatch.
# ---------------------------------------------------------------------------


def test_samplers_compile_once(sched):
  x_T = x_T_small()
  base = gaussian_eps(sched)
  traces = {"n": 0}

  def counted(x, t):
    traces["n"] += 1  # Runs only while tracing.
    return base(x, t)

  for name, kwargs in [("ddim", {"num_steps": 10}),
                       ("dpmpp_2m", {"num_steps": 10}),
                       ("ddpm", {"key": jax.random.PRNGKey(0),
                                 "num_steps": 20})]:
    traces["n"] = 0
    first = sample(name, counted, sched, x_T, **kwargs)
    second = sample(name, counted, sched, x_T + 1.0, **kwargs)
    assert traces["n"] == 1, name
    assert not np.allclose(first, second)

  # Params passed through jax.tree_util.Partial are traced, not baked in:
  # new values of the same shape reuse the compiled loop.
  traces["n"] = 0

  def apply(shift, x, t):
    traces["n"] += 1
    return base(x, t) + shift

  fn_a = jax.tree_util.Partial(apply, jnp.float32(0.0))
  fn_b = jax.tree_util.Partial(apply, jnp.float32(0.1))
  out_a = ddim_sample(fn_a, sched, x_T, num_steps=10)
  out_b = ddim_sample(fn_b, sched, x_T, num_steps=10)
  assert traces["n"] == 1
  assert rms(out_a, out_b) > 1e-3


def test_dispatcher(sched):
  x_T = x_T_small()
  fn = gaussian_eps(sched)
  np.testing.assert_array_equal(sample("ddim", fn, sched, x_T, num_steps=10),
                                ddim_sample(fn, sched, x_T, num_steps=10))
  np.testing.assert_array_equal(
      sample("dpmpp_2m", fn, sched, x_T, num_steps=10),
      dpmpp_2m_sample(fn, sched, x_T, num_steps=10))
  assert set(samplers.SAMPLERS) == {"ddim", "ddpm", "dpmpp_2m"}
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    sample("euler", fn, sched, x_T, num_steps=10)
  with pytest.raises(TypeError, match="callable"):
    ddim_sample("not a function", sched, x_T, num_steps=10)
