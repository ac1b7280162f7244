"""Device mesh, rule-based sharding and global batches (big_vision style).

Layers carry no sharding annotations. The config names a mesh
(`[("data", -1), ("fsdp", 1)]`) and a rule list (`[(regex, strategy), ...]`);
`shardings_from_rules` turns an abstract train state into a tree of
`NamedSharding`s, and the state is created directly with them
(`jax.jit(init, out_shardings=shardings)()`) so no device ever holds the full
replicated copy.

Mesh axes are `AxisType.Auto`: XLA's partitioner (GSPMD/Shardy) propagates
shardings through the unannotated model. Newer JAX defaults `jax.make_mesh` to
`Explicit` axes, which would require sharding annotations inside the layers.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import shlex
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from absl import flags as absl_flags
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from orbax.checkpoint import multihost as ocp_multihost

from segldm_jax import formatting

# Mesh axes the batch is split over, in this order (whichever exist). FSDP
# devices also take distinct examples: parameters are sharded over "fsdp" but
# gathered for compute, so every device does data-parallel work.
BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
STRATEGIES = ("replicate", "fsdp")

# Default rule sets, for configs to reference by name.
DATA_PARALLEL = [(".*", "replicate")]
FSDP = [(".*", "fsdp")]

Rules = Sequence[tuple[str, str]]


def _fmt_axes(axes: Sequence[tuple[str, int]]) -> str:
  return "[" + ", ".join(repr((n, s)) for n, s in axes) + "]"


def make_mesh(axes: Sequence[tuple[str, int]],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a topology-aware mesh from `[(name, size), ...]`.

  One size may be -1, meaning "all remaining devices". The product of the
  sizes must equal the number of devices (all global devices by default, so
  this works unchanged with several processes).

  Raises:
    ValueError: on malformed axes or sizes that do not use every device; the
      message names the config value and one that would work.
  """
  axes = [(str(n), int(s)) for n, s in axes]
  if not axes:
    raise ValueError("mesh needs at least one axis, e.g. [('data', -1)]")
  names = [n for n, _ in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh {_fmt_axes(axes)} repeats an axis name")
  if any(s == 0 or s < -1 for _, s in axes):
    raise ValueError(f"mesh {_fmt_axes(axes)}: sizes must be positive or -1")
  if sum(s == -1 for _, s in axes) > 1:
    raise ValueError(f"mesh {_fmt_axes(axes)} has more than one -1 size; at "
                     "most one axis can take 'all remaining devices'")
  n = len(jax.devices() if devices is None else devices)

  def others(i: int) -> int:  # Product of every size but axis i's.
    return math.prod(s for j, (_, s) in enumerate(axes) if j != i)

  wild = [i for i, (_, s) in enumerate(axes) if s == -1]
  if wild:
    (i,) = wild
    if n % others(i):
      raise ValueError(
          f"mesh {_fmt_axes(axes)}: the fixed sizes multiply to {others(i)}, "
          f"which does not divide the {n} available devices; use sizes whose "
          f"product divides {n}")
    axes[i] = (axes[i][0], n // others(i))
  elif math.prod(s for _, s in axes) != n:
    fix = next((i for i in range(len(axes)) if n % others(i) == 0), None)
    hint = f"use ({axes[fix][0]!r}, -1) or " if fix is not None else "use "
    raise ValueError(
        f"mesh {_fmt_axes(axes)} needs {math.prod(s for _, s in axes)} devices "
        f"but {n} are available; {hint}sizes whose product is {n}")

  # jax.make_mesh orders devices by the physical topology (GPU/TPU) and, with
  # devices=None, uses all global devices (every process).
  return jax.make_mesh(tuple(s for _, s in axes), tuple(names),
                       axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (see `BATCH_AXES`)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for arrays whose leading dimension is the global batch."""
  axes = batch_axes(mesh)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} contain none of the batch "
                     f"axes {BATCH_AXES}")
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _compile_rules(rules: Rules) -> list[tuple[re.Pattern, str]]:
  compiled = []
  for rule in rules:
    try:
      pattern, strategy = rule
    except (TypeError, ValueError):
      raise ValueError(f"sharding rule {rule!r} is not a (regex, strategy) "
                       "pair") from None
    if strategy not in STRATEGIES:
      raise ValueError(f"sharding rule {rule!r}: unknown strategy "
                       f"{strategy!r}; known: {', '.join(STRATEGIES)}")
    try:
      compiled.append((re.compile(pattern), strategy))
    except re.error as e:
      raise ValueError(f"sharding rule {rule!r}: bad regex: {e}") from None
  return compiled


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int) -> P:
  """Shards the largest dim divisible by `axis_size` (ties: the last one).

  Leaves with fewer than `min_size` elements, or with no divisible dim,
  replicate: splitting them saves little memory and costs a collective each.
  Non-divisible dims are never padded or split unevenly.
  """
  if axis_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % axis_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


def shardings_from_rules(abstract_tree: Any, mesh: Mesh, rules: Rules, *,
                         min_size: int = 2**14) -> Any:
  """Pytree of `NamedSharding`s (structure of `abstract_tree`) from rules.

  `rules` are `(regex, strategy)` pairs, tried in order with `re.search`
  against each leaf's '/'-joined path; the first match wins and unmatched
  leaves replicate. Strategies: "replicate"; "fsdp" (see `fsdp_spec`; a mesh
  without an "fsdp" axis, or with size 1, replicates). Leaves may be arrays,
  `ShapeDtypeStruct`s or Python scalars.

  Raises:
    ValueError: a rule names an unknown strategy or has a bad regex (checked
      up front, even if the rule matches nothing).
  """
  compiled = _compile_rules(rules)  # Fail fast on a bad config.
  axis_size = mesh.shape.get(FSDP_AXIS, 1)

  def one(path, leaf) -> NamedSharding:
    shape = tuple(np.shape(leaf))
    if not shape:  # Scalars: step counters, optax counts, rng keys.
      return replicated(mesh)
    name = formatting.path_str(path)
    strategy = next((s for p, s in compiled if p.search(name)), "replicate")
    if strategy == "fsdp":
      return NamedSharding(mesh, fsdp_spec(shape, axis_size, min_size))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's share of the batch -> global arrays split over the batch.

  Every process passes its own rows, the same number each (single-process:
  the whole batch); the global batch is their concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))

  def put(path, x):
    x = np.asarray(x)
    rows = x.shape[0] * jax.process_count() if x.ndim else 0
    if x.ndim == 0 or rows % shards:
      raise ValueError(
          f"batch entry {formatting.path_str(path)!r} with shape {x.shape}: "
          f"the global batch ({rows} rows) must split evenly over {shards} "
          "batch shards "
          f"(mesh axes {batch_axes(mesh)})")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(put, dict(local))


def _nbytes(shape: Sequence[int], leaf: Any) -> int:
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
  return math.prod(shape) * dtype.itemsize


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds for `tree`, from the arrays' actual shardings.

  Counts the first addressable shard of each `jax.Array` (all shards are the
  same size under even sharding); other leaves count in full.
  """
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    if isinstance(x, jax.Array):
      total += x.addressable_shards[0].data.nbytes
    else:
      total += np.asarray(x).nbytes
  return total


def describe(shardings: Any, abstract_tree: Any, top: int = 10) -> str:
  """A short table of the `top` largest leaves, for the train log.

  Columns: path, shape, PartitionSpec, bytes one device holds; the last line
  gives the leaf count and total vs per-device bytes.
  """
  flat_s = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  flat_x = jax.tree_util.tree_leaves_with_path(abstract_tree)
  if len(flat_s) != len(flat_x):
    raise ValueError(f"{len(flat_s)} shardings for {len(flat_x)} leaves")
  rows = []
  for (path, x), s in zip(flat_x, flat_s):
    shape = tuple(np.shape(x))
    rows.append((formatting.path_str(path), shape, _spec_str(s.spec),
                 _nbytes(shape, x), _nbytes(s.shard_shape(shape), x)))
  total = sum(r[3] for r in rows)
  local = sum(r[4] for r in rows)
  rows.sort(key=lambda r: -r[3])  # Stable: equal sizes keep tree order.
  shown = rows[:top]
  w = [max([len(r[0]) for r in shown] + [4]),
       max([len(str(r[1])) for r in shown] + [5]),
       max([len(r[2]) for r in shown] + [4])]
  lines = [f"{'leaf':<{w[0]}}  {'shape':<{w[1]}}  {'spec':<{w[2]}}  per device"]
  for name, shape, spec, _, dev in shown:
    lines.append(f"{name:<{w[0]}}  {str(shape):<{w[1]}}  {spec:<{w[2]}}  "
                 f"{formatting.human_bytes(dev)}")
  ratio = local / total if total else 1.0
  lines.append(f"{len(rows)} leaves: {formatting.human_bytes(total)} in total, "
               f"{formatting.human_bytes(local)} per device ({ratio:.1%})")
  return "\n".join(lines)


def _spec_str(spec: P) -> str:
  if all(a is None for a in spec):
    return "replicated"
  return "(" + ", ".join(str(a) for a in spec) + ")"


# Environment variables by which cluster launchers announce a multi-process
# job; jax.distributed.initialize() reads the details itself for these.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


# jax's own heartbeat check ends a process whose peer went silent with a C++
# fatal error: it is given this much longer than `watch_peers`, whose line
# saying what happened must come first.
_JAX_HEARTBEAT_MARGIN_S = 5
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


# Where process 0's coordination service listens, when given to us (not when
# jax detects the cluster itself): the lost-host helper probes it.
_coordinator_address = ""


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
  silent peer counts as alive; see `watch_peers`, which reports it.
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


def barrier(name: str, timeout_s: int = 900) -> None:
  """Waits until every process reaches `name`; a no-op for one process.

  Goes through the coordination service, which waits as long as asked. This
  matters on CPU: gloo gives a process only 30 s to join a communicator it
  has not used before, so a process still compiling (or importing, on a busy
  machine) would fail the others' first collective.
  """
  if jax.process_count() == 1:
    return
  # jax has no public barrier on the coordination service; orbax exposes
  # the client jax.distributed.initialize made.
  client = ocp_multihost.get_jax_distributed_client()
  client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


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


_ALIVE = "segldm/alive/"
_DONE = "segldm/done/"
_FAILED = "segldm/failed/"
# Set by `watch_peers`: how this process leaves after an error of its own.
_end_after_error: Callable[[str], None] | None = None


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


def last_complete_step(checkpoints_dir: pathlib.Path) -> int | None:
  """The newest finalised step under an orbax checkpoints folder (orbax
  renames a step's temporary folder to its number once complete)."""
  try:
    steps = [int(p.name) for p in checkpoints_dir.iterdir()
             if p.name.isdigit() and p.is_dir()]
  except OSError:
    return None
  return max(steps, default=None)


def watch_peers(timeout_s: int, checkpoints_dir: str | os.PathLike[str],
                command: Sequence[str] | None = None) -> None:
  """Ends this process in one line when a peer process stops responding.

  Each process beats (a counter in the coordination service) every
  `timeout_s`/10 s from a thread; a peer whose beat has not moved for
  `timeout_s`, or a coordination service that no longer answers (process 0
  hosts it), ends this process with exit code 1 and, as the last stderr
  line, which process stopped, the last complete checkpoint step and the
  command that resumes. An exception in the main thread (a collective that
  failed because the peer went away) waits for that verdict first. A
  process that exits normally says so, and is not reported. One process:
  nothing to watch.

  When process 0 itself is lost, jax's client in every other process
  aborts at once (exit 134) with its own fatal error about the coordination
  service, before this thread can speak, and jax offers no hook for it (the
  client's error callback cannot be given from Python: its status argument
  does not convert). So a small helper process (`_LAST_WORDS`) outlives
  this one: unless told that it exits cleanly or has reported, it writes the
  summary line to the same stderr once this process is gone.
  """
  if jax.process_count() == 1:
    return
  client = ocp_multihost.get_jax_distributed_client()
  me, count = jax.process_index(), jax.process_count()
  checkpoints_dir = pathlib.Path(checkpoints_dir)
  command = list(command if command is not None else sys.argv)
  interval = max(0.5, min(5.0, timeout_s / 10))
  stopping = threading.Event()

  resume = (f"resume by re-running every process's command, this one's: "
            f"python {shlex.join(command)}")
  last_words = _start_last_words(checkpoints_dir, count, resume)

  def report(who: str, why: str) -> None:
    if stopping.is_set():  # exiting anyway: the peer may be done too
      return
    _silence(last_words)
    line = (f"error: {who} of {count} stopped ({why}lost host, killed or "
            f"crashed); {_kept(checkpoints_dir)}; {resume}")
    sys.stdout.flush()
    sys.stderr.write("\n" + line + "\n")
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
    # Not sys.exit: jax's exit handlers would wait for the lost peer.

  def failed_here(line: str) -> None:
    stopping.set()
    _silence(last_words)  # this process has spoken
    try:
      client.key_value_set(f"{_FAILED}{me}", line, allow_overwrite=True)
      if me == 0:  # the coordinator: give the peers a beat to read it
        time.sleep(2 * interval)
    except Exception:  # pylint: disable=broad-except
      pass  # the peers' heartbeat check still notices
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access

  def failed_there(peer: str, line: str) -> None:
    if stopping.is_set():
      return
    stopping.set()
    _silence(last_words)
    sys.stdout.flush()
    sys.stderr.write(f"\nerror: process {peer} of {count} stopped on its "
                     f"own error ({line.removeprefix('error: ')}); "
                     f"{_kept(checkpoints_dir)}\n")
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access

  global _end_after_error
  _end_after_error = failed_here

  def beat() -> None:
    seen = {i: (None, time.monotonic()) for i in range(count) if i != me}
    beats = 0
    while not stopping.is_set():
      beats += 1
      try:
        client.key_value_set(f"{_ALIVE}{me}", str(beats), allow_overwrite=True)
        values = dict(client.key_value_dir_get(_ALIVE))
        done = dict(client.key_value_dir_get(_DONE))
        failed = dict(client.key_value_dir_get(_FAILED))
      except Exception:  # pylint: disable=broad-except
        if stopping.is_set():
          return
        # The coordination service is gone, and with it process 0 (the
        # same line as the helper's, which speaks if jax aborts us first).
        report("process 0 (the coordinator)", "")
        return
      for key, line in failed.items():
        failed_there(key.removeprefix(_FAILED), line)
      now = time.monotonic()
      for peer, (last, since) in list(seen.items()):
        value = values.get(f"{_ALIVE}{peer}")
        if f"{_DONE}{peer}" in done:
          del seen[peer]
        elif value != last:
          seen[peer] = (value, now)
        elif now - since > timeout_s:
          report(f"process {peer}", f"no heartbeat for {timeout_s} s: ")
      stopping.wait(interval)

  def on_exception(kind, value, tb) -> None:
    hook(kind, value, tb)  # jax's own diagnostics first
    if not issubclass(kind, (KeyboardInterrupt, SystemExit)):
      # A collective failed: if a peer is gone the watcher says so shortly.
      stopping.wait(timeout_s + 2 * interval)

  def on_exit() -> None:
    stopping.set()
    _silence(last_words)
    try:
      client.key_value_set(f"{_DONE}{me}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  import atexit  # pylint: disable=g-import-not-at-top
  atexit.register(on_exit)  # runs before jax's (registered earlier)
  hook = sys.excepthook
  sys.excepthook = on_exception
  threading.Thread(target=beat, name="segldm-watch-peers", daemon=True).start()


def _kept(checkpoints_dir: pathlib.Path) -> str:
  step = last_complete_step(checkpoints_dir)
  if step is None:
    return f"no checkpoint was completed in {checkpoints_dir}"
  return f"the last complete checkpoint is step {step} in {checkpoints_dir}"


# Run by a helper process: reads its stdin until the watched process closes
# it (by exiting, however it exits); unless told "quiet" first, writes the
# summary line. A coordinator that no longer accepts connections is the
# likely cause of an abnormal end (jax aborts when it loses it).
_LAST_WORDS = """
import pathlib, signal, socket, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
  signal.signal(s, signal.SIG_IGN)  # the process group's signals are not ours
address, directory, count, resume, me = sys.argv[1:6]
if sys.stdin.buffer.read().endswith(b"quiet"):
  sys.exit(0)
who = "this process ended abnormally (crashed or killed)"
host, _, port = address.rpartition(":")
try:
  if me != "0":  # process 0 hosts the coordinator itself
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
except (OSError, ValueError):
  who = f"process 0 (the coordinator) of {count} stopped (lost host, killed or crashed)"
steps = [int(p.name) for p in pathlib.Path(directory).glob("*")
         if p.name.isdigit() and p.is_dir()]
kept = (f"the last complete checkpoint is step {max(steps)} in {directory}"
        if steps else f"no checkpoint was completed in {directory}")
sys.stderr.write(f"\\nerror: {who}; {kept}; {resume}\\n")
"""


def _start_last_words(checkpoints_dir: pathlib.Path, count: int,
                      resume: str) -> Any:
  """The helper that speaks for this process if jax aborts it (see
  `watch_peers`); None where it cannot start."""
  import subprocess  # pylint: disable=g-import-not-at-top
  # Without the address (a cluster jax detected itself) the helper cannot
  # tell a lost coordinator from another crash, and says less.
  address = _coordinator_address
  try:
    return subprocess.Popen(
        [sys.executable, "-c", _LAST_WORDS, address, str(checkpoints_dir),
         str(count), resume, str(jax.process_index())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        start_new_session=True)
  except OSError:
    return None


def _silence(helper: Any) -> None:
  """Tells the helper this process ends cleanly or has spoken itself."""
  if helper is None:
    return
  try:
    helper.stdin.write(b"quiet")
    helper.stdin.close()
  except (OSError, ValueError):
    pass
