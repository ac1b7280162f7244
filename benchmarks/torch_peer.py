"""The PyTorch peer of benchmarks/bench.py: diffusers models, eager mode.

What a PyTorch user would run for the same recipe: diffusers' UNet2DModel
and VQModel built to the same architecture as the JAX models (channels,
res blocks per level, attention at the same levels and in the middle, the
same head width, input = latent + rescaled mask), the reference's rescaler
(bilinear halvings of the one-hot mask, then a bias-free 1x1 conv), AdamW,
an EMA of the UNet, and the DDIM update written out as the reference does.
On GPU, bf16 runs under torch.autocast (the usual mixed precision).

Imported only by the benchmark's torch worker; torch is never a dependency
of segldm-jax itself.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel, VQModel


def _unet(arch: dict) -> UNet2DModel:
  u = arch["unet"]
  mc, mult = u["model_channels"], u["channel_mult"]
  attn_at = set(u["attention_resolutions"])  # downsampling rates
  levels = [2**i in attn_at for i in range(len(mult))]
  bottom = mc * mult[-1]
  heads = u.get("num_heads", -1)
  head_dim = (u["num_head_channels"] if u.get("num_head_channels", -1) > 0
              else bottom // heads)
  return UNet2DModel(
      sample_size=arch["latent_size"],
      in_channels=u["in_channels"], out_channels=u["out_channels"],
      block_out_channels=tuple(mc * m for m in mult),
      layers_per_block=u["num_res_blocks"],
      down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D"
                             for a in levels),
      up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(levels)),
      attention_head_dim=head_dim, norm_num_groups=32, norm_eps=1e-5,
      add_attention=True)  # the middle block's attention, as openaimodel


def _vq(arch: dict) -> VQModel:
  v = arch["vq"]
  n = len(v["ch_mult"])
  return VQModel(
      in_channels=3, out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=tuple(v["ch"] * m for m in v["ch_mult"]),
      layers_per_block=v["num_res_blocks"], latent_channels=v["z_channels"],
      num_vq_embeddings=v["n_embed"], vq_embed_dim=v["embed_dim"],
      norm_num_groups=32, sample_size=arch["image_size"])


class Rescaler(torch.nn.Module):
  """SpatialRescaler: n bilinear x0.5 halvings, then a bias-free 1x1 conv."""

  def __init__(self, stages: int, cin: int, cout: int):
    super().__init__()
    self.stages = stages
    self.map = torch.nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    for _ in range(self.stages):
      x = F.interpolate(x, scale_factor=0.5, mode="bilinear")
    return self.map(x)


def workloads(arch: dict, batch: int, dtype: str, ddim_steps: int,
              threads: int, dpmpp_steps: int = 25):
  """-> ({name: run(n) -> seconds}, info, memory()) like the JAX side."""
  torch.manual_seed(0)
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16")
  unet, vq = _unet(arch).to(device), _vq(arch).to(device).eval()
  rescaler = Rescaler(arch["rescaler_stages"], arch["num_classes"],
                      arch["cond_channels"]).to(device)
  for p in vq.parameters():
    p.requires_grad_(False)
  trained = list(unet.parameters()) + list(rescaler.parameters())
  opt = torch.optim.AdamW(trained, lr=arch["lr"],
                          weight_decay=arch["weight_decay"])
  ema = [p.detach().clone() for p in unet.parameters()]

  betas = torch.linspace(arch["linear_start"]**0.5, arch["linear_end"]**0.5,
                         arch["timesteps"], dtype=torch.float64)**2
  abar = torch.cumprod(1 - betas, 0).float().to(device)
  rng = np.random.default_rng(0)
  hw = arch["image_size"]
  images = torch.from_numpy(
      rng.integers(0, 256, (batch, hw, hw, 3), dtype=np.uint8)).to(device)
  labels = torch.from_numpy(rng.integers(
      0, arch["num_classes"], (batch, hw, hw), dtype=np.uint8)).to(device)

  def condition(lbl):
    onehot = F.one_hot(lbl.long(), arch["num_classes"]).permute(0, 3, 1, 2)
    return rescaler(onehot.float())

  def train_step():
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad(), autocast:
      z = vq.encode(x).latents.float()
    t = torch.randint(0, arch["timesteps"], (batch,), device=device)
    noise = torch.randn_like(z)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    with autocast:
      out = unet(torch.cat([x_t, condition(labels)], 1), t).sample
    loss = (out.float() - noise).abs().mean()  # l1, the reference's
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(unet.parameters()), 1 - 0.9999)  # pylint: disable=protected-access
    return loss

  @torch.inference_mode()
  def ddim(ddim_steps=ddim_steps):
    # The reference's uniform DDIM grid (eta 0): t_i = i * c + 1.
    c_step = arch["timesteps"] // ddim_steps
    ts = list(range(0, arch["timesteps"], c_step))
    ts = [t + 1 for t in ts][::-1]
    with autocast:
      c = condition(labels)
      x = torch.randn(batch, arch["latent_channels"], arch["latent_size"],
                      arch["latent_size"], device=device)
      for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else None
        a_t = abar[t]
        a_prev = abar[prev] if prev is not None else abar[0]
        tt = torch.full((batch,), t, device=device)
        eps = unet(torch.cat([x, c.to(x.dtype)], 1), tt).sample.float()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
      img = vq.decode(x).sample.float()
    return ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

  x_img = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
  with torch.no_grad():
    z_fixed = vq.encode(x_img).latents

  @torch.inference_mode()
  def encode():
    with autocast:
      return vq.encode(x_img).latents

  @torch.inference_mode()
  def decode():
    with autocast:
      return vq.decode(z_fixed).sample

  def timed(fn):
    def run(n):
      if device == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      for _ in range(n):
        out = fn()
      if device == "cuda":
        torch.cuda.synchronize()
      else:
        out.sum().item()
      return time.perf_counter() - t0
    return run

  runs = {"train": timed(train_step), "ddim": timed(ddim),
          # DPM-Solver++ costs its steps' UNet calls, as DDIM does.
          "dpmpp": timed(lambda: ddim(dpmpp_steps)),
          "encode": timed(encode), "decode": timed(decode)}
  import diffusers  # pylint: disable=g-import-not-at-top
  info = {"framework": "torch", "torch": torch.__version__,
          "diffusers": diffusers.__version__, "threads": threads,
          "device": (torch.cuda.get_device_name() if device == "cuda"
                     else "cpu"),
          "params_unet": sum(p.numel() for p in unet.parameters())}

  def memory():
    if device == "cuda":
      return {"peak_device_bytes": torch.cuda.max_memory_allocated()}
    return {}

  return runs, info, memory
