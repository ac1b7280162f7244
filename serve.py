r"""Paint a mask, get a picture: a local web page on a trained model.

  python serve.py --workdir DIR [--port 7860] [--host 127.0.0.1]
      [--batch_size 8] [--max_queue 4] [--max_pixels N] [--max_programs 8]
      [--allow_origin URL ...] [--palette_tolerance 30] [--warmup_count 1]
      [--no-ema]

Loads DIR's newest weights (as sample.py does: EMA by default), compiles the
default request once, then serves http://HOST:PORT/: a canvas of the model's
size with a brush, a fill tool, an eraser ("don't care") and the run's
classes by name; Generate samples the painted mask, Edit region regenerates
part of an uploaded photo. The same seed and options give the same pixels as
`sample.py --masks MASK.png --seed S --num_samples COUNT`. The page's JSON
API is listed in segldm_jax/ui/server.py and at /api/docs.

Only the page itself may drive it: a POST from another site's page is
refused (403), and so is a Host that is not one of this server's names
(400: DNS rebinding); --allow_origin names a deliberate other origin.
Uploads are refused beyond --max_pixels before they are decoded.

Needs the optional extra: pip install -e ".[ui]" (FastAPI, uvicorn).
"""

import argparse
import logging
import pathlib
import sys

from segldm_jax import errors
from segldm_jax.config import cli
from segldm_jax.inference import trained_model
from segldm_jax.runtime import compilation_cache
from segldm_jax.runtime import xla_cpu


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", type=pathlib.Path, required=True)
  ap.add_argument("--host", default="127.0.0.1",
                  help="address to listen on (0.0.0.0: every interface)")
  ap.add_argument("--port", type=int, default=7860)
  ap.add_argument("--batch_size", type=int, default=8,
                  help="as sample.py's: the same batches give the same pixels")
  ap.add_argument("--max_queue", type=int, default=4,
                  help="requests that may wait while one runs; more are "
                  "refused with a message")
  ap.add_argument("--max_pixels", type=int, default=None,
                  help="most pixels per uploaded image, checked before "
                  "decoding (default: 4x the training size's area)")
  ap.add_argument("--max_programs", type=int, default=8,
                  help="compiled programs kept (one per canvas size, "
                  "sampler, steps and count; the least recently used goes)")
  ap.add_argument("--allow_origin", action="append", default=[],
                  metavar="URL", help="another origin whose pages may send "
                  "requests, e.g. https://lab.example:443 (repeatable)")
  ap.add_argument("--palette_tolerance", type=float, default=30.0,
                  help="as sample.py's, for masks uploaded in colours")
  ap.add_argument("--warmup_count", type=int, default=1,
                  help="images of the request compiled at start (0: none)")
  ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
  return ap.parse_args(argv)


@cli.main_exits
def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import uvicorn  # pylint: disable=g-import-not-at-top
    from segldm_jax.ui import server  # pylint: disable=g-import-not-at-top
    from segldm_jax.ui import studio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.InputError(f"serve.py needs the web extra ({e.name} is "
                            "missing): pip install -e \".[ui]\"") from None
  xla_cpu.use_xnnpack_convolutions()  # before any device is touched
  model = trained_model.load(args.workdir, use_ema=args.ema,
                            conv=xla_cpu.preferred_conv())
  compilation_cache.setup(model.config.get("compilation_cache_dir"))
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  lab = studio.Studio(model, batch_size=args.batch_size,
                      max_queue=args.max_queue, max_pixels=args.max_pixels,
                      max_programs=args.max_programs,
                      palette_tolerance=args.palette_tolerance)
  if args.warmup_count:
    seconds = lab.warm_up(args.warmup_count)
    print(f"compiled the default request in {seconds:.1f} s", flush=True)
  print(f"serving {model.workdir} (step {model.step}) on "
        f"http://{args.host}:{args.port}/", flush=True)
  app = server.create_app(lab, host=args.host, port=args.port,
                          allow_origins=args.allow_origin)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  return 0


if __name__ == "__main__":
  sys.exit(main())
