"""Run configs and the command lines that set them.

  run_config.py  geometry and checks of a run config; config.json in a workdir
  cli.py         flag errors, unknown keys, `main_exits` (one-line errors)

May import: the root, runtime, models, diffusion, data, checkpoint.
"""
