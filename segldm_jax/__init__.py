"""segldm-jax: latent diffusion for semantic image synthesis in JAX/Flax."""

__version__ = "0.1.0"
