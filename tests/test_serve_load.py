"""serve.py as a process under load (issue 26): a bounded mix of normal and
hostile requests (benchmarks/serve_load.py, its correctness part; the
figures are in BENCHMARKS.md), and the lane holding one large decode at a
time. Memory is the server process's own RSS (/proc/PID), its peak reset
before each measurement. Loopback only.
"""

import threading

import pytest

from benchmarks import serve_load
from segldm_jax.ui import headless
from segldm_jax.ui import probe


def test_a_bounded_load_of_normal_and_hostile_requests(ldm_tiny_workdir):
  with headless.serve(ldm_tiny_workdir, "--warmup_count", "0",
                      log_name="serve_load.log") as served:
    got = serve_load.run_load(served.url, served.pid, requests=60,
                              concurrency=4, seed=0)
  assert got["wrong"] == [] and got["errors_500"] == 0
  assert got["normal"] > 10 and got["hostile"] > 30
  assert set(got["statuses"]) <= {200, 400, 403, 413}
  assert got["rss_end_mb"] - got["rss_start_mb"] < 100
  assert got["programs"]["compiled"] == 3  # unguided, guided, edit


def _labels_peak_mb(url: str, pid: int, mask: bytes, senders: int) -> float:
  """Peak RSS growth of the server while `senders` upload `mask` at once."""
  answers = []

  def send():
    status, body = probe.post(url, "/api/labels", {"mask": ("big.png", mask)})
    answers.append((status, len(body.get("ids", ""))))

  probe.reset_peak(pid)
  before = probe.memory_kb(pid)["rss"]
  threads = [threading.Thread(target=send) for _ in range(senders)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(300)
  assert answers == [(200, 4 * -(-4096 * 4096 // 3))] * senders  # base64
  return (probe.memory_kb(pid)["peak"] - before) / 1024


def test_four_concurrent_large_uploads_decode_one_at_a_time(ldm_tiny_workdir):
  """With --max_pixels 4096^2, /api/labels of a 4096 x 4096 map: decoding
  and answering take ~100 MB; four at once decode in turn. What overlaps
  is the answers already made (22 MB of base64 each) while they are sent:
  1.4-1.8x one here, depending on how fast the clients read."""
  mask = probe.streamed_png(4096, 4096, value=2)
  with headless.serve(ldm_tiny_workdir, "--warmup_count", "0",
                      "--max_pixels", str(4096 * 4096),
                      log_name="serve_big.log") as served:
    one = _labels_peak_mb(served.url, served.pid, mask, 1)
    four = _labels_peak_mb(served.url, served.pid, mask, 4)
  assert one > 50, one
  # with the decoding outside the lane, four took 3.7x one (362, 97 MB)
  assert four < 2.5 * one, (one, four)
