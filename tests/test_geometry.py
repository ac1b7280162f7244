"""Config geometry: sizes that must agree fail at start with the fix named."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import seg_f4
from segldm_jax.config import run_config
from segldm_jax.models.rescaler import SpatialRescaler



def _config(variant=None, **data):
  c = seg_f4.get_config(variant)
  c.data.source = "synthetic"
  c.first_stage.allow_random_init = True
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.mark.parametrize("variant,sizes", [
    (None, {"image": 256, "mask": 256, "latent": 64, "factor": 4}),
    ("demo", {"image": 64, "mask": 64, "latent": 16, "factor": 4}),
    ("tiny", {"image": 32, "mask": 32, "latent": 8, "factor": 4}),
])
def test_variants_are_consistent(variant, sizes):
  c = _config(variant)
  g = run_config.validate(c)
  assert dataclasses.asdict(g) == {**sizes, "mask_stages": 0, "unet_levels": 2}
  assert g.step_px == sizes["factor"] * 4  # two UNet halvings, no mask ones
  c.model.params.image_size = 0  # bookkeeping: resolve() writes it, not validate()
  run_config.validate(c)
  assert c.model.params.image_size == 0
  run_config.resolve(c)
  assert c.model.params.image_size == sizes["latent"]  # derived


def test_mask_at_latent_size_with_two_stages_names_the_fix():
  # The widely shared recipe: masks downsampled to the latent size in the
  # dataset, and still n_stages 2. The reference crashes at the concat.
  c = _config(mask_size=64)
  with pytest.raises(run_config.ConfigError) as e:
    run_config.validate(c)
  msg = str(e.value)
  assert "\n" not in msg
  assert "n_stages=2" in msg and "latent is 64x64" in msg
  assert "set model.params.cond_stage_config.params.n_stages=0" in msg


def test_mask_at_latent_size_with_zero_stages_is_valid():
  c = _config(mask_size=64)
  c.model.params.cond_stage_config.params.n_stages = 0
  assert run_config.validate(c).mask == 64


@pytest.mark.parametrize("field,value,expect", [
    ("image_size", 250, "data.image_size=250 is not divisible by the first "
     "stage's downsampling factor 4; use 248"),
    ("num_classes", 150, "cond_stage_config.params.in_channels=182 but "
     "data.num_classes=150"),
])
def test_data_sizes(field, value, expect):
  with pytest.raises(run_config.ConfigError, match=expect):
    run_config.validate(_config(**{field: value}))


def test_unet_in_channels_must_be_latent_plus_conditioning():
  c = _config()
  c.model.params.unet_config.params.in_channels = 185
  with pytest.raises(run_config.ConfigError, match=r"in_channels=185 .* use 6$"):
    run_config.validate(c)


def test_latent_must_divide_by_unet_levels():
  c = _config("tiny", image_size=24)  # latent 6, UNet halves twice
  with pytest.raises(run_config.ConfigError,
                     match="latent size 6 is not divisible by 4"):
    run_config.validate(c)


def test_batch_must_split_over_mesh():
  c = _config()
  c.train.batch_size = 12
  with pytest.raises(run_config.ConfigError, match="use a multiple of 8"):
    run_config.check_batch_fits_mesh(c, batch_devices=8, processes=1)


def test_missing_first_stage_says_how_to_convert():
  c = _config()
  c.first_stage.allow_random_init = False
  with pytest.raises(run_config.ConfigError,
                     match="python convert_torch_ckpt.py vq-f4/model.ckpt"):
    run_config.validate(c)


@pytest.mark.parametrize("shape,stages,mask_stages", [
    ((2, 32, 32), 2, 0), ((2, 30, 23), 2, 0), ((1, 16, 16), 0, 2)])
def test_rescaler_from_labels_equals_one_hot_path(shape, stages, mask_stages):
  m = SpatialRescaler(n_stages=stages, in_channels=7, out_channels=3)
  params = m.init(jax.random.key(0), jnp.zeros((1, 4, 4, 7)))
  labels = np.random.RandomState(0).randint(0, 7, shape).astype(np.uint8)
  labels[0, :3] = 255  # ignored pixels: an all-zero one-hot
  one_hot = jax.nn.one_hot(labels, 7)
  for _ in range(mask_stages):  # masks given as 2x2 class fractions
    one_hot = one_hot.reshape(one_hot.shape[0], one_hot.shape[1] // 2, 2,
                              one_hot.shape[2] // 2, 2, 7).mean((2, 4))
  want = m.apply(params, one_hot)
  got = m.apply(params, labels, mask_stages, method="from_labels")
  np.testing.assert_allclose(got, want, atol=1e-6)
