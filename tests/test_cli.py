"""The ``fp4jax`` command line, run as a subprocess on generated safetensors files."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fp4jax as fj
from fp4jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# E2M1 by code (sign bit 3, exponent bits 2..1, mantissa bit 0), written out.
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def run_cli(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-m", "fp4jax", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def unpack_nibbles(packed, axis=-1):
  """uint8 -> E2M1 values in float64, low nibble = even element along ``axis``."""
  packed = np.moveaxis(packed, axis, -1)
  vals = np.stack([E2M1_TABLE[packed & 0xF], E2M1_TABLE[packed >> 4]], axis=-1).reshape(*packed.shape[:-1], -1)
  return np.moveaxis(vals, -1, axis)


def decode_gpt_oss(blocks, scales):
  vals = unpack_nibbles(blocks).reshape(*scales.shape, 32)
  return np.ldexp(vals, scales.astype(np.int32)[..., None] - 127).reshape(*blocks.shape[:-2], -1)


def decode_nvfp4(qvalues, qscales, global_scale):
  """fp4jax layout, NVFP4 along the last axis: E2M1 * E4M3 block scale * float32 global scale."""
  vals = unpack_nibbles(qvalues)
  scales = qscales.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return vals * np.repeat(scales, 16, axis=-1) * np.float64(global_scale)


def decode_mxfp8(qvalues, qscales):
  vals = qvalues.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return np.ldexp(vals, np.repeat(qscales.astype(np.int32) - 127, 32, axis=-1))


def sqnr(x, y):
  x = np.asarray(x, np.float64)
  return 10 * np.log10(np.sum(x * x) / np.sum((x - y) ** 2))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  rng = np.random.default_rng(0)
  tensors = {
      "embed.weight": rng.standard_normal((32, 64)).astype(np.float32),
      "layers.0.attn.q.weight": (0.02 * rng.standard_t(5, (64, 128))).astype(ml_dtypes.bfloat16),
      "layers.0.mlp.up.weight": rng.standard_normal((2, 32, 64)).astype(np.float16),
      "layers.0.norm.weight": np.ones(64, np.float32),
      "odd.weight": rng.standard_normal((4, 40)).astype(np.float32),
      "position_ids": np.arange(16, dtype=np.int64),
  }
  path = tmp_path_factory.mktemp("cli") / "model.safetensors"
  save_file(tensors, str(path))
  return path, tensors


def table_row(stdout, label):
  """The cells of the summary-table row that starts with ``label``."""
  for line in stdout.splitlines():
    if line.startswith(label + "  "):
      return re.split(r"\s{2,}", line.strip())
  raise AssertionError(f"no row {label!r} in:\n{stdout}")


def test_convert_mxfp4_writes_gpt_oss_tensors_and_a_true_summary(source, tmp_path):
  src, tensors = source
  dst = tmp_path / "mxfp4.safetensors"
  p = run_cli("convert", src, dst, "--format", "mxfp4", "--scale-rule", "floor", "--exclude", "^embed")
  assert "100%" in p.stderr and "convert" in p.stderr  # the progress bar
  out = load_file(str(dst))
  assert sorted(out) == sorted([
      "embed.weight", "layers.0.attn.q.weight_blocks", "layers.0.attn.q.weight_scales",
      "layers.0.mlp.up.weight_blocks", "layers.0.mlp.up.weight_scales",
      "layers.0.norm.weight", "odd.weight", "position_ids"])
  for name in ["embed.weight", "layers.0.norm.weight", "odd.weight", "position_ids"]:
    assert out[name].dtype == tensors[name].dtype and out[name].tobytes() == tensors[name].tobytes()
  sqnrs, before, after = [], 0, 0
  for name in ["layers.0.attn.q.weight", "layers.0.mlp.up.weight"]:
    x = tensors[name]
    blocks, scales = out[name + "_blocks"], out[name + "_scales"]
    assert blocks.shape == (*x.shape[:-1], x.shape[-1] // 32, 16) and scales.shape == (*x.shape[:-1], x.shape[-1] // 32)
    decoded = decode_gpt_oss(blocks, scales)
    # What the file holds is exactly fp4jax's MXFP4 floor quantization of the input.
    want = np.asarray(fj.dequantize(fj.quantize(jnp.asarray(x), fj.MXFP4, scale_rule="floor")), np.float64)
    np.testing.assert_array_equal(decoded, want)
    sqnrs.append(sqnr(x, decoded))
    before, after = before + x.nbytes, after + blocks.nbytes + scales.nbytes
  count, b, a, mean = table_row(p.stdout, "quantized")[1:]
  assert (int(count), int(b.replace(",", "")), int(a.replace(",", ""))) == (2, before, after)
  assert float(mean) == pytest.approx(np.mean(sqnrs), abs=0.02)
  assert table_row(p.stdout, "passed through")[1] == "3"
  assert table_row(p.stdout, "skipped")[1] == "1"
  assert "skipped odd.weight: length 40 along axis -1 is not a multiple of 32" in p.stdout
  total = table_row(p.stdout, "total")
  assert int(total[1]) == 6 and int(total[2].replace(",", "")) == sum(t.nbytes for t in tensors.values())


def test_convert_nvfp4_then_inspect_against_the_original(source, tmp_path):
  src, tensors = source
  nv = tmp_path / "nvfp4.safetensors"
  run_cli("convert", src, nv, "--format", "nvfp4", "--include", r"\.(q|up)\.", "--no-progress")
  p = run_cli("inspect", nv, "--reference", src, "--json")
  rows = {r["name"]: r for r in json.loads(p.stdout)["tensors"]}
  out = load_file(str(nv))
  for name in ["layers.0.attn.q.weight", "layers.0.mlp.up.weight"]:
    decoded = decode_nvfp4(out[name + ".qvalues"], out[name + ".qscales"], out[name + ".qglobal_scale"])
    assert rows[name]["format"] == "nvfp4" and rows[name]["layout"] == "fp4jax"
    assert rows[name]["shape"] == list(tensors[name].shape)
    assert rows[name]["bytes"] == tensors[name].size // 2 + tensors[name].size // 16 + 4
    assert rows[name]["sqnr_db"] == pytest.approx(sqnr(tensors[name], decoded), abs=1e-6)
  assert rows["embed.weight"]["format"] == "float32" and rows["embed.weight"]["sqnr_db"] == "inf"  # copied exactly
  assert rows["position_ids"]["sqnr_db"] is None



def test_convert_mxfp8_mse_and_inspect_table(source, tmp_path, capsys):
  """In-process (same code path as the subprocesses above, without the start-up cost)."""
  src, tensors = source
  mx8 = tmp_path / "mxfp8.safetensors"
  assert cli.main(["convert", str(src), str(mx8), "--format", "mxfp8", "--scale-rule", "mse",
                   "--include", "attn", "--no-progress"]) == 0
  assert table_row(capsys.readouterr().out, "quantized")[1] == "1"
  out = load_file(str(mx8))
  x = tensors["layers.0.attn.q.weight"]
  decoded = decode_mxfp8(out["layers.0.attn.q.weight.qvalues"], out["layers.0.attn.q.weight.qscales"])
  want = fj.quantize(jnp.asarray(x), fj.MXFP8_E4M3, scale_rule="mse").dequantize()
  np.testing.assert_array_equal(decoded, np.asarray(want, np.float64))
  assert cli.main(["inspect", str(mx8), "--reference", str(src)]) == 0
  stdout = capsys.readouterr().out
  assert stdout.startswith(f"{mx8}: 6 tensors")
  row = table_row(stdout, "layers.0.attn.q.weight")
  assert row[1:6] == ["mxfp8_e4m3", "fp4jax", "-1", "64x128", f"{x.size + x.size // 32:,}"]
  assert float(row[6]) == pytest.approx(sqnr(x, decoded), abs=0.006)
  assert table_row(stdout, "position_ids")[1:] == ["int64", "plain", "16", "128", "-"]


def test_malformed_input_exits_2_naming_the_tensor(tmp_path):
  bad = tmp_path / "bad.safetensors"
  save_file({"experts.w_blocks": np.zeros((2, 1, 16), np.uint8), "experts.b": np.zeros(2, np.float32)}, str(bad))
  p = run_cli("inspect", bad, check=False)
  assert p.returncode == 2
  assert "'experts.w_blocks' has no matching 'experts.w_scales'" in p.stderr and "Traceback" not in p.stderr


def test_convert_of_a_malformed_file_writes_nothing(tmp_path, capsys):
  bad = tmp_path / "bad.safetensors"
  save_file({"experts.w_blocks": np.zeros((2, 1, 16), np.uint8), "experts.w_scales": np.zeros(3, np.uint8)}, str(bad))
  assert cli.main(["convert", str(bad), str(tmp_path / "out.safetensors"), "--format", "mxfp4"]) == 2
  assert re.search(r"tensor 'experts.w' .*shapes do not agree", capsys.readouterr().err)
  assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_bad_arguments_are_refused(source, tmp_path, capsys):
  src, _ = source
  with pytest.raises(SystemExit):
    cli.main(["convert", str(src), str(tmp_path / "o.safetensors"), "--format", "fp3"])
  assert "invalid choice: 'fp3'" in capsys.readouterr().err
  assert cli.main(["convert", str(src), str(tmp_path / "o.safetensors"), "--format", "mxfp4",
                   "--scale-rule", "nearest", "--no-progress"]) == 2
  assert "'nearest' rounds E4M3 block scales" in capsys.readouterr().err
  assert not (tmp_path / "o.safetensors").exists()


def test_report_keeps_its_arguments():
  args = cli.build_parser().parse_args(["report", "--out", "r.png", "--size", "64", "--seed", "3"])
  assert (args.command, args.out, args.size, args.seed) == ("report", "r.png", 64, 3) and callable(args.func)


def _peak_rss_kib(src, dst):
  code = ("import resource, sys\nfrom fp4jax.cli import main\nrc = main(sys.argv[1:])\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  p = subprocess.run([sys.executable, "-c", code, "convert", str(src), str(dst), "--format", "mxfp4", "--no-progress"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert p.returncode == 0, p.stderr
  return int(p.stdout.strip().splitlines()[-1])


def test_convert_memory_does_not_grow_with_the_number_of_tensors(tmp_path):
  """8 and 24 tensors of 8 MiB: reading the file whole would add 128 MiB of peak RSS."""
  x = np.random.default_rng(1).standard_normal((1024, 2048)).astype(np.float32)
  for n in (8, 24):
    save_file({f"w{i}": x for i in range(n)}, str(tmp_path / f"in{n}.safetensors"))
  small = _peak_rss_kib(tmp_path / "in8.safetensors", tmp_path / "out8.safetensors")
  large = _peak_rss_kib(tmp_path / "in24.safetensors", tmp_path / "out24.safetensors")
  extra_bytes = 16 * x.nbytes
  assert (large - small) * 1024 < 0.375 * extra_bytes, (small, large)
