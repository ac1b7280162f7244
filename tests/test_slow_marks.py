"""The slow marks of tests/conftest.py (`make test-fast` leaves those tests
out) name tests that exist, and a test outside them cannot start a process."""

import ast
import pathlib
import subprocess

import pytest

import conftest

TESTS = pathlib.Path(__file__).parent


def _test_functions(path: pathlib.Path) -> dict[str, ast.FunctionDef]:
  tree = ast.parse(path.read_text())
  return {node.name: node for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_marked_file_and_test_exists():
  for name in conftest.SLOW_FILES:
    assert (TESTS / name).is_file(), name
  for name, tests in conftest.SLOW_TESTS.items():
    named = {test.split("[")[0] for test in tests}  # "test_x[2]": a parameter
    missing = named - set(_test_functions(TESTS / name))
    assert not missing, f"{name}: no test {sorted(missing)}"


def test_a_test_outside_the_slow_tier_cannot_start_a_process():
  with pytest.raises(AssertionError, match=(
      r"test_slow_marks.py::test_a_test_outside_the_slow_tier_cannot_start_a_"
      r"process starts a process \(\['true'\]\): make it an in-process test "
      r"or mark it slow")):
    subprocess.run(["true"], check=True)
