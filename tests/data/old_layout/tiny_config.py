"""configs/seg_f4.py:tiny made smaller still, for the committed old-layout
workdir (make.py): the same structure (UNet with attention, rescaler 182 -> 3
in 2 stages, VQ-f4 with 3-channel latents) at one level and no extra res
blocks, so that the train state (params, EMA, AdamW moments) and the first
stage stay small in git. Lists cannot be overridden on train.py's command
line, hence this file. Loaded by train.py from the repository root, where
`configs` is importable."""

from configs import seg_f4


def get_config(arg=None):
  del arg
  c = seg_f4.get_config("tiny")
  unet = c.model.params.unet_config.params
  unet.channel_mult = [1]
  unet.attention_resolutions = [1]
  unet.num_res_blocks = 0
  vq = c.model.params.first_stage_config.params.ddconfig
  vq.ch_mult = [1, 1, 1]  # still f4: two downsamplings
  vq.num_res_blocks = 0
  return c
