"""The benchmark scripts still run (CPU smoke runs; their timings mean nothing here)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
  """A benchmarks/ script as a module (they are files to run, not an installed package)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_qat_step_times_each_backend(tmp_path):
  out = tmp_path / "qat_step.md"
  assert _script("qat_step").main(["--tiny", "--modes", "bf16,mxfp4", "--backends", "xla,pallas", "--samples", "1",
                        "--steps", "1", "--out", str(out)]) == 0
  rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| mode")]
  assert [r.split("|")[1].strip() for r in rows] == ["bf16", "mxfp4", "mxfp4, backend=pallas"]
  for r in rows:  # a positive step time and a ratio to bf16 in every row
    ms, ratio = r.split("|")[2].strip(), r.split("|")[4].strip()
    assert float(ms) > 0 and re.fullmatch(r"\d+\.\d\d", ratio), r
