"""Export a segldm-jax workdir or model directory to PyTorch, no torch needed.

  python export_torch_ckpt.py WORKDIR --out DIR [--ema | --no-ema]

writes DIR/model.ckpt (torch.save format, {"state_dict": ...} with CompVis
latent-diffusion's key names), DIR/model.safetensors (the same tensors) and
DIR/config.yaml (the YAML that latent-diffusion's main.py and
instantiate_from_config read). A model directory (e.g. a converted or
demo-trained VQ: model.yaml + params/) exports that network alone.
`convert_torch_ckpt.py DIR/model.ckpt --config DIR/config.yaml` converts
the files back.
"""

import argparse
import pathlib
import sys
import time

from segldm_jax import formatting
from segldm_jax.config import cli
from segldm_jax.convert import export


@cli.main_exits
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("source", type=pathlib.Path,
                  help="workdir (train.py / convert_torch_ckpt.py) or model "
                       "directory")
  ap.add_argument("--out", type=pathlib.Path,
                  help="output directory (default: SOURCE-torch beside it)")
  ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                  help="the UNet's EMA weights become model.diffusion_model.*, "
                       "what samples use (default); --no-ema keeps the live "
                       "weights there and the EMA in model_ema.*, as "
                       "latent-diffusion's own checkpoints hold them")
  args = ap.parse_args(argv)
  source = args.source.absolute()
  out = args.out or source.with_name(source.name + "-torch")
  start = time.perf_counter()
  done = export.export(source, out, use_ema=args.ema)
  what = {"ldm": "LatentDiffusion"}.get(done.kind, done.kind.upper()
                                         if done.kind == "vq" else done.kind)
  step = f" at step {done.step}" if done.step is not None else ""
  print(f"{args.source}: {what}{step}, {len(done.state_dict)} tensors")
  for note in done.notes:
    print(f"  {note}")
  for path in done.files():  # named as the user named --out
    size = formatting.human_bytes(path.stat().st_size)
    print(f"wrote {out / path.name} ({size})")
  print(f"done in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
