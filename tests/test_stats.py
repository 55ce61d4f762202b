"""fj.stats against numpy float64 computations, and its use in the report and the CLI."""

import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import fp4jax as fj
import reference as ref
from fp4jax import cli, report


def _numpy_stats(x, values, scale_values, elem_max, block, axis=-1, g=1.0, tile=False):
  """Stats by hand: blocks by reshape, float64 throughout."""
  x = np.asarray(x, np.float64)
  if tile:
    xb, vb = ref.to_tiles(x, block), ref.to_tiles(values, block)
    sb = scale_values.reshape(*scale_values.shape[:-2], -1)
  else:
    xb = np.moveaxis(x, axis, -1).reshape(-1, block)
    vb = np.moveaxis(values, axis, -1).reshape(-1, block)
    sb = np.moveaxis(scale_values, axis, -1).reshape(-1)
    g = np.broadcast_to(np.moveaxis(np.broadcast_to(g, x.shape), axis, -1).reshape(-1, block)[:, :1], (sb.size, 1))
  if tile:
    g = np.broadcast_to(np.asarray(g).reshape(-1, 1), (sb.size, 1)) if np.ndim(g) else np.full((sb.size, 1), g)
    xb, vb = xb.reshape(-1, block * block), vb.reshape(-1, block * block)
  sb = sb.reshape(-1)
  dq = (vb * sb[:, None] * g).astype(np.float32).astype(np.float64)
  ok = np.isfinite(xb) & ~np.isnan(sb)[:, None]
  err = np.sum(((xb - dq) ** 2)[ok])
  sig = np.sum((xb**2)[ok])
  clipped = ok & (sb[:, None] != 0) & (np.abs(xb) > elem_max * np.abs(sb)[:, None] * g)
  fin = sb[~np.isnan(sb)]
  return {"rel_mse": err / sig, "sqnr_db": 10 * np.log10(sig / err), "clipped_fraction": clipped.sum() / ok.sum(),
          "elements": int(ok.sum()), "blocks": fin.size, "fin": fin}


def _compare(st, want, smax, smin):
  assert st.rel_mse == pytest.approx(want["rel_mse"], rel=1e-12)
  assert st.sqnr_db == pytest.approx(want["sqnr_db"], rel=1e-12)
  assert st.clipped_fraction == want["clipped_fraction"]
  assert (st.elements, st.blocks) == (want["elements"], want["blocks"])
  assert st.scale_at_max_fraction == np.mean(np.abs(want["fin"]) >= smax)
  assert st.scale_at_min_fraction == np.mean(np.abs(want["fin"]) <= smin)


def test_mxint8_with_nan_zero_tiny_and_huge_blocks():
  rng = np.random.default_rng(0)
  x = rng.standard_t(3, (4, 128)).astype(np.float32)
  x[0, :32] = 0.0                                  # all-zero block: scale 2**-127
  x[1, 32:64] *= np.float32(1e-30)                 # a small block
  x[2, 64:96] = rng.uniform(3.39e38, 3.4e38, 32)   # huge block: scale 2**127, elements clip at 127/64
  x[3, 100] = np.nan                               # NaN block: left out
  q = fj.quantize(x, fj.MXINT8, scale_rule="floor")
  st = fj.stats(x, q)
  vals = np.asarray(q.values).astype(np.float64) / 64
  sv = np.asarray(q.scales).astype(np.float64)
  want = _numpy_stats(x, vals, sv, 127 / 64, 32)
  _compare(st, want, 2.0**127, 2.0**-127)
  assert st.scale_at_max_fraction > 0 and st.scale_at_min_fraction > 0 and st.clipped_fraction > 0
  assert st.blocks == 15 and st.elements == 15 * 32


def test_nvfp4_zero_scales_saturation_and_row_globals():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 64)).astype(np.float32)
  x[0, :16] *= np.float32(1e-8)  # "nearest" gives this block the zero scale under g below
  g = np.full((4, 1), 2e-4, np.float32)
  g[3] = 1e-6                    # too small for row 3: its scales saturate at 448 and elements clip
  q = fj.quantize(x, fj.NVFP4, global_scale=g)
  st = fj.stats(x, q)
  sv = np.asarray(q.scales).astype(np.float64)
  want = _numpy_stats(x, np.asarray(q.values).astype(np.float64), sv, 6.0, 16, g=g.astype(np.float64))
  _compare(st, want, 448.0, 2.0**-9)
  assert (sv[0, 0] == 0) and st.scale_at_max_fraction >= 0.25 and st.clipped_fraction > 0


def test_two_d_tiles_and_bfloat16_input():
  x = np.random.default_rng(2).standard_normal((2, 64, 64)).astype(ml_dtypes.bfloat16)
  q = fj.quantize(x, fj.MXFP4, block_shape=(32, 32), scale_rule="floor")
  st = fj.stats(x, q)
  sv = np.asarray(q.scales).astype(np.float64)
  want = _numpy_stats(x.astype(np.float64), np.asarray(q.values).astype(np.float64),
                      np.repeat(np.repeat(sv, 1, -1), 1, -2), 6.0, 32, tile=True)
  _compare(st, want, 2.0**127, 2.0**-127)


def test_exact_copies_and_bad_inputs():
  x = np.tile(np.array([0.5, -1, 1.5, 6, 4, 3, -2, 0], np.float32), (2, 4))
  st = fj.stats(x, fj.quantize(x, fj.MXFP4))
  assert st.sqnr_db == math.inf and st.rel_mse == 0 and st.clipped_fraction == 0
  z = np.zeros((1, 32), np.float32)
  assert fj.stats(z, fj.quantize(z, fj.MXFP4)).scale_at_min_fraction == 1.0
  q = fj.quantize(x, fj.MXFP4)
  with pytest.raises(ValueError, match=r"x has shape \(2, 16\), the QArray has shape \(2, 32\)"):
    fj.stats(x[:, :16], q)
  with pytest.raises(ValueError, match="x must be floating, got dtype int32"):
    fj.stats(x.astype(np.int32), q)
  with pytest.raises(ValueError, match="expects a fp4jax.QArray"):
    fj.stats(x, x)
  with pytest.raises(ValueError, match="values dtype"):
    fj.stats(x, fj.QArray(q.values.astype(jnp.float32), q.scales, None, fj.MXFP4, -1))


def test_report_table_carries_stats_of_new_formats_and_rules():
  table = report.error_table(1024, seed=3, formats=[fj.MXFP6_E2M3, fj.NVFP4], distributions=["student_t"],
                             rules=list(fj.ALL_SCALE_RULES))
  assert [(r["format"], r["rule"]) for r in table] == [
      ("mxfp6_e2m3", r) for r in ("floor", "ceil", "mse", "even")] + [
      ("nvfp4", r) for r in ("floor", "ceil", "nearest", "mse", "4over6")]
  x = report.generate("student_t", 1024, 3)
  for row in table:
    assert set(row) == set(report.COLUMNS)
    st = fj.stats(x, fj.quantize(x, row["format"], scale_rule=row["rule"]))
    assert (row["clipped_fraction"], row["scale_at_max_fraction"], row["scale_at_min_fraction"]) == (
        st.clipped_fraction, st.scale_at_max_fraction, st.scale_at_min_fraction)
    assert row["rel_mse"] == pytest.approx(st.rel_mse, rel=1e-12)
  text = report.format_diagnostics(table)
  assert text.splitlines()[2].split()[:3] == ["mxfp6_e2m3", "floor", "student_t"]


def test_cli_report_formats_and_rules(tmp_path, capsys):
  out = tmp_path / "r.png"
  assert cli.main(["report", "--size", "512", "--out", str(out), "--formats", "mxint8,nvfp4",
                   "--rules", "all"]) == 0
  text = capsys.readouterr().out
  diag = [line.split() for line in text.splitlines() if line.startswith(("mxint8 ", "nvfp4 "))]
  assert {(d[0], d[1]) for d in diag} == {("mxint8", r) for r in ("floor", "ceil", "mse", "even")} | {
      ("nvfp4", r) for r in ("floor", "ceil", "nearest", "mse", "4over6")} and len(diag) == 27
  assert all(len(d) == 6 and 0 <= float(d[3]) <= 100 for d in diag) and out.exists()
  assert cli.main(["report", "--size", "64", "--out", str(out), "--formats", "fp3"]) == 2
  assert "unknown format 'fp3'" in capsys.readouterr().err


def test_cli_convert_and_inspect_stats(tmp_path, capsys):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((8, 64)).astype(np.float32)
  src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
  save_file({"w": x, "b": np.ones(8, np.float32)}, str(src))
  assert cli.main(["convert", str(src), str(dst), "--format", "mxint8", "--stats", "--no-progress"]) == 0
  out = capsys.readouterr().out
  st = fj.stats(x, fj.quantize(x, fj.MXINT8))
  row = next(line.split() for line in out.splitlines() if line.startswith("w "))
  assert float(row[1]) == pytest.approx(st.sqnr_db, abs=0.006) and float(row[3]) == pytest.approx(
      100 * st.clipped_fraction, abs=6e-4)
  assert cli.main(["inspect", str(dst), "--reference", str(src), "--stats"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split() == ["name", "format", "layout", "axis", "shape", "bytes", "SQNR", "dB",
                              "clipped", "%", "scale@max", "%", "scale@min", "%"]
  w = next(line.split() for line in lines if line.startswith("w "))
  assert w[1] == "mxint8" and float(w[-3]) == pytest.approx(100 * st.clipped_fraction, abs=6e-4)
  assert cli.main(["inspect", str(dst), "--reference", str(src), "--json"]) == 0
  rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["tensors"]}
  assert rows["w"]["clipped_fraction"] == st.clipped_fraction
  assert rows["w"]["rel_mse"] == pytest.approx(st.rel_mse, rel=1e-12)
  assert rows["b"]["clipped_fraction"] is None
