r"""Compile train.py's programs (and sampling) for a TPU slice, on any CPU.

Builds, for a named slice (`--topology v5e:2x2`, `v5e:16x16`, `v5p:4x4x4`,
`v6e:2x2`, ...), exactly the programs train.py runs there, from the same
functions (benchmarks/memory.py:config_train_programs): the frozen encoder
on the batch's images, then the step on their latents, with the state's
shardings from `config.mesh` and `config.sharding_strategy`, FSDP's weights
gathered for compute, the batch over the mesh's batch axes, the state
donated, `train.remat`, `train.encode_chunks`, `train.grad_accum` and the
compute dtype. libtpu compiles them for the slice's devices without a TPU
(jax.experimental.topologies), so nothing runs and nothing the size of the
model is allocated. Then, unless `--no_sample`, the sampling programs at
the same size: one DPM-Solver++(2M) step with classifier-free guidance (the
UNet on 2B rows) and the VQ decode.

Per chip, for each program:
  memory    parameters, AdamW, EMA, first stage, batch (the state's shards
            from its shardings), XLA's arguments, temporaries and peak
            (arguments + outputs - aliased + temporaries) against the chip's
            HBM, plus what the other program keeps there meanwhile (the
            whole frozen VQ during the step; the train state and the VQ's
            decoder during the encoder); a train step's peak is the larger
  cost      XLA's cost analysis: flops, bytes accessed, optimal_seconds
            (libtpu 0.0.42 counts -1 s per ConcatBitcast custom-call, which
            made the figure negative; those seconds are added back); the
            roofline max(flops / bf16 peak, bytes / HBM bandwidth), its
            images/s per chip, the arithmetic intensity (flops / byte)
            against the chip's ridge point (peak / bandwidth); the analytic
            count of convolution + matmul flops (benchmarks/flops.py) as a
            cross-check
  comms     the collectives in the compiled HLO (all-reduce, all-gather,
            reduce-scatter, all-to-all, collective-permute): how many and
            the bytes they move per step (each one's result, times the trip
            count of a loop it sits in)

These are XLA's estimates for the compiled program, not measurements: the
roofline is a bound a real step does not reach.

  pip install -e ".[tpu]"        # libtpu: the TPU compiler, no TPU needed
  python benchmarks/tpu_compile.py --config tiny --topology v5e:2x2 \
      --strategy fsdp --batch 8 --dtype bfloat16
  python benchmarks/tpu_compile.py --config configs/seg_f4.py:reference \
      --topology v5e:16x16 --strategy fsdp --per_chip 4 --dtype bfloat16 \
      --remat none,block --json v5e_256.json
  python benchmarks/tpu_compile.py --config demo --topology v5e:2x2 \
      --dtype bfloat16 --max_batch --remat none,block

`--max_batch` finds, per remat policy, the largest per-chip batch whose
peak fits the chip's HBM (a few compiles: two sizes give the memory per
image, then the prediction is checked and corrected).

Chip figures (per chip; dense bf16 peak, HBM capacity and bandwidth) are
Google Cloud's published specifications:
  v5e  https://cloud.google.com/tpu/docs/v5e   197 TFLOP/s, 16 GB, 819 GB/s
  v5p  https://cloud.google.com/tpu/docs/v5p   459 TFLOP/s, 95 GB, 2765 GB/s
  v6e  https://cloud.google.com/tpu/docs/v6e   918 TFLOP/s, 32 GB, 1640 GB/s
(GB = 1e9 bytes throughout.)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# libtpu asks GCE's metadata server for the host's TPU; there is none here.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from benchmarks import memory  # noqa: E402  (after the path)

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kind: str      # jax's Device.device_kind on this chip
  hbm_bytes: float
  bf16_flops: float     # dense peak, FLOP/s
  hbm_bytes_per_s: float
  source: str


# One JAX device per chip on all three (v5p's two TensorCores are one
# megacore device).
CHIPS = {c.name: c for c in (
    Chip("v5e", "TPU v5 lite", 16e9, 197e12, 819e9,
         "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 95e9, 459e12, 2765e9,
         "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "TPU v6 lite", 32e9, 918e12, 1640e9,
         "https://cloud.google.com/tpu/docs/v6e"),
)}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
REMATS = ("none", "block", "dots_saveable")


def have_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


# ------------------------------------------------------------------------- #
#                         Slice, config, programs                           #
# ------------------------------------------------------------------------- #
def slice_devices(topology: str):
  """-> (compile-only devices of the slice, Chip)."""
  name = topology.split(":")[0]
  if name not in CHIPS:
    raise SystemExit(f"--topology {topology!r}: chips known here: "
                     f"{', '.join(CHIPS)} (e.g. v5e:2x2, v5p:2x2x1, v6e:4x4)")
  if not have_libtpu():
    raise SystemExit("libtpu is not installed (it is the TPU compiler; no "
                     "TPU is needed): pip install -e \".[tpu]\"")
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    devices = topologies.get_topology_desc(topology_name=topology,
                                           platform="tpu").devices
  except jax.errors.JaxRuntimeError as e:
    if "lockfile" in str(e):
      raise SystemExit(
          "libtpu is in use by another process (one libtpu process at a "
          f"time): wait for it to finish ({e})") from None
    raise SystemExit(f"--topology {topology!r}: {e}") from None
  chip = CHIPS[name]
  if devices[0].device_kind != chip.device_kind:
    raise SystemExit(f"{topology}: libtpu says {devices[0].device_kind!r}, "
                     f"expected {chip.device_kind!r}")
  return list(devices), chip


def load_config(spec: str, overrides=()):
  """`tiny` | `configs/seg_f4.py:VARIANT` -> the ConfigDict train.py gets."""
  name = spec
  if ".py" not in spec:
    spec = f"{os.path.join(ROOT, 'configs', 'seg_f4.py')}:{spec}"
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_tpu_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:  # --set train.grad_accum=2, as --config.KEY=VALUE
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.get(p) if hasattr(node, "get") else None
    if not hasattr(node, "get") or leaf not in node:
      raise SystemExit(f"--set {item}: {name} has no config key {key!r}")
    with config.unlocked():
      node[leaf] = value
  return config


def strategy_settings(strategy: str, chips: int = 1):
  """--strategy -> (mesh, rules), or None to keep the config's. "fsdp2d"
  splits the chips over two FSDP axes, "fsdp_transpose" the largest power
  of two up to sqrt(chips) (see sharding.FSDP_AXES)."""
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  inner = 1
  while (2 * inner) ** 2 <= chips and chips % (2 * inner) == 0:
    inner *= 2
  return {"config": None,
          "dp": ((("data", -1), ("fsdp", 1)), sharding.DATA_PARALLEL),
          "fsdp": ((("data", 1), ("fsdp", -1)), sharding.FSDP),
          "fsdp2d": ((("data", 1), ("fsdp", -1), ("fsdp_transpose", inner)),
                     sharding.FSDP)}[strategy]


def batch_shards(mesh) -> int:
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  return math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))


def shard_bytes(tree, shardings) -> int:
  """Bytes one chip holds of `tree` under `shardings` (same structure)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(tree)
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
      s, jax.sharding.Sharding))
  assert len(leaves) == len(specs), (len(leaves), len(specs))
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for x, s in zip(leaves, specs))


def sample_programs(config, mesh, per_chip: int, guidance_scale: float,
                    state_shardings, abstract_state):
  """-> {"sample_step": (jitted, args), "decode": (jitted, args)}.

  One DPM-Solver++(2M) step (samplers.dpmpp_2m_sample, num_steps=1) of the
  EMA UNet in the compute dtype with guidance (cond + uncond as one batch of
  2B), on precomputed conditioning; and the VQ decode to uint8 pixels. The
  batch is split over the mesh's batch axes, the UNet parameters sharded as
  the train state's EMA, the first stage replicated.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segldm_jax.config import run_config  # pylint: disable=g-import-not-at-top
  from segldm_jax.data.pixel_range import model_range_to_images  # pylint: disable=g-import-not-at-top
  from segldm_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top

  geometry = run_config.geometry(config)
  dtype = jnp.dtype(config.train.compute_dtype)
  ldm = build.build_model(config.model, dtype=jnp.float32, conv="xla")
  ldm = dataclasses.replace(ldm, unet=ldm.unet.clone(dtype=dtype))
  batch = per_chip * batch_shards(mesh)
  labels = jax.ShapeDtypeStruct((batch, geometry.mask, geometry.mask),
                                jnp.uint8)
  c = jax.eval_shape(
      lambda p, l: ldm.condition(p, l, geometry.mask_stages),
      abstract_state.params["cond_stage"], labels)
  x = jax.ShapeDtypeStruct((*c.shape[:3], ldm.latent_channels), jnp.float32)
  schedule = ldm.schedule()
  rows = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  unet_shardings = state_shardings.ema["unet"]

  def sample_step(unet_params, c, x):
    model = ldm.model_fn(unet_params, c, guidance_scale)
    return samplers.dpmpp_2m_sample(model, schedule, x, num_steps=1)

  def decode(fs_params, z):
    return model_range_to_images(ldm.decode(fs_params, z))

  fs_params = build.param_shapes(ldm.first_stage)
  return {
      "sample_step": (jax.jit(sample_step,
                              in_shardings=(unet_shardings, rows, rows),
                              out_shardings=rows),
                      (abstract_state.ema["unet"], c, x)),
      "decode": (jax.jit(decode, in_shardings=(repl, rows),
                         out_shardings=rows),
                 (fs_params, x)),
  }


# ------------------------------------------------------------------------- #
#                         The compiled program's figures                    #
# ------------------------------------------------------------------------- #
def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0]
  return cost or {}


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes,
         "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes,
         "temporaries": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"]
                 + out["temporaries"])
  return out


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e\w+|"
                    r"bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
         "bf16": 16, "f16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64,
         "u64": 64, "f64": 64, "c64": 64, "c128": 128}


def _type_and_op(rhs: str) -> tuple[str, str]:
  """`(f32[2], bf16[3]) all-gather-start(...)` -> (type text, opcode)."""
  if rhs.startswith("("):
    depth = 0
    for i, ch in enumerate(rhs):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    type_text, rest = rhs[:i + 1], rhs[i + 1:].lstrip()
  else:
    type_text, _, rest = rhs.partition(" ")
  return type_text, rest.split("(", 1)[0].strip()


def _array_bytes(type_text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    bits = _BITS.get(dtype, 8)
    out.append(n * bits // 8)
  return out


def collectives(hlo_text: str) -> dict:
  """Collectives of a compiled HLO module: {kind: {count, bytes}} per step.

  Bytes: the whole array each collective works on (an all-gather's result,
  a reduce-scatter's input, an all-reduce's, all-to-all's or permute's
  array); a ring moves about (chips - 1) / chips of it through each chip,
  twice for an all-reduce. How XLA:TPU writes them: an async collective
  sits in a fusion whose root is an AsyncCollectiveStart custom-call, and
  copies of it in every fusion it overlaps (`async_collective_fusion*`, and
  the AsyncCollectiveDone one), counted once; a reduce-scatter is a fusion
  `all-reduce-scatter*` around an all-reduce of the whole array. An op in a
  while loop's body counts its known trip count times (once, with
  `unknown_trip_count` set, when XLA does not know it).
  """
  comps = {}        # computation -> its instruction lines
  comp = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      comp = head.group(1)
      comps[comp] = []
    elif comp is not None and _INSTR.match(line):
      comps[comp].append(line)
  calls = {}        # computation -> [(callee, trip count)]
  unknown = False
  ops = []          # (computation, kind, bytes)
  for comp, lines in comps.items():
    root = next((l for l in lines if l.lstrip().startswith("ROOT")), "")
    copy = (comp.startswith("async_collective_fusion")
            or 'custom_call_target="AsyncCollectiveDone"' in root)
    for line in lines:
      m = _INSTR.match(line)
      type_text, op = _type_and_op(m.group(2))
      trip = 1
      if op == "while":
        t = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trip = int(t.group(1)) if t else 1
        unknown |= t is None
      for callee in re.findall(
          r"(?:body|condition|to_apply|calls|branch_computations)="
          r"\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?", line):
        for name in re.split(r",\s*%?", callee):
          calls.setdefault(comp, []).append((name, trip))
      base = op[:-len("-start")] if op.endswith("-start") else op
      if base not in COLLECTIVES or copy:
        continue
      sizes = _array_bytes(type_text)
      # An async start's result: (operand, result, context...).
      nbytes = sizes[1] if op.endswith("-start") and len(sizes) > 1 else sum(
          sizes)
      if comp.startswith("all-reduce-scatter") and base == "all-reduce":
        base = "reduce-scatter"
      ops.append((comp, base, nbytes))
  # Multiplier of each computation: the product of trip counts on the way
  # from the entry (the computation no one calls).
  callees = {c for cs in calls.values() for c, _ in cs}
  mult = {c: 1 for c in comps if c not in callees}
  frontier = list(mult)
  while frontier:
    c = frontier.pop()
    for callee, trip in calls.get(c, ()):
      k = mult[c] * trip
      if mult.get(callee, 0) < k:
        mult[callee] = k
        frontier.append(callee)
  out = {}
  for comp, kind, nbytes in ops:
    k = mult.get(comp, 1)
    entry = out.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += k
    entry["bytes"] += k * nbytes
  if unknown:
    out["unknown_trip_count"] = True
  return out


def hlo_summary(hlo_text: str) -> dict:
  """Size of the compiled module: instructions, fusions, while loops."""
  lines = hlo_text.splitlines()
  instr = [l for l in lines if _INSTR.match(l)]
  ops = [_type_and_op(_INSTR.match(l).group(2))[1] for l in instr]
  return {"instructions": len(instr),
          "computations": sum(1 for l in lines if l and not l.startswith(" ")
                              and l.rstrip().endswith("{")),
          "fusions": ops.count("fusion"), "while_loops": ops.count("while"),
          "convolutions": sum(op == "convolution" for op in ops) +
                          hlo_text.count('kind=kOutput, calls=%fused_conv'),
          "chars": len(hlo_text)}


def analyse(name: str, jitted, args, chip: Chip, per_chip_images: int,
            chips: int, hlo_dir: str = "") -> dict:
  """Lowers and compiles one program; -> its figures per chip."""
  from benchmarks import flops as flops_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  rss_before = _current_rss()
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  cost = _cost(compiled)
  hlo = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(hlo)
  optimal = float(cost.get("optimal_seconds", float("nan")))
  # XLA:TPU (libtpu 0.0.42) costs each ConcatBitcast custom-call (a
  # concatenation written in place) at -1 s in optimal_seconds: a program
  # with N of them reports its estimate minus N seconds (the demo's DP step:
  # 12 of them, -11.997 s). Added back; the raw figure stays in the JSON.
  uncosted = sum(1 for line in hlo.splitlines()
                 if 'custom_call_target="ConcatBitcast"' in line)
  fl = float(cost.get("flops", float("nan")))
  by = float(cost.get("bytes accessed", float("nan")))
  roof = max(fl / chip.bf16_flops, by / chip.hbm_bytes_per_s)
  analytic = flops_lib.count_jaxpr(
      jax.make_jaxpr(jitted)(*args).jaxpr) / chips
  # CPU seconds too: wall time on a shared machine says little.
  r = {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
       # This process's largest RSS so far: the compiler's memory, at most.
       "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        * 1024,
       # What the process held before compiling (Python, jax, the traced
       # program): the compiler's own memory is at most the difference.
       "rss_before_compile_bytes": rss_before,
       "memory": _memory(compiled),
       "flops": fl, "bytes_accessed": by,
       "optimal_seconds": optimal + uncosted,
       "optimal_seconds_xla": optimal, "concat_bitcasts": uncosted,
       "analytic_model_flops": analytic,
       "roofline_s": roof,
       "bound": "compute" if fl / chip.bf16_flops >= by / chip.hbm_bytes_per_s
                else "memory bandwidth",
       "images_per_s": per_chip_images / roof if roof > 0 else float("nan"),
       "intensity": fl / by if by else float("nan"),
       "collectives": collectives(hlo), "hlo": hlo_summary(hlo),
       "images_per_chip": per_chip_images}
  r["memory"]["fits"] = r["memory"]["peak"] <= chip.hbm_bytes
  return r, compiled


def _current_rss() -> int:
  """This process's resident memory now, in bytes (Linux; 0 elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


# ------------------------------------------------------------------------- #
#                                  Report                                   #
# ------------------------------------------------------------------------- #
def _gb(n) -> str:
  return f"{n / GB:.3f}"


def print_program(name: str, r: dict, chip: Chip, state=None) -> None:
  m = r["memory"]
  print(f"\n[{name}] per chip, {r['images_per_chip']} image(s): compiled in "
        f"{r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} s of CPU; lowered "
        f"in {r['lower_s']:.1f} s; process RSS up to "
        f"{r['max_rss_bytes'] / GB:.1f} GB, from "
        f"{r['rss_before_compile_bytes'] / GB:.1f} GB before compiling)")
  if state:
    print(f"  state        params {_gb(state['params'])} GB, AdamW "
          f"{_gb(state['optimizer'])} GB, EMA {_gb(state['ema'])} GB; first "
          f"stage {_gb(state['first_stage'])} GB (the encoder reads "
          f"{_gb(state['first_stage_read'])}); batch (latents, labels) "
          f"{_gb(state['batch'])} GB")
    if "state_per_chip" in state:
      print(f"  state/chip   {_gb(state['state_per_chip'])} GB = "
            f"{state['state_per_chip'] / state['state_even_split']:.2f} x "
            f"an even split ({_gb(state['state_even_split'])} GB); "
            f"{state['replicated_leaves']} leaves whole on every chip, "
            f"{state['replicated_bytes'] / 1e6:.2f} MB (largest: "
            + ", ".join(f"{n} {tuple(sh)}" for n, sh, _ in
                        state["replicated_largest"][:2]) + ")")
  peak = m.get("peak_on_chip", m["peak"])
  print(f"  memory       arguments {_gb(m['arguments'])} GB + outputs "
        f"{_gb(m['outputs'])} GB - aliased {_gb(m['aliased'])} GB + "
        f"temporaries {_gb(m['temporaries'])} GB = peak {_gb(m['peak'])} GB"
        + (f" (+ {_gb(m['held_outside'])} GB {m['held_what']} in HBM "
           "meanwhile)" if m.get("held_outside") else "")
        + f"; {_gb(peak)} GB of {chip.hbm_bytes / GB:.0f} GB HBM "
        f"({100 * peak / chip.hbm_bytes:.1f}%"
        f"{'' if m['fits'] else ', DOES NOT FIT'})")
  print(f"  cost         {r['flops'] / 1e9:.2f} GFLOP (analytic conv + "
        f"matmul {r['analytic_model_flops'] / 1e9:.2f}), "
        f"{r['bytes_accessed'] / GB:.3f} GB accessed, intensity "
        f"{r['intensity']:.1f} flop/byte (ridge "
        f"{chip.bf16_flops / chip.hbm_bytes_per_s:.0f}); XLA optimal_seconds "
        f"{r['optimal_seconds'] * 1e3:.3f} ms"
        + (f" (XLA says {r['optimal_seconds_xla'] * 1e3:.3f} ms: -1 s for "
           f"each of {r['concat_bitcasts']} ConcatBitcast custom-calls, added "
           "back)" if r["concat_bitcasts"] else ""))
  print(f"  roofline     {r['roofline_s'] * 1e3:.3f} ms ({r['bound']} bound)"
        f" -> {r['images_per_s']:.1f} images/s per chip")
  coll = {k: v for k, v in r["collectives"].items() if isinstance(v, dict)}
  if coll:
    print("  collectives  " + "; ".join(
        f"{k} x{v['count']} {v['bytes'] / GB:.4f} GB" for k, v in
        sorted(coll.items())) + " per step"
        + (" (a loop of unknown trip count counted once)"
           if r["collectives"].get("unknown_trip_count") else ""))
  else:
    print("  collectives  none")
  h = r["hlo"]
  print(f"  HLO          {h['instructions']} instructions, {h['fusions']} "
        f"fusions, {h['while_loops']} while loops, {h['chars'] / 1e6:.1f} M "
        "characters")


def train_once(config, mesh, chip, chips, per_chip, remat, hlo_dir=""):
  """Compiles train.py's two programs at `per_chip` images per chip for
  `remat`: the frozen encoder, then the step on its latents.

  -> (the step's figures, with "encode" (the encoder's) and "together" (a
  train step as train.py runs it: both programs, one after the other),
  {"state", "shardings", "compiled": the step's compiled program}).
  """
  import copy  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.train.batch_size = per_chip * batch_shards(mesh)
  config.train.remat = remat
  programs, shardings = memory.config_train_programs(config, mesh)
  encode, (image, fs_params) = programs["encode"]
  step, step_args = programs["step"]
  state, data, _ = step_args
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  rows = jax.tree.map(lambda _: sharding.batch_sharding(mesh), data)
  repl = jax.tree.map(lambda _: sharding.replicated(mesh), fs_params)
  split = {"params": shard_bytes(state.params, shardings.params),
           "optimizer": shard_bytes(state.opt_state, shardings.opt_state),
           "ema": shard_bytes(state.ema, shardings.ema),
           "first_stage": shard_bytes(fs_params, repl),
           "batch": shard_bytes(data, rows),
           "state_total": memory.nbytes(state),
           "state_per_chip": shard_bytes(state, shardings)}
  split["state_even_split"] = split["state_total"] / chips
  split.update(whole_leaves(state, shardings))
  enc, enc_compiled = analyse(f"encode_b{per_chip}", encode,
                              (image, fs_params), chip, per_chip, chips,
                              hlo_dir)
  r, compiled = analyse(f"train_{remat}_b{per_chip}", step, step_args, chip,
                        per_chip, chips, hlo_dir)
  # jit leaves out the arguments a program does not read (their input
  # sharding is None): the encoder reads the first stage's encoder, while
  # train.py keeps the whole VQ on every chip.
  read = jax.tree.leaves(enc_compiled.input_shardings[0][1],
                         is_leaf=lambda x: x is None)
  split["first_stage_read"] = sum(
      x.size * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(fs_params), read) if s is not None)
  r["state"] = split
  # What else sits in HBM while each program runs: the first stage during
  # the step; the train state and the unread decoder during the encoder.
  held = {"step": (split["first_stage"], "of first stage"),
          "encode": (split["params"] + split["optimizer"] + split["ema"]
                     + split["first_stage"] - split["first_stage_read"],
                     "of train state and VQ decoder")}
  for name, x in (("step", r), ("encode", enc)):
    m = x["memory"]
    m["held_outside"], m["held_what"] = held[name]
    m["peak_on_chip"] = m["peak"] + m["held_outside"]
    m["fits"] = m["peak_on_chip"] <= chip.hbm_bytes
  r["encode"] = enc
  r["together"] = together(r, enc, chip, per_chip)
  return r, {"state": state, "shardings": shardings, "compiled": compiled}


def whole_leaves(state, shardings, top: int = 4) -> dict:
  """The state's leaves left whole on every chip (too small, or no dim
  divides): how many, their bytes, the largest."""
  import jax  # pylint: disable=g-import-not-at-top
  from segldm_jax import formatting  # pylint: disable=g-import-not-at-top
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
      s, jax.sharding.Sharding))
  whole = [(formatting.path_str(path), list(x.shape),
            x.size * x.dtype.itemsize)
           for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state),
                                   specs)
           if s.is_fully_replicated and x.ndim]
  whole.sort(key=lambda w: -w[2])
  return {"replicated_leaves": len(whole),
          "replicated_bytes": sum(w[2] for w in whole),
          "replicated_largest": whole[:top]}


def together(step: dict, enc: dict, chip: Chip, per_chip: int) -> dict:
  """A train step as train.py runs it: the encoder's program, then the
  step's, on the same chip (their times add; the larger peak counts)."""
  fl = step["flops"] + enc["flops"]
  by = step["bytes_accessed"] + enc["bytes_accessed"]
  roof = step["roofline_s"] + enc["roofline_s"]
  peak = max(step["memory"]["peak_on_chip"], enc["memory"]["peak_on_chip"])
  return {"compile_s": step["compile_s"] + enc["compile_s"],
          "compile_cpu_s": step["compile_cpu_s"] + enc["compile_cpu_s"],
          "max_rss_bytes": max(step["max_rss_bytes"], enc["max_rss_bytes"]),
          "flops": fl, "bytes_accessed": by,
          "analytic_model_flops": (step["analytic_model_flops"]
                                   + enc["analytic_model_flops"]),
          "intensity": fl / by if by else float("nan"),
          "optimal_seconds": (step["optimal_seconds"]
                              + enc["optimal_seconds"]),
          "roofline_s": roof,
          "images_per_s": per_chip / roof if roof > 0 else float("nan"),
          "peak_on_chip": peak, "fits": peak <= chip.hbm_bytes}


def print_together(t: dict, chip: Chip, per_chip: int) -> None:
  print(f"\n[both, as train.py runs them] per chip, {per_chip} image(s): "
        f"compiled in {t['compile_s']:.1f} s ({t['compile_cpu_s']:.1f} s of "
        f"CPU; process RSS up to {t['max_rss_bytes'] / GB:.1f} GB); peak "
        f"{_gb(t['peak_on_chip'])} GB of {chip.hbm_bytes / GB:.0f} GB"
        f"{'' if t['fits'] else ', DOES NOT FIT'}; "
        f"{t['flops'] / 1e9:.2f} GFLOP (analytic "
        f"{t['analytic_model_flops'] / 1e9:.2f}), "
        f"{t['bytes_accessed'] / GB:.3f} GB, intensity {t['intensity']:.1f}"
        f" flop/byte; XLA optimal_seconds {t['optimal_seconds'] * 1e3:.3f}"
        f" ms; roofline {t['roofline_s'] * 1e3:.3f} ms -> "
        f"{t['images_per_s']:.1f} images/s per chip")


def find_max_batch(config, mesh, chip, chips, remat, start: int, limit: int,
                   log, multiple: int = 1) -> dict:
  """Largest per-chip batch (<= limit, a multiple of `multiple`) whose peak
  fits the chip's HBM. Each try is a compile of both programs, so sizes are
  guessed from the memory per image of the last two; `multiple` > 1 ends
  the search sooner (within that many images of the largest)."""
  peaks = {}
  m = max(1, multiple)

  def peak(b):
    if b not in peaks:
      r, _ = train_once(config, mesh, chip, chips, b, remat)
      peaks[b] = r["together"]["peak_on_chip"]
      log(f"  remat {remat}: {b}/chip -> peak {_gb(peaks[b])} GB "
          f"({'fits' if peaks[b] <= chip.hbm_bytes else 'too big'}; "
          f"compiled in {r['together']['compile_s']:.0f} s)")
    return peaks[b]

  lo = max(m, start // m * m)
  if peak(lo) > chip.hbm_bytes:
    while lo > m and peak(lo) > chip.hbm_bytes:
      lo = max(m, lo // 2 // m * m)
    if peak(lo) > chip.hbm_bytes:
      return {"max_per_chip": 0, "peaks": peaks}
  hi = None  # smallest size known not to fit
  while True:
    fits = [b for b in peaks if peaks[b] <= chip.hbm_bytes]
    best = max(fits)
    bigger = [b for b in peaks if b > best]
    hi = min(bigger) if bigger else None
    if (hi is not None and hi - best <= m) or best + m > limit:
      break
    # Linear in the batch: two sizes give the memory per image.
    pts = sorted(peaks)
    if len(pts) == 1:
      guess = 2 * best
    else:
      a, b = (pts[-2], pts[-1]) if hi is None else (best, hi)
      per_image = max((peaks[b] - peaks[a]) / (b - a), 1.0)
      guess = best + int((chip.hbm_bytes - peaks[best]) // per_image)
    guess = min(guess // m * m, limit // m * m)
    if hi is not None:
      guess = min(guess, hi - m)
    peak(max(best + m, guess))
  return {"max_per_chip": best, "multiple": m,
          "at_limit": best + m > limit and hi is None,
          "peaks": {str(b): p for b, p in sorted(peaks.items())}}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1])
  ap.add_argument("--config", default="reference",
                  help="a variant of configs/seg_f4.py (reference, demo, "
                  "tiny, ade20k, ...) or PATH.py:VARIANT, as train.py's")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, as --config.KEY=VALUE (repeatable)")
  ap.add_argument("--topology", default="v5e:2x2",
                  help="the slice: v5e:2x2, v5e:16x16, v5p:2x2x1, v6e:4x4...")
  ap.add_argument("--strategy", choices=("config", "dp", "fsdp", "fsdp2d"),
                  default="config",
                  help="dp / fsdp / fsdp2d: replace config.mesh and "
                  "config.sharding_strategy by all-data, all-FSDP, or "
                  "all-FSDP over two axes (for 256 chips: 16 x 16)")
  size = ap.add_mutually_exclusive_group()
  size.add_argument("--batch", type=int, default=0,
                    help="global batch (default: train.batch_size)")
  size.add_argument("--per_chip", type=int, default=0,
                    help="images per chip instead (global = this x chips "
                    "on the batch axes)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="train.compute_dtype (default: the config's)")
  ap.add_argument("--remat", default=None,
                  help=f"train.remat, or a comma list of {','.join(REMATS)}"
                  " (default: the config's)")
  ap.add_argument("--encode_chunks", type=int, default=0,
                  help="train.encode_chunks (default: the config's)")
  ap.add_argument("--no_sample", action="store_true",
                  help="the train step only")
  ap.add_argument("--no_train", action="store_true",
                  help="the sampling programs only")
  ap.add_argument("--sample_per_chip", type=int, default=0,
                  help="sampling batch per chip (default: the train step's)")
  ap.add_argument("--guidance_scale", type=float, default=2.0,
                  help="classifier-free guidance of the sampling step (1: "
                  "no guidance, the UNet on B rows instead of 2B)")
  ap.add_argument("--sample_steps", type=int, default=0,
                  help="solver steps per image for sampling images/s "
                  "(default: sample.steps)")
  ap.add_argument("--max_batch", action="store_true",
                  help="find the largest per-chip batch that fits, per "
                  "remat policy")
  ap.add_argument("--max_batch_multiple", type=int, default=1,
                  help="--max_batch tries multiples of this (e.g. 8: fewer "
                  "compiles, the answer within 8 images)")
  ap.add_argument("--max_batch_limit", type=int, default=64,
                  help="largest per-chip batch --max_batch tries")
  ap.add_argument("--hlo_dir", default="",
                  help="also write each compiled program's HLO text here")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args(argv)
  if args.max_batch_multiple < 1:
    ap.error(f"--max_batch_multiple={args.max_batch_multiple}: use 1 or more")

  devices, chip = slice_devices(args.topology)
  import jax  # pylint: disable=g-import-not-at-top
  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top

  config = load_config(args.config, args.set)
  override = strategy_settings(args.strategy, len(devices))
  with config.unlocked():
    if override:
      config.mesh, config.sharding_strategy = override
    if args.dtype:
      config.train.compute_dtype = args.dtype
    if args.encode_chunks:
      config.train.encode_chunks = args.encode_chunks
  remats = (args.remat or config.train.remat).split(",")
  if set(remats) - set(REMATS):
    ap.error(f"--remat: choose from {','.join(REMATS)}")
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  chips = len(devices)
  shards = batch_shards(mesh)
  global_batch = (args.per_chip * shards if args.per_chip else
                  args.batch or int(config.train.batch_size))
  if global_batch % shards:
    ap.error(f"the global batch {global_batch} does not split over the "
             f"{shards} chips of the batch axes; use a multiple of {shards}")
  per_chip = global_batch // shards

  head = {"topology": args.topology, "chips": chips, "chip": chip.name,
          "device_kind": devices[0].device_kind,
          "chip_spec": {"hbm_bytes": chip.hbm_bytes,
                        "bf16_flops": chip.bf16_flops,
                        "hbm_bytes_per_s": chip.hbm_bytes_per_s,
                        "source": chip.source},
          "config": args.config, "overrides": args.set,
          "mesh": dict(mesh.shape),
          "sharding_strategy": [list(r) for r in config.sharding_strategy],
          "global_batch": global_batch, "per_chip": per_chip,
          "compute_dtype": config.train.compute_dtype,
          "encode_chunks": int(config.train.encode_chunks),
          "grad_accum": int(config.train.grad_accum),
          "jax": jax.__version__, "libtpu": _libtpu_version()}
  print(f"{args.config} on {args.topology} ({chips} x {chip.device_kind}; "
        f"{chip.hbm_bytes / GB:.0f} GB HBM, {chip.bf16_flops / 1e12:.0f} "
        f"TFLOP/s bf16, {chip.hbm_bytes_per_s / GB:.0f} GB/s): mesh "
        f"{dict(mesh.shape)}, rules {list(map(tuple, config.sharding_strategy))}"
        f", global batch {global_batch} = {per_chip}/chip, "
        f"{config.train.compute_dtype}, encode_chunks "
        f"{config.train.encode_chunks}, grad_accum {config.train.grad_accum}; "
        f"jax {jax.__version__}, libtpu {head['libtpu']}; GB = 1e9 bytes",
        flush=True)
  results = {**head, "train": {}, "sample": {}, "max_batch": {}}
  abstract = None
  for remat in ([] if args.no_train else remats):
    r, extra = train_once(config, mesh, chip, chips, per_chip, remat,
                          args.hlo_dir)
    abstract = (extra["state"], extra["shardings"])
    results["train"][remat] = r
    print_program(f"train step on latents, remat {remat}", r, chip,
                  r["state"])
    print_program("frozen encoder", r["encode"], chip)
    print_together(r["together"], chip, per_chip)
    sys.stdout.flush()

  if not args.no_sample:
    if abstract is None:
      programs, shardings = memory.config_train_programs(config, mesh)
      abstract = (programs["step"][1][0], shardings)
    state, shardings = abstract
    s_per_chip = args.sample_per_chip or per_chip
    steps = args.sample_steps or int(config.sample.steps)
    programs = sample_programs(config, mesh, s_per_chip, args.guidance_scale,
                               shardings, state)
    for name, (jitted, pargs) in programs.items():
      r, _ = analyse(name, jitted, pargs, chip, s_per_chip, chips,
                     args.hlo_dir)
      results["sample"][name] = r
      label = (f"one DPM-Solver++(2M) step, guidance {args.guidance_scale}"
               if name == "sample_step" else "VQ decode")
      print_program(label, r, chip)
    t = (steps * results["sample"]["sample_step"]["roofline_s"]
         + results["sample"]["decode"]["roofline_s"])
    results["sample"]["steps"] = steps
    results["sample"]["images_per_s"] = s_per_chip / t
    print(f"\nsampling {steps} steps + decode: roofline {t * 1e3:.2f} ms per "
          f"{s_per_chip} image(s) -> {s_per_chip / t:.1f} images/s per chip")

  if args.max_batch:
    print(f"\nlargest batch per chip within {chip.hbm_bytes / GB:.0f} GB "
          f"(up to {args.max_batch_limit}):", flush=True)
    for remat in remats:
      found = find_max_batch(config, mesh, chip, chips, remat, per_chip,
                             args.max_batch_limit,
                             lambda s: print(s, flush=True),
                             multiple=args.max_batch_multiple)
      results["max_batch"][remat] = found
      print(f"  remat {remat}: {found['max_per_chip']}/chip"
            + (" (the limit; more may fit)" if found.get("at_limit") else "")
            + (f" (within {found['multiple']})"
               if found["multiple"] > 1 and found["max_per_chip"]
               and not found.get("at_limit") else ""),
            flush=True)

  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return "unknown"


if __name__ == "__main__":
  sys.exit(main())
