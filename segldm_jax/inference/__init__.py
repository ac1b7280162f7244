"""Inference: a trained or converted run, loaded and sampled.

  trained_model.py  `load(workdir)` -> TrainedModel (.sample, .edit)
  first_stage.py    finds, checks and loads a run's frozen VQ
  generation.py     masks -> images: one batch, tiles, a stream of batches
  region_edit.py    repaint a region of a photo to new labels

May import: the root, runtime, models, diffusion, data, checkpoint, config.
Never training code or optax: sampling stays light (tests/test_architecture.py).
"""
