"""Diffusion process: noise schedule, training objective and samplers.

May import: the root and runtime; never data, training, inference,
checkpoint or ui code.
"""

from segldm_jax.diffusion.objective import diffusion_loss, q_sample
from segldm_jax.diffusion.samplers import (SAMPLERS, ddim_parameters,
                                           ddim_sample, ddim_timesteps,
                                           ddpm_sample, dpmpp_2m_sample,
                                           sample, solver_grid)
from segldm_jax.diffusion.schedule import Schedule, make_betas

__all__ = [
    "SAMPLERS", "Schedule", "ddim_parameters", "ddim_sample", "ddim_timesteps",
    "ddpm_sample", "diffusion_loss", "dpmpp_2m_sample", "make_betas",
    "q_sample", "sample", "solver_grid",
]
