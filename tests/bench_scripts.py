"""benchmarks/ scripts as modules, for the tests (they are files to run, not an installed package)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
  """``benchmarks/{name}.py`` as a module (``name`` like ``"qat_step"`` or ``"experiments/int8_probe"``)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name.replace('/', '_')}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # a dataclass in the script looks its module up there
  spec.loader.exec_module(module)
  return module
