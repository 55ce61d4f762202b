"""Fuzz: the public API and the command line over odd shapes, dtypes, values and arguments.

Every call either succeeds or raises a ValueError whose message names the
shape, dtype or axis at fault: never an error from inside JAX or numpy
(TypeError, IndexError, ZeroDivisionError, a jax error), which hypothesis
reports with the example that raised it. The command line either succeeds or
exits 2 with one line (argparse's usage errors too), never an internal error,
and never changes its input or leaves a temporary file.

Budgets are bounded (small shapes, a few dozen examples each, the same ones
every run) so that the file runs in well under a minute; for a longer, random
search set ``FP4JAX_FUZZ_EXAMPLES=500``.
"""

import contextlib
import io
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp4jax as fj
from fp4jax import cli, report

_LONG = int(os.environ.get("FP4JAX_FUZZ_EXAMPLES", 0))


def fuzz(examples):
  return settings(max_examples=_LONG or examples, deadline=None, derandomize=not _LONG,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


DIMS = st.sampled_from([32, 64, 16, 1, 0, 2, 3, 31, 33])
FLOATS = [np.float32, ml_dtypes.bfloat16, np.float16, np.float64]
OTHERS = [np.int8, np.int32, np.uint8, np.bool_, np.complex64, ml_dtypes.float8_e4m3fn]


@st.composite
def shapes(draw, ranks=(2, 1, 3, 4, 0)):
  """Rank 0 to 4 (mostly 1 to 3), each axis 0, 1, odd, or a block multiple; at most 8192 elements."""
  shape = tuple(draw(DIMS) for _ in range(draw(st.sampled_from(ranks))))
  while math.prod(shape) > 8192:
    shape = shape[1:]
  return shape


@st.composite
def dtypes(draw):
  """Mostly the floats quantize takes (float64 included), one time in five another dtype."""
  return draw(st.sampled_from(FLOATS)) if draw(st.integers(0, 4)) < 4 else draw(st.sampled_from(OTHERS))


SHAPES = shapes()
DTYPES = dtypes()
KINDS = st.sampled_from(["normal", "zeros", "huge", "tiny", "nonfinite"])


@st.composite
def shape_and_axis(draw):
  """A shape, and an axis that is mostly within its rank (sometimes just outside, sometimes far)."""
  shape = draw(SHAPES)
  n = len(shape)
  if draw(st.integers(0, 4)) < 4:
    return shape, draw(st.integers(-max(n, 1), max(n, 1) - 1))
  return shape, draw(st.sampled_from([n, -n - 1, 7, -9]))
FORMATS = st.sampled_from(list(fj.ALL_FORMATS.values()))
WORDS = ("shape", "dtype", "axis", "axes")


def make(shape, dtype, kind, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if kind == "zeros":
    x = np.zeros(shape)
  elif kind == "huge":
    x = x * 1e30
  elif kind == "tiny":
    x = x * 1e-40
  elif kind == "nonfinite" and x.size:
    x.flat[rng.integers(0, x.size, max(1, x.size // 7))] = rng.choice([np.nan, np.inf, -np.inf])
  with np.errstate(all="ignore"):
    return x.astype(dtype)


def value_error_or_ok(call, *words):
  """Runs ``call``; a ValueError must name a shape, dtype or axis (or one of ``words``: the argument at
  fault). Returns the result, or None after a ValueError."""
  try:
    return call()
  except ValueError as e:
    assert any(w in str(e) for w in WORDS + words), f"ValueError without shape/dtype/axis: {e}"
    return None


@fuzz(40)
@given(shape_and_axis(), DTYPES, KINDS, FORMATS, st.booleans(), st.sampled_from([None, jnp.float32, jnp.bfloat16]))
def test_quantize_dequantize(shape_axis, dtype, kind, fmt, pad, out_dtype):
  (shape, axis) = shape_axis
  x = make(shape, dtype, kind)
  q = value_error_or_ok(lambda: fj.quantize(x, fmt, axis=axis, pad=pad))
  if q is not None:
    fj.validate_qarray(q)
    assert q.shape[:len(shape)] == q.shape[:len(shape)] and len(q.shape) == len(shape)
    y = fj.dequantize(q, out_dtype or jnp.float32)
    assert y.shape == q.shape


@fuzz(25)
@given(shape_and_axis(), DTYPES, KINDS, FORMATS, st.sampled_from(["identity", "clipped"]))
def test_fake_quant(shape_axis, dtype, kind, fmt, ste):
  (shape, axis) = shape_axis
  x = make(shape, dtype, kind)
  y = value_error_or_ok(lambda: fj.fake_quant(x, fmt, axis=axis, ste=ste))
  if y is not None:
    assert y.shape == shape


@st.composite
def matmul_shapes(draw):
  """``a (..., M, K)`` and ``b (K, N)`` mostly; sometimes K differs or ``b`` has another rank."""
  a = draw(shapes(ranks=(2, 1, 3, 0)))
  k = a[-1] if a else draw(DIMS)
  if draw(st.integers(0, 4)) < 4:
    return a, (k, draw(DIMS))
  return a, draw(SHAPES)


@fuzz(30)
@given(matmul_shapes(), DTYPES, st.sampled_from(["array", "qarray", "list"]), FORMATS, st.sampled_from([0, -1, 1, 2]))
def test_scaled_matmul(ab_shapes, dtype, b_kind, fmt, b_axis):
  a_shape, b_shape = ab_shapes
  a = make(a_shape, dtype, "normal")
  b = make(b_shape, np.float32, "normal", seed=1)
  if b_kind == "qarray":
    b = value_error_or_ok(lambda: fj.quantize(b, fmt, axis=b_axis, pad=True))
    if b is None:
      return
  elif b_kind == "list":
    b = b.tolist()
  out = value_error_or_ok(lambda: fj.scaled_matmul(a, b, preferred_element_type=jnp.float32))
  if out is not None:
    assert out.shape == (*a_shape[:-1], np.shape(b)[-1] if b_kind != "qarray" else b.shape[-1])


@fuzz(25)
@given(shape_and_axis(), st.sampled_from([jnp.float4_e2m1fn, np.uint8, np.int8, np.float32, np.int32]))
def test_pack_and_unpack(shape_axis, dtype):
  (shape, axis) = shape_axis
  codes = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  if dtype == jnp.float4_e2m1fn:
    values = (codes & 0xF).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn)
  else:
    values = codes.astype(dtype)
  packed = value_error_or_ok(lambda: fj.pack_fp4(values, axis=axis))
  if packed is not None:
    np.testing.assert_array_equal(np.asarray(fj.unpack_fp4(packed, axis=axis)).view(np.uint8),
                                  np.asarray(values).view(np.uint8))
  out = value_error_or_ok(lambda: fj.unpack_fp4(values, axis=axis))
  if out is not None:
    assert out.shape[axis % len(shape)] == 2 * shape[axis % len(shape)]


@fuzz(25)
@given(SHAPES, SHAPES, st.sampled_from([np.uint8, np.int8, ml_dtypes.float8_e8m0fnu, np.float32]),
       st.sampled_from([32, 16, 2, 0, 3, -32]), st.sampled_from([jnp.bfloat16, jnp.float32, np.int32]))
def test_dequantize_packed(b_shape, s_shape, s_dtype, block_size, dtype):
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256, b_shape, dtype=np.uint8)
  scales = rng.integers(100, 150, s_shape, dtype=np.uint8)
  scales = scales.view(s_dtype) if s_dtype == ml_dtypes.float8_e8m0fnu else scales.astype(s_dtype)
  out = value_error_or_ok(lambda: fj.dequantize_packed(blocks, scales, block_size=block_size, dtype=dtype),
                          "block_size")
  if out is not None:
    assert out.shape == (*b_shape[:-1], 2 * b_shape[-1])


@fuzz(15)
@given(shape_and_axis(), DTYPES, KINDS, FORMATS)
def test_stochastic_quantize_and_global_amax(shape_axis, dtype, kind, fmt):
  (shape, axis) = shape_axis
  x = make(shape, dtype, kind)
  # Under jit (the checks run while tracing): one compile per shape instead of one per op.
  sq = jax.jit(fj.stochastic_quantize, static_argnames=("fmt", "axis", "pad"))
  q = value_error_or_ok(lambda: sq(x, fmt, jax.random.key(0), axis=axis, pad=True))
  if q is not None:
    fj.validate_qarray(q)
  amax = value_error_or_ok(lambda: fj.global_amax(x, axis=axis))
  if amax is not None:
    assert amax.shape == () and amax.dtype == jnp.float32


# ---- the command line ---------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  from safetensors.numpy import save_file

  d = tmp_path_factory.mktemp("fuzzcli")
  rng = np.random.default_rng(0)
  src = d / "in.safetensors"
  save_file({"a.weight": rng.standard_normal((4, 64)).astype(np.float32),
             "b.weight": rng.standard_normal((2, 48)).astype(np.float32),
             "ids": np.arange(3, dtype=np.int64)}, str(src))
  os.symlink("in.safetensors", d / "link.safetensors")
  (d / "sub").mkdir()
  return d


PATHS = ["in.safetensors", "out.safetensors", "link.safetensors", "missing.safetensors", "sub", "sub/",
         "nodir/out.safetensors", "r.png", ""]
OPTIONS = {
    "convert": [("--format", ["mxfp4", "nvfp4", "mxfp8", "mxint8", "fp3"]),
                ("--scale-rule", ["floor", "nearest", "mse", "4over6", "bogus"]),
                ("--axis", ["0", "-1", "1", "7", "x"]), ("--include", ["(", r"\.weight", "[z", ""]),
                ("--exclude", ["^a", "*"]), ("--layout", ["deepseek", "fp4jax", "gpt_oss", "x"]),
                ("--overwrite", None), ("--no-progress", None), ("-v", None), ("--stats", None)],
    "inspect": [("--reference", PATHS), ("--json", None), ("--stats", None)],
    "report": [("--size", ["-3", "0", "64", "x"]), ("--seed", ["1", "-1", "x"]),
               ("--formats", ["all", "nvfp4,zz", "mxfp4", ""]), ("--rules", ["floor,4over6", "all", "x"]),
               ("--no-plot", None), ("--out", PATHS)],
}
POSITIONAL = {"convert": 2, "inspect": 1, "report": 0}


@st.composite
def command_lines(draw):
  """A command, about the right number of paths, some of its options with good and bad values, stray tokens."""
  command = draw(st.sampled_from(sorted(OPTIONS)))
  n = POSITIONAL[command] + draw(st.sampled_from([0, 0, 0, -1, 1]))
  likely = [["in.safetensors"] * 3, ["out.safetensors", "out2.safetensors"] * 2, []]
  argv = [command] + [draw(st.sampled_from(likely[min(i, 2)] + PATHS)) for i in range(max(0, n))]
  options = draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=5, unique_by=lambda o: o[0]))
  if command == "convert" and draw(st.integers(0, 4)) < 4 and OPTIONS["convert"][0] not in options:
    options.insert(0, OPTIONS["convert"][0])  # mostly with the --format it requires
  for flag, values in options:
    argv += [flag] if values is None else [flag, draw(st.sampled_from(values))]
  if draw(st.booleans()) and draw(st.booleans()):
    argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["--", "-x", "--help", "1"])))
  return argv


def _table_stub(*args, **kwargs):
  return [{"distribution": "gaussian", "format": "mxfp4", "rule": "floor", "bits": 4.25, "mse": 0.01,
           "rel_mse": 0.01, "sqnr_db": 20.0, "clipped_fraction": 0.0, "scale_at_max_fraction": 0.0,
           "scale_at_min_fraction": 0.0}]


@settings(max_examples=_LONG or 60, deadline=None, derandomize=not _LONG,
          suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_command_line(files, argv):
  before = (files / "in.safetensors").read_bytes()
  out, err = io.StringIO(), io.StringIO()
  cwd = os.getcwd()
  os.chdir(files)
  saved = report.error_table
  report.error_table = _table_stub  # the report's arguments are fuzzed here, not its numbers
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        rc = cli.main(argv)
      except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        assert e.code in (0, 2), (argv, err.getvalue())
        return
  finally:
    report.error_table = saved
    os.chdir(cwd)
    assert (files / "in.safetensors").read_bytes() == before, argv
    assert not [f for f in os.listdir(files) if f.endswith(".tmp")], argv
  lines = err.getvalue().strip().splitlines()
  assert rc in (0, 2), (argv, err.getvalue())
  if rc == 2:
    assert len(lines) == 1 and lines[0].startswith(f"fp4jax {argv[0]}: error: "), (argv, err.getvalue())
