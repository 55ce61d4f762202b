"""fp4jax.dequantize_packed against a numpy float64 decoder, and the two MXFP4 decoders against each other.

``dequantize_packed`` (bytes) and ``dequantize`` (a QArray, XLA or the Pallas
kernel) agree bit for bit on every E2M1 code with every E8M0 scale byte: NaN
for byte 0xFF (E8M0's NaN, which fp4jax writes for blocks that held NaN or
Inf), float32 subnormal results flushed to zero, and results beyond the
output dtype's range saturated to its largest finite value (a finite code
times a finite scale never decodes to Inf).
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
from fp4jax import kernels
from fp4jax.kernels import dequantize as dqk

# E2M1 by code, written out: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
F32_TINY = 2.0**-126  # smallest normal float32


def _reference(blocks, scales, block_size, dtype):
  """E2M1(code) * 2**(byte - 127) in float64 (exact), NaN for byte 0xFF, then float32 (flushing
  what falls below its normal range), saturated to ``dtype``'s largest finite value, then ``dtype``."""
  b = np.asarray(blocks).view(np.uint8)
  s = np.asarray(scales).view(np.uint8)
  codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)
  vals = E2M1_TABLE[codes].reshape(*s.shape, block_size)
  out = np.ldexp(vals, s.astype(np.int64)[..., None] - 127)
  out = np.where((s == 0xFF)[..., None], np.nan, out)
  out = np.where(np.abs(out) < F32_TINY, 0.0 * out, out)
  big = float(ml_dtypes.finfo(dtype).max)
  out = np.where(np.abs(out) > big, np.copysign(big, out), out)  # NaN compares False: kept
  with np.errstate(over="ignore"):  # float32 rounding past float16/bfloat16 max: saturated above
    return out.astype(np.float32).reshape(*b.shape[:-1], -1).astype(dtype)


def _assert_same_bits(got, want):
  """Bit equality; NaN equals NaN whatever its payload (numpy compares ml_dtypes NaNs as unequal)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape
  ints = np.uint16 if got.dtype.itemsize == 2 else np.uint32
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
  np.testing.assert_array_equal(got.view(ints)[~nan], want.view(ints)[~nan])


def _every_code_block():
  # 16 bytes whose low and high nibbles each run over all 16 codes.
  i = np.arange(16, dtype=np.uint8)
  return i | ((15 - i) << 4)


def _all_pairs():
  """Every scale byte 0..255, each with a 32-element block holding every E2M1 code."""
  blocks = np.tile(_every_code_block(), (256, 1))
  scales = np.arange(256, dtype=np.uint8)[:, None]
  return blocks, scales


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_every_code_and_scale_byte(dtype):
  blocks, scales = _all_pairs()
  got = np.asarray(fj.dequantize_packed(blocks, scales, dtype=dtype))
  assert got.shape == (256, 32) and got.dtype == np.dtype(dtype)
  _assert_same_bits(got, _reference(blocks, scales, 32, np.dtype(dtype)))


def test_scale_byte_ff_is_nan_and_byte_254_saturates():
  blocks, scales = _all_pairs()
  got = np.asarray(fj.dequantize_packed(blocks, scales, dtype=jnp.float32))
  assert np.isnan(got[0xFF]).all()  # E8M0's NaN, whatever the code: as in a QArray
  codes = np.stack([blocks[0] & 15, blocks[0] >> 4], -1).reshape(-1)
  vals = E2M1_TABLE[codes] * 2.0**127
  # 2**127 times 0.5 and 1 fits; 1.5 and more pass float32's maximum and saturate, never Inf.
  fits = np.abs(vals) <= np.finfo(np.float32).max
  np.testing.assert_array_equal(got[0xFE][fits], vals[fits].astype(np.float32))
  np.testing.assert_array_equal(got[0xFE][~fits], np.sign(vals[~fits]) * np.finfo(np.float32).max)
  assert np.isfinite(got[:0xFF]).all()


_QARRAY_DECODERS = {
    "xla": lambda q, dtype: fj.dequantize(q, dtype, backend="xla"),
    "pallas": lambda q, dtype: dqk.dequantize(q, dtype, interpret=not kernels.on_gpu()),
}


@pytest.mark.parametrize("decoder", sorted(_QARRAY_DECODERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: np.dtype(d).name)
def test_the_two_mxfp4_decoders_agree_on_every_code_and_scale_byte(decoder, dtype):
  """All 16 codes x all 256 scale bytes (0, 1, 254 and 0xFF included): ``dequantize_packed`` of the
  bytes equals ``dequantize`` of the same data as an MXFP4 QArray, bit for bit (NaN payloads aside);
  through the Pallas kernel too (on a GPU the real one)."""
  blocks, scales = _all_pairs()
  packed = np.asarray(fj.dequantize_packed(blocks, scales, dtype=dtype))
  values = fj.unpack_fp4(jnp.asarray(blocks))
  q = fj.QArray(values, jax.lax.bitcast_convert_type(jnp.asarray(scales), jnp.float8_e8m0fnu), None, fj.MXFP4, -1)
  got = np.asarray(_QARRAY_DECODERS[decoder](q, dtype))
  _assert_same_bits(got, packed)
  _assert_same_bits(packed, _reference(blocks, scales, 32, np.dtype(dtype)))


def test_bottom_of_scale_range_flushes_only_subnormal_results():
  blocks, scales = _all_pairs()
  got = np.asarray(fj.dequantize_packed(blocks, scales, dtype=jnp.float32))[0]  # 2**-127
  codes = np.stack([blocks[0] & 15, blocks[0] >> 4], -1).reshape(-1)
  exact = E2M1_TABLE[codes] * 2.0**-127
  np.testing.assert_array_equal(got, np.where(np.abs(exact) < F32_TINY, 0.0, exact).astype(np.float32))
  assert (got[np.abs(exact) >= 2.0**-126] != 0).all()  # 2 * 2**-127 .. 6 * 2**-127 survive


def test_int8_blocks_and_e8m0_scales_are_the_same_bytes():
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256, size=(4, 48), dtype=np.uint8)
  scales = rng.integers(100, 150, size=(4, 3), dtype=np.uint8)
  want = _reference(blocks, scales, 32, np.float32)
  for b in (blocks, blocks.view(np.int8)):
    for s in (scales, scales.view(ml_dtypes.float8_e8m0fnu)):
      got = np.asarray(fj.dequantize_packed(b, s, dtype=jnp.float32))
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block_size", [32, 16])
def test_batched_shapes(block_size):
  rng = np.random.default_rng(block_size)
  k = 4 * block_size
  blocks = rng.integers(0, 256, size=(2, 3, 5, k // 2), dtype=np.uint8)
  scales = rng.integers(90, 170, size=(2, 3, 5, k // block_size), dtype=np.uint8)
  got = fj.dequantize_packed(blocks, scales, block_size=block_size, dtype=jnp.bfloat16)
  assert got.shape == (2, 3, 5, k) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), _reference(blocks, scales, block_size, ml_dtypes.bfloat16))


def test_under_jit_and_vmap():
  rng = np.random.default_rng(7)
  blocks = rng.integers(0, 256, size=(3, 6, 32), dtype=np.uint8)
  scales = rng.integers(110, 140, size=(3, 6, 2), dtype=np.uint8)
  f = jax.jit(functools.partial(fj.dequantize_packed, dtype=jnp.float32))
  want = _reference(blocks, scales, 32, np.float32)
  np.testing.assert_array_equal(np.asarray(f(blocks, scales)), want)
  np.testing.assert_array_equal(np.asarray(jax.vmap(f)(blocks, scales)), want)


def test_matches_fp4jax_dequantize_of_the_same_mxfp4_data():
  # A second route to the same numbers: unpack + QArray dequantize.
  x = jax.random.normal(jax.random.key(1), (8, 128), jnp.float32) * 3.0
  q = fj.quantize(x, fj.MXFP4, axis=-1)
  got = fj.dequantize_packed(fj.pack_fp4(q.values), q.scales, dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(fj.dequantize(q, jnp.float32)))


def test_errors():
  b = np.zeros((4, 16), np.uint8)
  s = np.zeros((4, 1), np.uint8)
  with pytest.raises(ValueError, match=r"blocks shape \(4, 16\) and scales shape \(4, 2\)"):
    fj.dequantize_packed(b, np.zeros((4, 2), np.uint8))
  with pytest.raises(ValueError, match=r"\(3, 1\)"):
    fj.dequantize_packed(b, np.zeros((3, 1), np.uint8))
  with pytest.raises(ValueError, match=r"shape \(\)"):
    fj.dequantize_packed(np.zeros((), np.uint8), s)
  with pytest.raises(ValueError, match="float32"):
    fj.dequantize_packed(b.astype(np.float32), s)
  with pytest.raises(ValueError, match="int8"):
    fj.dequantize_packed(b, s.view(np.int8))
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    fj.dequantize_packed(b, s.view(ml_dtypes.float8_e4m3fn))
  with pytest.raises(ValueError, match="block_size"):
    fj.dequantize_packed(b, s, block_size=31)
  with pytest.raises(ValueError, match="block_size"):
    fj.dequantize_packed(b, s, block_size=0)
