"""The layout rules the codebase keeps (issues 13 and 23), checked from the
source.

* packages by role, in layers: a module imports only from its own package
  and the layers below it (`LAYERS`), so the folder listing is the
  architecture; the top level holds only the API, errors and formatting;
* loading a model to sample imports neither optax nor any training module;
* no import cycle between modules of segldm_jax (imports inside functions
  count too: a deferred import still ties two modules together);
* no private jax API (`jax._src`);
* the library never exits the process: only the scripts do (parallel's
  peer watchdog ends a process whose peer is lost, with os._exit, from its
  own thread: no exception could reach the scripts from there);
* the entry points stay short enough to read top to bottom, and no library
  function runs past `MAX_FUNCTION_LINES` unless its docstring says why.
"""

import ast
import pathlib
import subprocess
import sys

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
  assert graph["segldm_jax.training.startup"] >= {
      "segldm_jax.checkpoint.store", "segldm_jax.config.run_config"}  # sanity
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


@pytest.mark.parametrize("script, limit", [("train.py", 120),
                                           ("sample.py", 80),
                                           ("evaluate.py", 80),
                                           ("serve.py", 40)])
def test_entry_points_stay_short(script, limit):
  assert _function_lines(ROOT / script, "main") <= limit


# Packages by role, lowest first. A module may import its own package and
# any package of a lower layer; `NEVER` lists the lower ones that are still
# off limits. The root's modules (errors, formatting) are layer 0; its
# __init__ (`segldm_jax.load`) is the API and may reach any layer.
LAYERS = {
    "segldm_jax": 0,
    "runtime": 1,
    "diffusion": 2, "data": 2,
    "models": 3,  # the LDM module holds its diffusion schedule
    "checkpoint": 4,
    "config": 5,
    "inference": 6,
    "convert": 7, "training": 7,
    "eval": 8,
    "ui": 9,
}
NEVER = {"eval": {"training"}, "ui": {"training"}}
TOP_LEVEL = {"__init__", "errors", "formatting"}
MAX_FUNCTION_LINES = 80


def _package(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (
      len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "segldm_jax"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
  bad = []
  for name, deps in sorted(graph.items()):
    if name == "segldm_jax":
      continue  # the API facade: load() reaches inference lazily
    mine = _package(name)
    for dep in sorted(deps):
      theirs = _package(dep)
      if theirs == mine:
        continue
      if LAYERS[theirs] >= LAYERS[mine] or theirs in NEVER.get(mine, ()):
        bad.append(f"{name} imports {dep} ({mine} may not import {theirs})")
  return bad


def test_packages_import_only_lower_layers():
  sources = _sources()
  graph = {name: _imports(name, tree, set(sources))
           for name, tree in sources.items()}
  assert {_package(n) for n in graph} == set(LAYERS)  # every package placed
  assert layering_violations(graph) == []
  # the rule itself: a model that reached up into training is caught
  assert layering_violations({"segldm_jax.models.unet": {
      "segldm_jax.training.ldm_step"}}) == [
          "segldm_jax.models.unet imports segldm_jax.training.ldm_step "
          "(models may not import training)"]


def test_the_top_level_holds_only_the_api_errors_and_formatting():
  assert {p.stem for p in PACKAGE.glob("*.py")} == TOP_LEVEL


def test_each_package_says_its_role_and_what_it_may_import():
  for init in sorted(PACKAGE.glob("*/__init__.py")):
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert "May import" in doc, init.relative_to(ROOT)


def test_sampling_loads_no_training_code():
  code = ("import sys\n"
          "import segldm_jax\n"
          "from segldm_jax.inference import generation, region_edit, trained_model\n"
          "print(sorted(m for m in sys.modules if m == 'optax' or "
          "m.startswith(('optax.', 'segldm_jax.training', 'segldm_jax.eval'))))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                        capture_output=True, check=True)
  assert proc.stdout.strip() == "[]", proc.stdout


def _long_functions(path: pathlib.Path) -> list[str]:
  """Functions longer than MAX_FUNCTION_LINES whose docstring does not say
  why (a line containing "long because")."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = node.end_lineno - node.lineno + 1
      doc = ast.get_docstring(node) or ""
      if length > MAX_FUNCTION_LINES and "long because" not in doc:
        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                     f"({length} lines)")
  return found


def test_no_library_function_runs_long_without_saying_why():
  assert [f for p in sorted(PACKAGE.rglob("*.py"))
          for f in _long_functions(p)] == []
