"""The ``report`` command: its table, its plot, and properties its numbers must have."""

import math
import os
import subprocess
import sys

import matplotlib.image
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
from fp4jax import cli, report

DISTS = ("gaussian", "student_t", "llm_weights")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _expected_rules(fmt):
  # Every format takes floor/ceil/mse; "nearest" rounds a scale to E4M3.
  rules = {"floor", "ceil", "mse"}
  if np.dtype(fmt.scale_dtype) == np.dtype(ml_dtypes.float8_e4m3fn):
    rules.add("nearest")
  return rules


def _parse(stdout):
  rows = {}
  for line in stdout.splitlines():
    parts = line.split()
    if len(parts) == 7 and parts[0] in DISTS:
      dist, fmt, rule, bits, mse, rel, sqnr = parts
      key = (dist, fmt, rule)
      assert key not in rows, f"duplicate row {key}"
      rows[key] = {"bits": float(bits), "mse": float(mse), "rel_mse": float(rel), "sqnr_db": float(sqnr)}
  return rows


# One worker runs this module: its module fixture is a subprocess of many seconds, which
# pytest-xdist would otherwise start again on every worker that gets one of its tests.
pytestmark = pytest.mark.xdist_group("report_cli")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("report") / "nested" / "sqnr.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "fp4jax", "report", "--out", str(out), "--size", "3000", "--seed", "3"],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  return out, proc.stdout, _parse(proc.stdout)


def test_table_has_every_distribution_format_and_rule(cli_run):
  _, stdout, rows = cli_run
  want = {(d, f.name, r) for d in DISTS for f in fj.FORMATS.values() for r in _expected_rules(f)}
  assert set(rows) == want
  assert "6x512" in stdout  # 3000 elements round up to 6 rows of 512
  for (_, name, _), row in rows.items():
    fmt = fj.FORMATS[name]
    bits = ml_dtypes.finfo(fmt.elem_dtype).bits + ml_dtypes.finfo(fmt.scale_dtype).bits / fmt.block_size
    assert row["bits"] == pytest.approx(bits, abs=0.005)


def test_png_is_written_and_decodes(cli_run):
  out, _, _ = cli_run
  with open(out, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  img = matplotlib.image.imread(out)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert np.ptp(img[..., :3]) > 0  # something was drawn


def test_numbers_are_finite_and_sane(cli_run):
  _, _, rows = cli_run
  for key, row in rows.items():
    assert all(math.isfinite(v) for v in row.values()), key
    assert row["mse"] > 0, key
    # Rounding to the nearest grid point never moves an element further than
    # zero is (0 is on every grid, clipping keeps the sign), so the error
    # power is below the signal power.
    assert 0 < row["rel_mse"] < 1 and row["sqnr_db"] > 0, key


def test_more_bits_beat_fewer_on_gaussian(cli_run):
  _, _, rows = cli_run
  for rule in ("floor", "ceil", "mse"):
    assert rows[("gaussian", "mxfp8_e4m3", rule)]["sqnr_db"] > rows[("gaussian", "mxfp4", rule)]["sqnr_db"]


def test_mse_rule_is_never_worse_than_a_fixed_rule(cli_run):
  # The "mse" search tries every scale the fixed rules can pick; the slack is
  # float32 rounding of its block losses (and the table's printed digits,
  # which round monotonically).
  _, _, rows = cli_run
  for d in DISTS:
    for fmt in fj.FORMATS.values():
      best = rows[(d, fmt.name, "mse")]["mse"]
      for rule in _expected_rules(fmt) - {"mse"}:
        assert best <= rows[(d, fmt.name, rule)]["mse"] * (1 + 1e-5), (d, fmt.name, rule)


def _mxfp4_floor_numpy(x):
  """OCP MX floor rule for MXFP4 along the last axis, in numpy float64 + ml_dtypes."""
  b = x.astype(np.float64).reshape(*x.shape[:-1], -1, 32)
  amax = np.max(np.abs(b), axis=-1, keepdims=True)
  _, e = np.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2 amax) = e - 1
  scale_exp = (e - 1) - 2  # emax of E2M1 is 2 (6 = 1.5 * 2**2)
  y = np.clip(np.ldexp(b, -scale_exp), -6.0, 6.0).astype(ml_dtypes.float4_e2m1fn)
  return np.ldexp(y.astype(np.float64), scale_exp).reshape(x.shape)


def test_error_table_matches_numpy_reference():
  table = report.error_table(1024, seed=5, formats=[fj.MXFP4], distributions=["gaussian", "llm_weights"],
                             rules=["floor"])
  assert [(r["distribution"], r["format"], r["rule"]) for r in table] == [
      ("gaussian", "mxfp4", "floor"), ("llm_weights", "mxfp4", "floor")]
  for row in table:
    x = report.generate(row["distribution"], 1024, 5).astype(np.float64)
    err = _mxfp4_floor_numpy(x) - x
    mse = np.mean(err**2)
    assert row["mse"] == pytest.approx(mse, rel=1e-12)
    assert row["rel_mse"] == pytest.approx(mse / np.mean(x**2), rel=1e-12)
    assert row["sqnr_db"] == pytest.approx(10 * np.log10(np.mean(x**2) / mse), rel=1e-12)
    assert set(row) == set(report.COLUMNS)


def test_generated_data_is_as_described():
  for d in DISTS:
    x = report.generate(d, 1000, 0)
    assert x.shape == (2, 512) and x.dtype == np.float32
    np.testing.assert_array_equal(x, report.generate(d, 1000, 0))
    assert not np.array_equal(x, report.generate(d, 1000, 1))
  w = np.abs(report.generate("llm_weights", 1 << 16, 0).astype(np.float64))
  # Medians ignore the few super weights: 1% outlier input channels (5 of 512)
  # with an 8x to 30x gain stand out, the rest do not.
  col = np.median(w, axis=0)
  assert np.sort(col)[-5] > 6 * np.median(col) > 3 * np.sort(col)[-6]
  # Two super weights (one per 32768 elements), 100 to 300 standard deviations
  # of 0.02, far beyond what their column's own spread produces.
  z = w / col
  assert np.sum(z > 60) == 2 and np.all(w[z > 60] >= 2.0)
  t = report.generate("student_t", 1 << 16, 0)
  g = report.generate("gaussian", 1 << 16, 0)
  kurt = lambda v: np.mean(v.astype(np.float64) ** 4) / np.mean(v.astype(np.float64) ** 2) ** 2
  assert kurt(t) > 2 * kurt(g)


def test_valid_rules():
  assert set(report.valid_rules(fj.MXFP4)) == _expected_rules(fj.MXFP4)
  assert set(report.valid_rules(fj.NVFP4)) == _expected_rules(fj.NVFP4)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown distribution"):
    report.generate("laplace", 64, 0)
  with pytest.raises(ValueError, match="size"):
    report.generate("gaussian", 0, 0)
  with pytest.raises(ValueError, match="unknown scale rule"):
    report.error_table(64, rules=["round"])
  out = tmp_path / "x.png"
  assert cli.main(["report", "--size", "0", "--out", str(out)]) == 2
  assert not out.exists()


def test_output_is_checked_before_anything_is_computed(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(report, "error_table", lambda *a, **k: pytest.fail("computed before --out was checked"))
  ckpt = tmp_path / "model.safetensors"
  ckpt.write_bytes(b"weights")
  cases = {tmp_path: "is a directory, not a file",
           ckpt: "exists and is not a PNG image: the report will not replace it; choose another --out",
           ckpt / "r.png": "model.safetensors' is not a directory"}
  for out, message in cases.items():
    assert cli.main(["report", "--out", str(out), "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp4jax report: error: ") and message in err and err.count("\n") == 1, err
  assert ckpt.read_bytes() == b"weights" and os.listdir(tmp_path) == ["model.safetensors"]


def test_no_plot_prints_the_tables_and_writes_nothing(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(["report", "--no-plot", "--size", "512", "--formats", "mxfp4", "--rules", "floor"]) == 0
  rows = _parse(capsys.readouterr().out)
  assert set(rows) == {(d, "mxfp4", "floor") for d in DISTS}
  assert os.listdir(tmp_path) == []


def test_the_plot_replaces_an_older_plot_with_normal_permissions(tmp_path, capsys):
  out = tmp_path / "r.png"
  table = report.error_table(512, formats=[fj.MXFP4], rules=["floor"], distributions=["gaussian"])
  out.write_bytes(PNG_SIGNATURE + b"an older plot")
  old = os.umask(0o022)
  try:
    report.plot(table, str(out))
  finally:
    os.umask(old)
  assert matplotlib.image.imread(out).ndim == 3
  assert os.stat(out).st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == ["r.png"]
