"""Shared pytest setup: CPU only, deterministic, paths to the fixture folder.

One persistent XLA compilation cache for the whole session, the train.py and
sample.py subprocesses included: many tests run the same tiny recipe, and a
program loaded from the cache is the very program compiled before, so it
saves minutes of compiling without changing a single result.
"""
import atexit
import os
import pathlib
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# train.py and sample.py keep compiled programs in $XDG_CACHE_HOME
# (segldm_jax/compilation_cache.py): never the user's, in tests.
_CACHE_HOME = tempfile.mkdtemp(prefix="segldm_test_cache_")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
# 8 host devices so sharding tests run on CPU; must be set before jax loads.
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _XLA_FLAGS:
  os.environ["XLA_FLAGS"] = (_XLA_FLAGS
                             + " --xla_force_host_platform_device_count=8")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="segldm_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top

xla_cpu.use_xnnpack_convolutions()  # the numerics train.py and sample.py get

import pytest  # pylint: disable=g-import-not-at-top

TESTS_DIR = pathlib.Path(__file__).parent
# The suite's time budget on a 2-core CPU: `make test` (venv build included)
# must finish within 15 minutes in CI, so new features fit their tests in
# what is left. The ten slowest tests are printed after every run.
SUITE_BUDGET_S = 780
_START = time.monotonic()


def pytest_terminal_summary(terminalreporter):
  elapsed = time.monotonic() - _START
  verdict = "within" if elapsed <= SUITE_BUDGET_S else "OVER"
  terminalreporter.write_line(
      f"suite time {elapsed:.0f} s, {verdict} the {SUITE_BUDGET_S} s budget "
      "(tests/conftest.py)")


# `make test` runs `-n 2 --dist loadfile`: xdist hands out whole files, by
# default those with the most tests first, which left the few-test files that
# each run several train.py processes for the end, one worker busy while the
# other waited. These go first instead (longest first), the rest follow in
# collection order and fill in. Rank by `--durations=0` when a file grows.
SLOW_FILES_FIRST = (
    "test_train_e2e.py", "test_multiprocess.py", "test_datasets.py",
    "test_sharded_training.py", "test_guidance_edit_tiles.py",
    "test_benchmarks.py", "test_ldm_training.py", "test_remat.py",
    "test_serve_browser.py", "test_serve_api.py",
    "test_vq_training.py", "test_config_errors.py", "test_data_robustness.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # xdist loaded
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEGLDM_FIXTURES", TESTS_DIR / "fixtures"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return TESTS_DIR / "data"


@pytest.fixture(scope="session")
def ldm_tiny_workdir(tmp_path_factory) -> pathlib.Path:
  """The reference's ldm_tiny checkpoint converted into a workdir, as users
  convert a released model (32x32 images, 5 classes, real weights)."""
  import convert_torch_ckpt  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("converted") / "ldm_tiny"
  assert convert_torch_ckpt.main([
      str(TESTS_DIR / "fixtures" / "ldm_tiny.ckpt"), "--config",
      str(TESTS_DIR / "fixtures" / "ldm_tiny.yaml"), "--out", str(out)]) == 0
  return out
