"""The product never imports torch: not at import time, not converting.

A fresh interpreter (no sitecustomize: the blocker is installed by the `-c`
script itself) puts a meta-path finder first that refuses `torch` and
`torch.*` and records who asked, imports every module of `segldm_jax`, the
CLI (and train.py / sample.py where present), and converts the LDM fixture.
A static scan of the sources backs it up for code paths the run does not
reach.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(os.environ.get(
    "SEGLDM_FIXTURES", pathlib.Path(__file__).parent / "fixtures"))

_PROBE = textwrap.dedent(r"""
    import json, os, pkgutil, sys, traceback

    ROOT = os.path.realpath(sys.argv[1])
    attempts = []

    class BlockTorch:
      # First on sys.meta_path: sees every import that sys.modules misses.
      def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
          stack = traceback.extract_stack()[:-1]
          outside = [f for f in stack if "importlib" not in f.filename]
          caller = outside[-1] if outside else stack[-1]
          attempts.append({"module": name, "file": caller.filename,
                           "line": caller.lineno})
          raise ImportError(f"torch is blocked in this test ({name})")
        return None

    sys.modules.pop("torch", None)
    sys.meta_path.insert(0, BlockTorch())
    sys.path.insert(0, ROOT)

    import segldm_jax
    imported, failed = ["segldm_jax"], {}
    def onerror(name):
      failed[name] = repr(sys.exc_info()[1])
    for info in pkgutil.walk_packages(segldm_jax.__path__, "segldm_jax.",
                                      onerror=onerror):
      try:
        __import__(info.name)
        imported.append(info.name)
      except Exception as e:  # reported, and fails the test
        failed[info.name] = repr(e)
    import convert_torch_ckpt, export_torch_ckpt
    imported += ["convert_torch_ckpt", "export_torch_ckpt"]
    for script in ("train", "sample"):  # the other entry points, when present
      if os.path.isfile(os.path.join(ROOT, script + ".py")):
        try:
          __import__(script)
          imported.append(script)
        except Exception as e:
          failed[script] = repr(e)

    rc = convert_torch_ckpt.main([sys.argv[2], "--config", sys.argv[3],
                                  "--out", sys.argv[4]])
    product_attempts = list(attempts)
    torch_loaded = "torch" in sys.modules
    try:  # control: the blocker does see and refuse an import
      import torch.nn
      control = "imported"
    except ImportError as e:
      control = str(e)
    print("@@RESULT@@" + json.dumps({
        "rc": rc, "imported": imported, "failed": failed,
        "attempts": product_attempts, "torch_loaded": torch_loaded,
        "control": control, "control_attempts": attempts[len(product_attempts):]}))
""")


def test_product_runs_without_torch(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE, str(ROOT), str(FIXTURES / "ldm_tiny.ckpt"),
       str(FIXTURES / "ldm_tiny.yaml"), str(out)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next((l for l in proc.stdout.splitlines() if l.startswith("@@RESULT@@")),
              None)
  assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
  result = json.loads(line[len("@@RESULT@@"):])

  assert "blocked" in result["control"], result["control"]
  assert [a["module"] for a in result["control_attempts"]] == ["torch"]
  assert result["attempts"] == [], result["attempts"]
  assert not result["torch_loaded"]
  assert result["failed"] == {}, result["failed"]
  assert {"segldm_jax.convert", "segldm_jax.convert.torch_io", "segldm_jax.checkpoint.store",
          "segldm_jax.convert.infer_config", "convert_torch_ckpt",
          "segldm_jax.convert.export", "export_torch_ckpt"} <= set(
              result["imported"]), result["imported"]
  assert result["rc"] == 0, proc.stderr[-4000:]
  assert (out / "config.json").is_file() and (out / "first_stage").is_dir()


_TORCH_IMPORT = re.compile(
    r"^\s*(?:import\s+(?:[\w.]+\s*(?:as\s+\w+\s*)?,\s*)*torch\b"
    r"|from\s+torch(?:\.|\s)"
    r"|.*\b(?:import_module|__import__)\(\s*['\"]torch\b)",
    re.MULTILINE)


def _product_sources() -> list[pathlib.Path]:
  files = sorted((ROOT / "segldm_jax").rglob("*.py"))
  files += [ROOT / name for name in ("train.py", "sample.py",
                                     "convert_torch_ckpt.py",
                                     "export_torch_ckpt.py")
            if (ROOT / name).is_file()]
  return files


def test_no_torch_import_in_sources():
  files = _product_sources()
  names = {p.relative_to(ROOT).as_posix() for p in files}
  assert {"segldm_jax/convert/mapping.py", "segldm_jax/convert/torch_io.py",
          "convert_torch_ckpt.py"} <= names, names
  offenders = [f"{p.relative_to(ROOT)}:{p.read_text()[:m.start()].count(chr(10)) + 1}:"
               f" {m.group(0).strip()}"
               for p in files for m in _TORCH_IMPORT.finditer(p.read_text())]
  assert not offenders, offenders


def test_torch_import_pattern():
  """The scan catches the spellings that matter and nothing else."""
  hits = ["import torch", "  import torch.nn as nn", "from torch import nn",
          "from torch.utils import data", "import numpy as np, torch",
          "m = importlib.import_module('torch')", "__import__(\"torch.nn\")"]
  misses = ["from segldm_jax.convert import torch_io", "import torch_io",
            "import torchvision_like_name_x", "# torch.load(path) is not needed",
            "x = torch_key(path)"]
  for text in hits:
    assert _TORCH_IMPORT.search(text), text
  for text in misses:
    assert not _TORCH_IMPORT.search(text), text
