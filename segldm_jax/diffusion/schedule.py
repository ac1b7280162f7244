"""Discrete diffusion noise schedule, mirroring `DDPM.register_schedule`.

Reference: CompVis/latent-diffusion @ a506df5, `ldm/modules/diffusionmodules/
util.py::make_beta_schedule` and `ldm/models/diffusion/ddpm.py::DDPM.
register_schedule`. Every buffer is computed in float64 and cast to float32,
as the original does before registering it; `lvlb_weights` is computed from
the float32 buffers, again as the original does.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
PARAMETERIZATIONS = ("eps", "x0")


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """float64 linspace with torch's CPU formula (symmetric from both ends).

  torch fills the first half as `start + i*step` and the second half as
  `end - (steps-1-i)*step`; np.linspace differs in the last ulp for some
  entries. Mirroring it keeps the float64 betas bit-identical.
  """
  if steps == 1:
    return np.array([start], dtype=np.float64)
  step = (end - start) / (steps - 1)
  idx = np.arange(steps, dtype=np.float64)
  half = steps // 2
  return np.where(idx < half, start + step * idx,
                  end - step * (steps - 1 - idx)).astype(np.float64)


def make_betas(kind: str, num_timesteps: int, linear_start: float = 1e-4,
               linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
  """Beta schedule in float64, exactly as the original `make_beta_schedule`.

  Args:
    kind: "linear" (linear in sqrt(beta), then squared), "cosine" (Nichol &
      Dhariwal, clipped to [0, 0.999]), "sqrt_linear" (linear in beta, despite
      the name) or "sqrt" (sqrt of a linear ramp), names as in the original.
    num_timesteps: number of diffusion steps T.
    linear_start: first beta of the linear-type schedules.
    linear_end: last beta of the linear-type schedules.
    cosine_s: offset s of the cosine schedule.

  Returns:
    float64 array of shape (T,).
  """
  if kind not in BETA_SCHEDULES:
    raise ValueError(
        f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")
  if isinstance(num_timesteps, bool) or not isinstance(
      num_timesteps, (int, np.integer)) or num_timesteps < 2:
    raise ValueError(
        f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
  n = int(num_timesteps)
  if kind == "linear":
    if linear_start < 0 or linear_end < 0:
      raise ValueError(
          f"linear schedule needs linear_start, linear_end >= 0, got "
          f"{linear_start!r}, {linear_end!r}")
    betas = _torch_linspace(linear_start**0.5, linear_end**0.5, n)**2
  elif kind == "cosine":
    if not cosine_s > 0:
      raise ValueError(f"cosine_s must be > 0, got {cosine_s!r}")
    steps = np.arange(n + 1, dtype=np.float64) / n + cosine_s
    f = np.cos(steps / (1 + cosine_s) * math.pi / 2)**2
    f = f / f[0]
    betas = np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)
  elif kind == "sqrt_linear":
    betas = _torch_linspace(linear_start, linear_end, n)
  else:  # "sqrt"
    if linear_start < 0 or linear_end < 0:
      raise ValueError(
          f"sqrt schedule needs linear_start, linear_end >= 0, got "
          f"{linear_start!r}, {linear_end!r}")
    betas = _torch_linspace(linear_start, linear_end, n)**0.5
  return betas.astype(np.float64)


def gather_at(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] as (B, 1, ..., 1), like the original `extract_into_tensor`."""
  out = jnp.take(values, t, axis=0)
  return out.reshape(out.shape + (1,) * (ndim - 1))


@flax.struct.dataclass
class Schedule:
  """All schedule buffers of the original, as float32 arrays of shape (T,).

  A JAX pytree: the arrays are leaves, `num_timesteps` and `parameterization`
  are static metadata, so a Schedule can be passed straight into jitted code.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  lvlb_weights: jax.Array
  num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  parameterization: str = flax.struct.field(pytree_node=False, default="eps")

  @classmethod
  def create(cls, kind: str = "linear", num_timesteps: int = 1000,
             linear_start: float = 1e-4, linear_end: float = 2e-2,
             cosine_s: float = 8e-3, parameterization: str = "eps"
             ) -> "Schedule":
    """Builds the schedule like `register_schedule` (v_posterior = 0)."""
    if parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {parameterization!r}; "
                       f"expected one of {PARAMETERIZATIONS}")
    betas = make_betas(kind, num_timesteps, linear_start, linear_end, cosine_s)
    return cls.from_betas(betas, parameterization=parameterization)

  @classmethod
  def from_betas(cls, betas: np.ndarray, parameterization: str = "eps"
                 ) -> "Schedule":
    """Builds the schedule from given betas (the original's `given_betas`)."""
    if parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {parameterization!r}; "
                       f"expected one of {PARAMETERIZATIONS}")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
      raise ValueError(f"betas must be 1-D with >= 2 entries, got shape "
                       f"{betas.shape}")
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad.size:
      # beta = 0 makes 1 - alphas_cumprod vanish (division by zero in the
      # posterior); beta >= 1 makes alphas_cumprod non-positive.
      raise ValueError(f"betas must lie in (0, 1); betas[{bad[0]}] = "
                       f"{float(betas[bad[0]])!r}")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    bufs = dict(
        betas=f32(betas),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1)),
        posterior_variance=f32(post_var),
        # Clipped because the posterior variance is 0 at t = 0.
        posterior_log_variance_clipped=f32(
            np.log(np.maximum(post_var, 1e-20))),
        posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) /
                                 (1.0 - ac)),
    )
    # The original computes lvlb_weights in float32 from the float32 buffers.
    with np.errstate(divide="ignore", invalid="ignore"):
      if parameterization == "eps":
        lvlb = bufs["betas"]**2 / (
            np.float32(2) * bufs["posterior_variance"] * f32(alphas) *
            (np.float32(1) - bufs["alphas_cumprod"]))
      else:
        # Mirrors the original literally: `(2. * 1 - ac)` is 2 - ac, not
        # 2 * (1 - ac). Only logged (original_elbo_weight defaults to 0).
        ac32 = bufs["alphas_cumprod"]
        lvlb = np.float32(0.5) * np.sqrt(ac32) / (np.float32(2.0) - ac32)
    lvlb = f32(lvlb)
    # Entry 0 is inf for eps (posterior variance 0); the original copies 1.
    lvlb[0] = lvlb[1]
    bufs["lvlb_weights"] = lvlb
    return cls(**{k: jnp.asarray(v) for k, v in bufs.items()},
               num_timesteps=int(betas.shape[0]),
               parameterization=parameterization)
