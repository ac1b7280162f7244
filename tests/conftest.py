"""Shared pytest setup: CPU only, deterministic, paths to the fixture folder."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

TESTS_DIR = pathlib.Path(__file__).parent


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEGLDM_FIXTURES", TESTS_DIR / "fixtures"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return TESTS_DIR / "data"
