"""tpu_compile.py --max_batch's search, on a made-up memory model.

Each try of the real search is a compile of both train programs (minutes
for the reference), so what matters is that it lands on the largest batch
that fits in few tries. Peak memory here is linear in the batch, as XLA's
is to within a few percent: 1.1 GB + 0.13 GB per image on v5e's 16 GB, so
114 images fit and 115 do not. No libtpu needed: nothing compiles.
"""

import pytest

from benchmarks import tpu_compile

V5E = tpu_compile.CHIPS["v5e"]


def _search(monkeypatch, start, limit, multiple=1):
  tried = []

  def fake_train_once(config, mesh, chip, chips, per_chip, remat):
    del config, mesh, chip, chips, remat
    tried.append(per_chip)
    return {"together": {"peak_on_chip": 1.1e9 + 0.13e9 * per_chip,
                         "compile_s": 0.0}}, None

  monkeypatch.setattr(tpu_compile, "train_once", fake_train_once)
  found = tpu_compile.find_max_batch(None, None, V5E, 4, "none", start,
                                     limit, lambda _: None, multiple)
  return found, tried


@pytest.mark.parametrize("start", [16, 64, 200])
def test_finds_the_largest_batch_that_fits(monkeypatch, start):
  found, tried = _search(monkeypatch, start, limit=256)
  assert found["max_per_chip"] == 114 and not found["at_limit"]
  assert 115 in tried and len(tried) <= 5, tried


def test_a_multiple_stops_within_it_in_fewer_tries(monkeypatch):
  found, tried = _search(monkeypatch, 64, limit=256, multiple=16)
  assert found["max_per_chip"] == 112 and found["multiple"] == 16
  assert all(b % 16 == 0 for b in tried) and 128 in tried
  assert len(tried) <= 3, tried


def test_the_limit_is_reported_as_such(monkeypatch):
  found, tried = _search(monkeypatch, 16, limit=48)
  assert found["max_per_chip"] == 48 and found["at_limit"]
  assert max(tried) == 48


def test_nothing_fits(monkeypatch):
  small = tpu_compile.Chip("small", "x", 1e9, 1e12, 1e9, "")
  monkeypatch.setattr(tpu_compile, "train_once", lambda *a: (
      {"together": {"peak_on_chip": 2e9, "compile_s": 0.0}}, None))
  found = tpu_compile.find_max_batch(None, None, small, 4, "none",
                                     8, 64, lambda _: None)
  assert found["max_per_chip"] == 0
