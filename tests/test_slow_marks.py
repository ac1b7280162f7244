"""The slow marks of tests/conftest.py (`make test-fast` leaves those tests
out) name tests that exist, and no unmarked test starts one of the
repository's scripts as a process itself (those that do it through a
fixture are listed by hand)."""

import ast
import pathlib

import conftest

TESTS = pathlib.Path(__file__).parent
SCRIPTS = ("train.py", "sample.py", "convert_torch_ckpt.py", "serve.py",
           "bench.py")


def _test_functions(path: pathlib.Path) -> dict[str, ast.FunctionDef]:
  tree = ast.parse(path.read_text())
  return {node.name: node for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_marked_file_and_test_exists():
  for name in conftest.SLOW_FILES:
    assert (TESTS / name).is_file(), name
  for name, tests in conftest.SLOW_TESTS.items():
    missing = set(tests) - set(_test_functions(TESTS / name))
    assert not missing, f"{name}: no test {sorted(missing)}"


def _starts_a_script(func: ast.FunctionDef) -> bool:
  names = {n.id for n in ast.walk(func) if isinstance(n, ast.Name)}
  strings = [n.value for n in ast.walk(func)
             if isinstance(n, ast.Constant) and isinstance(n.value, str)]
  return "subprocess" in names and any(
      s.endswith(script) for s in strings for script in SCRIPTS)


def test_tests_that_start_a_script_are_marked_slow():
  found = []
  for path in sorted(TESTS.glob("test_*.py")):
    if path.name in conftest.SLOW_FILES:
      continue
    marked = conftest.SLOW_TESTS.get(path.name, set())
    found += [f"{path.name}::{name}" for name, func in
              _test_functions(path).items()
              if name not in marked and _starts_a_script(func)]
  assert not found, f"mark these slow in tests/conftest.py: {found}"
