"""segldm-jax: latent diffusion for semantic image synthesis in JAX/Flax.

    import segldm_jax
    model = segldm_jax.load("workdirs/demo")      # a trained or converted run
    images = model.sample(masks, num_samples=2)   # (N, H, W) ids -> uint8 RGB
    edited = model.edit(photo, labels, new_labels)
"""

__version__ = "0.1.0"


def load(workdir, use_ema: bool = True):
  """A trained run's or a converted checkpoint's workdir, ready to sample
  (`trained_model.TrainedModel`), computing as fast as this backend allows."""
  # Imported here: `import segldm_jax` stays light (no jax start-up).
  from segldm_jax.inference import trained_model  # pylint: disable=g-import-not-at-top
  from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.use_xnnpack_convolutions()  # takes effect if jax has not started
  return trained_model.load(workdir, use_ema=use_ema,
                            conv=xla_cpu.preferred_conv())
