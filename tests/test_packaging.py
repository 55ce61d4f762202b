"""pyproject.toml's extras: what the README's table says they give, and what the tests and docs import."""

import ast
import pathlib
import re
import sys
import tomllib

from fp4jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# Import name -> distribution, where they differ.
DISTRIBUTION = {"orbax": "orbax-checkpoint", "sklearn": "scikit-learn", "yaml": "pyyaml"}
# Imported by tests but installed by another requirement: scipy (scikit-learn), absl (chex, orbax), jaxlib (jax).
TRANSITIVE = {"scipy", "absl", "jaxlib"}


def names(requirements) -> set[str]:
  return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def closure(extra: str) -> set[str]:
  """The distributions an extra installs, following fp4jax[...] references."""
  out = set()
  for req in EXTRAS[extra]:
    m = re.fullmatch(r"fp4jax\[([\w,]+)\]", req.replace(" ", ""))
    if m:
      for sub in m.group(1).split(","):
        out |= closure(sub)
    else:
      out |= names([req])
  return out


def readme_table() -> dict[str, str]:
  """``{extra: what it gives}`` from the README's rows ``| `pip install 'fp4jax[extra]'` | ... |``."""
  text = (ROOT / "README.md").read_text()
  table = text[text.index("## Which extra gives what"):]
  return dict(re.findall(r"^\| `pip install 'fp4jax\[(\w+)\]'` \| (.+) \|$", table, flags=re.M))


def test_the_readme_table_names_exactly_the_extras():
  assert set(readme_table()) == set(EXTRAS)


def test_each_row_names_the_packages_of_its_extra():
  table = readme_table()
  assert closure("cli") == {"safetensors", "tqdm", "matplotlib"}
  assert all(p in table["cli"] for p in closure("cli"))
  assert closure("checkpoints") == {"safetensors"} and "safetensors" in table["checkpoints"]
  assert closure("flax") == {"flax"} and "fp4jax.flax" in table["flax"] and "fp4jax.nnx" in table["flax"]
  assert "all of the above" in table["dev"]
  assert closure("dev") >= closure("cli") | closure("checkpoints") | closure("flax")
  for tool in ("pytest", "pytest-xdist", "chex", "hypothesis", "orbax"):
    assert tool in table["dev"] and DISTRIBUTION.get(tool, tool) in closure("dev")


def test_the_cli_extra_has_what_each_command_imports():
  assert {m for needs in cli._NEEDS.values() for m in needs} == closure("cli")


def _imports(source: str) -> set[str]:
  tree = ast.parse(source)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module.split(".")[0])
  return out


def test_dev_installs_everything_the_tests_and_docs_import():
  sources = [p.read_text() for p in (ROOT / "tests").glob("*.py")]
  for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
    sources += re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.M | re.S)
  imported = set().union(*map(_imports, sources))
  local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"fp4jax"}
  third_party = imported - set(sys.stdlib_module_names) - local - TRANSITIVE
  have = closure("dev") | names(PROJECT["dependencies"])
  missing = sorted(m for m in third_party if DISTRIBUTION.get(m, m).replace("_", "-") not in
                   {h.replace("_", "-") for h in have})
  assert missing == [], f"imported by tests or docs but not installed by the dev extra: {missing}"
