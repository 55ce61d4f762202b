"""The benchmark scripts still run (CPU smoke runs; their timings mean nothing here)."""

from __future__ import annotations

import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import qat_step  # noqa: E402


def test_qat_step_times_each_backend(tmp_path):
  out = tmp_path / "qat_step.md"
  assert qat_step.main(["--tiny", "--modes", "bf16,mxfp4", "--backends", "xla,pallas", "--samples", "1",
                        "--steps", "1", "--out", str(out)]) == 0
  rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| mode")]
  assert [r.split("|")[1].strip() for r in rows] == ["bf16", "mxfp4", "mxfp4, backend=pallas"]
  for r in rows:  # a positive step time and a ratio to bf16 in every row
    ms, ratio = r.split("|")[2].strip(), r.split("|")[4].strip()
    assert float(ms) > 0 and re.fullmatch(r"\d+\.\d\d", ratio), r
