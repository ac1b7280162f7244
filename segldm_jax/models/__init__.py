"""The networks, as Flax Linen modules whose parameter trees mirror the
PyTorch state_dicts (conversion is a rename table plus transposes).

  ldm.py, unet.py, rescaler.py, autoencoder.py, layers.py, winograd.py
  build.py   LDM-style config nodes -> modules; parameter init

May import: the root and runtime; never data, training, inference,
checkpoint or ui code.
"""
