"""pack_fp4 / unpack_fp4 and dequantize_packed against numpy references."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4jax as fj
import reference as ref


def _codes(values):
  return np.asarray(jnp.asarray(values).view(jnp.uint4)).astype(np.uint8)


def _from_codes(codes):
  return jnp.asarray(np.asarray(codes, np.uint8).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn))


def test_low_nibble_is_the_even_element():
  v = _from_codes([1, 7, 0, 15, 8, 9])  # 0.5, 6, 0, -6, -0, -0.5
  packed = np.asarray(fj.pack_fp4(v))
  np.testing.assert_array_equal(packed, [0x71, 0xF0, 0x98])
  np.testing.assert_array_equal(_codes(fj.unpack_fp4(packed)), [1, 7, 0, 15, 8, 9])


def test_every_byte_round_trips():
  b = np.arange(256, dtype=np.uint8).reshape(16, 16)
  v = fj.unpack_fp4(b)
  assert v.shape == (16, 32) and v.dtype == jnp.float4_e2m1fn
  codes = _codes(v)
  np.testing.assert_array_equal(codes[:, 0::2], b & 0xF)
  np.testing.assert_array_equal(codes[:, 1::2], b >> 4)
  np.testing.assert_array_equal(np.asarray(fj.pack_fp4(v)), b)
  # int8 bytes are the same bits.
  np.testing.assert_array_equal(_codes(fj.unpack_fp4(b.view(np.int8))), codes)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_along_any_axis(axis):
  rng = np.random.default_rng(0)
  shape = [4, 6, 8]
  codes = rng.integers(0, 16, shape).astype(np.uint8)
  packed = np.asarray(fj.pack_fp4(_from_codes(codes), axis=axis))
  c = np.moveaxis(codes, axis, -1)
  want = np.moveaxis(c[..., 0::2] | (c[..., 1::2] << 4), -1, axis)
  np.testing.assert_array_equal(packed, want)
  np.testing.assert_array_equal(_codes(fj.unpack_fp4(packed, axis=axis)), codes)


@settings(max_examples=20)
@given(st.lists(st.integers(0, 15), min_size=64, max_size=64), st.sampled_from([0, 1]))
def test_pack_unpack_are_inverses(codes, axis):
  v = _from_codes(np.array(codes).reshape(8, 8))
  back = fj.unpack_fp4(fj.pack_fp4(v, axis=axis), axis=axis)
  np.testing.assert_array_equal(_codes(back), _codes(v))


def test_packing_errors():
  with pytest.raises(ValueError, match=r"odd length 3 along axis"):
    fj.pack_fp4(_from_codes(np.zeros((2, 3))))
  with pytest.raises(ValueError, match="float4_e2m1fn values, got dtype float32"):
    fj.pack_fp4(np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="uint8 .* got dtype float32"):
    fj.unpack_fp4(np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="out of range"):
    fj.pack_fp4(_from_codes(np.zeros((2, 4))), axis=2)


# ---- dequantize_packed -----------------------------------------------------------
def _all_codes_all_scales():
  i = np.arange(16, dtype=np.uint8)
  blocks = np.tile(i | ((15 - i) << 4), (256, 1))  # every code in both nibbles
  scales = np.arange(256, dtype=np.uint8)[:, None]
  return blocks, scales


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_packed_matches_the_float64_decoder(dtype):
  """Every code under every scale byte against ldexp over the E2M1 table: 0xFF (E8M0's NaN)
  gives NaN, float32 subnormal results are flushed, results past the dtype's range saturate."""
  blocks, scales = _all_codes_all_scales()
  got = np.asarray(fj.dequantize_packed(blocks, scales, dtype=dtype)).astype(np.float64)
  exact = ref.dequantize_packed(blocks, scales)
  big = float(ml_dtypes.finfo(dtype).max)
  want = ref.flush_f32_subnormals(np.where(np.abs(exact) > big, np.copysign(big, exact), exact))
  want = want.astype(np.float32).astype(dtype).astype(np.float64)
  np.testing.assert_array_equal(got, want)  # NaN where NaN (0xFF)
  np.testing.assert_array_equal(np.signbit(got[:0xFF]), np.signbit(want[:0xFF]))
  assert np.isnan(got[0xFF]).all() and np.isfinite(got[:0xFF]).all()
  # e8m0 scales are the same bytes
  e8 = np.asarray(fj.dequantize_packed(blocks, scales.view(ml_dtypes.float8_e8m0fnu), dtype=dtype))
  np.testing.assert_array_equal(e8.astype(np.float64), got)


def test_dequantize_packed_equals_dequantize_of_qarray():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((3, 5, 64)) * np.exp(rng.uniform(-20, 20, (3, 5, 1)))).astype(np.float32)
  q = fj.quantize(x, fj.MXFP4)
  blocks = fj.pack_fp4(q.values)
  scale_bytes = np.asarray(q.scales).view(np.uint8)
  out = fj.dequantize_packed(blocks, scale_bytes, dtype=jnp.float32)
  np.testing.assert_array_equal(out, fj.dequantize(q))


def test_dequantize_packed_errors():
  b = np.zeros((2, 16), np.uint8)
  s = np.zeros((2, 1), np.uint8)
  with pytest.raises(ValueError, match=r"blocks shape \(2, 16\) and scales shape \(2, 2\)"):
    fj.dequantize_packed(b, np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError, match="scales must be uint8 or float8_e8m0fnu, got dtype float32"):
    fj.dequantize_packed(b, s.astype(np.float32))
  with pytest.raises(ValueError, match="blocks must be uint8 or int8, got dtype float32"):
    fj.dequantize_packed(b.astype(np.float32), s)
  with pytest.raises(ValueError, match="positive even"):
    fj.dequantize_packed(b, s, block_size=31)
