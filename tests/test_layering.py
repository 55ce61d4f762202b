"""The import structure: layers that import only downward, no circles, no private names across modules.

The layer order is the list in ``fp4jax/__init__.py``'s docstring; this test
parses it, walks every module of ``fp4jax/`` with ``ast`` (imports inside
functions too) and fails on any import of a module listed later, any
``_private`` name taken from another module, any ``_private`` module used from
outside its package, and any module missing from the list.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fp4jax"


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under fp4jax/ (package inits as the package name)."""
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _layer_order() -> list[str]:
  """The dotted modules in the order of the docstring's layer list (bottom first)."""
  doc = ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text()))
  lines = re.findall(r"^\s*\d+\.\s+(.+)$", doc, flags=re.M)
  assert lines, "no numbered layer list in fp4jax/__init__.py's docstring"
  order = []
  for line in lines:
    for entry in re.findall(r"[\w.]+(?:\s*\[[^\]]*\])?", line):
      name, _, subs = entry.partition("[")
      name = name.strip()
      for sub in re.findall(r"\w+", subs):
        order.append(f"fp4jax.{name}.{sub}")
      order.append(f"fp4jax.{name}")
  return order


def _package(module: str, modules) -> str:
  """The package a module belongs to (a package belongs to itself for its own submodules' sake)."""
  return module if pathlib.Path(modules[module]).name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: pathlib.Path, modules):
  """(imported module, private name or None, line) for each fp4jax import in ``path``."""
  tree = ast.parse(path.read_text())
  package = _package(module, modules)
  aliases = {}  # local name -> fp4jax module it is bound to
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "fp4jax":
          found.append((a.name, None, node.lineno))
          aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else "fp4jax"
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      if base.split(".")[0] != "fp4jax":
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in modules:
          found.append((sub, None, node.lineno))
          aliases[a.asname or a.name] = sub
        else:
          found.append((base, a.name if a.name.startswith("_") else None, node.lineno))
  for node in ast.walk(tree):  # module._private through an imported fp4jax module
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith("_") and not node.attr.startswith("__")
        and f"{aliases[node.value.id]}.{node.attr}" not in modules):
      found.append((aliases[node.value.id], node.attr, node.lineno))
  return found


MODULES = _modules()
ORDER = _layer_order()
TOP = {"fp4jax"}  # the package's own __init__ re-exports everything


def test_every_module_is_in_the_layer_list_once():
  assert len(ORDER) == len(set(ORDER)), "a module is listed twice"
  listed = set(ORDER) | TOP
  assert sorted(set(MODULES) - listed) == [], "modules missing from fp4jax/__init__.py's layer list"
  assert sorted(listed - set(MODULES)) == [], "the layer list names modules that do not exist"


@pytest.mark.parametrize("module", sorted(set(MODULES) - TOP))
def test_imports_only_downward_and_no_private_names(module):
  rank = ORDER.index(module)
  bad = []
  for target, private, line in _imports(module, MODULES[module], MODULES):
    where = f"{MODULES[module].relative_to(ROOT.parent)}:{line}"
    if target == module:
      continue
    if target not in MODULES:
      bad.append(f"{where} imports {target}, which is not a module of fp4jax")
    elif target in TOP:
      bad.append(f"{where} imports the package root fp4jax (the top): import the module that defines it")
    elif ORDER.index(target) > rank:
      bad.append(f"{where} imports {target}, listed above {module} (an upward import)")
    if private is not None:
      bad.append(f"{where} takes the private name {private} from {target}")
    leaf = target.rpartition(".")[2]
    owner = target.rpartition(".")[0]
    if leaf.startswith("_") and not (module == owner or module.startswith(owner + ".")):
      bad.append(f"{where} imports the private module {target} from outside its package {owner}")
  assert bad == []


def test_the_checker_sees_an_upward_import_and_a_private_name(tmp_path):
  # The rules above must be able to fail: a module low in the list that reaches
  # up, and one that takes a private name, are both reported.
  fake = tmp_path / "mod.py"
  fake.write_text("def f():\n  from fp4jax.quantize import quantize\n"
                  "from fp4jax.scales.fixed import _x\nfrom fp4jax import kernels\nkernels._INTERPRET\n")
  found = _imports("fp4jax.formats", fake, MODULES)
  assert ("fp4jax.quantize", None, 2) in found
  assert ("fp4jax.scales.fixed", "_x", 3) in found
  assert ("fp4jax.kernels", "_INTERPRET", 5) in found
  assert ORDER.index("fp4jax.quantize") > ORDER.index("fp4jax.formats")
