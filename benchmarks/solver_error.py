"""Solver error vs step count: DDIM against DPM-Solver++(2M).

Error = RMS distance to the full-resolution DDIM solution (eta 0, every one of
the 999 index steps from t = 999 down to t = 0, the finest DDIM the discrete
schedule allows; the original's "uniform" DDIM cannot run 1000 steps, its
+1 shift would index abar[1000]) from the same x_T, for two fixed models:

* analytic: data ~ N(mu, s^2 I) per channel, exact eps-prediction in closed
  form (its probability-flow ODE is also solvable: the last row of the
  table gives each solver's error against that exact solution);
* mlp: a fixed random pointwise tanh MLP denoiser (nonlinear in x and t).

Columns: DDIM on the original "uniform" grid (starts at t = 961 for S = 25),
DDIM on the quadratic grid DPM-Solver++ uses, DPM-Solver++(2M) on that
quadratic grid (the default) and on a uniform grid over [0, 999].

Run: .venv/bin/python benchmarks/solver_error.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from segldm_jax.diffusion.samplers import (  # noqa: E402
    ddim_sample, dpmpp_2m_sample)
from segldm_jax.diffusion.schedule import Schedule  # noqa: E402

STEPS = (5, 10, 25, 50, 100)
MU = np.array([1.5, -0.5, 0.25], np.float32)
STD = 0.5


def gaussian_eps(schedule: Schedule):
  """Exact eps(x_t, t) = E[eps | x_t] for data ~ N(MU, STD^2 I)."""
  def fn(x, t):
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD**2 + 1 - a)
  return fn


def gaussian_ode_exact(schedule: Schedule, x_T):
  """Exact probability-flow ODE solution from t = T-1 to t = 0."""
  a_T = schedule.alphas_cumprod[-1]
  a_0 = schedule.alphas_cumprod[0]
  z = (x_T - jnp.sqrt(a_T) * MU) / jnp.sqrt(a_T * STD**2 + 1 - a_T)
  return jnp.sqrt(a_0) * MU + jnp.sqrt(a_0 * STD**2 + 1 - a_0) * z


def mlp_eps(schedule: Schedule, seed: int = 0, width: int = 16):
  """Fixed random pointwise denoiser x0 = W2 tanh(W1 x + b1 + w_t t/T) + b2."""
  rng = np.random.default_rng(seed)
  c = MU.shape[0]
  w1 = jnp.asarray(rng.normal(size=(c, width)) / np.sqrt(c), jnp.float32)
  b1 = jnp.asarray(rng.normal(size=(width,)) * 0.3, jnp.float32)
  wt = jnp.asarray(rng.normal(size=(width,)) * 0.5, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(width, c)) / 4, jnp.float32)
  b2 = jnp.asarray([0.5, -0.3, 0.1], jnp.float32)
  num_t = schedule.num_timesteps

  def fn(x, t):
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    tt = (t.astype(jnp.float32) / num_t).reshape(-1, 1, 1, 1)
    x0 = jnp.tanh(x @ w1 + b1 + tt * wt) @ w2 + b2
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return fn


def rms(a, b) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(a - b))))


def main() -> None:
  schedule = Schedule.create("linear", 1000, 0.0015, 0.0205)
  x_T = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3), jnp.float32)
  models = {"analytic": gaussian_eps(schedule), "mlp": mlp_eps(schedule)}
  print("| model | steps | DDIM (orig. uniform grid) | DDIM (quad grid) | "
        "DPM++(2M) (quad grid, default) | DPM++(2M) (uniform grid) |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  notes = []
  for name, fn in models.items():
    ref = ddim_sample(fn, schedule, x_T, num_steps=999,
                      discretization="solver_uniform")
    for n in STEPS:
      row = [
          rms(ddim_sample(fn, schedule, x_T, num_steps=n), ref),
          rms(ddim_sample(fn, schedule, x_T, num_steps=n,
                          discretization="solver_quad"), ref),
          rms(dpmpp_2m_sample(fn, schedule, x_T, num_steps=n), ref),
          rms(dpmpp_2m_sample(fn, schedule, x_T, num_steps=n,
                              spacing="uniform"), ref),
      ]
      print(f"| {name} | {n} | " + " | ".join(f"{v:.2e}" for v in row) + " |")
    ref2 = dpmpp_2m_sample(fn, schedule, x_T, num_steps=999)
    notes.append(f"{name}: 999-step DDIM vs 999-step DPM++(2M) (the floor a "
                 f"second-order solver hits in this metric): "
                 f"{rms(ref, ref2):.2e}")
    if name == "analytic":
      exact = gaussian_ode_exact(schedule, x_T)
      notes.append(f"analytic vs exact ODE: 999-step DDIM {rms(ref, exact):.2e}"
                   f", 999-step DPM++(2M) {rms(ref2, exact):.2e}")
      row = [
          rms(ddim_sample(fn, schedule, x_T, num_steps=25), exact),
          rms(ddim_sample(fn, schedule, x_T, num_steps=25,
                          discretization="solver_quad"), exact),
          rms(dpmpp_2m_sample(fn, schedule, x_T, num_steps=25), exact),
          rms(dpmpp_2m_sample(fn, schedule, x_T, num_steps=25,
                              spacing="uniform"), exact),
      ]
      print("| analytic, vs exact ODE | 25 | " +
            " | ".join(f"{v:.2e}" for v in row) + " |")
  print()
  for note in notes:
    print(f"- {note}")


if __name__ == "__main__":
  main()
