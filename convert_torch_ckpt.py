"""Convert a PyTorch latent-diffusion / taming checkpoint to segldm-jax, no torch.

  python convert_torch_ckpt.py model.ckpt [--config config.yaml] [--out DIR]
                               [--ema | --no-ema] [--num-heads N]

A standalone VQ first stage (e.g. vq-f4/model.ckpt), UNet or SpatialRescaler
becomes a model directory (model.yaml + params/); a full LatentDiffusion
checkpoint becomes a workdir that sample.py samples from and train.py can
fine-tune (config.json, first_stage/, checkpoints/STEP/). A `.safetensors`
file with the same key names converts the same way. Without --config the
architecture is inferred from tensor shapes and the inferred config is printed.
"""

import argparse
import pathlib
import sys
import time
import traceback

from segldm_jax import convert
from segldm_jax import errors
from segldm_jax.checkpoint import store
from segldm_jax.checkpoint import workdir_files
from segldm_jax.config import cli
from segldm_jax.convert import infer_config
from segldm_jax.formatting import printable


def _convert(args: argparse.Namespace) -> convert.Converted:
  """The checkpoint converted; any failure is a UserError whose one line
  names the checkpoint."""
  name = printable(args.checkpoint)
  try:
    return convert.convert_checkpoint(
        args.checkpoint, args.config, use_ema=args.ema,
        resolution=args.resolution, num_heads=args.num_heads,
        num_head_channels=args.num_head_channels)
  except (errors.UserError, ValueError, OSError) as e:  # CheckpointError, ...
    message = printable(e)
    where = "" if name in message else f"{name}: "  # reader errors name it
    raise errors.InputError(f"{where}{message}") from e
  except Exception as e:  # pylint: disable=broad-except
    # A file this odd can still trip the model builder (e.g. an inferred
    # architecture from inconsistent shapes): one line, not a traceback.
    frame = traceback.extract_tb(e.__traceback__)[-1]
    raise errors.InputError(
        f"{name}: cannot convert ({type(e).__name__}: {printable(e, 300)}, "
        f"at {pathlib.Path(frame.filename).name}:{frame.lineno})") from e


def _write(converted: convert.Converted, args: argparse.Namespace,
           out: pathlib.Path, report: str) -> None:
  """Saves the workdir (a full LDM) or the model directory (one network)."""
  if converted.kind == "ldm":
    store.save_model_dir(out / workdir_files.FIRST_STAGE_DIR,
                         converted.node["params"]["first_stage_config"],
                         converted.params["first_stage"])
    config = {"model": converted.node,
              "first_stage": {"checkpoint": workdir_files.FIRST_STAGE_DIR},
              "converted_from": str(args.checkpoint.absolute())}
    step = int(converted.meta.get("global_step", 0))
    store.save_converted_workdir(
        out, config, step,
        {k: converted.params[k] for k in ("unet", "cond_stage")},
        converted.ema, converted.meta)
    (out / "report.txt").write_text(report + "\n")
    print(f"wrote workdir {out} (step {step}, UNet weights: "
          f"{'live + EMA' if converted.ema else 'live'}); sample with:\n"
          f"  python sample.py --workdir {out}")
  else:
    store.save_model_dir(out, converted.node, converted.params, report)
    print(f"wrote model directory {out}")
    if converted.kind == "vq":
      print(f"use it as the first stage: python train.py --config "
            f"configs/seg_f4.py --config.first_stage.checkpoint={out}")


@cli.main_exits
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("checkpoint", type=pathlib.Path,
                  help=".ckpt/.pt/.pth or .safetensors file")
  ap.add_argument("--config", type=pathlib.Path,
                  help="LDM-style YAML (the config.yaml beside model.ckpt)")
  ap.add_argument("--out", type=pathlib.Path,
                  help="output directory (default: CHECKPOINT_STEM-jax beside it)")
  ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                  help="keep the UNet's EMA weights when present (default)")
  ap.add_argument("--num-heads", type=int, help="attention heads, when inferring")
  ap.add_argument("--num-head-channels", type=int,
                  help="attention head width, when inferring (wins over heads)")
  ap.add_argument("--resolution", type=int, default=256,
                  help="image size the VQ was configured for, when inferring")
  args = ap.parse_args(argv)

  out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-jax")
  if out.exists() and any(out.iterdir()):
    ap.error(f"--out {out} exists and is not empty; choose another directory")
  start = time.perf_counter()
  converted = _convert(args)
  if converted.inferred:
    print("Inferred config (pass --config to use the real one):")
    print(infer_config.format_config(converted.node))
  report = converted.report.summary()
  print(f"{args.checkpoint}: {converted.kind} checkpoint\n{report}")
  try:
    _write(converted, args, out, report)
  except (OSError, ValueError) as e:  # unwritable --out, full disk
    raise errors.WorkdirError(
        f"cannot write {printable(out)}: {printable(e, 300)}") from e
  print(f"done in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
