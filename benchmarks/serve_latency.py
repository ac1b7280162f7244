r"""The web page's first Generate against sample.py doing the same work.

  python benchmarks/serve_latency.py --workdir workdirs/demo \
      [--screenshot docs/images/serve_page.png]

Paints a mask on the page in headless Chromium (a filled background, a disc
and a brush stroke), downloads it, and times:
  serve_start_s    serve.py from launch until it serves (load + compiling the
                   default request, so that the first Generate is warm)
  first_generate_s the page: press Generate -> the image is shown (round
                   trip: PNG upload, sampling, PNGs back, decoding)
  sample_py_s      `sample.py --masks MASK --num_samples 1` from launch to
                   exit, the same mask, seed and options: once with an empty
                   compilation cache (cold) and once with it filled (warm)
and checks that the page's image and sample.py's are the same pixels. With
`--screenshot`, saves the page with its result (the README's picture).
Needs `make browser` (Debian's chromium and chromium-driver).
"""

import argparse
import base64
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from segldm_jax.ui import headless  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).parents[1]


def paint(page) -> None:
  """A scene like the demo's: background, a disc, a stroke."""
  size = int(page.el("width").get_attribute("value"))
  classes = len(page.css("#palette li"))
  page.pick(0, "fill")
  page.click_pixel(1, 1)
  page.pick(5 % classes, "brush")
  page.brush_size(size // 3)
  page.click_pixel(size * 2 // 3, size // 3)
  page.pick(9 % classes, "brush")
  page.brush_size(max(1, size // 8))
  page.drag([(size // 8, size * 3 // 4), (size // 2, size * 5 // 8),
             (size * 7 // 8, size * 7 // 8)])


def sample_py(workdir, mask, out, cache_home) -> float:
  start = time.monotonic()
  subprocess.run([sys.executable, str(ROOT / "sample.py"), "--workdir",
                  str(workdir), "--masks", str(mask), "--num_samples", "1",
                  "--seed", "0", "--out", str(out)], check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})
  return time.monotonic() - start


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", type=pathlib.Path,
                  default=ROOT / "workdirs" / "demo")
  ap.add_argument("--screenshot", type=pathlib.Path, default=None)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    cache = tmp / "cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)  # serve.py's, cold too
    with headless.serve(args.workdir) as (url, started, _), \
        headless.chromium(downloads=tmp) as driver:
      page = headless.Page(driver, url)
      paint(page)
      t0 = time.monotonic()
      page.generate()
      first = time.monotonic() - t0
      page.el("download-ids").click()
      page.wait(lambda: (tmp / "mask_ids.png").exists(), 30)
      shown = page.d.execute_script(
          "return document.querySelector('img.sample').src")
      if args.screenshot:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.screenshot))
    cold = sample_py(args.workdir, tmp / "mask_ids.png", tmp / "cold",
                     tmp / "fresh_cache")
    warm = sample_py(args.workdir, tmp / "mask_ids.png", tmp / "warm",
                     tmp / "fresh_cache")
    page_image = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        shown.split(",", 1)[1]))))
    cli_image = np.asarray(Image.open(tmp / "warm" / "mask_ids_0.png"))
    diff = np.abs(page_image.astype(int) - cli_image)
  print(json.dumps({
      "workdir": str(args.workdir), "serve_start_s": round(started, 1),
      "first_generate_s": round(first, 2),
      "sample_py_cold_s": round(cold, 1), "sample_py_warm_s": round(warm, 1),
      "first_generate_vs_warm_sample_py": round(first / warm, 3),
      "same_pixels": {"max_diff": int(diff.max()),
                      "differing_fraction": float((diff > 0).mean())},
  }, indent=1))


if __name__ == "__main__":
  main()
