"""The package's dependencies point one way: nn -> tensor -> ops -> _ffi (utils -> ops).

Reads every module's import statements (module level and inside functions alike) with ``ast``
and checks the graph of jsparse modules: no cycle, no import against the layering, and no
function-level import of a jsparse module (the usual way to hide a cycle). And importing jsparse
prints nothing.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jsparse"

# Layers, lowest first: a module may import modules of its own layer or lower ones only.
LAYERS = (
  ("jsparse._capacity", "jsparse._ffi", "jsparse._porting"),
  ("jsparse.ops",),
  ("jsparse.tensor", "jsparse._build_info", "jsparse.utils", "jsparse.export"),
  ("jsparse.nn",),
  ("jsparse.models", "jsparse.interop"),
  ("jsparse", "jsparse.demo", "jsparse.cli", "jsparse.__main__"),
)


def modules_of(package: pathlib.Path) -> dict[str, pathlib.Path]:
  """Module name -> file, for every module of ``package``."""
  names = {}
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(package.parent).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


MODULES = modules_of(PACKAGE)


def imports(module: str, modules: dict[str, pathlib.Path]) -> list[tuple[str, bool]]:
  """``(imported module of the package, at module level)`` for each import in ``module``."""
  path = modules[module]
  tree = ast.parse(path.read_text(), str(path))
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  root = next(iter(modules)).split(".")[0]
  top_level = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: the package, up level - 1 parents
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parent, base] if base else parent)
      names = [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      if name == root or name.startswith(root + "."):
        while name not in modules:  # an attribute of a module: the module
          name = name.rpartition(".")[0]
        found.append((name, id(node) in top_level))
  return found


def find_cycle(modules: dict[str, pathlib.Path]) -> list[str] | None:
  """An import cycle among ``modules``, or None. A package importing its own submodules (or a
  submodule its package) is how Python packages work and does not count."""
  edges = {
    m: {t for t, _ in imports(m, modules) if not (m.startswith(t + ".") or t.startswith(m + ".") or t == m)}
    for m in modules
  }
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(module: str, path: list[str]) -> list[str] | None:
    state[module] = 1
    for target in sorted(edges[module]):
      if state.get(target) == 1:
        return [*path, module, target]
      if target not in state and (cycle := visit(target, [*path, module])):
        return cycle
    state[module] = 2
    return None

  for module in sorted(edges):
    if module not in state and (cycle := visit(module, [])):
      return cycle
  return None


def _layer(module: str) -> int:
  rank = max(
    ((len(prefix), r) for r, prefixes in enumerate(LAYERS) for prefix in prefixes
     if module == prefix or module.startswith(prefix + ".")),
    default=None,
  )  # fmt: skip
  assert rank is not None, f"{module} is in no layer of LAYERS: add it"
  return rank[1]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_are_at_module_level(module):
  for target, top_level in imports(module, MODULES):
    assert top_level, f"{module} imports {target} inside a function; import it at module level"
    if target == "jsparse" or module.startswith(target + "."):
      continue  # the package's own __init__, which Python runs first anyway
    assert _layer(target) <= _layer(module), (
      f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}): see LAYERS"
    )


def test_ops_see_no_tensor_or_layer():
  for module in MODULES:
    if module.startswith("jsparse.ops"):
      for target, _ in imports(module, MODULES):
        assert not target.startswith(("jsparse.tensor", "jsparse.nn", "jsparse.utils", "jsparse.models")), (
          f"{module} imports {target}: ops work on arrays and kernel maps only"
        )


def test_utils_need_only_ops():
  for module in MODULES:
    if module.startswith("jsparse.utils"):
      for target, _ in imports(module, MODULES):
        assert target.startswith(("jsparse.utils", "jsparse.ops", "jsparse._capacity", "jsparse._porting")), (
          f"{module} imports {target}: the point-cloud utilities stand on ops alone"
        )


def test_no_import_cycle():
  assert find_cycle(MODULES) is None, "import cycle: " + " -> ".join(find_cycle(MODULES))


def test_a_cycle_is_found(tmp_path):
  """The checks can fail: a cycle, a function-level import and a relative import are seen."""
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("from pkg import a\n")
  (package / "a.py").write_text("from pkg.sub import b\n")
  (package / "sub" / "__init__.py").write_text("")
  (package / "sub" / "b.py").write_text("def f():\n  from ..a import thing\n")
  modules = modules_of(package)
  assert imports("pkg.sub.b", modules) == [("pkg.a", False)]
  assert find_cycle(modules) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_import_prints_nothing():
  out = subprocess.run([sys.executable, "-c", "import jsparse"], capture_output=True, text=True, check=True)
  assert out.stdout == "" and out.stderr == ""
