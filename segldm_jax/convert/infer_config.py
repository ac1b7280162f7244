"""Infer an LDM-style model config from the tensor shapes of a checkpoint.

`convert_torch_ckpt.py model.ckpt` without `--config` needs the architecture.
Most hyper-parameters leave a trace in the key names or the shapes (widths,
depth, where attention and resampling blocks sit, the noise schedule in the
`betas` buffer). Some leave none: the number of attention heads, the
rescaler's number of halvings, the loss. Those get the semantic_synthesis256
value and a note that names them, so the caller can say what was guessed.
Lists that name places where nothing exists leave no trace either: the UNet's
attention_resolutions [32, 16, 8] of semantic_synthesis256 match no level
(ds is 1, 2, 4), so they come back as the equivalent [].

The node has the targets and parameter names of the reference YAML files, so
`build.build_model(node)` builds it and `format_config` writes it as a file
that `build.load_model_config` reads.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.diffusion import schedule as schedule_lib
from segldm_jax.models import build

Node = dict[str, Any]
KINDS = ("ldm", "vq", "unet", "rescaler")

_UNET = "model.diffusion_model."
_FIRST = "first_stage_model."
_COND = "cond_stage_model."
_EMA = "model_ema."
# What semantic_synthesis256 uses where the weights cannot tell.
_DEFAULT_NUM_HEADS = 8
_RESCALER_STAGES = 2
_LOSS_TYPE = "l1"
_COSINE_S = 8e-3


class InferenceError(errors.UserError, ValueError):
  """The tensors do not describe a model this port can build."""


class _Shapes:
  """Shape look-ups in a state_dict, relative to a key prefix."""

  def __init__(self, state_dict: Mapping[str, Any], prefix: str = "",
               shapes: Mapping[str, tuple[int, ...]] | None = None):
    self._state_dict = state_dict
    self._shapes = shapes if shapes is not None else {
        k: tuple(int(d) for d in np.shape(v)) for k, v in state_dict.items()}
    self.prefix = prefix

  def view(self, prefix: str) -> "_Shapes":
    return _Shapes(self._state_dict, self.prefix + prefix, self._shapes)

  def has(self, key: str) -> bool:
    return self.prefix + key in self._shapes

  def any(self, prefix: str) -> bool:
    return any(k.startswith(self.prefix + prefix) for k in self._shapes)

  def shape(self, key: str) -> tuple[int, ...]:
    try:
      return self._shapes[self.prefix + key]
    except KeyError:
      raise InferenceError(f"missing tensor {self.prefix + key!r}: the "
                           "checkpoint is incomplete or not the expected "
                           "kind of model") from None

  def value(self, key: str) -> np.ndarray:
    """The few buffers whose values matter (betas, scale_factor)."""
    self.shape(key)
    return np.asarray(self._state_dict[self.prefix + key])

  def indices(self, prefix: str) -> list[int]:
    """Sorted n such that some key starts with `prefix` + "n."."""
    start = self.prefix + prefix
    found = set()
    for key in self._shapes:
      if key.startswith(start):
        head = key[len(start):].split(".", 1)[0]
        if head.isdigit():
          found.add(int(head))
    return sorted(found)

  def count(self, prefix: str) -> int:
    """Number of children `prefix`.0 .. n-1; they must be contiguous."""
    idx = self.indices(prefix)
    if idx != list(range(len(idx))):
      raise InferenceError(f"{self.prefix + prefix}* has indices {idx}; "
                           "expected 0, 1, 2, ...")
    return len(idx)


class _Notes(list):
  """Notes of the form "path = value: why", one per value that was guessed."""

  def add(self, path: str, value: Any, why: str) -> None:
    self.append(f"{path} = {value!r}: {why}")


def detect_kind(state_dict: Mapping[str, Any]) -> str:
  """Which model a state_dict holds: "ldm", "vq", "unet" or "rescaler".

  Raises:
    InferenceError: none of them (a one-line message naming a few keys).
  """
  keys = set(state_dict)
  if any(k.startswith(_UNET) for k in keys):
    return "ldm"
  if {"encoder.conv_in.weight", "decoder.conv_in.weight",
      "quantize.embedding.weight"} <= keys:
    return "vq"
  if "input_blocks.0.0.weight" in keys:
    return "unet"
  if "channel_mapper.weight" in keys and all(
      k.startswith("channel_mapper.") for k in keys):
    return "rescaler"
  seen = list(state_dict)[:5]
  shown = ", ".join(seen) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
  raise InferenceError(
      f"cannot tell what this checkpoint holds (keys: {shown or 'none'}); "
      "expected a LatentDiffusion (model.diffusion_model.*, "
      "first_stage_model.*, cond_stage_model.*), a VQ autoencoder (encoder.*, "
      "decoder.*, quantize.embedding.weight), a bare UNetModel "
      "(input_blocks.0.0.weight, ...) or a SpatialRescaler "
      "(channel_mapper.weight)")


def _multiple(width: int, base: int, what: str) -> int:
  if base <= 0:  # a zero-width tensor: a broken file, not a division error
    raise InferenceError(f"{what}: base width {base} (a tensor with a zero-"
                         "size dimension); the checkpoint is corrupt")
  if width % base:
    raise InferenceError(f"{what}: width {width} is not a multiple of the base "
                         f"width {base}")
  return width // base


def _vq_levels(s: _Shapes, ch: int, at: str
               ) -> tuple[list[int], list[bool], int]:
  """(ch_mult, attention per level, num_res_blocks) of a taming VQ, checked
  level by level for an encoder and a decoder that mirror each other."""
  levels = s.count("encoder.down.")
  if not levels or s.count("decoder.up.") != levels:
    raise InferenceError(f"{at}: the encoder has {levels} levels but the "
                         f"decoder {s.count('decoder.up.')}")
  ch_mult, enc_attn, dec_attn = [], [], []
  num_res_blocks = s.count("encoder.down.0.block.")
  for i in range(levels):
    down, up = f"encoder.down.{i}.", f"decoder.up.{i}."
    width = s.shape(down + "block.0.conv1.weight")[0]
    ch_mult.append(_multiple(width, ch, f"{s.prefix}{down}block.0"))
    if (s.count(down + "block.") != num_res_blocks
        or s.count(up + "block.") != num_res_blocks + 1):
      raise InferenceError(
          f"{at} level {i} has {s.count(down + 'block.')} encoder and "
          f"{s.count(up + 'block.')} decoder blocks; a taming VQ has "
          f"num_res_blocks ({num_res_blocks}) and num_res_blocks + 1")
    if s.shape(up + "block.0.conv1.weight")[0] != width:
      raise InferenceError(f"{s.prefix}{up}block.0 has width "
                           f"{s.shape(up + 'block.0.conv1.weight')[0]}, the "
                           f"encoder's level {i} {width}")
    # Attention follows every res block of a level, or none.
    n_enc, n_dec = s.count(down + "attn."), s.count(up + "attn.")
    if n_enc not in (0, num_res_blocks) or n_dec not in (0, num_res_blocks + 1):
      raise InferenceError(f"{at} level {i}: attention on some res "
                           "blocks only; taming puts it after all or none")
    enc_attn.append(n_enc > 0)
    dec_attn.append(n_dec > 0)
    if i < levels - 1 and not s.has(down + "downsample.conv.weight"):
      raise InferenceError(f"{s.prefix}{down}downsample.conv is missing: "
                           "resamp_with_conv=False is not supported")
  if num_res_blocks and enc_attn != dec_attn:
    raise InferenceError(
        f"{at}: the encoder has attention at levels "
        f"{[i for i, a in enumerate(enc_attn) if a]} but the decoder at "
        f"{[i for i, a in enumerate(dec_attn) if a]}; one taming config "
        "always places them alike")
  for part in ("encoder", "decoder"):
    s.shape(f"{part}.mid.attn_1.q.weight")  # always there, even with attn []
  return ch_mult, dec_attn, num_res_blocks


def _vq_bottleneck(s: _Shapes) -> tuple[int, int, int]:
  """(z_channels, n_embed, embed_dim), checked against the convolutions
  into and out of the codebook."""
  z_channels = s.shape("decoder.conv_in.weight")[1]
  n_embed, embed_dim = s.shape("quantize.embedding.weight")
  for key, dims in (("encoder.conv_out.weight", (z_channels,)),
                    ("quant_conv.weight", (embed_dim, z_channels)),
                    ("post_quant_conv.weight", (z_channels, embed_dim))):
    if s.shape(key)[:len(dims)] != dims:
      raise InferenceError(f"{s.prefix}{key} has shape {s.shape(key)}; with "
                           f"z_channels {z_channels} and embed_dim {embed_dim} "
                           f"(double_z false) it must start with {dims}")
  return z_channels, n_embed, embed_dim


def _infer_vq(s: _Shapes, resolution: int, notes: _Notes, where: str) -> Node:
  """taming Encoder/Decoder + VectorQuantizer2 keys -> VQModelInterface node."""
  ch, in_channels = s.shape("encoder.conv_in.weight")[:2]
  ch_mult, attn, num_res_blocks = _vq_levels(s, ch,
                                             s.prefix.rstrip(".") or "VQ")
  levels = len(ch_mult)
  factor = 2 ** (levels - 1)
  if resolution % factor:
    raise InferenceError(f"resolution {resolution} is not a multiple of the "
                         f"VQ's downsampling factor {factor}")
  # Level i works at resolution / 2**i; the config names attention by that.
  attn_resolutions = [resolution // 2 ** i for i in range(levels) if attn[i]]
  z_channels, n_embed, embed_dim = _vq_bottleneck(s)

  dd = where + "ddconfig."
  notes.add(dd + "resolution", resolution,
            "not in the weights (the networks are size-agnostic); taken from "
            "the `resolution` argument, attn_resolutions are relative to it")
  notes.add(dd + "dropout", 0.0, "not in the weights; matters for training only")
  return {
      "target": "ldm.models.autoencoder.VQModelInterface",
      "params": {
          "embed_dim": embed_dim,
          "n_embed": n_embed,
          "ddconfig": {
              "double_z": False,
              "z_channels": z_channels,
              "resolution": resolution,
              "in_channels": in_channels,
              "out_ch": s.shape("decoder.conv_out.weight")[0],
              "ch": ch,
              "ch_mult": ch_mult,
              "num_res_blocks": num_res_blocks,
              "attn_resolutions": attn_resolutions,
              "dropout": 0.0,
          },
          "lossconfig": {"target": "torch.nn.Identity"},
      },
  }


def _resample_kind(s: _Shapes, block: str) -> str:
  """What a resampling slot holds: "conv", "resblock" or "none" (no params)."""
  if s.has(block + "op.weight") or s.has(block + "conv.weight"):
    return "conv"
  if s.has(block + "in_layers.2.weight"):
    return "resblock"
  return "none"


def _heads(widths: Sequence[int], num_heads: int | None,
           num_head_channels: int | None, notes: _Notes,
           where: str) -> tuple[int, int]:
  """(num_heads, num_head_channels) from the arguments, or the default."""
  if num_heads is None and num_head_channels is None:
    notes.add(where + "num_heads", _DEFAULT_NUM_HEADS,
              "WARNING: NOT inferable from the weights (every head count gives "
              "the same shapes but a different function); using the "
              "semantic_synthesis256 value. Pass --config with the original "
              "YAML, or --num-heads / --num-head-channels "
              "(num_heads_upsample is assumed equal to num_heads)")
    num_heads = _DEFAULT_NUM_HEADS
  num_heads = -1 if num_heads is None else num_heads
  num_head_channels = -1 if num_head_channels is None else num_head_channels
  for width in widths:
    if num_head_channels != -1:
      if num_head_channels <= 0 or width % num_head_channels:
        raise InferenceError(f"num_head_channels {num_head_channels} does not "
                             f"divide the attention width {width}")
    elif num_heads <= 0 or width % num_heads:
      raise InferenceError(f"num_heads {num_heads} does not divide the "
                           f"attention width {width}")
  return num_heads, num_head_channels


def _output_upsampler(s: _Shapes, k: int) -> str:
  """The resampling kind among output block k's children after its res
  block ("none" when it has no upsampler, or a parameter-free one)."""
  kinds = [_resample_kind(s, f"output_blocks.{k}.{j}.")
           for j in s.indices(f"output_blocks.{k}.") if j >= 1]
  return next((x for x in kinds if x != "none"), "none")


def _unet_layout(s: _Shapes, at: str) -> tuple[int, int, str | None]:
  """(levels, num_res_blocks, resampling kind: "conv", "resblock", "none",
  or None with one level) of an openaimodel UNet's block lists."""
  n_out = s.count("output_blocks.")
  n_in = max(s.indices("input_blocks.")) + 1

  # The upsampler is the last child (index >= 1) of each level's last output
  # block; the first one ends the lowest level, which has num_res_blocks + 1
  # blocks. Without resampling parameters the input side's gaps (parameter-free
  # avg-pool downsamplers) mark the levels instead.
  ups = [k for k in range(n_out) if _output_upsampler(s, k) != "none"]
  if ups:
    num_res_blocks = ups[0]
  else:
    gaps = sorted(set(range(1, n_in)) - set(s.indices("input_blocks.")))
    num_res_blocks = gaps[0] - 1 if gaps else n_in - 1
  per_level = num_res_blocks + 1
  levels = n_out // per_level
  if not levels or n_out % per_level or n_in != levels * per_level:
    raise InferenceError(f"{at}: {n_in} input and {n_out} output blocks "
                         f"do not fit num_res_blocks {num_res_blocks}")

  # One resampling flavour throughout: conv (conv_resample), ResBlock
  # (resblock_updown) or parameter-free.
  slots = {_resample_kind(s, f"input_blocks.{(lv + 1) * per_level}.0.")
           for lv in range(levels - 1)}
  slots |= {_output_upsampler(s, lv * per_level + num_res_blocks)
            for lv in range(levels - 1)}
  if len(slots) > 1:
    raise InferenceError(f"{at}: mixed resampling blocks {sorted(slots)}")
  return levels, num_res_blocks, slots.pop() if slots else None


def _unet_widths(s: _Shapes, at: str, mc: int, levels: int,
                 num_res_blocks: int) -> tuple[list[int], list[bool], bool]:
  """(channel_mult, attention per level, use_scale_shift_norm), checked
  block by block: a level's res blocks share a width and attention, the
  middle block is the last level's width, scale-shift norm is all or none."""
  per_level = num_res_blocks + 1
  scale_shift: set[bool] = set()

  def res_width(block: str) -> int:
    width = s.shape(block + "out_layers.3.weight")[0]
    emb = s.shape(block + "emb_layers.1.weight")[0]
    if emb not in (width, 2 * width):
      raise InferenceError(f"{s.prefix}{block}emb_layers.1 has {emb} outputs "
                           f"for width {width}; expected {width} or {2 * width}")
    scale_shift.add(emb == 2 * width)
    return width

  channel_mult, attn = [], []
  for lv in range(levels):
    # Output blocks run from the lowest level up.
    outs = [(levels - 1 - lv) * per_level + b for b in range(per_level)]
    ins = [1 + lv * per_level + b for b in range(num_res_blocks)]
    blocks = [f"output_blocks.{k}." for k in outs] + [f"input_blocks.{k}."
                                                      for k in ins]
    widths = {res_width(b + "0.") for b in blocks}
    has_attn = {s.has(b + "1.qkv.weight") for b in blocks}
    if len(widths) > 1 or len(has_attn) > 1:
      raise InferenceError(f"{at} level {lv}: res blocks of widths "
                           f"{sorted(widths)}, attention on some only")
    channel_mult.append(_multiple(widths.pop(), mc, f"{at} level {lv}"))
    attn.append(has_attn.pop())
  mid = mc * channel_mult[-1]
  for j in (0, 2):
    if res_width(f"middle_block.{j}.") != mid:
      raise InferenceError(f"{s.prefix}middle_block.{j} is not {mid} wide")
  if len(scale_shift) > 1:
    raise InferenceError(f"{at}: some res blocks use scale-shift norm, "
                         "others not")
  s.shape("middle_block.1.qkv.weight")  # the middle attention always exists
  return channel_mult, attn, scale_shift.pop()


def _infer_unet(s: _Shapes, image_size: int, num_heads: int | None,
                num_head_channels: int | None, notes: _Notes,
                where: str) -> Node:
  """openaimodel UNetModel keys -> UNetModel node."""
  at = s.prefix.rstrip(".") or "UNet"
  mc, in_channels = s.shape("input_blocks.0.0.weight")[:2]
  if s.shape("time_embed.0.weight") != (4 * mc, mc):
    raise InferenceError(f"{s.prefix}time_embed.0.weight has shape "
                         f"{s.shape('time_embed.0.weight')}, expected "
                         f"{(4 * mc, mc)} for model_channels {mc}")
  levels, num_res_blocks, resample = _unet_layout(s, at)
  channel_mult, attn, scale_shift = _unet_widths(s, at, mc, levels,
                                                 num_res_blocks)
  mid = mc * channel_mult[-1]

  # attention_resolutions are downsampling rates ds = 2**level; entries that
  # match no level (e.g. 32, 16, 8 with three levels) leave no trace.
  attention_resolutions = [2 ** lv for lv in reversed(range(levels)) if attn[lv]]
  widths = [mc * m for m, a in zip(channel_mult, attn) if a] + [mid]
  heads, head_channels = _heads(widths, num_heads, num_head_channels, notes,
                                where)
  notes.add(where + "use_new_attention_order", False,
            "not inferable (only the order of the qkv channels changes); "
            "False in every LDM config")
  if resample in ("resblock", None):
    notes.add(where + "conv_resample", True,
              "not inferable (no conv resampler in the weights); unused "
              + ("with resblock_updown" if resample else "with one level"))
  notes.add(where + "dropout", 0.0, "not in the weights; matters for training "
            "only")
  return {
      "target": build.UNET_TARGET,
      "params": {
          "image_size": image_size,
          "in_channels": in_channels,
          "out_channels": s.shape("out.2.weight")[0],
          "model_channels": mc,
          "attention_resolutions": attention_resolutions,
          "num_res_blocks": num_res_blocks,
          "channel_mult": channel_mult,
          "num_heads": heads,
          "num_head_channels": head_channels,
          "use_scale_shift_norm": scale_shift,
          "resblock_updown": resample == "resblock",
          "conv_resample": resample != "none",
          "use_new_attention_order": False,
          "dropout": 0.0,
      },
  }


def _infer_rescaler(s: _Shapes, n_stages: int, why: str, notes: _Notes,
                    where: str) -> Node:
  shape = s.shape("channel_mapper.weight")
  if len(shape) != 4 or shape[2:] != (1, 1):
    raise InferenceError(f"{s.prefix}channel_mapper.weight has shape {shape}; "
                         "expected a 1x1 conv (out, in, 1, 1)")
  notes.add(where + "n_stages", n_stages, why)
  notes.add(where + "method", "bilinear",
            "not inferable; the reference value (nearest differs)")
  notes.add(where + "multiplier", 0.5,
            "not inferable; the reference value (the only one supported)")
  return {
      "target": build.RESCALER_TARGET,
      "params": {
          "n_stages": n_stages,
          "method": "bilinear",
          "multiplier": 0.5,
          "in_channels": shape[1],
          "out_channels": shape[0],
          "bias": s.has("channel_mapper.bias"),
      },
  }


def _round_float(x: float, digits: int) -> float:
  return float(f"{x:.{digits}g}")


def infer_schedule(betas: np.ndarray) -> dict[str, Any]:
  """The LatentDiffusion schedule params that reproduce a `betas` buffer.

  Tries linear, sqrt_linear, sqrt (endpoints read off the buffer, rounded to
  the fewest significant digits that still reproduce it) and cosine with the
  default s = 8e-3.

  Raises:
    InferenceError: no supported schedule reproduces the buffer.
  """
  betas = np.asarray(betas, np.float32)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise InferenceError(f"betas buffer has shape {betas.shape}; expected (T,)")
  steps = int(betas.shape[0])

  def same(kind: str, **kw) -> bool:
    ours = schedule_lib.make_betas(kind, steps, **kw).astype(np.float32)
    return np.allclose(ours, betas, rtol=1e-6, atol=0.0)

  first, last = float(betas[0]), float(betas[-1])
  # make_betas's endpoint parameters, in terms of the first and last beta.
  endpoints = {"linear": (first, last), "sqrt_linear": (first, last),
               "sqrt": (first ** 2, last ** 2)}
  for kind, (start, end) in endpoints.items():
    for digits in range(1, 10):
      kw = {"linear_start": _round_float(start, digits),
            "linear_end": _round_float(end, digits)}
      if same(kind, **kw):
        return {**kw, "timesteps": steps, "beta_schedule": kind}
  if same("cosine", cosine_s=_COSINE_S):
    return {"timesteps": steps, "beta_schedule": "cosine",
            "cosine_s": _COSINE_S}
  raise InferenceError(
      f"the betas buffer ({steps} steps, {first:.4g} .. {last:.4g}) matches no "
      "linear / sqrt_linear / sqrt schedule, nor cosine with cosine_s "
      f"{_COSINE_S}; pass --config")


def _infer_ldm(s: _Shapes, resolution: int,
               num_heads: int | None, num_head_channels: int | None,
               notes: _Notes) -> Node:
  """LatentDiffusion keys -> node with unet/first_stage/cond_stage configs."""
  for prefix in (_FIRST, _COND):
    if not s.any(prefix):
      raise InferenceError(f"LatentDiffusion checkpoint without {prefix}*: "
                           "only the VQ + SpatialRescaler model is supported")
  vq = _infer_vq(s.view(_FIRST), resolution, notes, "first_stage_config.params.")
  factor = 2 ** (len(vq["params"]["ddconfig"]["ch_mult"]) - 1)
  latent = resolution // factor
  cond = _infer_rescaler(
      s.view(_COND), int(math.log2(factor)),
      f"not inferable; log2 of the VQ factor {factor}, for a mask at image "
      "resolution (the reference setup); use 0 for a mask already at latent "
      "size", notes, "cond_stage_config.params.")
  unet = _infer_unet(s.view(_UNET), latent, num_heads, num_head_channels,
                     notes, "unet_config.params.")
  embed_dim = vq["params"]["embed_dim"]
  cond_ch = cond["params"]["out_channels"]
  u = unet["params"]
  if u["in_channels"] != embed_dim + cond_ch or u["out_channels"] != embed_dim:
    raise InferenceError(
        f"UNet maps {u['in_channels']} -> {u['out_channels']} channels; concat "
        f"conditioning with a {embed_dim}-channel latent and {cond_ch} "
        f"conditioning channels needs {embed_dim + cond_ch} -> {embed_dim}")
  if not s.has("betas"):
    raise InferenceError("LatentDiffusion checkpoint without the `betas` "
                         "buffer: cannot recover the noise schedule")
  sched = infer_schedule(s.value("betas"))
  if s.has("scale_factor"):  # a buffer only with scale_by_std
    # The shortest decimal that is the same float32 (0.18215, not 0.1821500062).
    scale_factor = float(str(np.float32(s.value("scale_factor"))))
  else:
    scale_factor = 1.0
    notes.add("scale_factor", 1.0, "not in the checkpoint (it is saved only "
              "with scale_by_std); the semantic_synthesis256 value. Configs "
              "that set it in the YAML (e.g. KL-f8 models) need --config")
  notes.add("image_size", latent, f"latent size = resolution {resolution} / "
            f"VQ factor {factor}; the networks do not fix it")
  notes.add("unet_config.params.image_size", latent, "as image_size")
  notes.add("loss_type", _LOSS_TYPE, "not inferable; the reference value "
            "(training only)")
  notes.add("parameterization", "eps", "not inferable (eps and x0 models have "
            "the same shapes); the reference value")
  notes.add("cond_stage_trainable", True, "not inferable; the reference value "
            "(training only)")
  return {
      "target": build.LDM_TARGET,
      "params": {
          **sched,
          "loss_type": _LOSS_TYPE,
          "parameterization": "eps",
          "first_stage_key": "image",
          "cond_stage_key": "segmentation",
          "image_size": latent,
          "channels": embed_dim,
          "concat_mode": True,
          "conditioning_key": "concat",
          "cond_stage_trainable": True,
          "use_ema": s.any(_EMA),
          "scale_factor": scale_factor,
          "unet_config": unet,
          "first_stage_config": vq,
          "cond_stage_config": cond,
      },
  }


def infer_model_config(state_dict: Mapping[str, Any], *, resolution: int = 256,
                       num_heads: int | None = None,
                       num_head_channels: int | None = None
                       ) -> tuple[Node, list[str]]:
  """The model node a state_dict was built from, and notes on what was guessed.

  Args:
    state_dict: torch key -> array (only shapes are read, plus the `betas` and
      `scale_factor` buffers of a LatentDiffusion).
    resolution: image size the VQ was configured for (its attn_resolutions are
      relative to it; the LDM's latent size is resolution / VQ factor).
    num_heads: UNet attention heads (shapes do not fix them).
    num_head_channels: UNet attention head width; wins over num_heads.

  Returns:
    (node, notes): `{"target": ..., "params": {...}}` in the format of the
    reference YAML, and one "path = value: why" note per value that the
    weights do not determine. A head-count guess is marked "WARNING".

  Raises:
    InferenceError: unknown or inconsistent checkpoint.
  """
  kind = detect_kind(state_dict)
  s = _Shapes(state_dict)
  notes = _Notes()
  if kind == "ldm":
    node = _infer_ldm(s, resolution, num_heads, num_head_channels, notes)
  elif kind == "vq":
    node = _infer_vq(s, resolution, notes, "")
  elif kind == "unet":
    image_size = resolution // 4
    node = _infer_unet(s, image_size, num_heads, num_head_channels, notes, "")
    notes.add("image_size", image_size, "not inferable and unused by the "
              "network; resolution / 4, the latent size of an f4 first stage")
  else:
    node = _infer_rescaler(s, _RESCALER_STAGES, "not inferable; the "
                           "semantic_synthesis256 value (mask at image "
                           "resolution, f4 latents)", notes, "")
  # The WARNING notes first: they change what the model computes.
  notes.sort(key=lambda n: "WARNING" not in n)
  return node, list(notes)


def format_config(node: Mapping[str, Any], notes: Sequence[str] = ()) -> str:
  """YAML text `model: node`, as `build.load_model_config` reads it.

  `notes`, if given, become comment lines at the top.
  """
  head = "".join(f"# {n}\n" for n in notes)
  return head + yaml.safe_dump({"model": formatting.plain(node)}, sort_keys=False)

