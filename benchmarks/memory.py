r"""Memory of the train step from XLA's compiled memory analysis, any backend.

Compiles (never runs) the LDM train step for a size, batch, compute dtype
and `train.remat` policy from abstract shapes, so nothing the size of the
model is allocated, and prints what XLA's buffer assignment reserves:

  arguments     split into UNet + rescaler parameters, AdamW moments, EMA,
                first stage (frozen VQ) and batch
  outputs       the new train state and metrics (aliased to the donated
                arguments, so they take no memory of their own)
  temporaries   activations kept for the backward pass and every other
                intermediate buffer, at the program's peak
  peak          arguments + outputs - aliased + temporaries
  kept          the UNet activations its backward pass needs (jax.vjp's
                residuals, from shapes: backend-independent), which is
                what `train.remat` trades for a second forward

  python benchmarks/memory.py --size seg_f4 --batch 16 --dtype bfloat16
  python benchmarks/memory.py --size seg_f4 --batch 16 --dtype bfloat16 \
      --remat none,block,dots_saveable --explain 12

`--explain N` also dumps XLA's buffer live ranges and prints the N largest
buffers live at the peak and where in the program they were made. On CPU,
bf16 convolutions are computed in float32 (XLA converts them), so CPU
figures overstate what a GPU needs for activations; the split of the state
is the same everywhere.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks import bench  # noqa: E402  (after the path)

REMATS = ("none", "block", "dots_saveable")


def nbytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_train_step(size: str, batch: int, dtype: str, remat: str,
                        encode_chunks: int = 1, conv: str = "xla"):
  """-> (jitted step, abstract args (state, batch, fs_params, key)).

  `conv`: the 3x3 convolutions (layers.CONV_IMPLS); train.py takes
  xla_cpu.preferred_conv(), Winograd's on CPU. It changes only float32
  convolutions (bf16 ones always go to XLA): the frozen encoder's in every
  step, the UNet's in a float32 step.
  """
  config = bench.size_config(size)
  config.train.compute_dtype = dtype
  config.train.batch_size = batch
  config.train.remat = remat
  config.train.encode_chunks = encode_chunks
  return config_train_step(config, conv)


def config_train_step(config, conv: str = "xla"):
  """The reference's whole training step for `config`, as one program,
  from abstract shapes.

  -> (jitted step, abstract args (state, batch, fs_params, key)). The same
  functions, optimiser, mask geometry and donation as train.py, which runs
  them as two programs (`config_train_programs`); one program keeps these
  CPU figures comparable across versions. `config.train` holds the global
  batch, compute dtype, remat and encode_chunks.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from segldm_jax.training import ldm_step  # pylint: disable=g-import-not-at-top

  ldm, optimizer, state, data, fs_params, key, mask_stages = _abstract_run(
      config, conv)
  step = ldm_step.make_train_step(ldm, optimizer, config.train, mask_stages)
  # As train.py: the state is donated, so the new one reuses its buffers.
  return jax.jit(step, donate_argnums=(0,)), (state, data, fs_params, key)


def config_train_programs(config, mesh, conv: str = "xla"):
  """train.py's two programs for `config` on `mesh`, from abstract shapes:
  the frozen encoder and the step on its latents, jitted by the functions
  train.py calls (loop.jit_encoder, loop.jit_train_step), with the state's
  shardings from `config.sharding_strategy` and FSDP's weights gathered for
  compute.

  -> ({"encode": (jitted, (image, fs_params)), "step": (jitted, (state,
  batch, key))}, state shardings).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from segldm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from segldm_jax.training import ldm_step  # pylint: disable=g-import-not-at-top
  from segldm_jax.training import loop  # pylint: disable=g-import-not-at-top

  ldm, optimizer, state, data, fs_params, key, mask_stages = _abstract_run(
      config, conv)
  state_shardings = sharding.shardings_from_rules(
      state, mesh, config.sharding_strategy)
  encode = loop.jit_encoder(ldm_step.make_encoder(ldm, config.train), mesh)
  step = loop.jit_train_step(
      ldm_step.make_latent_train_step(
          ldm, optimizer, config.train, mask_stages,
          gather_weights=sharding.gathered_for_compute(mesh)),
      mesh, state_shardings, replicated_args=1)
  batch = loop.encoded(data, lambda *a: jax.eval_shape(encode, *a), fs_params)
  return ({"encode": (encode, (data["image"], fs_params)),
           "step": (step, (state, batch, key))}, state_shardings)


def _abstract_run(config, conv: str):
  """-> (ldm, optimiser, abstract state, batch, first stage, key, mask
  stages) for `config`: nothing allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segldm_jax.config import run_config  # pylint: disable=g-import-not-at-top
  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top
  from segldm_jax.training import ldm_step  # pylint: disable=g-import-not-at-top

  geometry = run_config.geometry(config)  # the sizes train.py checks first
  batch = int(config.train.batch_size)
  ldm = build.build_model(config.model, dtype=jnp.float32, conv=conv)
  optimizer = ldm_step.make_optimizer(config.train)
  params = {"unet": build.param_shapes(ldm.unet),
            "cond_stage": build.param_shapes(ldm.cond_stage)}
  state = jax.eval_shape(lambda p: ldm_step.init_state(p, optimizer),
                         params)
  data = {"image": jax.ShapeDtypeStruct(
              (batch, geometry.image, geometry.image, 3), jnp.uint8),
          "labels": jax.ShapeDtypeStruct(
              (batch, geometry.mask, geometry.mask), jnp.uint8)}
  fs_params = build.param_shapes(ldm.first_stage)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return ldm, optimizer, state, data, fs_params, key, geometry.mask_stages


def unet_residual_bytes(unet, params, batch: int, latent: int, channels: int,
                        dtype) -> int:
  """Bytes the UNet keeps from its forward pass for the backward pass.

  The residuals of `jax.vjp` other than the parameters, from shapes only
  (nothing runs, nothing compiles): what the program must hold between the
  two passes before XLA fuses anything, the same on every backend. This
  is what `remat` trades for recompute.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((batch, latent, latent, channels), dtype)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)

  def backward_fn(p, x, t):
    return jax.vjp(lambda p: unet.apply({"params": p}, x, t, True), p)[1]
  jaxpr = jax.make_jaxpr(backward_fn)(params, x, t).jaxpr
  # The parameters themselves are residuals too, but they are held anyway.
  inputs = {id(v) for v in jaxpr.invars}
  kept = {id(v): v for v in jaxpr.outvars
          if isinstance(v, jax.extend.core.Var) and id(v) not in inputs}
  return sum(v.aval.size * v.aval.dtype.itemsize for v in kept.values())


def split(compiled, args) -> dict[str, int]:
  """Compiled memory analysis of a train step, with its arguments split."""
  state, data, fs_params, _ = args
  m = compiled.memory_analysis()
  out = {
      "params": nbytes(state.params),
      "optimizer": nbytes(state.opt_state),
      "ema": nbytes(state.ema),
      "first_stage": nbytes(fs_params),
      "batch": nbytes(data),
      "arguments": m.argument_size_in_bytes,
      "outputs": m.output_size_in_bytes,
      "aliased": m.alias_size_in_bytes,
      "temporaries": m.temp_size_in_bytes,
  }
  out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"]
                 + out["temporaries"])
  return out


def _explain(dump_dir: str, top: int) -> None:
  """The largest buffers live at the peak, from XLA's live-range dump."""
  files = sorted(glob.glob(os.path.join(
      dump_dir, "*jit_step*after_optimizations-live-range.txt")))
  if not files:
    print(f"(no live-range dump in {dump_dir})")
    return
  lines = open(files[-1]).read().splitlines()
  start = next((i for i, l in enumerate(lines) if "(peak):" in l), None)
  if start is None:
    return
  print(lines[start].strip())
  for line in lines[start + 1:start + 1 + top]:
    print("  " + line.strip())
  trace = next((i for i, l in enumerate(lines)
                if l.startswith("  Stack trace breakdown")), None)
  if trace is None:
    return
  # Depth-1 entries name the op (its name scope) that made each buffer;
  # grouped by the part of the step they belong to.
  groups = {}
  for line in lines[trace + 1:]:
    m = re.match(r"\s+[├└]── (.*?) \([\d.]+%, total: ([\d ]+) bytes", line)
    if not m or line.index(m.group(1)) > 12:
      continue
    name, size = m.group(1), int(m.group(2).replace(" ", ""))
    group = next((g for key, g in _GROUPS if key in name), "other (XLA's own "
                 "copies, converts, layout transposes)")
    groups[group] = groups.get(group, 0) + size
  print(lines[trace].strip() + ", by part of the step:")
  for group, size in sorted(groups.items(), key=lambda kv: -kv[1]):
    print(f"  {size / 1e9:7.3f} GB  {group}")


# Name-scope fragments -> part of the step (first match wins).
_GROUPS = (
    ("state", "train state (arguments)"),
    ("first_stage_params", "first stage parameters (argument)"),
    ("VQModel.encode", "first stage encode"),
    ("checkpoint/rematted_computation", "UNet forward recomputed (remat)"),
    ("transpose(jvp(UNetModel))", "UNet backward (gradients)"),
    ("jvp(UNetModel)", "UNet forward, kept for the backward pass"),
    ("adamw", "optimiser update"),
    ("jit(step)", "rest of the step (loss, noise, update, EMA)"),
)


def _kept(args, remat: str, abstract) -> int:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from segldm_jax.models import build  # pylint: disable=g-import-not-at-top
  config = bench.size_config(args.size)
  unet = build.build_model(config.model.params.unet_config).clone(
      dtype=jnp.dtype(args.dtype), remat=remat)
  p = config.model.params
  return unet_residual_bytes(unet, abstract[0].params["unet"], args.batch,
                             int(config.data.image_size) // 2 ** (
                                 len(p.first_stage_config.params.ddconfig
                                     .ch_mult) - 1),
                             int(p.unet_config.params.in_channels),
                             jnp.dtype(args.dtype))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  bench.add_train_step_args(
      ap, remat_help=f"comma-separated subset of {','.join(REMATS)}")
  ap.add_argument("--explain", type=int, default=0, metavar="N",
                  help="print the N largest buffers live at the peak")
  ap.add_argument("--conv", choices=("xla", "winograd"), default=None,
                  help="3x3 convolutions (default: train.py's for the "
                  "backend, Winograd's on CPU)")
  ap.add_argument("--no_xnnpack", action="store_true",
                  help="CPU: XLA's default convolutions (not train.py's)")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args(argv)
  remats = args.remat.split(",")
  if set(remats) - set(REMATS):
    ap.error(f"--remat: choose from {','.join(REMATS)}")
  dump_dir = ""
  if args.explain:
    dump_dir = tempfile.mkdtemp(prefix="segldm_memory_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump_dir}"
                               " --xla_dump_hlo_module_re=.*jit_step.*")
  from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top
  if not args.no_xnnpack:
    xla_cpu.use_xnnpack_convolutions()  # as train.py
  import jax  # pylint: disable=g-import-not-at-top
  conv = args.conv or xla_cpu.preferred_conv()

  gb = 1e9
  results = {}
  print(f"{args.size}, batch {args.batch}, {args.dtype}, encode_chunks "
        f"{args.encode_chunks}, conv {conv}, "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
        "GB = 1e9 bytes")
  print("| remat | params | AdamW | EMA | first stage | batch | arguments "
        "| outputs (aliased) | **temporaries** | peak | UNet activations kept "
        "for the backward pass |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for remat in remats:
    step, abstract = abstract_train_step(args.size, args.batch, args.dtype,
                                         remat, args.encode_chunks, conv)
    r = split(step.lower(*abstract).compile(), abstract)
    r["kept_for_backward"] = _kept(args, remat, abstract)
    results[remat] = r
    print(f"| {remat} | {r['params'] / gb:.3f} | {r['optimizer'] / gb:.3f} "
          f"| {r['ema'] / gb:.3f} | {r['first_stage'] / gb:.3f} "
          f"| {r['batch'] / gb:.3f} | {r['arguments'] / gb:.3f} "
          f"| {r['outputs'] / gb:.3f} ({r['aliased'] / gb:.3f}) "
          f"| **{r['temporaries'] / gb:.3f}** | {r['peak'] / gb:.3f} "
          f"| {r['kept_for_backward'] / gb:.3f} |",
          flush=True)
    if dump_dir:
      _explain(dump_dir, args.explain)
      shutil.rmtree(dump_dir)  # the next policy's program dumps afresh
      os.mkdir(dump_dir)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"size": args.size, "batch": args.batch, "dtype": args.dtype,
                 "conv": conv,
                 "platform": jax.devices()[0].platform, "bytes": results},
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
