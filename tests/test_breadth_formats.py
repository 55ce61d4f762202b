"""MXFP6 (E2M3, E3M2) and MXINT8: format data, every code, quantize against float64 references."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
import reference as ref
from fp4jax import scales as S

NEW = [fj.MXFP6_E2M3, fj.MXFP6_E3M2, fj.MXINT8]

# OCP MX v1.0 (section 5.3) numbers, typed on purpose as an independent check:
# (elem max, elem emax, mantissa bits, smallest normal exponent, smallest
# positive element, storage dtype, bits per element with the E8M0 scale).
SPEC_NUMBERS = {
    "mxfp6_e2m3": (7.5, 2, 3, 0, 2.0**-3, np.uint8, 6.25),
    "mxfp6_e3m2": (28.0, 4, 2, -2, 2.0**-4, np.uint8, 6.25),
    "mxint8": (1.0 + 63 / 64, 0, 6, 0, 2.0**-6, np.int8, 8.25),
}


def _bytes(a):
  return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _decode_codes(codes, fmt):
  """fp4jax's decode of element codes at scale 1 (E8M0 byte 127), float64."""
  codes = np.asarray(codes).reshape(-1, 32)
  s = np.full((codes.shape[0], 1), 127, np.uint8).view(ml_dtypes.float8_e8m0fnu)
  q = fj.QArray(jnp.asarray(codes), jnp.asarray(s), None, fmt, -1)
  return np.asarray(fj.dequantize(q)).astype(np.float64).reshape(-1)


@pytest.mark.parametrize("fmt", NEW, ids=str)
def test_constants_match_the_spec(fmt):
  m, emax, nmant, emin, tiny, storage, bpe = SPEC_NUMBERS[fmt.name]
  assert (fmt.elem_max, fmt.elem_emax, fmt.elem_nmant, fmt.elem_emin) == (m, emax, nmant, emin)
  assert 2.0**fmt.elem_log2_smallest_subnormal == tiny
  assert np.dtype(fmt.elem_dtype) == np.dtype(storage)
  assert fmt.bits_per_element == bpe and fmt.block_size == 32 and fmt.power_of_two_scales
  assert not fmt.has_global_scale and fmt.default_scale_rule == "floor"
  frac = m / 2.0**emax - 1.0
  assert fmt.elem_max_significand_bits == int(frac * 2**23)


def test_registries_and_names():
  assert sorted(fj.FORMATS) == ["mxfp4", "mxfp8_e4m3", "mxfp8_e5m2", "nvfp4"]  # unchanged
  assert set(fj.ALL_FORMATS) == set(fj.FORMATS) | {"mxfp6_e2m3", "mxfp6_e3m2", "mxint8"}
  for f in NEW:
    assert fj.get_format(f.name.upper()) is f
    assert hash(f) == hash(fj.Format(f.name, f.elem_dtype, f.scale_dtype, 32, elem_type=f.elem_type))
  assert fj.MXINT8.elem_storage == "fixed_point" and fj.MXFP6_E2M3.elem_storage == "code"
  assert fj.MXFP4.elem_storage == "native" and fj.MXFP4.elem_type is fj.MXFP4.elem_dtype
  with pytest.raises(ValueError, match="stored as int8, got elem_dtype uint8"):
    fj.Format("bad", jnp.uint8, jnp.float8_e8m0fnu, 32, elem_type=fj.FixedPoint(8, 6))


@pytest.mark.parametrize("dtype", [ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn], ids=lambda d: d.__name__)
def test_all_64_fp6_codes_decode_and_encode(dtype):
  fmt = fj.MXFP6_E2M3 if dtype == ml_dtypes.float6_e2m3fn else fj.MXFP6_E3M2
  codes = np.arange(64, dtype=np.uint8)
  want = codes.view(dtype).astype(np.float64)
  got = _decode_codes(codes, fmt)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
  # Each block (codes 0..31, then their negatives) has amax = elem_max, so the
  # floor scale is 1 and quantizing the decoded grid gives back every code.
  q = fj.quantize(want.astype(np.float32).reshape(2, 32), fmt, scale_rule="floor")
  assert (_bytes(q.scales) == 127).all()
  np.testing.assert_array_equal(np.asarray(q.values).reshape(-1), codes)


def test_all_256_int8_codes_decode_and_symmetric_encode():
  codes = np.arange(-128, 128).astype(np.int8)
  np.testing.assert_array_equal(_decode_codes(codes, fj.MXINT8), codes.astype(np.float64) / 64)
  # k / 64 for every k in -127..127 round-trips at scale 1: 31 codes a block
  # plus a 127 that makes the block's amax 127/64 (floor scale 1).
  k = np.pad(np.arange(-127, 128), (0, 9 * 31 - 255)).reshape(9, 31)
  k = np.concatenate([k, np.full((9, 1), 127)], axis=1)
  q = fj.quantize((k / 64).astype(np.float32), fj.MXINT8, scale_rule="floor")
  assert (_bytes(q.scales) == 127).all()
  np.testing.assert_array_equal(np.asarray(q.values), k.astype(np.int8))
  # The spec's two's complement code -128 (-2.0) is never produced: symmetric clipping.
  y = jnp.asarray(np.array([[-2.0, -1.99, 2.0, 1.99] + [0.0] * 28], np.float32))
  one = jnp.asarray(np.array([127], np.uint8).view(ml_dtypes.float8_e8m0fnu))
  v = np.asarray(S.encode_elements(y[:, None, :], one[None], fj.MXINT8))
  np.testing.assert_array_equal(v[0, 0, :4], [-127, -127, 127, 127])


@pytest.mark.parametrize("fmt", NEW, ids=str)
def test_encoder_matches_ml_dtypes_or_round_half_even(fmt):
  """Element rounding on dense values: every midpoint (ties to even), -0, saturation."""
  elem = ref.ELEMS[fmt.name]
  grid = np.unique(np.abs(elem.round(np.linspace(0, elem.max, 4001))))
  mids = (grid[1:] + grid[:-1]) / 2
  rng = np.random.default_rng(0)
  y = np.concatenate([grid, mids, np.nextafter(mids, 0), np.nextafter(mids, 9), rng.uniform(0, 1.2 * elem.max, 500)])
  y = np.concatenate([y, -y, [0.0, -0.0]]).astype(np.float32)
  y = np.pad(y, (0, -y.size % 32)).reshape(-1, 32)
  one = np.full((y.shape[0],), 127, np.uint8).view(ml_dtypes.float8_e8m0fnu)
  codes = np.asarray(S.encode_elements(jnp.asarray(y)[:, None], jnp.asarray(one)[:, None], fmt))[:, 0]
  want = elem.round(np.clip(y.astype(np.float64), -elem.max, elem.max))
  if elem.kind == "int8":
    np.testing.assert_array_equal(codes, (want * 64).astype(np.int8))
  else:
    want_codes = np.clip(y, -elem.max, elem.max).astype(elem.dtype).view(np.uint8)
    np.testing.assert_array_equal(codes, want_codes)  # sign of zero included
  np.testing.assert_array_equal(np.asarray(S.decode_elements(jnp.asarray(codes), fmt)), want)
  np.testing.assert_array_equal(np.asarray(S.encode_units(jnp.asarray(y), fmt)), codes)


def _data(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(3, shape) * np.exp(rng.uniform(-8, 8, shape[:-1] + (1,)))
  x.reshape(-1)[:5] = 0.0
  return x.astype(dtype)


@pytest.mark.parametrize("fmt", NEW, ids=str)
@pytest.mark.parametrize("rule", ["floor", "ceil", "even", "mse"])
def test_quantize_matches_float64_reference(fmt, rule):
  elem = ref.ELEMS[fmt.name]
  for dtype, axis in [(np.float32, -1), (ml_dtypes.bfloat16, 0)]:
    x = _data((64, 64), dtype, seed=hash((fmt.name, rule)) % 1000)
    q = fj.quantize(x, fmt, scale_rule=rule, axis=axis)
    v, s = ref.quantize_mx(np.asarray(x), elem, rule, axis=axis)
    np.testing.assert_array_equal(_bytes(q.scales), s)
    vals = np.asarray(S.decode_elements(q.values, fmt)).astype(np.float64)
    np.testing.assert_array_equal(vals, v)
    want = ref.dequantize(v, s, ref.SPECS["mxfp4"], axis=axis)  # values * 2**(byte - 127), float32
    np.testing.assert_array_equal(np.asarray(fj.dequantize(q)), want)
    if fmt.name in ref.SPECS_BREADTH and rule != "even":  # the core's reference takes ml_dtypes elements
      v2, s2, _ = ref.quantize(np.asarray(x), ref.SPECS_BREADTH[fmt.name], rule, axis=axis)
      np.testing.assert_array_equal(v2, v)
      np.testing.assert_array_equal(s2, s)


@pytest.mark.parametrize("fmt", NEW, ids=str)
def test_shapes_dtypes_jit_and_nonfinite(fmt):
  dims = chex.Dimensions(N=3, K=64, S=2)
  x = _data(dims["NK"], np.float32)
  x[1, 40] = np.nan
  chex.clear_trace_counter()  # the lambda below has the same code for every format
  f = jax.jit(chex.assert_max_traces(lambda v: fj.quantize(v, fmt), n=1))
  q = f(jnp.asarray(x))
  f(jnp.asarray(x + 1))  # same shapes: no retrace
  chex.assert_shape(q.values, dims["NK"])
  chex.assert_shape(q.scales, dims["NS"])
  chex.assert_type(q.values, fmt.elem_dtype)
  chex.assert_type(q.scales, fmt.scale_dtype)
  dq = np.asarray(fj.dequantize(q))
  assert np.isnan(dq[1, 32:]).all() and np.isfinite(dq[1, :32]).all() and np.isfinite(dq[[0, 2]]).all()
  assert q.nbytes == 3 * 64 * fmt.elem_bits // 8 + 3 * 2
  assert fj.quantize(np.zeros((1, 32), np.float32), fmt).dequantize().sum() == 0


def test_kernels_refuse_the_new_formats_cleanly():
  x = jnp.asarray(_data((4, 64), np.float32))
  for fmt in NEW:
    with pytest.raises(ValueError, match=rf"no Pallas quantize kernel.*{fmt!r}"):
      fj.quantize(x, fmt, backend="pallas")
    q = fj.quantize(x, fmt, backend="auto")  # falls back to XLA
    with pytest.raises(ValueError, match="no Pallas dequantize kernel"):
      fj.dequantize(q, backend="pallas")
    np.testing.assert_array_equal(np.asarray(fj.dequantize(q, backend="auto")), np.asarray(fj.dequantize(q)))


def test_rules_a_format_lacks_are_refused():
  x = np.ones((2, 32), np.float32)
  with pytest.raises(ValueError, match="'nearest' rounds E4M3 block scales; fp4jax.MXINT8"):
    fj.quantize(x, fj.MXINT8, scale_rule="nearest")
  with pytest.raises(ValueError, match="'4over6' chooses between two E4M3 block scales; fp4jax.MXFP6_E2M3"):
    fj.quantize(x, fj.MXFP6_E2M3, scale_rule="4over6")
  with pytest.raises(ValueError, match="unknown scale_rule 'round'"):
    fj.quantize(x, fj.MXFP6_E3M2, scale_rule="round")
  with pytest.raises(ValueError, match=r"values dtype is int8, fp4jax.MXFP6_E2M3 stores uint8"):
    q = fj.quantize(x, fj.MXINT8)
    fj.dequantize(fj.QArray(q.values, q.scales, None, fj.MXFP6_E2M3, -1))
