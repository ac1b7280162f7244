"""Training: the LDM train step, the demo's VQ trainer, and a run's set-up.

  ldm_step.py           TrainState, optimiser, the jitted LDM train step
  vq_trainer.py         the demo's own VQ-f4 (losses, step, loop)
  first_stage_setup.py  the run's frozen first stage: found, trained or random
  startup.py            preflight checks; a fresh, resumed or converted state
  loop.py               what both loops share: jit conventions, log steps,
                        the LDM's input, stop signals and saves
  metrics.py            metrics.jsonl and TensorBoard
  previews.py           sample grids written while training

May import: every layer below it (root, runtime, models, diffusion, data,
checkpoint, config, inference); never eval or ui.
"""
