"""The layout rules the codebase keeps (issue 13), checked from the source.

* no import cycle between modules of segldm_jax (imports inside functions
  count too: a deferred import still ties two modules together);
* no private jax API (`jax._src`);
* the library never exits the process: only the scripts do (parallel's
  peer watchdog ends a process whose peer is lost, with os._exit, from its
  own thread: no exception could reach the scripts from there);
* the entry points stay short enough to read top to bottom.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "segldm_jax"
SCRIPTS = ("train.py", "sample.py", "convert_torch_ckpt.py",
           "export_torch_ckpt.py", "evaluate.py", "serve.py")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _sources() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(), str(p))
          for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
  """The segldm_jax modules `name` imports (`from a import b` counts as a.b
  when a.b is a module, else as a)."""
  package = name if (PACKAGE / name.split(".", 1)[-1].replace(".", "/")
                     / "__init__.py").exists() else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(package.split(".")[:len(package.split(".")) -
                                           node.level + 1] + [base]).strip(".")
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.add(full if full in modules else base)
  return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycle_inside_the_package():
  sources = _sources()
  modules = set(sources)
  graph = {name: _imports(name, tree, modules) for name, tree in sources.items()}
  # A package's __init__ importing its own submodules is how packages work,
  # not a cycle between two modules' logic.
  graph = {name: {d for d in deps if not d.startswith(name + ".")}
           for name, deps in graph.items()}
  assert graph["segldm_jax.startup"] >= {"segldm_jax.checkpoints",
                                         "segldm_jax.run_config"}  # sanity
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def _names_in(tree: ast.Module) -> set[str]:
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Attribute):
      out.add(ast.unparse(node))
    elif isinstance(node, ast.Name):
      out.add(node.id)
  return out


@pytest.mark.parametrize("path", sorted(
    [*PACKAGE.rglob("*.py"), *(ROOT / s for s in SCRIPTS)]),
    ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_jax_api(path):
  names = _names_in(ast.parse(path.read_text()))
  assert not [n for n in names if n.startswith("jax._src")]


def _exits(tree: ast.Module) -> list[str]:
  """`raise SystemExit...` and calls of sys.exit / exit (catching or
  naming SystemExit, e.g. to let it pass, is fine)."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Raise) and node.exc is not None:
      exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
      if ast.unparse(exc) == "SystemExit":
        found.append(f"line {node.lineno}: raise SystemExit")
    elif isinstance(node, ast.Call) and ast.unparse(node.func) in (
        "sys.exit", "exit"):
      found.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
  return sorted(found, key=lambda f: int(f.split()[1][:-1]))


def test_the_library_never_exits_the_process():
  offenders = [f"{path.relative_to(ROOT)} {where}"
               for path in sorted(PACKAGE.rglob("*.py"))
               for where in _exits(ast.parse(path.read_text()))]
  assert not offenders
  assert _exits(ast.parse("import sys\nsys.exit(1)\nraise SystemExit(2)")) == [
      "line 2: sys.exit()", "line 3: raise SystemExit"]


def _function_lines(path: pathlib.Path, name: str) -> int:
  tree = ast.parse(path.read_text())
  fn = next(n for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name == name)
  return fn.end_lineno - fn.lineno + 1


@pytest.mark.parametrize("script, limit", [("train.py", 150),
                                           ("sample.py", 80),
                                           ("evaluate.py", 80),
                                           ("serve.py", 40)])
def test_entry_points_stay_short(script, limit):
  assert _function_lines(ROOT / script, "main") <= limit
