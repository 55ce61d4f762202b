"""Runs every ```python block of README.md and docs/*.md, and checks the README's promises.

One test per block, each in a fresh namespace (``exec`` in a new dict) with
the working directory set to an empty temporary directory: a reader can copy
any single block and run it, so no block may lean on names or files another
block made. Blocks fenced ```bash or ```text are not run (shell commands, GPU-only
code, program output).

The code is compiled under the page's path, padded so that its line numbers
are the page's: a traceback points at the line of the Markdown file.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
TOPICS = ("index", "formats", "kernels", "qat", "checkpoints", "numerics")
README_MAX_BYTES = 8500
# The commands other tools and people copy from the README; they must not drift.
README_COMMANDS = (
    "pip install -e '.[dev]'",
    "JAX_PLATFORMS=cpu python -m pytest",
    "JAX_PLATFORMS=cpu python -m fp4jax report --out report.png",
)
IMAGE_MAX_BYTES = 150_000

FENCE = re.compile(r"^```(\S*)\s*$")


def python_blocks(path: pathlib.Path):
  """``(line, source)`` for each ```python block; ``line`` is the 1-based line of its first code line."""
  blocks, lang, start, body = [], None, 0, []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    m = FENCE.match(line)
    if lang is None:
      if m:
        lang, start, body = m.group(1), n + 1, []
    elif line.strip() == "```":
      if lang == "python":
        blocks.append((start, "\n".join(body) + "\n"))
      lang = None
    else:
      body.append(line)
  assert lang is None, f"{path.name}: a ``` block opened at line {start - 1} is never closed"
  return blocks


def _rel(path):
  return path.relative_to(ROOT).as_posix()


BLOCKS = [(page, line, src) for page in PAGES for line, src in python_blocks(page)]


def test_every_topic_page_exists():
  missing = [t for t in TOPICS if not (DOCS / f"{t}.md").is_file()]
  assert not missing, f"docs/ lacks {missing}"


@pytest.mark.parametrize("page,line,src", BLOCKS, ids=[f"{_rel(p)}:{n}" for p, n, _ in BLOCKS])
def test_python_block_runs(page, line, src, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = compile("\n" * (line - 1) + src, str(page), "exec")
  try:
    exec(code, {"__name__": "__docs__"})
  except Exception as e:  # noqa: BLE001 -- any failure is the page's, reported with its place
    pytest.fail(f"{_rel(page)}: the python block starting at line {line} raised {type(e).__name__}: {e}")


def test_readme_is_short_and_keeps_its_commands():
  text = README.read_text(encoding="utf-8")
  size = len(README.read_bytes())
  assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the limit is {README_MAX_BYTES}"
  for command in README_COMMANDS:
    assert command in text, f"README.md lost the command {command!r}"


def test_relative_links_and_images_exist():
  link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
  for page in PAGES:
    for target in link.findall(page.read_text(encoding="utf-8")):
      if "://" in target or target.startswith("mailto:"):
        continue
      path = (page.parent / target).resolve()
      assert path.exists(), f"{_rel(page)} links to {target}, which does not exist"
      if path.suffix == ".png":
        assert path.stat().st_size < IMAGE_MAX_BYTES, f"{target} is {path.stat().st_size} bytes"
