"""Samplers (DDIM, ancestral DDPM, DPM-Solver++(2M)) as single compiled loops.

Reference: CompVis/latent-diffusion @ a506df5, `ldm/models/diffusion/ddim.py`
(`DDIMSampler.ddim_sampling`, `p_sample_ddim`), `ldm/models/diffusion/ddpm.py`
(`LatentDiffusion.p_sample`, `p_sample_loop`) and `make_ddim_timesteps`,
`make_ddim_sampling_parameters` in `ldm/modules/diffusionmodules/util.py`.
DPM-Solver++(2M) follows Lu et al. 2022 (arXiv:2211.01095, Alg. 2), data
prediction form, on the same discrete schedule.

Every sampler takes `model_fn(x, t) -> model_output` with x float32 (B, ...)
(NHWC latents) and t int32 (B,). The whole chain runs as one `lax.scan` inside
`jax.jit`; the compiled loop is cached on (model_fn identity, shapes, step
grid), so calling again with the same model_fn and shapes does not retrace.
`model_fn` may be a plain function/closure (static, keyed by identity) or a
`jax.tree_util.Partial(apply_fn, params, cond)`, whose array arguments are then
traced inputs: new params or conditioning of the same shapes reuse the
compiled loop instead of being baked in as constants.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from segldm_jax.diffusion.objective import q_sample
from segldm_jax.diffusion.schedule import PARAMETERIZATIONS, Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SampleOut = Union[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
DDIM_DISCRETIZATIONS = ("uniform", "quad", "solver_uniform", "solver_quad")
SOLVER_SPACINGS = ("uniform", "quad")


# ---------------------------------------------------------------------------
# Step grids and DDIM parameters.
# ---------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if not lo <= value <= hi:
    raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
  return int(value)


def solver_grid(num_timesteps: int, num_steps: int,
                spacing: str = "quad") -> np.ndarray:
  """num_steps + 1 strictly increasing indices from 0 to T-1 (both included).

  Sampling runs from t = T-1 down to t = 0, i.e. it ends at abar[0] where the
  original DDIM ends too. "uniform" spaces the indices evenly; "quad" places
  them at (T-1) * (i / N)**2 (DPM-Solver's "time_quadratic"), denser near
  t = 0. With the linear beta schedule an even grid puts about a quarter of
  the log-SNR range into the last step (t = T/N -> 0), which ruins any
  multistep extrapolation; see benchmarks/solver_error.py.

  Indices are rounded half up and then pushed up to stay strictly increasing
  (t_i >= t_{i-1} + 1), so there are always exactly num_steps steps.
  """
  if spacing not in SOLVER_SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; expected one of "
                     f"{SOLVER_SPACINGS}")
  n = _check_int("num_steps", num_steps, 1, num_timesteps - 1)
  u = np.linspace(0.0, 1.0, n + 1)
  if spacing == "quad":
    u = u**2
  grid = np.floor((num_timesteps - 1) * u + 0.5).astype(np.int64)
  i = np.arange(n + 1)
  grid = i + np.maximum.accumulate(grid - i)
  assert grid[0] == 0 and grid[-1] == num_timesteps - 1, grid
  return grid


def ddim_timesteps(num_timesteps: int, num_steps: int,
                   discretization: str = "uniform") -> np.ndarray:
  """DDIM timesteps, ascending, as the original `make_ddim_timesteps`.

  "uniform": range(0, T, T // S) + 1, so S=10, T=1000 gives [1, 101, ..., 901]
  and S=7 gives 8 steps [1, 143, ..., 995] (T // S need not divide T).
  "quad": int(linspace(0, sqrt(0.8 T), S)**2) + 1 (stops near 0.8 T).
  "solver_uniform" / "solver_quad" (not in the original):
  solver_grid(T, S, spacing)[1:], S steps starting at T-1, whose
  previous-step alphas end at abar[0] like the original's. These put DDIM on
  exactly the time points of `dpmpp_2m_sample`.

  Raises ValueError where the +1 shift would index abar[T]; the original fails
  there with an IndexError (e.g. uniform S > T/2, or T // S == 3 for T=1000).
  """
  if discretization not in DDIM_DISCRETIZATIONS:
    raise ValueError(f"unknown DDIM discretization {discretization!r}; "
                     f"expected one of {DDIM_DISCRETIZATIONS}")
  t_max = num_timesteps
  if discretization.startswith("solver_"):
    return solver_grid(t_max, num_steps, discretization[len("solver_"):])[1:]
  s = _check_int("num_steps", num_steps, 1, t_max)
  if discretization == "uniform":
    steps = np.arange(0, t_max, t_max // s, dtype=np.int64)
  else:
    steps = (np.linspace(0, np.sqrt(t_max * 0.8), s)**2).astype(np.int64)
  # The original adds one "to get the final alpha values right".
  steps = steps + 1
  if steps[-1] >= t_max:
    raise ValueError(
        f"num_steps={num_steps} with {discretization!r} discretization gives "
        f"timestep {steps[-1]} >= num_timesteps={t_max} (the original would "
        f"raise IndexError); use fewer steps or a 'solver_*' discretization")
  return steps


def ddim_parameters(schedule: Schedule, timesteps: np.ndarray, eta: Any = 0.0
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(alphas, alphas_prev, sigmas) as `make_ddim_sampling_parameters`.

  alphas_prev starts with abar[0], not 1 (the original's choice), so DDIM
  ends at x_0-level abar[0] = 0.9985, not at the clean prediction.
  """
  timesteps = np.asarray(timesteps, dtype=np.int64)
  ac = schedule.alphas_cumprod
  alphas = jnp.take(ac, timesteps)
  prev_idx = np.concatenate([[0], timesteps[:-1]])
  alphas_prev = jnp.take(ac, prev_idx)
  sigmas = jnp.asarray(eta, jnp.float32) * jnp.sqrt(
      (1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  return alphas, alphas_prev, sigmas


# ---------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------


def _as_partial(model_fn: Any) -> jax.tree_util.Partial:
  if isinstance(model_fn, jax.tree_util.Partial):
    return model_fn
  if not callable(model_fn):
    raise TypeError(f"model_fn must be callable, got {type(model_fn)}")
  return jax.tree_util.Partial(model_fn)


def _check_common(schedule: Schedule, x_T: jax.Array,
                  parameterization: Optional[str], mask: Any, x0: Any,
                  key: Any, key_needed: bool, who: str) -> str:
  if not isinstance(schedule, Schedule):
    raise TypeError(f"schedule must be a Schedule, got {type(schedule)}")
  if getattr(x_T, "ndim", 0) < 2:
    raise ValueError(f"x_T must be a batched array (B, ...), got "
                     f"shape {getattr(x_T, 'shape', None)}")
  param = schedule.parameterization if parameterization is None else (
      parameterization)
  if param not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {param!r}; expected one of "
                     f"{PARAMETERIZATIONS}")
  if (mask is None) != (x0 is None):
    raise ValueError("mask and x0 must be given together (inpainting)")
  if mask is not None:
    if tuple(x0.shape) != tuple(x_T.shape):
      raise ValueError(f"x0 shape {x0.shape} must equal x_T shape {x_T.shape}")
    try:
      np.broadcast_shapes(tuple(mask.shape), tuple(x_T.shape))
    except ValueError:
      raise ValueError(f"mask shape {mask.shape} does not broadcast to "
                       f"{x_T.shape}") from None
  if key_needed and key is None:
    raise ValueError(f"{who} needs a PRNG key (stochastic steps or mask)")
  return param


def _impose_known(schedule: Schedule, x: jax.Array, t: jax.Array,
                  mask: Optional[jax.Array], x0: Optional[jax.Array],
                  key: jax.Array) -> jax.Array:
  """x <- q_sample(x0, t) * mask + (1 - mask) * x, as the original inpainting.

  The original draws fresh noise for q_sample at every step (no fixed noise).
  """
  if mask is None:
    return x
  noise = jax.random.normal(key, x.shape, jnp.float32)
  return q_sample(schedule, x0, t, noise) * mask + (1.0 - mask) * x


def _pack(x_T: jax.Array, x: jax.Array, ys: Any, return_intermediates: bool
          ) -> SampleOut:
  if not return_intermediates:
    return x
  xs, preds = ys
  return x, {
      "x_inter": jnp.concatenate([x_T[None], xs], axis=0),
      "pred_x0": jnp.concatenate([x_T[None], preds], axis=0),
  }


def _prep(x_T, mask, x0, key):
  x_T = jnp.asarray(x_T, jnp.float32)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    x0 = jnp.asarray(x0, jnp.float32)
  if key is None:
    key = jax.random.PRNGKey(0)  # Unused: only deterministic steps remain.
  return x_T, mask, x0, key


# ---------------------------------------------------------------------------
# DDIM.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "timesteps", "use_noise", "return_intermediates", "parameterization"))
def _ddim_loop(model, schedule, x_T, eta, key, mask, x0, *, timesteps,
               use_noise, return_intermediates, parameterization):
  ts = np.asarray(timesteps, dtype=np.int64)
  alphas, alphas_prev, sigmas = ddim_parameters(schedule, ts, eta)
  # The original takes np.sqrt(1 - ddim_alphas) of the float32 alphas.
  sqrt_one_minus = jnp.sqrt(1.0 - alphas)
  rev = slice(None, None, -1)  # The original loops over np.flip(timesteps).
  n = ts.shape[0]
  batch = x_T.shape[0]

  def step(x, inp):
    i, t, a_t, a_prev, sigma, s1m = inp
    tb = jnp.full((batch,), t, jnp.int32)
    step_key = jax.random.fold_in(key, i)
    # The original applies the mask before the model call of each step.
    x = _impose_known(schedule, x, tb, mask, x0,
                      jax.random.fold_in(step_key, 1))
    out = model(x, tb).astype(jnp.float32)
    if parameterization == "eps":
      e_t = out
      pred_x0 = (x - s1m * e_t) / jnp.sqrt(a_t)
    else:
      pred_x0 = out
      e_t = (x - jnp.sqrt(a_t) * pred_x0) / s1m
    # No clipping of pred_x0 (the original has none in DDIM).
    dir_xt = jnp.sqrt(1.0 - a_prev - sigma**2) * e_t
    x_prev = jnp.sqrt(a_prev) * pred_x0 + dir_xt
    if use_noise:
      x_prev = x_prev + sigma * jax.random.normal(step_key, x.shape,
                                                  jnp.float32)
    return x_prev, ((x_prev, pred_x0) if return_intermediates else None)

  xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(ts[rev], jnp.int32),
        alphas[rev], alphas_prev[rev], sigmas[rev], sqrt_one_minus[rev])
  x, ys = jax.lax.scan(step, x_T, xs)
  return _pack(x_T, x, ys, return_intermediates)


def ddim_sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *,
                num_steps: int, eta: float = 0.0,
                key: Optional[jax.Array] = None,
                return_intermediates: bool = False,
                parameterization: Optional[str] = None,
                discretization: str = "uniform",
                mask: Optional[jax.Array] = None,
                x0: Optional[jax.Array] = None) -> SampleOut:
  """DDIM sampling exactly as `DDIMSampler.sample` (no clipping).

  Args:
    model_fn: (x, t) -> eps (or x0 for parameterization "x0").
    schedule: the noise schedule.
    x_T: starting latents (B, ...).
    num_steps: requested steps S (the "uniform" grid may give more).
    eta: DDIM eta; sigma noise per step uses `jax.random.fold_in(key, i)`.
    key: PRNG key, needed when eta != 0 or a mask is given.
    return_intermediates: also return {"x_inter", "pred_x0"} stacks, index 0
      = x_T, then one entry per step in sampling order.
    parameterization: "eps" or "x0"; None takes the schedule's.
    discretization: "uniform" / "quad" (original) or "solver_uniform" /
      "solver_quad" (T-1 down to 0 on `solver_grid`; see ddim_timesteps).
    mask: optional inpainting mask broadcastable to x_T; 1 keeps x0.
    x0: known latents for the mask. As in the original, before each model
      call x = q_sample(x0, t) * mask + (1 - mask) * x; the output after the
      last step is not re-masked.

  Returns:
    Final latents, or (latents, intermediates) if return_intermediates.
  """
  eta = float(eta)
  param = _check_common(schedule, x_T, parameterization, mask, x0, key,
                        eta != 0.0 or mask is not None, "ddim_sample")
  ts = ddim_timesteps(schedule.num_timesteps, num_steps, discretization)
  x_T, mask, x0, key = _prep(x_T, mask, x0, key)
  return _ddim_loop(_as_partial(model_fn), schedule, x_T, eta, key, mask, x0,
                    timesteps=tuple(int(v) for v in ts),
                    use_noise=eta != 0.0,
                    return_intermediates=bool(return_intermediates),
                    parameterization=param)


# ---------------------------------------------------------------------------
# Ancestral DDPM.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "num_steps", "clip_denoised", "return_intermediates", "parameterization"))
def _ddpm_loop(model, schedule, x_T, key, mask, x0, *, num_steps,
               clip_denoised, return_intermediates, parameterization):
  batch = x_T.shape[0]

  def step(x, inp):
    i, t = inp
    tb = jnp.full((batch,), t, jnp.int32)
    out = model(x, tb).astype(jnp.float32)
    if parameterization == "eps":
      x_recon = (schedule.sqrt_recip_alphas_cumprod[t] * x -
                 schedule.sqrt_recipm1_alphas_cumprod[t] * out)
    else:
      x_recon = out
    if clip_denoised:
      x_recon = jnp.clip(x_recon, -1.0, 1.0)
    mean = (schedule.posterior_mean_coef1[t] * x_recon +
            schedule.posterior_mean_coef2[t] * x)
    step_key = jax.random.fold_in(key, i)
    noise = jax.random.normal(step_key, x.shape, jnp.float32)
    # No noise at t == 0, as the original's nonzero_mask.
    std = jnp.where(t == 0, 0.0,
                    jnp.exp(0.5 * schedule.posterior_log_variance_clipped[t]))
    x = mean + std * noise
    # p_sample_loop applies the mask after the step, noising x0 to level t.
    x = _impose_known(schedule, x, tb, mask, x0,
                      jax.random.fold_in(step_key, 1))
    return x, ((x, x_recon) if return_intermediates else None)

  ts = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
  x, ys = jax.lax.scan(step, x_T, (jnp.arange(num_steps, dtype=jnp.int32), ts))
  return _pack(x_T, x, ys, return_intermediates)


def ddpm_sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *,
                key: jax.Array, num_steps: Optional[int] = None,
                clip_denoised: bool = False,
                return_intermediates: bool = False,
                parameterization: Optional[str] = None,
                mask: Optional[jax.Array] = None,
                x0: Optional[jax.Array] = None) -> SampleOut:
  """Ancestral sampling with the posterior mean/variance (`p_sample_loop`).

  Args:
    model_fn: (x, t) -> eps (or x0).
    schedule: the noise schedule.
    x_T: starting latents (B, ...).
    key: PRNG key; step i draws its noise from `jax.random.fold_in(key, i)`.
    num_steps: run t = num_steps-1, ..., 0 (the original's `start_T`);
      None = all T steps.
    clip_denoised: clamp the x0 estimate to [-1, 1]. False by default:
      `LatentDiffusion.p_sample` defaults to False (latents are not in
      [-1, 1]), although `p_sample_loop` forwards `self.clip_denoised`.
    return_intermediates: also return {"x_inter", "pred_x0"} (index 0 = x_T).
    parameterization: "eps" or "x0"; None takes the schedule's.
    mask: optional inpainting mask (1 keeps x0), applied after each step.
    x0: known latents for the mask.

  Returns:
    Final latents, or (latents, intermediates).
  """
  param = _check_common(schedule, x_T, parameterization, mask, x0, key, True,
                        "ddpm_sample")
  n = schedule.num_timesteps if num_steps is None else _check_int(
      "num_steps", num_steps, 1, schedule.num_timesteps)
  x_T, mask, x0, key = _prep(x_T, mask, x0, key)
  return _ddpm_loop(_as_partial(model_fn), schedule, x_T, key, mask, x0,
                    num_steps=n, clip_denoised=bool(clip_denoised),
                    return_intermediates=bool(return_intermediates),
                    parameterization=param)


# ---------------------------------------------------------------------------
# DPM-Solver++(2M).
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "grid", "return_intermediates", "parameterization"))
def _dpmpp_2m_loop(model, schedule, x_T, key, mask, x0, *, grid,
                   return_intermediates, parameterization):
  tg = np.asarray(grid, dtype=np.int64)[::-1]  # T-1 ... 0, N+1 points.
  n = tg.shape[0] - 1
  batch = x_T.shape[0]
  # alpha, sigma from the float64-derived buffers: 1 - abar in float32 would
  # lose digits near t = 0 where abar ~ 1.
  alpha = jnp.take(schedule.sqrt_alphas_cumprod, tg)
  sigma = jnp.take(schedule.sqrt_one_minus_alphas_cumprod, tg)
  lam = jnp.log(alpha) - jnp.log(sigma)
  h = lam[1:] - lam[:-1]
  # Multistep coefficients: first step is first order (= DDIM), later steps
  # use D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i.
  inv_2r = h[1:] / (2.0 * h[:-1])
  c_cur = jnp.concatenate([jnp.ones((1,)), 1.0 + inv_2r])
  c_prev = jnp.concatenate([jnp.zeros((1,)), -inv_2r])
  ratio = sigma[1:] / sigma[:-1]
  phi = -alpha[1:] * jnp.expm1(-h)

  def step(carry, inp):
    x, d_prev = carry
    i, t, a_i, s_i, cc, cp, rt, ph = inp
    tb = jnp.full((batch,), t, jnp.int32)
    x = _impose_known(schedule, x, tb, mask, x0,
                      jax.random.fold_in(jax.random.fold_in(key, i), 1))
    out = model(x, tb).astype(jnp.float32)
    d_i = (x - s_i * out) / a_i if parameterization == "eps" else out
    x_next = rt * x + ph * (cc * d_i + cp * d_prev)
    return (x_next, d_i), ((x_next, d_i) if return_intermediates else None)

  xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(tg[:-1], jnp.int32),
        alpha[:-1], sigma[:-1], c_cur, c_prev, ratio, phi)
  (x, _), ys = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), xs)
  return _pack(x_T, x, ys, return_intermediates)


def dpmpp_2m_sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, *,
                    num_steps: int, spacing: str = "quad",
                    key: Optional[jax.Array] = None,
                    return_intermediates: bool = False,
                    parameterization: Optional[str] = None,
                    mask: Optional[jax.Array] = None,
                    x0: Optional[jax.Array] = None) -> SampleOut:
  """DPM-Solver++(2M), deterministic, on the discrete schedule.

  lambda_t = log(alpha_t / sigma_t), alpha = sqrt(abar), sigma = sqrt(1-abar);
  the num_steps + 1 time points are `solver_grid(T, num_steps, spacing)`
  (T-1 down to 0), so the result lives at abar[0] like DDIM's; num_steps
  model calls. Textbook 2M: the first step is first order (= DDIM), every
  later step second order, no lower-order final step.

  Args:
    model_fn: (x, t) -> eps (converted to x0) or x0.
    schedule: the noise schedule.
    x_T: starting latents (B, ...).
    num_steps: number of solver steps (= model evaluations), 1..T-1.
    spacing: "quad" (default, dense near t = 0) or "uniform" in index space;
      see `solver_grid` for why uniform spacing is a poor fit here.
    key: PRNG key, only needed with a mask.
    return_intermediates: also return {"x_inter", "pred_x0"} (index 0 = x_T).
    parameterization: "eps" or "x0"; None takes the schedule's.
    mask: optional inpainting mask (1 keeps x0), applied before each model
      call as in DDIM.
    x0: known latents for the mask.

  Returns:
    Final latents, or (latents, intermediates).
  """
  param = _check_common(schedule, x_T, parameterization, mask, x0, key,
                        mask is not None, "dpmpp_2m_sample")
  grid = solver_grid(schedule.num_timesteps, num_steps, spacing)
  x_T, mask, x0, key = _prep(x_T, mask, x0, key)
  return _dpmpp_2m_loop(_as_partial(model_fn), schedule, x_T, key, mask, x0,
                        grid=tuple(int(v) for v in grid),
                        return_intermediates=bool(return_intermediates),
                        parameterization=param)


# ---------------------------------------------------------------------------
# Dispatcher.
# ---------------------------------------------------------------------------

_SAMPLER_FNS = {
    "ddim": ddim_sample,
    "ddpm": ddpm_sample,
    "dpmpp_2m": dpmpp_2m_sample,
}


def sample(name: str, model_fn: ModelFn, schedule: Schedule, x_T: jax.Array,
           **kwargs: Any) -> SampleOut:
  """Runs sampler `name` ("ddim", "ddpm", "dpmpp_2m") with its kwargs."""
  if name not in _SAMPLER_FNS:
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
  return _SAMPLER_FNS[name](model_fn, schedule, x_T, **kwargs)


# ---------------------------------------------------------------------------
# Step limits: what each sampler takes, for the forms and flags that ask.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def step_ranges(name: str, num_timesteps: int) -> tuple[tuple[int, int], ...]:
  """The step counts sampler `name` runs on a `num_timesteps` schedule, as
  inclusive (first, last) ranges: DDPM 1..T, DPM-Solver++(2M) 1..T-1, DDIM
  (the original "uniform" grid, as `sample` runs it) every count whose +1
  shift stays below T, e.g. 1..250 and 334..500 for T = 1000."""
  if name not in _SAMPLER_FNS:
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
  if name == "ddpm":
    return ((1, num_timesteps),)
  if name == "dpmpp_2m":
    return ((1, num_timesteps - 1),)
  ranges: list[list[int]] = []
  for n in range(1, num_timesteps + 1):
    try:
      ddim_timesteps(num_timesteps, n)
    except ValueError:
      continue
    if ranges and ranges[-1][1] == n - 1:
      ranges[-1][1] = n
    else:
      ranges.append([n, n])
  return tuple((a, b) for a, b in ranges)


def describe_steps(name: str, num_timesteps: int) -> str:
  """`step_ranges` in words: "1 to 999", or for DDIM "1 to 500 (not 3, 9,
  27, 36 to 37, 101 to 111 or 251 to 333)"."""
  ranges = step_ranges(name, num_timesteps)
  span = lambda a, b: f"{a} to {b}" if a != b else str(a)  # noqa: E731
  text = span(ranges[0][0], ranges[-1][1])
  gaps = [span(b + 1, a - 1) for (_, b), (a, _) in zip(ranges, ranges[1:])]
  if gaps:
    text += " (not " + ", ".join(gaps[:-1]) + (
        " or " if len(gaps) > 1 else "") + gaps[-1] + ")"
  return text


def check_steps(name: str, steps: Any, num_timesteps: int) -> int:
  """`steps` if sampler `name` runs that many on this schedule, else a
  ValueError of one line naming the counts it takes."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or (
      not any(a <= steps <= b for a, b in step_ranges(name, num_timesteps))):
    raise ValueError(
        f"steps {steps}: {name} takes {describe_steps(name, num_timesteps)} "
        f"on this model's {num_timesteps}-step schedule")
  return int(steps)
