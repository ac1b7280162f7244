r"""Paint a mask, get a picture: a local web page on a trained model.

  python serve.py --workdir DIR [--port 7860] [--host 127.0.0.1]
      [--batch_size 8] [--max_queue 4] [--warmup_count 1] [--no-ema]

Loads DIR's newest weights (as sample.py does: EMA by default), compiles the
default request once, then serves http://HOST:PORT/: a canvas of the model's
size with a brush, a fill tool, an eraser ("don't care") and the run's
classes by name; Generate samples the painted mask, Edit region regenerates
part of an uploaded photo. The same seed and options give the same pixels as
`sample.py --masks MASK.png --seed S --num_samples COUNT`. The page's JSON
API is listed in segldm_jax/ui/server.py and at /api/docs.

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
                      max_queue=args.max_queue)
  if args.warmup_count:
    seconds = lab.warm_up(args.warmup_count)
    print(f"compiled the default request in {seconds:.1f} s", flush=True)
  print(f"serving {model.workdir} (step {model.step}) on "
        f"http://{args.host}:{args.port}/", flush=True)
  uvicorn.run(server.create_app(lab), host=args.host, port=args.port,
              log_level="warning")
  return 0


if __name__ == "__main__":
  sys.exit(main())
