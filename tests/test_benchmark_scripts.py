"""The benchmark scripts still run (CPU smoke runs; their timings mean nothing here)."""

from __future__ import annotations

import json
import re

from bench_scripts import load as _script


def test_qat_step_times_each_backend(tmp_path):
  out = tmp_path / "qat_step.md"
  assert _script("qat_step").main(["--tiny", "--modes", "bf16,mxfp4", "--backends", "xla,pallas", "--samples", "1",
                        "--steps", "1", "--out", str(out)]) == 0
  rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| mode")]
  assert [r.split("|")[1].strip() for r in rows] == ["bf16", "mxfp4", "mxfp4, backend=pallas"]
  for r in rows:  # a positive step time and a ratio to bf16 in every row
    ms, ratio = r.split("|")[2].strip(), r.split("|")[4].strip()
    assert float(ms) > 0 and re.fullmatch(r"\d+\.\d\d", ratio), r


def test_w4a4_layer_mode_runs_and_checks_the_fused_quantize(tmp_path):
  _script("w4a4").main(["--out", str(tmp_path), "--layer", "--shapes", "128x512x256", "--budget-s", "60"])
  row = json.loads((tmp_path / "w4a4.json").read_text())["rows"][0]
  assert (row["m"], row["k"], row["n"]) == (128, 512, 256)
  assert row["fused_equals_rows_path"] is True
  assert {"bf16", "qdense_w4a4", "qdense_w4a4_fused", "quantize_codes"} <= set(row["us"])
  assert all(v > 0 for v in row["us"].values())


def test_qat_int8_forward_experiment_runs(tmp_path):
  from fp4jax.qat import dot as qdot

  before = (qdot.INT8_FORWARD, qdot.INT8_BACKWARD)
  assert _script("experiments/qat_int8_forward").main(
      ["--tiny", "--out", str(tmp_path), "--samples", "1", "--steps", "1", "--variants", "gate+up,library_both"]) == 0
  assert (qdot.INT8_FORWARD, qdot.INT8_BACKWARD) == before  # the library's switches as they were
  res = json.loads((tmp_path / "qat_int8_forward.json").read_text())
  assert set(res["ms"]) == {"bf16", "mxfp4", "mxfp4, int8 forward: gate+up",
                            "mxfp4, qat.dot.INT8_FORWARD + INT8_BACKWARD"}
  assert min(res["ms"].values()) > 0
  assert res["vs_mxfp4"]["mxfp4, int8 forward: gate+up"]["y_rel"] < 1e-2  # float32 rounding, then bf16


def test_w4a4_stored_mode_runs_and_compares_bits(tmp_path):
  _script("w4a4").main(["--out", str(tmp_path), "--stored", "--shapes", "128x512x256", "--budget-s", "60"])
  row = json.loads((tmp_path / "w4a4.json").read_text())["rows"][0]
  assert {"bf16", "a_rows", "a_rows_int8_weight_tiles", "heavy_tails", "heavy_tails_int8_weight_cond"} <= set(row["us"])
  assert row["bits"]["int8_weight_equals_qarray"]
  assert row["bits"]["heavy_rows_residual"] > 0  # some rows fall back (most do at K = 8192)


def test_notebook_int8_qat_experiment_runs_and_restores_the_switches(tmp_path):
  from fp4jax import kernels
  from fp4jax.qat import dot as qdot

  before = (qdot.residual_free_product, qdot.INT8_FORWARD, qdot.INT8_BACKWARD)
  assert _script("experiments/notebook_int8_qat").main(
      ["--base-steps", "4", "--ft-steps", "2", "--offsets", "1000000,1000001", "--out", str(tmp_path)]) == 0
  assert (qdot.residual_free_product, qdot.INT8_FORWARD, qdot.INT8_BACKWARD) == before
  res = json.loads((tmp_path / "notebook_int8_qat.json").read_text())
  runs = [f"qat_full_int8_{s}{o}" for o in ("", "_batches_from_1000001") for s in ("off", "on")]
  assert set(runs) <= set(res)
  for name in ["bf16", "ptq", *runs]:
    assert res[name]["bpc"] > 0 and 0 <= res[name]["acc"] <= 1
  off, on = res["qat_full_int8_off"], res["qat_full_int8_on"]
  if kernels.on_gpu():  # the switches send the training's MXFP4 products to the int8 path
    assert on["int8_products_traced"] > off["int8_products_traced"]
  else:  # the int8 path does not run on the CPU: the switches change no bit
    assert on["int8_products_traced"] == off["int8_products_traced"] == 0 and on["bpc"] == off["bpc"]


def test_gpu_profile_gaps_sum_the_idle_time_between_kernels():
  # qat_step_profile.py's "where the GPU idles": gaps between one kernel's end (on any stream) and the next start.
  from collections import namedtuple

  gp = _script("experiments/gpu_profile")
  ev, line, plane = (namedtuple("Ev", "start_ns duration_ns name"), namedtuple("Line", "name events"),
                     namedtuple("Plane", "name lines"))
  p = plane("/device:GPU:0", [line("s1", [ev(0, 10_000, "a"), ev(20_000, 5_000, "b")]),
                              line("s2", [ev(5_000, 10_000, "c"), ev(40_000, 1_000, "d"), ev(41_500, 100, "e")])])
  g = gp._gaps(p)
  assert g["span_us"] == 41.6 and g["idle_gaps_us"] == 20.0  # c ends 15 us, b 20..25 us, d at 40 us; 0.5 us < 3
  assert g["top_gaps"] == [("b -> d", 15.0, 1), ("c -> b", 5.0, 1)]
