"""Runtime: where programs run and how processes cooperate.

  sharding.py           device mesh, rule-based shardings, global batches
  distributed.py        joining a multi-process run; barriers, preemption
  peers.py              a lost peer process ends the run in one line
  last_words.py         the helper (`python -m`) that speaks for an aborted one
  xla_cpu.py            XLA:CPU settings (XNNPACK convolutions)
  compilation_cache.py  jax's persistent compilation cache

May import: the package root (errors, formatting). Nothing else here.
"""
