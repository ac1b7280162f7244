"""Seeded mutations of the fixture checkpoints, fed to the torch-free reader.

Each mutated file must be refused with one line (a `CheckpointError`) or,
when accepted, load exactly the tensors (and everything else) of the
original: a corrupted file never loads silently. No other exception type, a
bound on what the reader allocates (measured on every third file: tracing
allocations makes a load 3-4x slower, and a third still covers every kind
of mutation of every fixture), and a deadline per file (no hang).
Conversion is a pure function of what the reader returns, so equal loads
convert equally. In-process and seeded: the same 1,200 files every run.
"""

import collections
import os
import pathlib
import signal
import struct
import tempfile
import tracemalloc
import zipfile

import numpy as np
import pytest

from segldm_jax.convert import torch_io

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# The larger fixtures cost more per file (writing it, checksumming it):
# fewer mutations of those.
PLAN = {"rescaler.ckpt": 500, "unet_tiny.ckpt": 200, "unet_tiny_ss.ckpt": 150,
        "vq_tiny.ckpt": 200, "ldm_tiny.ckpt": 100}
KINDS = ("byte flips", "data.pkl flips", "storage flips", "truncation",
         "zeroed run", "duplicated run", "zip size field", "zip header field")
DEADLINE_S = 10  # per file; a load takes milliseconds
ALLOC_SLACK = 32 << 20  # bytes the reader may allocate beyond the file size
ALLOC_EVERY = 3  # files; coprime with len(KINDS), so every kind is measured


class _Hang(Exception):
  pass


def _entries(data: bytes) -> list[tuple[zipfile.ZipInfo, int, int]]:
  """(info, central directory record offset, data offset) of every entry."""
  import io  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    infos = zf.infolist()
  out, i = [], 0
  for info in infos:
    i = data.index(b"PK\x01\x02", i)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    out.append((info, i, info.header_offset + 30 + name_len + extra_len))
    i += 4
  return out


def _mutate(data: bytes, entries, kind: str, rng: np.random.Generator) -> bytes:
  buf = bytearray(data)
  n = len(buf)

  def flip(lo, hi, count):
    for at in rng.integers(lo, hi, size=count):
      buf[at] ^= int(rng.integers(1, 256))

  if kind == "byte flips":
    flip(0, n, int(rng.integers(1, 5)))
  elif kind in ("data.pkl flips", "storage flips"):
    def chosen(name):
      if kind == "data.pkl flips":
        return name.endswith("/data.pkl")
      return "/data/" in name  # the storages
    wanted = [(info, start) for info, _, start in entries
              if info.file_size and chosen(info.filename)]
    info, start = wanted[rng.integers(len(wanted))]
    flip(start, start + info.file_size, int(rng.integers(1, 3)))
  elif kind == "truncation":
    del buf[int(rng.integers(0, n)):]
  elif kind == "zeroed run":
    at, size = int(rng.integers(0, n)), int(rng.integers(1, 4097))
    buf[at:at + size] = bytes(len(buf[at:at + size]))
  elif kind == "duplicated run":
    at, size = int(rng.integers(0, n)), int(rng.integers(1, 4097))
    buf[at:at] = buf[at:at + size]
  elif kind == "zip size field":
    info, record, _ = entries[rng.integers(len(entries))]
    # Central directory: compressed size (20), size (24); local header: 18, 22.
    field = [record + 20, record + 24, info.header_offset + 18,
             info.header_offset + 22][rng.integers(4)]
    old = struct.unpack_from("<I", buf, field)[0]
    new = [old + 1, old - 1 if old else 1, 0, 0xFFFFFFFF, old * 2 + 7,
           int(rng.integers(0, 2**32))][rng.integers(6)]
    struct.pack_into("<I", buf, field, new & 0xFFFFFFFF)
  elif kind == "zip header field":
    info, record, _ = entries[rng.integers(len(entries))]
    # CRC (16), name length (28), extra length (30), local header offset (42)
    # of the central record, or the local header's name/extra lengths.
    field, width = [(record + 16, 4), (record + 28, 2), (record + 30, 2),
                    (record + 42, 4), (info.header_offset + 26, 2),
                    (info.header_offset + 28, 2)][rng.integers(6)]
    fmt = "<I" if width == 4 else "<H"
    old = struct.unpack_from(fmt, buf, field)[0]
    delta = int(rng.integers(1, 64)) * (1 if rng.integers(2) else -1)
    struct.pack_into(fmt, buf, field, (old + delta) % (1 << (8 * width)))
  else:
    raise AssertionError(kind)
  return bytes(buf)


def _same(a, b) -> bool:
  """Equal loads: arrays bit for bit (NaNs too), containers item by item."""
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and
            a.dtype == b.dtype and a.shape == b.shape and
            np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                           np.ascontiguousarray(b).view(np.uint8)))
  if isinstance(a, torch_io.ForeignObject):
    return (type(a).qualified_name() == type(b).qualified_name() and
            all(_same(getattr(a, k), getattr(b, k))
                for k in ("args", "kwargs", "state", "items", "list_items")))
  if type(a) is not type(b):  # pylint: disable=unidiomatic-typecheck
    return False
  if isinstance(a, dict):
    return (list(a) == list(b) and
            all(_same(a[k], b[k]) for k in a))
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def _on_alarm(signum, frame):
  del signum, frame
  raise _Hang()


@pytest.fixture
def scratch(tmp_path):
  """A memory-backed folder where there is one: rewriting a file on disk
  1,200 times costs more than reading it."""
  shm = pathlib.Path("/dev/shm")
  if shm.is_dir() and os.access(shm, os.W_OK):
    with tempfile.TemporaryDirectory(dir=shm) as d:
      yield pathlib.Path(d)
  else:
    yield tmp_path


def test_mutated_checkpoints_are_refused_or_load_unchanged(scratch):
  path = scratch / "mutated.ckpt"
  counts = collections.Counter()
  problems = []
  measured = 0  # files whose allocations were traced
  previous = signal.signal(signal.SIGALRM, _on_alarm)
  try:
    for number, (fixture, count) in enumerate(PLAN.items()):
      data = (FIXTURES / fixture).read_bytes()
      original = torch_io.load_checkpoint(FIXTURES / fixture)
      entries = _entries(data)
      for i in range(count):
        kind = KINDS[i % len(KINDS)]
        rng = np.random.default_rng([number, i])
        mutated = _mutate(data, entries, kind, rng)
        path.write_bytes(mutated)
        traced = i % ALLOC_EVERY == 0
        if traced:
          tracemalloc.start()
        signal.alarm(DEADLINE_S)
        try:
          loaded = torch_io.load_checkpoint(path)
        except torch_io.CheckpointError as e:
          outcome = "refused"
          text = str(e)
          if "\n" in text or not text.startswith(f"{path}: "):
            problems.append(f"{fixture} #{i} {kind}: not one line: {text!r}")
        except _Hang:
          outcome = "hang"
          problems.append(f"{fixture} #{i} {kind}: no answer in {DEADLINE_S} s")
        except Exception as e:  # pylint: disable=broad-except
          outcome = "other exception"
          problems.append(f"{fixture} #{i} {kind}: {type(e).__name__}: {e}")
        else:
          outcome = "same" if _same(loaded, original) else "DIFFERENT"
          if outcome == "DIFFERENT":
            problems.append(f"{fixture} #{i} {kind}: accepted, other tensors")
          del loaded
        finally:
          signal.alarm(0)
        if traced:
          peak = tracemalloc.get_traced_memory()[1]
          tracemalloc.stop()
          measured += 1
          if peak > len(mutated) + ALLOC_SLACK:
            problems.append(f"{fixture} #{i} {kind}: allocated {peak} bytes")
        counts[kind, outcome] += 1
  finally:
    tracemalloc.stop()
    signal.signal(signal.SIGALRM, previous)
  total = sum(counts.values())
  table = "\n".join(f"{k}: {o} {n}" for (k, o), n in sorted(counts.items()))
  print(f"{total} mutated files:\n{table}")  # shown with pytest -s
  assert total >= 1000 and measured >= total // ALLOC_EVERY, (measured, table)
  assert not problems, "\n".join(problems[:20]) + "\n" + table
  assert sum(n for (_, o), n in counts.items() if o == "DIFFERENT") == 0
  # Every kind was tried, and the checks did refuse files of each kind that
  # corrupts what the reader uses.
  for kind in KINDS:
    assert counts[kind, "refused"] > 0, table
  for kind in ("storage flips", "data.pkl flips", "truncation"):
    assert counts[kind, "same"] == 0, table
