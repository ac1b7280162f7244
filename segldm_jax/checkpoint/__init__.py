"""Checkpoints: what lies in a workdir or a model directory, and reading
and writing it.

  workdir_files.py  the file layout; writable workdirs, free space, run.lock
  store.py          orbax save/restore of model directories and train states
  manifest.py       a hash per array, checked on every restore
  saved_shapes.py   saved shapes against a config's, before any restore

May import: the root, runtime, models.
"""
