"""A corpus of hostile and broken checkpoints fed to convert_torch_ckpt.py.

Every file is refused with exit code 1 and exactly one stderr line that
starts with "error:" and names the refused callable or the problem; nothing
is written, and every payload that would run code under a plain unpickler
(`torch.load(weights_only=False)`) would create a marker file, which must
not exist afterwards. Files are written by tests/torch_files.py (no torch).

The CLI runs in-process (cheap); one case also runs as a real subprocess.
"""

import mmap
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tempfile
import uuid
import zipfile

import numpy as np
import pytest

import torch_files as tf
from segldm_jax.convert import torch_io

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
import convert_torch_ckpt  # noqa: E402  pylint: disable=g-import-not-at-top

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MARKER = "PWNED"
# A module whose mere import creates the marker (see `evil_module`).
EVIL = f"evil_{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------


def _payload(value_ops: bytes, protocol: int = 2):
  """A builder: a torch zip whose data.pkl holds `{'x': <value_ops>}`."""

  def build(path: pathlib.Path, marker: str) -> None:
    del marker  # Baked into value_ops by the caller.
    tf.write_torch_zip(path, tf.checkpoint_pickle_with(value_ops, protocol),
                       {})

  return build


def _central_record(data: bytes, name: str) -> int:
  """Offset of the zip central directory record for entry `name`."""
  i = 0
  while True:
    i = data.index(b"PK\x01\x02", i)
    name_len = struct.unpack_from("<H", data, i + 28)[0]
    if data[i + 46:i + 46 + name_len] == name.encode():
      return i
    i += 4


def _patched(write, name: str, field_offset: int, value: int):
  """A builder: `write(path)`, then one 4-byte field of `name`'s central
  directory record set to `value` (24: uncompressed size, 42: offset of
  its local header)."""

  def build(path: pathlib.Path, marker: str) -> None:
    del marker
    write(path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, _central_record(data, name) + field_offset,
                     value)
    path.write_bytes(bytes(data))

  return build


def _zip_flags(name: str, field: str, value: int, compress: bool = False):
  """A builder: a one-tensor checkpoint whose entry `name` claims another
  compression method ('method') or general-purpose flags ('flags', bit 0:
  encrypted), in its local header and the central directory alike."""
  central, local = {"flags": (8, 6), "method": (10, 8)}[field]

  def build(path: pathlib.Path, marker: str) -> None:
    del marker
    tf.save_torch(path, {"state_dict": {"w": np.ones(64, np.float32)}},
                  compress=compress)
    data = bytearray(path.read_bytes())
    record = _central_record(data, name)
    header = struct.unpack_from("<I", data, record + 42)[0]
    struct.pack_into("<H", data, record + central, value)
    struct.pack_into("<H", data, header + local, value)
    path.write_bytes(bytes(data))

  return build


def _corrupt_deflated_pickle(path: pathlib.Path, marker: str) -> None:
  del marker
  tf.save_torch(path, {"state_dict": {"w": np.ones(64, np.float32)}},
                compress=True)
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("archive/data.pkl")
  data = bytearray(path.read_bytes())
  start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 5
  data[start:start + 8] = b"\xff" * 8
  path.write_bytes(bytes(data))


def _saved(obj):
  return lambda path, marker: tf.save_torch(path, obj)


def _raw(data: bytes):
  return lambda path, marker: path.write_bytes(data)


def _good_bytes() -> bytes:
  """A valid one-tensor checkpoint, to cut short."""
  pkl, storages = tf.dumps_torch(
      {"state_dict": {"w": np.arange(1000, dtype=np.float32)}})
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "good.ckpt"
    tf.write_torch_zip(path, pkl, storages)
    return path.read_bytes()


def _vq_state_dict(change):
  """A builder: the tiny VQ fixture's state_dict, passed through `change`."""

  def build(path: pathlib.Path, marker: str) -> None:
    del marker
    sd = {k: np.array(v) for k, v in
          torch_io.load_state_dict(FIXTURES / "vq_tiny.ckpt").items()}
    tf.save_torch(path, {"state_dict": change(sd)})

  return build


def _first_conv(sd):
  return next(k for k, v in sd.items() if v.ndim == 4)


def _with(sd, key, value):
  sd[key] = value
  return sd


def _self_referential():
  cycle = {"w": np.ones(2, np.float32)}
  cycle["self"] = cycle
  return {"state_dict": cycle}


def _billion_laughs():
  # 10**60 list elements if walked, a few KB as a pickle (memo references).
  laughs = []
  for _ in range(60):
    laughs = [laughs] * 10
  return {"state_dict": laughs}


def _deep_nesting(path, marker):
  del marker
  n = 200_000
  pkl = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + tf.op_str("state_dict") +
         pickle.EMPTY_LIST * n + pickle.APPEND * (n - 1) + pickle.SETITEM +
         pickle.STOP)
  tf.write_torch_zip(path, pkl, {})


class _Evil:
  """Pickled by plain `pickle` as os.system(touch marker)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _call(qualified: str, *args: bytes, stack: bool = False) -> bytes:
  """Opcodes for `qualified(*args)`, the global by GLOBAL or STACK_GLOBAL."""
  return tf.op_call(tf.op_global(qualified, stack=stack), *args)


def _corpus(m: str) -> dict:
  """id -> (builder(path, marker), text the one-line error must contain).

  `m` is the marker path; payloads that would run code create it.
  """
  evil_code = tf.op_str(f"open({m!r}, 'w').close()")
  touch = tf.op_str(f"touch {m}")
  touch_argv = tf.op_tuple(tf.op_str("touch"), tf.op_str(m))
  good = _good_bytes()
  one_tensor = {"state_dict": {"w": np.ones(3, np.float32)}}
  runstring = "numpy.testing._private.utils.runstring"
  return {
      # --- pickles that call out ---------------------------------------
      "os.system": (_payload(_call("os.system", touch)), "'os.system'"),
      "posix.system": (_payload(_call("posix.system", touch)),
                       "'posix.system'"),
      "builtins.eval": (_payload(_call("builtins.eval", evil_code)),
                        "'builtins.eval'"),
      "builtins.exec": (_payload(_call("builtins.exec", evil_code)),
                        "'builtins.exec'"),
      "__builtin__.eval (py2 name)": (
          _payload(_call("__builtin__.eval", evil_code)), "'builtins.eval'"),
      "subprocess.Popen": (_payload(_call("subprocess.Popen", touch_argv)),
                           "'subprocess.Popen'"),
      "STACK_GLOBAL os.system": (
          _payload(_call("os.system", touch, stack=True), protocol=4),
          "'os.system'"),
      "STACK_GLOBAL subprocess.check_output": (
          _payload(_call("subprocess.check_output", touch_argv, stack=True),
                   protocol=4),
          "'subprocess.check_output'"),
      "importlib.import_module": (
          _payload(_call("importlib.import_module", tf.op_str(EVIL))),
          "'importlib.import_module'"),
      "builtins.__import__": (
          _payload(_call("builtins.__import__", tf.op_str(EVIL))),
          "'builtins.__import__'"),
      "global of an arbitrary module": (
          _payload(tf.op_global(f"{EVIL}.anything")), f"'{EVIL}.anything'"),
      "getattr(__import__('os'), 'system')": (
          _payload(tf.op_call(_call(
              "builtins.getattr",
              _call("builtins.__import__", tf.op_str("os")),
              tf.op_str("system")), touch)),
          "'builtins.getattr'"),
      "numpy runstring (calls exec)": (
          _payload(_call(runstring, evil_code, pickle.EMPTY_DICT)),
          f"'{runstring}'"),
      "torch.load inside the pickle": (
          _payload(_call("torch.load", tf.op_str("/etc/passwd"))),
          "'torch.load'"),
      # --- calls the reader resolves, with the wrong things ----------------
      "REDUCE on a storage type (not callable)": (
          _payload(_call("torch.FloatStorage", tf.op_str("x"))),
          "corrupt or unsupported pickle in data.pkl (TypeError"),
      "tensor rebuilt on a list": (
          _payload(_call("torch._utils._rebuild_tensor_v2", pickle.EMPTY_LIST,
                         b"K\x00", tf.op_tuple(), tf.op_tuple())),
          "tensor is built on list, not a storage"),
      "BUILD rewrites a storage dtype": (
          _payload(tf.op_global("torch.FloatStorage") + pickle.NONE +
                   pickle.EMPTY_DICT + tf.op_str("dtype") + tf.op_str("O") +
                   pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD),
          "modify internal object"),
      "bytes(2**31) allocation": (
          _payload(_call("__builtin__.bytes", b"J\xff\xff\xff\x7f")),
          "pickle calls bytes with unexpected arguments"),
      # --- recursive and huge structures ---------------------------------
      "self-referential state_dict": (
          _saved(_self_referential()), "state_dict entry 'self' is a dict"),
      "billion laughs (10**60 elements)": (
          _saved(_billion_laughs()), "'state_dict' entry is a list"),
      "200k nested lists": (_deep_nesting, "'state_dict' entry is a list"),
      "memo index 2**31": (
          _payload(pickle.LONG_BINGET + struct.pack("<I", 2**31)),
          "Memo value not found"),
      "BINBYTES8 claims 2**40 bytes": (
          _payload(b"\x8e" + struct.pack("<Q", 2**40), protocol=4),
          "corrupt or unsupported pickle in data.pkl"),
      "global name not UTF-8": (
          _payload(pickle.GLOBAL + b"os\nsys\xff\xfetem\n"),
          "UnicodeDecodeError"),
      # --- sizes and storages that point outside -------------------------
      "storage numel 2**60": (
          _saved({"state_dict": {"w": tf.Tensor(tf.Storage(
              np.arange(10, dtype=np.float32), declared_numel=2**60), (10,))}}),
          f"declares {2**60} float32 elements"),
      "stride-0 view of 2**60 elements": (
          _saved({"state_dict": {"w": tf.Tensor(
              tf.Storage(np.ones(1, np.float32)), (2**20,) * 3, (0, 0, 0))}}),
          "refusing absurd size"),
      "data.pkl declares 3.75 GiB": (
          _patched(lambda p: tf.save_torch(p, one_tensor), "archive/data.pkl",
                   24, 0xF0000000),
          "data.pkl declares 4026531840 bytes"),
      "storage without its zip entry": (
          lambda p, _: tf.write_torch_zip(p, tf.dumps_torch(one_tensor)[0],
                                          {}),
          "points to missing zip entry 'archive/data/0'"),
      "storage key ../../../etc/passwd": (
          _saved({"state_dict": {"w": tf.Tensor(tf.Storage(
              np.ones(3, np.float32), key="../../../etc/passwd"), (3,))}}),
          "bad storage key"),
      "zip entry offset past the end of the file": (
          _patched(lambda p: tf.save_torch(p, one_tensor), "archive/data/0",
                   42, 0x7FFFFFF0),
          "bad local zip header for 'archive/data/0'"),
      "tensor beyond its storage": (
          _saved({"state_dict": {"w": tf.Tensor(
              tf.Storage(np.arange(10, dtype=np.float32)), (4, 4))}}),
          "reaches element 15 of storage '0'"),
      # --- truncated, empty, foreign formats -----------------------------
      "truncated zip": (_raw(good[:len(good) // 2]),
                        "truncated or not a zip archive"),
      "zip cut 10 bytes short": (_raw(good[:-10]),
                                 "truncated or not a zip archive"),
      "truncated data.pkl": (
          lambda p, _: tf.write_torch_zip(
              p, tf.dumps_torch(one_tensor)[0][:20],
              tf.dumps_torch(one_tensor)[1]),
          "corrupt or unsupported pickle in data.pkl"),
      "data.pkl deflate stream corrupt": (
          _corrupt_deflated_pickle,
          "corrupt zip entry (Error -3 while decompressing data"),
      "data.pkl with unknown compression": (
          _zip_flags("archive/data.pkl", "method", 99),
          "corrupt zip entry (That compression method is not supported)"),
      "data.pkl encrypted": (_zip_flags("archive/data.pkl", "flags", 1),
                             "is encrypted, password required"),
      "storage encrypted": (
          _zip_flags("archive/data/0", "flags", 1, compress=True),
          "zip entry 'archive/data/0' is corrupt (File 'archive/data/0' is "
          "encrypted"),
      "random bytes": (_raw(np.random.default_rng(0).bytes(4096)),
                       "not a PyTorch checkpoint"),
      "empty file": (_raw(b""), "empty file"),
      "legacy torch file carrying a payload": (
          _raw(b"\x80\x02\x8a\x0a" +
               (0x1950a86a20f9469cfc6c).to_bytes(10, "little") + b"." +
               pickle.dumps(_Evil(m), protocol=2)),
          "legacy (non-zip) torch.save"),
      "bare pickle calling os.system": (
          _raw(pickle.dumps(_Evil(m), protocol=2)), "a bare pickle"),
      "zip without data.pkl": (
          lambda p, _: tf.write_torch_zip(p, b"", {"0": b"\0" * 8},
                                          include_pickle=False),
          "without <folder>/data.pkl"),
      # --- well-formed files with broken contents -------------------------
      "tensor name with newline and escape": (
          _saved({"state_dict": {"evil\n\x1b[2Jkey": np.ones(2, np.float32)}}),
          "evil\\n\\x1b[2Jkey"),
      "complex weights": (
          _vq_state_dict(lambda sd: {k: v.astype(np.complex64)
                                     for k, v in sd.items()}),
          "has dtype complex64"),
      "NaN weights": (
          _vq_state_dict(lambda sd: _with(sd, _first_conv(sd), np.full(
              sd[_first_conv(sd)].shape, np.nan, np.float32))),
          "non-finite values"),
      "zero-size weight": (
          _vq_state_dict(lambda sd: _with(sd, _first_conv(sd), np.ones(
              (0, 3, 3, 3), np.float32))),
          "base width 0"),
      "shapes no model has": (
          _vq_state_dict(lambda sd: _with(sd, _first_conv(sd), np.ones(
              (1, 1, 1, 1), np.float32))),
          "cannot convert (TypeError"),
  }


CASES = list(_corpus("/m"))


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
  """Puts `EVIL` on sys.path: importing it creates the marker."""
  marker = tmp_path / MARKER
  (tmp_path / f"{EVIL}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  yield
  assert EVIL not in sys.modules


def _write_case(tmp_path, case) -> pathlib.Path:
  marker = tmp_path / MARKER
  build, _ = _corpus(str(marker))[case]
  path = tmp_path / (case.replace("/", "_").replace(" ", "_")[:60] + ".ckpt")
  if "newline" in case:  # The file name too: it reaches the message.
    path = tmp_path / "evil\n\x1b[31mname.ckpt"
  build(path, str(marker))
  assert path.exists()
  return path


def test_corpus_is_big_enough():
  assert len(CASES) >= 10
  assert sum("system" in c or "eval" in c or "exec" in c or "import" in c
             for c in CASES) >= 8


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_is_refused_in_one_line(tmp_path, capsys, evil_module,
                                             case):
  del evil_module
  path = _write_case(tmp_path, case)
  out = tmp_path / "out"
  capsys.readouterr()
  rc = convert_torch_ckpt.main([str(path), "--out", str(out)])
  captured = capsys.readouterr()
  _, expected = _corpus("/m")[case]
  assert rc == 1, captured
  assert captured.err.startswith("error: "), captured.err
  assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), (
      captured.err)
  assert expected in captured.err, captured.err
  assert "wrote" not in captured.out
  assert not (tmp_path / MARKER).exists(), "a payload ran"
  assert not out.exists()
  if "pickle refers to" in captured.err:  # a refused global
    assert "nothing was executed" in captured.err
  if "newline" in case:  # control characters of the file name are escaped
    assert "evil\\n\\x1b[31mname.ckpt: " in captured.err, captured.err


def test_any_other_failure_of_the_reader_is_a_checkpoint_error(
    tmp_path, monkeypatch):
  path = tmp_path / "good.ckpt"
  path.write_bytes(_good_bytes())

  def no_memory(*args, **kwargs):
    raise MemoryError()

  monkeypatch.setattr(mmap, "mmap", no_memory)
  with pytest.raises(torch_io.CheckpointError) as e:
    torch_io.load_checkpoint(path)
  assert str(e.value) == f"{path}: unreadable checkpoint (MemoryError)"


def test_real_cli_process_exits_1_with_one_line(tmp_path):
  marker = tmp_path / MARKER
  path = _write_case(tmp_path, "os.system")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, str(ROOT / "convert_torch_ckpt.py"), str(path),
       "--out", str(tmp_path / "out")],
      env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert r.returncode == 1
  assert r.stderr.splitlines() == [
      f"error: {path}: pickle refers to 'os.system', which is not a tensor "
      "or plain container; refusing to load (nothing was executed)"]
  assert r.stdout == ""
  assert not marker.exists()
  assert not (tmp_path / "out").exists()


def _file_offset(array: np.ndarray) -> int:
  """Where a loaded tensor's first byte sits in its (memory-mapped) file."""
  base = array
  while isinstance(base, np.ndarray):
    base = base.base
  base = base.obj if isinstance(base, memoryview) else base
  assert isinstance(base, mmap.mmap)
  start = np.frombuffer(base, np.uint8, count=1).__array_interface__["data"][0]
  return array.__array_interface__["data"][0] - start


@pytest.mark.parametrize("fixture,key", [
    ("vq_tiny.ckpt", "decoder.up.2.attn.1.proj_out.weight"),
    ("ldm_tiny.ckpt", "model.diffusion_model.out.2.weight"),
])
def test_flipped_byte_in_a_tensor_is_refused_naming_it(tmp_path, capsys,
                                                       fixture, key):
  tensor = torch_io.load_state_dict(FIXTURES / fixture)[key]
  data = bytearray((FIXTURES / fixture).read_bytes())
  at = _file_offset(tensor) + tensor.nbytes // 2
  data[at] ^= 0x10  # one bit, in the middle of the tensor
  path = tmp_path / fixture
  path.write_bytes(bytes(data))
  with zipfile.ZipFile(path) as zf:
    entry = next(i for i in zf.infolist()
                 if i.header_offset < at < i.header_offset + 100 + i.file_size
                 and i.filename.split("/")[-2] == "data")
  capsys.readouterr()
  rc = convert_torch_ckpt.main([str(path), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 1
  assert err.startswith(
      f"error: {path}: zip entry '{entry.filename}' (tensor '{key}') fails its "
      f"CRC-32 check (stored {entry.CRC:08x}, read "), err
  assert err.endswith("): the file is corrupt, re-download or re-save it\n")
  assert err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_deflated_storage_with_a_flipped_byte_names_its_tensor(tmp_path):
  path = tmp_path / "deflated.ckpt"
  tf.save_torch(path, {"state_dict": {"a": np.zeros(64, np.float32),
                                      "b": np.arange(64, dtype=np.float32)}},
                compress=True)
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("archive/data/1")
  data = bytearray(path.read_bytes())
  # The CRC field of the central directory: the data inflate fine, but no
  # longer match it.
  data[_central_record(data, info.filename) + 16] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(torch_io.CheckpointError) as e:
    torch_io.load_state_dict(path)
  assert (f"zip entry 'archive/data/1' (tensor 'b') fails its CRC-32 check "
          f"(stored {info.CRC ^ 1:08x}, read {info.CRC:08x})") in str(e.value)
