"""Joining a multi-process run, and the collectives every process meets at.

`maybe_initialize_distributed` starts jax.distributed when a launcher (or
train.py's flags) announces several processes; `barrier`, `compile_for_all`
and `preemption_requested` keep the processes in step. `end_after_error` is
how a process leaves after its own one-line error: `peers.PeerWatcher`
installs what that does in a watched run.
"""
from __future__ import annotations

import os
from typing import Callable

from absl import flags as absl_flags
import jax
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as ocp_multihost

# Environment variables by which cluster launchers announce a multi-process
# job; jax.distributed.initialize() reads the details itself for these.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")

# jax's own heartbeat check ends a process whose peer went silent with a C++
# fatal error: it is given this much longer than the peer watcher, whose
# line saying what happened must come first.
_JAX_HEARTBEAT_MARGIN_S = 5
DEFAULT_HEARTBEAT_TIMEOUT_S = 60

# Where process 0's coordination service listens, when given to us (not when
# jax detects the cluster itself): the lost-host helper probes it.
_coordinator_address = ""

# Installed by a peer watcher: how this process leaves after its own error.
_end_after_error: Callable[[str], None] | None = None


def coordinator_address() -> str:
  """The coordinator's host:port as given to `maybe_initialize_distributed`;
  "" when jax found the cluster itself (or in a single process)."""
  return _coordinator_address


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 heartbeat_timeout_s: int | None = None) -> bool:
  """Joins a multi-process run when launched as one; True if it did.

  Explicit arguments (train.py's flags) win, then JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID, then jax's own detection of SLURM,
  Open MPI and TPU pods. A single process (none of these) does nothing. On
  CPU, collectives go through gloo, so several processes on one machine (or
  several machines without accelerators) also work.

  `heartbeat_timeout_s` (config `parallel.heartbeat_timeout_s`): how long a
  silent peer counts as alive; see `peers.watch_peers`, which reports it.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", 0)) or None
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  explicit = coordinator_address is not None and num_processes is not None
  launched = any(int(env.get(k, "1") or 1) > 1 if k.endswith(("NTASKS", "SIZE"))
                 else k in env for k in _CLUSTER_ENV)
  if not explicit and not launched:
    return False
  # Only affects the CPU backend (harmless on GPU/TPU hosts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = int(heartbeat_timeout_s or DEFAULT_HEARTBEAT_TIMEOUT_S)
  timeouts = {"heartbeat_timeout_seconds": timeout + _JAX_HEARTBEAT_MARGIN_S}
  global _coordinator_address
  _coordinator_address = coordinator_address or ""  # "" when jax detects it
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
  # Orbax's own barriers then go through the coordination service too,
  # instead of through device collectives (see `barrier`).
  try:
    absl_flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  except (AttributeError, absl_flags.Error):  # flags unparsed or renamed
    pass
  jax.devices()  # backend (and gloo transport) up in every process...
  barrier("segldm_backend_ready")  # ...before anyone starts a collective
  return True


def coordination_client():
  """The coordination service's client that jax.distributed.initialize made
  (jax has no public accessor; orbax exposes it)."""
  return ocp_multihost.get_jax_distributed_client()


def barrier(name: str, timeout_s: int = 900) -> None:
  """Waits until every process reaches `name`; a no-op for one process.

  Goes through the coordination service, which waits as long as asked. This
  matters on CPU: gloo gives a process only 30 s to join a communicator it
  has not used before, so a process still compiling (or importing, on a busy
  machine) would fail the others' first collective.
  """
  if jax.process_count() == 1:
    return
  coordination_client().wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def compile_for_all(jitted, *args, name: str, **kwargs):
  """`jitted` compiled ahead of time, once every process has compiled it.

  The first run of a program with cross-process collectives then starts in
  step everywhere (see `barrier`). One process: `jitted` itself, compiled on
  first call as usual.
  """
  if jax.process_count() == 1:
    return jitted
  compiled = jitted.lower(*args, **kwargs).compile()
  barrier(name)
  return compiled


def preemption_requested(step: int) -> bool:
  """True, at the same `step` in every process, once any process of a
  multi-process run got SIGTERM (a preemption notice); call it every step.

  jax's preemption service catches SIGTERM in each process (so do not
  install a Python handler for it there) and agrees on the first step every
  process can still reach. One process: always False (handle the signal).
  """
  if jax.process_count() == 1:
    return False
  return multihost_utils.reached_preemption_sync_point(step)


def on_own_error(handler: Callable[[str], None] | None) -> None:
  """Installs (None: removes) what `end_after_error` does."""
  global _end_after_error
  _end_after_error = handler


def end_after_error(line: str) -> None:
  """After this process printed `line` (its one-line error) in a watched
  multi-process run: tells the peers, then ends at once with exit code 1.

  A normal exit would wait in jax's shutdown barrier for the peers, and they
  wait for this process in their next collective: both would hang until a
  timeout. The peers' watchers instead report this line and stop. Nothing
  happens in a single-process run (no watcher).
  """
  if _end_after_error is not None:
    _end_after_error(line)
