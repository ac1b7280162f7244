r"""serve.py under a bounded mix of normal and hostile requests (issue 26).

  python benchmarks/serve_load.py [--workdir W] [--requests 300]
      [--concurrency 4] [--seed 0] [--new_programs K --max_programs M]

Starts `serve.py` on 127.0.0.1 (the converted ldm_tiny fixture unless
--workdir is given; its defaults: --max_queue 4, --max_pixels 4x the
training area), answers each normal request once to learn its answer, then
sends `--requests` requests from `--concurrency` threads in a seeded random
order: normal ones (generate at several guidance scales and seeds, labels
in ids and in colours, an edit, info, status) and hostile ones (a 13376 x
13376 PNG of 174 KB, a 600 x 600 mask, a header past the decoder's limit,
another site's POST, a foreign Host, impossible steps, file names "..",
with a NUL or 300 characters, a float TIFF, a grey WebP, a truncated PNG,
an empty file, a missing field, a body claiming a gigabyte). Checks that
every normal request got its answer (the same pixels), that no request got
a 500, and the server's RSS (VmRSS, peak VmHWM) before and after; before
the mix, each hostile request alone: its status, milliseconds and the
server's peak RSS growth. With --new_programs K, then K generate requests
that each need a program of their own (DDIM 10, 11, ... steps), the
server keeping --max_programs: its RSS after each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import pathlib
import random
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from segldm_jax.ui import headless  # pylint: disable=g-import-not-at-top,wrong-import-position
from segldm_jax.ui import probe  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).parents[1]
STEPS = {"sampler": "ddim", "steps": "2", "count": "1"}


def _two_regions(h: int = 32, w: int = 48) -> np.ndarray:
  ids = np.full((h, w), 1, np.uint8)
  ids[:, w // 2:] = 3
  ids[: h // 4, : w // 4] = 255
  return ids


def _generic_colours(ids: np.ndarray) -> np.ndarray:
  """The 5-class generic palette (black for don't care)."""
  from segldm_jax.data import palette  # pylint: disable=g-import-not-at-top
  return palette.colorize(ids, palette.palette(5))


class Request:
  """One kind of request: how to send it and what answer is right."""

  def __init__(self, name: str, hostile: bool, send: Callable[[str], tuple],
               want: int):
    self.name, self.hostile, self.send, self.want = name, hostile, send, want


def catalogue(hostile_too: bool = True) -> list[Request]:
  """The normal requests and the hostile ones (status each must get)."""
  mask = probe.encoded(_two_regions())
  edited = _two_regions()
  edited[16:, :8] = 4
  photo = probe.encoded(np.full((32, 48, 3), (90, 140, 200), np.uint8))
  post = lambda path, fields, **kw: (  # noqa: E731
      lambda url: probe.post(url, path, fields, **kw))
  normal = [Request(f"generate seed {s} guidance {g}", False, post(
      "/api/generate", {"mask": ("m.png", mask), **STEPS, "seed": str(s),
                        "guidance_scale": str(g)}), 200)
            for s in (0, 1) for g in (1.0, 2.0, 3.5)]
  normal += [
      Request("labels ids", False, post("/api/labels", {"mask": (
          "ids.png", mask)}), 200),
      Request("labels colours", False, post("/api/labels", {"mask": (
          "colours.png", probe.encoded(_generic_colours(_two_regions())))}),
              200),
      Request("edit", False, post("/api/edit", {
          "photo": ("photo.png", photo), "labels": ("a.png", mask),
          "new_labels": ("b.png", probe.encoded(edited)), **STEPS}), 200),
      Request("info", False, lambda url: probe.request(url, "GET",
                                                       "/api/info"), 200),
  ]
  if not hostile_too:
    return normal
  bomb = probe.streamed_png(13376, 13376)
  garbage = b"not a picture"
  hostile = [
      Request("13376x13376 PNG", True, post("/api/labels", {"mask": (
          "bomb.png", bomb)}), 400),
      Request("600x600 mask", True, post("/api/generate", {"mask": (
          "big.png", probe.encoded(np.ones((600, 600), np.uint8))),
          **STEPS}), 400),
      Request("past the decoder's limit", True, post("/api/generate", {
          "mask": ("huge.png", probe.declared_png(20000, 20000))}), 400),
      Request("another site's POST", True, post(
          "/api/generate", {"mask": ("m.png", mask), **STEPS},
          headers={"Origin": "http://evil.example"}), 403),
      Request("foreign Host", True, lambda url: probe.request(
          url, "GET", "/api/info", headers={"Host": "evil.example:7871"}),
              400),
      Request("ddim 600 steps", True, post("/api/generate", {
          "mask": ("m.png", mask), "sampler": "ddim", "steps": "600"}), 400),
      Request("guidance 99", True, post("/api/generate", {
          "mask": ("m.png", mask), "guidance_scale": "99"}), 400),
      Request("file name ..", True, post("/api/labels", {"mask": (
          "..", garbage)}), 400),
      Request("file name with NUL", True, post("/api/labels", {"mask": (
          "a\x00b.png", garbage)}), 400),
      Request("300-character name", True, post("/api/labels", {"mask": (
          "y" * 300, garbage)}), 400),
      Request("float TIFF", True, post("/api/labels", {"mask": (
          "f.tif", probe.encoded(np.ones((32, 32), np.float32), "TIFF"))}),
              400),
      Request("grey WebP", True, post("/api/labels", {"mask": (
          "g.webp", probe.encoded(np.ones((32, 32), np.uint8), "WEBP",
                                  lossless=True))}), 400),
      Request("truncated PNG", True, post("/api/labels", {"mask": (
          "t.png", mask[:len(mask) // 2])}), 400),
      Request("empty file", True, post("/api/labels", {"mask": (
          "e.png", b"")}), 400),
      Request("missing field", True, post("/api/generate", STEPS), 400),
      Request("a gigabyte claimed", True, lambda url: probe.request(
          url, "POST", "/api/labels", b"x", {
              "Content-Length": str(1 << 30),
              "Content-Type": "multipart/form-data; boundary=x"}), 413),
  ]
  return normal + hostile


def _answer(body: dict[str, Any]) -> Any:
  """What a normal request's correctness is judged on."""
  return body.get("images") or body.get("ids") or body.get("classes")


@contextlib.contextmanager
def tiny_workdir() -> Iterator[pathlib.Path]:
  """The reference's ldm_tiny converted into a workdir, as the tests do."""
  import convert_torch_ckpt  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
    out = pathlib.Path(tmp) / "ldm_tiny"
    fixtures = ROOT / "tests" / "fixtures"
    assert convert_torch_ckpt.main([
        str(fixtures / "ldm_tiny.ckpt"), "--config",
        str(fixtures / "ldm_tiny.yaml"), "--out", str(out)]) == 0
    yield out


def run_load(url: str, pid: int, requests: int, concurrency: int,
             seed: int = 0) -> dict[str, Any]:
  """The load on a running server -> a summary (see the module docstring)."""
  kinds = catalogue()
  expected = {}
  for kind in kinds:  # each normal answer once, alone
    if not kind.hostile:
      status, body = kind.send(url)
      assert status == 200, (kind.name, status, body)
      expected[kind.name] = _answer(body)
  alone = {}
  for kind in kinds:  # each hostile request alone: its time and memory
    if kind.hostile:
      probe.reset_peak(pid)
      before, t0 = probe.memory_kb(pid)["rss"], time.monotonic()
      status, _ = kind.send(url)
      alone[kind.name] = [status, round(1000 * (time.monotonic() - t0)),
                          round((probe.memory_kb(pid)["peak"] - before)
                                / 1024, 1)]
  rng = random.Random(seed)
  order = [rng.choice(kinds) for _ in range(requests)]
  start_mem = probe.memory_kb(pid)
  probe.reset_peak(pid)

  def one(kind: Request):
    t0 = time.monotonic()
    status, body = kind.send(url)
    right = status == kind.want and (
        kind.hostile or _answer(body) == expected[kind.name])
    return kind, status, right, time.monotonic() - t0, body

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    results = list(pool.map(one, order))
  wall = time.monotonic() - start
  time.sleep(1.0)  # let the last answers' buffers go
  end_mem = probe.memory_kb(pid)
  programs = probe.request(url, "GET", "/api/status")[1]["programs"]
  wrong = [f"{k.name}: {s} {str(b)[:120]}" for k, s, ok, _, b in results
           if not ok]
  normal_s = sorted(t for k, _, _, t, _ in results if not k.hostile)
  statuses = collections.Counter(s for _, s, _, _, _ in results)
  return {
      "requests": len(results),
      "normal": len(normal_s), "hostile": len(results) - len(normal_s),
      "concurrency": concurrency, "wall_s": round(wall, 2),
      "statuses": dict(sorted(statuses.items())),
      "wrong": wrong, "errors_500": statuses.get(500, 0),
      "normal_p50_s": round(normal_s[len(normal_s) // 2], 3)
      if normal_s else None,
      "normal_p95_s": round(normal_s[int(len(normal_s) * 0.95)], 3)
      if normal_s else None,
      "rss_start_mb": round(start_mem["rss"] / 1024, 1),
      "rss_peak_mb": round(end_mem["peak"] / 1024, 1),
      "rss_end_mb": round(end_mem["rss"] / 1024, 1),
      "programs": programs,
      "alone_status_ms_peak_mb": alone,
  }


def new_programs(url: str, pid: int, count: int) -> list[float]:
  """RSS (MB) of the server after each of `count` requests that compile a
  program of their own."""
  mask = probe.encoded(_two_regions())
  rss = []
  for steps in range(10, 10 + count):
    status, body = probe.post(url, "/api/generate", {
        "mask": ("m.png", mask), "sampler": "ddim", "steps": str(steps),
        "count": "1"})
    assert status == 200, body
    rss.append(round(probe.memory_kb(pid)["rss"] / 1024, 1))
  return rss


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", type=pathlib.Path, default=None)
  ap.add_argument("--requests", type=int, default=300)
  ap.add_argument("--concurrency", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--new_programs", type=int, default=0)
  ap.add_argument("--max_programs", type=int, default=8)
  args = ap.parse_args()
  if args.requests > 1000:
    ap.error("--requests: at most 1000 (a bounded test, not a flood)")
  with contextlib.ExitStack() as stack:
    workdir = args.workdir or stack.enter_context(tiny_workdir())
    served = stack.enter_context(headless.serve(
        workdir, "--warmup_count", "0", "--max_programs",
        str(args.max_programs)))
    summary = run_load(served.url, served.pid, args.requests,
                       args.concurrency, args.seed)
    if args.new_programs:
      summary["new_programs_rss_mb"] = new_programs(
          served.url, served.pid, args.new_programs)
      summary["programs"] = probe.request(served.url, "GET", "/api/status"
                                          )[1]["programs"]
  print(json.dumps({"workdir": str(args.workdir or "ldm_tiny fixture"),
                    **summary}))


if __name__ == "__main__":
  main()
