"""Shared pytest setup: CPU only, deterministic, paths to the fixture folder."""
import atexit
import os
import pathlib
import shutil
import tempfile

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

from segldm_jax import xla_cpu  # pylint: disable=g-import-not-at-top

xla_cpu.use_xnnpack_convolutions()  # the numerics train.py and sample.py get

import pytest  # pylint: disable=g-import-not-at-top

TESTS_DIR = pathlib.Path(__file__).parent


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEGLDM_FIXTURES", TESTS_DIR / "fixtures"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return TESTS_DIR / "data"
