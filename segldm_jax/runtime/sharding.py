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
import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from segldm_jax import formatting

# Mesh axes the batch is split over, in this order (whichever exist). FSDP
# devices also take distinct examples: parameters are sharded over the FSDP
# axes but gathered for compute (`gathered_for_compute`), so every device
# does data-parallel work.
BATCH_AXES = ("data", "fsdp", "fsdp_transpose")
# FSDP's axes. One is enough while some dim of each weight divides by its
# size; past that (256 chips: a (3, 3, 640, 128) kernel has no dim that 256
# divides) a second axis splits a second dim, as MaxText's fsdp_transpose.
FSDP_AXES = ("fsdp", "fsdp_transpose")
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


def gathered_for_compute(mesh: Mesh):
  """-> params -> the same params, whole on every device: FSDP's "gathered
  for compute", said to XLA (one sharding constraint, no annotations in the
  layers).

  Without it, XLA's partitioner computes some layers with the weights as
  they are stored, split over "fsdp", and moves activations between devices
  instead: the reference step on v5e:2x2 sent 1.1 GB per step through 340
  collective-permutes and 63 all-to-alls, moved 50% more bytes and took 27%
  longer to compile (BENCHMARKS.md). Applied to the compute-dtype copy of
  the weights, so the all-gathers carry bf16 in a bf16 step; the gradients
  come back through reduce-scatters. A mesh without a split FSDP axis
  changes nothing.
  """
  whole = replicated(mesh)
  return lambda params: jax.lax.with_sharding_constraint(params, whole)


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


def fsdp_spec(shape: Sequence[int], axis_sizes: Mapping[str, int],
              min_size: int) -> P:
  """Shards a leaf over the FSDP axes, `axis_sizes` {axis: size}.

  The largest dim divisible by all of them together takes them all (ties:
  the last one); failing that, the first axis takes the largest dim it
  divides and the second the largest other dim it divides. Leaves with
  fewer than `min_size` elements, or with no such dims, replicate: splitting
  them saves little memory and costs a collective each. Dims are never
  padded or split unevenly.
  """
  axes = [(a, n) for a, n in axis_sizes.items() if n > 1]
  total = math.prod(n for _, n in axes)
  if total <= 1 or math.prod(shape) < min_size:
    return P()

  def largest(size: int, skip: int = -1) -> int | None:
    best = None
    for i, d in enumerate(shape):
      if i != skip and d % size == 0 and (best is None or d >= shape[best]):
        best = i
    return best

  spec = [None] * len(shape)
  whole = largest(total)
  if whole is not None:
    spec[whole] = axes[0][0] if len(axes) == 1 else tuple(a for a, _ in axes)
    return P(*spec)
  if len(axes) == 2:
    (a, n_a), (b, n_b) = axes
    i = largest(n_a)
    j = None if i is None else largest(n_b, skip=i)
    if j is not None:
      spec[i], spec[j] = a, b
      return P(*spec)
  return P()


def shardings_from_rules(abstract_tree: Any, mesh: Mesh, rules: Rules, *,
                         min_size: int = 2**14) -> Any:
  """Pytree of `NamedSharding`s (structure of `abstract_tree`) from rules.

  `rules` are `(regex, strategy)` pairs, tried in order with `re.search`
  against each leaf's '/'-joined path; the first match wins and unmatched
  leaves replicate. Strategies: "replicate"; "fsdp" (see `fsdp_spec`: over
  the mesh's "fsdp" and "fsdp_transpose" axes; without them, or with size 1,
  it replicates). Leaves may be arrays, `ShapeDtypeStruct`s or Python
  scalars.

  Raises:
    ValueError: a rule names an unknown strategy or has a bad regex (checked
      up front, even if the rule matches nothing).
  """
  compiled = _compile_rules(rules)  # Fail fast on a bad config.
  fsdp_sizes = {a: mesh.shape[a] for a in FSDP_AXES if a in mesh.shape}

  def one(path, leaf) -> NamedSharding:
    shape = tuple(np.shape(leaf))
    if not shape:  # Scalars: step counters, optax counts, rng keys.
      return replicated(mesh)
    name = formatting.path_str(path)
    strategy = next((s for p, s in compiled if p.search(name)), "replicate")
    if strategy == "fsdp":
      return NamedSharding(mesh, fsdp_spec(shape, fsdp_sizes, min_size))
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
