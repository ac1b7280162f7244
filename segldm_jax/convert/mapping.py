"""PyTorch state_dict -> Flax parameter trees for every network of the port.

The whole mapping is one rule: a torch key's dotted path becomes the Flax path
with each numeric index glued to the name before it, and the leaf `weight`
becomes whichever of `kernel` / `scale` / `embedding` the Flax module holds:

    encoder.down.0.block.1.norm1.weight  ->  encoder/down_0/block_1/norm1/scale
    input_blocks.4.1.qkv.weight          ->  input_blocks_4_1/qkv/kernel

Kernels go from (O, I, *spatial) to (*spatial, I, O); a 1x1 conv that the port
implements as a Dense loses its unit spatial axes. Every source key is used,
or ignored for a stated reason; anything else is an error that names it.
"""

import dataclasses
import mmap
import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from segldm_jax import errors
from segldm_jax.convert import infer_config
from segldm_jax.convert import safetensors_io
from segldm_jax.convert import torch_io
from segldm_jax.diffusion import schedule as schedule_lib
from segldm_jax.models import build

Params = dict[str, Any]

# Top-level LatentDiffusion buffers that are derived from the config.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2")
# Training-only parts of a trained VQGAN (LPIPS, discriminator, KL logvar).
IGNORED_PREFIXES = {"loss.": "autoencoder training loss (LPIPS/discriminator)"}
LDM_PREFIXES = {"unet": "model.diffusion_model.", "cond_stage": "cond_stage_model.",
                "first_stage": "first_stage_model."}
EMA_PREFIX = "model_ema."


class ConversionError(errors.UserError, ValueError):
  """A tensor is missing, unexpected or has the wrong shape."""


@dataclasses.dataclass
class Report:
  """What happened to every source key."""
  used: list[str] = dataclasses.field(default_factory=list)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"used {len(self.used)} tensors, ignored {len(self.ignored)}"]
    by_reason: dict[str, list[str]] = {}
    for key, reason in self.ignored.items():
      by_reason.setdefault(reason, []).append(key)
    for reason, keys in sorted(by_reason.items()):
      shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
      lines.append(f"  ignored {len(keys)} ({reason}): {shown}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def flax_path(torch_key: str) -> tuple[str, ...]:
  """`a.b.0.c.1.weight` -> ('a', 'b_0', 'c_1', 'weight')."""
  parts: list[str] = []
  for p in torch_key.split("."):
    if p.isdigit() and parts:
      parts[-1] += f"_{p}"
    else:
      parts.append(p)
  return tuple(parts)


def _to_flax(value: np.ndarray, leaf: str, target: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and value.ndim >= 2:
    value = np.transpose(value, (*range(2, value.ndim), 1, 0))
    if value.shape != target and value.shape[-2:] == target[-2:] and all(
        s == 1 for s in value.shape[:-2]):
      value = value.reshape(target)  # 1x1 conv / Conv1d -> Dense
  return value


def _release_pages(array: np.ndarray) -> None:
  """Lets the kernel take `array`'s pages out of this process's resident set.

  torch_io returns views of a read-only memory map of the checkpoint. Once a
  tensor is copied, its pages would stay resident until the map closes, so
  the peak would be the converted weights plus every page of the file read.
  MADV_DONTNEED on a read-only file map only unmaps them (they stay in the
  page cache; reading the array again faults them back in, unchanged). A
  no-op for arrays that are not views of an mmap.
  """
  base = array
  while True:
    if isinstance(base, np.ndarray) and base.base is not None:
      base = base.base
    elif isinstance(base, memoryview):
      base = base.obj
    else:
      break
  if (not isinstance(base, mmap.mmap) or array.size == 0
      or not hasattr(mmap, "MADV_DONTNEED")):
    return
  try:
    lo, hi = np.lib.array_utils.byte_bounds(array)
    origin = np.frombuffer(base, np.uint8, count=1).ctypes.data
    start = (lo - origin) // mmap.PAGESIZE * mmap.PAGESIZE
    if 0 <= start < hi - origin <= len(base):
      base.madvise(mmap.MADV_DONTNEED, start, hi - origin - start)
  except (OSError, ValueError):  # closed map, or the OS refuses: harmless
    pass


def convert_tree(state_dict: Mapping[str, np.ndarray], target: Params, *,
                 prefix: str = "", where: str = "",
                 report: Report | None = None) -> Params:
  """Fill a Flax param tree (of shapes or arrays) from `state_dict`.

  Only keys starting with `prefix` are read. Returns float32 numpy arrays in
  the target structure; the keys read are appended to `report.used`.
  """
  where = where or prefix.rstrip(".") or "checkpoint"
  targets = {tuple(k.key for k in path): leaf for path, leaf in
             jax.tree_util.tree_flatten_with_path(target)[0]}
  out: dict[tuple[str, ...], np.ndarray] = {}
  for key in state_dict:
    if not key.startswith(prefix):
      continue
    *mod, leaf = flax_path(key[len(prefix):])
    if leaf == "weight":
      leaf = next((c for c in ("kernel", "scale", "embedding")
                   if (*mod, c) in targets), "kernel")
    path = (*mod, leaf)
    if path not in targets:
      raise ConversionError(f"{where}: unexpected tensor {key!r} "
                            f"{tuple(state_dict[key].shape)}: the model built "
                            "from the config has no such parameter")
    shape = tuple(targets[path].shape)
    source = np.asarray(state_dict[key])
    value = _to_flax(source, path[-1], shape)
    if value.shape != shape:
      raise ConversionError(
          f"{where}: tensor {key!r} has shape {tuple(state_dict[key].shape)}, "
          f"but parameter {'/'.join(path)} needs {shape} (after layout change)")
    if value.dtype.kind not in "fiub":  # complex would lose its imaginary part
      raise ConversionError(f"{where}: tensor {key!r} has dtype {value.dtype}; "
                            "expected real numbers (float or int)")
    # One C-ordered float32 copy (what jax and tensorstore want, so neither
    # copies again); then the source's file pages can go.
    out[path] = np.array(value, dtype=np.float32, order="C", copy=True)
    _release_pages(source)
    if not np.isfinite(out[path]).all():  # a corrupt or diverged checkpoint
      bad = int(out[path].size - np.isfinite(out[path]).sum())
      raise ConversionError(
          f"{where}: tensor {key!r} holds {bad} non-finite values (NaN or "
          "inf); the checkpoint is corrupt or its training diverged")
    if report is not None:
      report.used.append(key)

  missing = [p for p in targets if p not in out]
  if missing:
    raise ConversionError(
        f"{where}: missing tensor {prefix + torch_key(missing[0])!r} for "
        f"parameter {'/'.join(missing[0])} {tuple(targets[missing[0]].shape)}"
        f" ({len(missing)} missing in all)")
  tree: Params = {}
  for path, value in out.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def ema_key(unet_key: str) -> str:
  """LitEma names a shadow parameter by deleting every dot of its module path."""
  return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _ignore_rest(state_dict, report: Report, claimed: set[str],
                 strict: bool = True) -> None:
  """Marks the keys of IGNORED_PREFIXES ignored; with `strict`, any other
  key not in `claimed` is an error."""
  for key in state_dict:
    if key in claimed or key in report.ignored:
      continue
    for p, reason in IGNORED_PREFIXES.items():
      if key.startswith(p) or key.startswith("first_stage_model." + p):
        report.ignored[key] = reason
        break
    else:
      if not strict:
        continue
      raise ConversionError(f"unexpected tensor {key!r} "
                            f"{tuple(np.shape(state_dict[key]))}: not part of "
                            "any network of this model")


def convert_module(module, state_dict: Mapping[str, np.ndarray],
                   report: Report | None = None, prefix: str = "") -> Params:
  """Standalone VQ / UNet / rescaler checkpoint -> Flax params."""
  report = report if report is not None else Report()
  # A trained VQGAN's file also holds its training loss (loss.*): set it
  # aside first, or the prefix-less read below would call it unexpected.
  _ignore_rest(state_dict, report, set(), strict=False)
  params = convert_tree(
      {k: v for k, v in state_dict.items() if k not in report.ignored},
      build.param_shapes(module), prefix=prefix, where=type(module).__name__,
      report=report)
  _ignore_rest(state_dict, report, set(report.used))
  return params


def convert_ldm(ldm, state_dict: Mapping[str, np.ndarray],
                report: Report | None = None):
  """LatentDiffusion checkpoint -> ({unet, cond_stage, first_stage}, ema, meta).

  `params` are the live weights; `ema` is {"unet": ...} (LitEma covers only
  the UNet) or None when the file has none; `meta` carries scale_factor and
  the EMA's decay and update count.
  """
  report = report if report is not None else Report()
  # The first stage's training loss (first_stage_model.loss.*) is no part of
  # the first stage's network: set it aside before reading that prefix.
  _ignore_rest(state_dict, report, set(), strict=False)
  networks = {k: v for k, v in state_dict.items() if k not in report.ignored}
  params = {name: convert_tree(networks, build.param_shapes(getattr(ldm, name)),
                               prefix=prefix, where=name, report=report)
            for name, prefix in LDM_PREFIXES.items()}
  claimed = set(report.used)
  meta: dict[str, Any] = {"scale_factor": float(ldm.settings["scale_factor"])}

  ema = None
  if any(k.startswith(EMA_PREFIX) for k in state_dict):
    # Read the shadow of each live UNet key under its mangled name, so the
    # EMA goes through exactly the same mapping as the live weights.
    unet_prefix = LDM_PREFIXES["unet"]
    live = [k[len(unet_prefix):] for k in state_dict if k.startswith(unet_prefix)]
    absent = [ema_key(k) for k in live if ema_key(k) not in state_dict]
    if absent:
      raise ConversionError(f"model_ema: missing tensor {absent[0]!r} (the EMA "
                            f"of {unet_prefix}{live[0]}; {len(absent)} missing)")
    shadow = {k: state_dict[ema_key(k)] for k in live}
    ema = {"unet": convert_tree(shadow, build.param_shapes(ldm.unet),
                                where="model_ema")}
    claimed |= {ema_key(k) for k in live}
    report.used += [ema_key(k) for k in live]
    for k in ("model_ema.decay", "model_ema.num_updates"):
      if k in state_dict:
        meta[k.split(".")[1]] = np.asarray(state_dict[k]).item()
        report.ignored[k] = "EMA bookkeeping (kept in meta)"
  if "scale_factor" in state_dict:  # only written with scale_by_std
    meta["scale_factor"] = float(np.asarray(state_dict["scale_factor"]))
    report.ignored["scale_factor"] = "scale_factor buffer (overrides the config)"
    report.notes.append(f"scale_factor = {meta['scale_factor']:.6g} from the checkpoint")

  _check_schedule(ldm, state_dict, report)
  _ignore_rest(state_dict, report, claimed)
  return params, ema, meta


def _check_schedule(ldm, state_dict, report: Report) -> None:
  """The 12 schedule buffers must be what the config's schedule computes."""
  present = [k for k in SCHEDULE_BUFFERS if k in state_dict]
  if not present:
    return
  s = ldm.settings
  sched = schedule_lib.Schedule.create(
      s["beta_schedule"], s["timesteps"], s["linear_start"], s["linear_end"],
      s["cosine_s"], parameterization=s["parameterization"])
  for k in present:
    ours, theirs = np.asarray(getattr(sched, k)), np.asarray(state_dict[k])
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-5, atol=1e-7):
      raise ConversionError(
          f"schedule buffer {k!r} does not match the config's schedule "
          f"({s['beta_schedule']}, {s['timesteps']} steps, "
          f"{s['linear_start']}..{s['linear_end']}): check the config")
    report.ignored[k] = "diffusion schedule buffer (recomputed, checked equal)"


@dataclasses.dataclass
class Converted:
  """A PyTorch checkpoint turned into Flax: what it is and its parameters.

  kind: "ldm" | "vq" | "unet" | "rescaler". For "ldm", `model` is a
  `LatentDiffusion` and `params` holds unet / cond_stage / first_stage
  (live weights); `ema` holds {"unet": ...} or None.
  """
  kind: str
  node: dict
  model: Any
  params: Params
  ema: Params | None
  meta: dict
  report: Report
  inferred: bool


def convert_checkpoint(path, config=None, *, use_ema: bool = True,
                       **infer_kw) -> Converted:
  """Read a torch checkpoint (no torch needed) or a `.safetensors` file with
  the same key names, and convert every network.

  `config` is an LDM-style YAML path or config node; without it the
  architecture is inferred from tensor shapes (`infer_kw` supplies what
  shapes cannot tell, e.g. num_heads). `use_ema=False` drops EMA weights.
  """
  safetensors = pathlib.Path(path).suffix == safetensors_io.SUFFIX
  state_dict = (safetensors_io.load_state_dict(path) if safetensors
                else torch_io.load_state_dict(path))
  report = Report()
  if config is None:
    node, notes = infer_config.infer_model_config(state_dict, **infer_kw)
    report.notes += notes
  elif isinstance(config, Mapping):
    node = dict(config)
  else:
    node = build.load_model_config(config)
  model = build.build_model(node)
  if isinstance(model, build.LatentDiffusion):
    params, ema, meta = convert_ldm(model, state_dict, report)
    if not use_ema and ema is not None:
      report.notes.append("EMA weights present but not kept (--no-ema)")
      shadow = {k for k in report.used if k.startswith(EMA_PREFIX)}
      report.used = [k for k in report.used if k not in shadow]
      report.ignored.update(dict.fromkeys(sorted(shadow),
                                          "EMA weights (--no-ema)"))
      ema = None
    # The CLI numbers the workdir's step by it (Lightning's global_step; a
    # safetensors file has none).
    ckpt = None if safetensors else torch_io.load_checkpoint(path)
    step = ckpt.get("global_step") if isinstance(ckpt, Mapping) else None
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
      meta["global_step"] = step
    if not np.isclose(meta["scale_factor"], model.scale_factor, rtol=1e-6,
                      atol=0):
      # A scale_by_std buffer wins over the config, as in torch's
      # load_state_dict; the node (the workdir's config.json) must say so,
      # since sample.py builds the model from it.
      report.notes.append(f"config's scale_factor {model.scale_factor:.6g} "
                          "replaced by the checkpoint's")
      node = {**node, "params": {**node["params"],
                                 "scale_factor": meta["scale_factor"]}}
      model = build.build_model(node)
    kind = "ldm"
  else:
    params, ema, meta = convert_module(model, state_dict, report), None, {}
    kind = {build.VQModel: "vq", build.UNetModel: "unet",
            build.SpatialRescaler: "rescaler"}[type(model)]
  return Converted(kind, node, model, params, ema, meta, report,
                   inferred=config is None)


# Torch modules that the port holds as Dense, by their torch layout: Linear
# (O, I); the UNet attention's Conv1d (O, I, 1); every other one is a 1x1
# Conv2d (O, I, 1, 1).
_LINEAR_MODULES = ("time_embed", "emb_layers")
_CONV1D_MODULES = ("qkv", "proj_out")
_LDM_PARTS = {"unet": "unet", "first_stage": "vq", "cond_stage": "rescaler"}


def torch_key(path: Sequence[str]) -> str:
  """Inverse of `flax_path` + leaf renaming.

  ('encoder', 'down_0', 'block_1', 'norm1', 'scale') ->
  'encoder.down.0.block.1.norm1.weight'.
  """
  parts: list[str] = []
  for i, name in enumerate(path[:-1]):
    m = re.fullmatch(r"(.+?)((?:_\d+)+)", name)
    # taming's mid block really names its children block_1, attn_1, block_2.
    if m and not (i and path[i - 1] == "mid"):
      parts += [m.group(1), *m.group(2)[1:].split("_")]
    else:
      parts.append(name)
  return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def _to_torch(value: np.ndarray, path: Sequence[str], kind: str) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  w = value.T
  module = re.sub(r"(_\d+)+$", "", path[-2])
  if module in _LINEAR_MODULES:
    return w
  if kind == "unet" and module in _CONV1D_MODULES:
    return w[..., None]
  return w[..., None, None]


def to_torch_state_dict(params: Params, kind: str) -> dict[str, np.ndarray]:
  """Flax params -> torch state_dict (names and layouts), the inverse mapping.

  kind: "vq", "unet", "rescaler", or "ldm" for {"unet", "first_stage",
  "cond_stage"} (live weights only: no model_ema.*, no schedule buffers).
  Arrays are numpy views where the layout change allows it.
  """
  if kind == "ldm":
    return {LDM_PREFIXES[part] + key: value
            for part, sub in _LDM_PARTS.items()
            for key, value in to_torch_state_dict(params[part], sub).items()}
  if kind not in _LDM_PARTS.values():
    raise ValueError(f"unknown kind {kind!r}; expected ldm, "
                     f"{', '.join(_LDM_PARTS.values())}")
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    out[torch_key(names)] = _to_torch(np.asarray(leaf), names, kind)
  return out
