"""fp4jax.layouts against index formulas and decoders written out in numpy."""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
from fp4jax import layouts

# The 16 E2M1 values by code, written out (sign bit 3, exponent bits 2..1,
# mantissa bit 0), independent of fp4jax's own table.
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _ceil_to(n, m):
  return (n + m - 1) // m * m


def _offset_128x4(r, c, padded_cols):
  # cuBLAS "1D Block Scaling Factors Layout".
  return ((r // 128) * (padded_cols // 4) + (c // 4)) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)


def _offset_8x4(r, c, padded_cols):
  # TensorRT-LLM / FlashInfer get_sf_out_offset_8x4: [m_tile, k_tile, 8, 4].
  return (r // 8) * (padded_cols // 4) * 32 + (c // 4) * 32 + (r % 8) * 4 + (c % 4)


_REFERENCE = {"128x4": (128, _offset_128x4), "8x4": (8, _offset_8x4)}


def _swizzle_loop(mat, layout):
  """Scatters every (r, c) of a 2-D uint8 matrix by the layout's offset formula."""
  tile_rows, offset = _REFERENCE[layout]
  rows, cols = mat.shape
  prows, pcols = _ceil_to(rows, tile_rows), _ceil_to(cols, 4)
  out = np.zeros(prows * pcols, np.uint8)
  seen = set()
  for r in range(rows):
    for c in range(cols):
      o = offset(r, c, pcols)
      assert o not in seen
      seen.add(o)
      out[o] = mat[r, c]
  return out


def _random_bytes(shape, seed=0, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("layout", ["128x4", "8x4"])
@pytest.mark.parametrize("shape", [(130, 7), (256, 8), (5, 3), (1, 1), (9, 4)])
def test_swizzle_matches_index_formula(layout, shape):
  mat = _random_bytes(shape, seed=shape[0] * 31 + shape[1], low=1)  # nonzero: padding shows up as 0
  got = np.asarray(layouts.swizzle_scales(mat, layout))
  want = _swizzle_loop(mat, layout)
  assert got.dtype == np.uint8
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["128x4", "8x4"])
def test_swizzled_shape(layout):
  tile_rows = _REFERENCE[layout][0]
  for rows, cols in [(1, 1), (130, 7), (256, 8), (8, 5)]:
    assert layouts.swizzled_shape(rows, cols, layout) == (_ceil_to(rows, tile_rows), _ceil_to(cols, 4))


@pytest.mark.parametrize("layout", ["128x4", "8x4"])
@pytest.mark.parametrize("shape", [(3, 5), (129, 9), (17, 1), (200, 13)])
def test_round_trip_odd_shapes(layout, shape):
  mat = _random_bytes(shape, seed=sum(shape))
  back = layouts.unswizzle_scales(layouts.swizzle_scales(mat, layout), shape, layout)
  np.testing.assert_array_equal(np.asarray(back), mat)


@pytest.mark.parametrize("layout", ["128x4", "8x4"])
def test_batched_is_per_matrix_concatenation(layout):
  mat = _random_bytes((2, 3, 130, 7), seed=5)
  got = np.asarray(layouts.swizzle_scales(mat, layout))
  tile_rows = _REFERENCE[layout][0]
  per = _ceil_to(130, tile_rows) * _ceil_to(7, 4)
  assert got.shape == (2, 3, per)
  for i, j in itertools.product(range(2), range(3)):
    np.testing.assert_array_equal(got[i, j], _swizzle_loop(mat[i, j], layout))
  # Leading axes stored one after another = TensorRT-LLM's batched offset.
  np.testing.assert_array_equal(got.reshape(-1)[per * 4:per * 5], _swizzle_loop(mat[1, 1], layout))
  np.testing.assert_array_equal(np.asarray(layouts.unswizzle_scales(got, (130, 7), layout)), mat)
  np.testing.assert_array_equal(np.asarray(layouts.unswizzle_scales(got, (2, 3, 130, 7), layout)), mat)


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e8m0fnu, ml_dtypes.float8_e4m3fn])
def test_scale_dtypes_are_kept_and_padding_is_zero_bytes(dtype):
  raw = _random_bytes((10, 6), seed=3, low=1, high=0x7F)  # finite in both dtypes
  scales = raw.view(dtype)
  sw = layouts.swizzle_scales(scales, "8x4")
  assert sw.dtype == np.dtype(dtype)
  sw_bytes = np.asarray(sw).view(np.uint8)
  np.testing.assert_array_equal(sw_bytes, _swizzle_loop(raw, "8x4"))
  assert np.count_nonzero(sw_bytes) == raw.size  # every padding byte is 0x00
  back = layouts.unswizzle_scales(sw, (10, 6), "8x4")
  assert back.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(back).view(np.uint8), raw)


def test_swizzle_under_jit():
  mat = _random_bytes((40, 6), seed=9)
  f = jax.jit(layouts.swizzle_scales, static_argnames="layout")
  g = jax.jit(layouts.unswizzle_scales, static_argnames=("shape", "layout"))
  sw = f(mat, layout="128x4")
  np.testing.assert_array_equal(np.asarray(sw), _swizzle_loop(mat, "128x4"))
  np.testing.assert_array_equal(np.asarray(g(sw, shape=(40, 6), layout="128x4")), mat)


def test_swizzle_errors():
  with pytest.raises(ValueError, match=r"shape \(7,\)"):
    layouts.swizzle_scales(np.zeros(7, np.uint8))
  with pytest.raises(ValueError, match="float32"):
    layouts.swizzle_scales(np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="unknown scale layout"):
    layouts.swizzle_scales(np.zeros((4, 4), np.uint8), layout="32x4")
  with pytest.raises(ValueError, match=r"\(100,\)"):
    layouts.unswizzle_scales(np.zeros(100, np.uint8), (4, 4), "128x4")
  with pytest.raises(ValueError, match="does not fit"):
    layouts.unswizzle_scales(np.zeros((2, 512), np.uint8), (3, 4, 4), "128x4")
  with pytest.raises(ValueError, match="rows, cols"):
    layouts.unswizzle_scales(np.zeros(512, np.uint8), (4,), "128x4")
  with pytest.raises(ValueError, match="int32"):
    layouts.unswizzle_scales(np.zeros(512, np.int32), (4, 4), "128x4")


# ---- GPT-OSS --------------------------------------------------------------------


def _gpt_oss_decode(blocks, scales):
  """numpy float64 GPT-OSS decoding: E2M1 table by nibble, times ldexp(1, e - 127)."""
  lo = E2M1_TABLE[blocks & 0x0F]
  hi = E2M1_TABLE[blocks >> 4]
  vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
  scale = np.ldexp(1.0, scales.astype(np.int64) - 127)
  scale = np.where(scales == 0xFF, np.nan, scale)  # E8M0's NaN
  out = vals * scale[..., None]
  return out.reshape(*blocks.shape[:-2], -1)


def test_gpt_oss_layout_and_values():
  blocks = _random_bytes((2, 3, 4, 16), seed=11)
  # Exponents well inside float32's normal range, plus one NaN scale.
  scales = _random_bytes((2, 3, 4), seed=12, low=100, high=160)
  scales[1, 2, 3] = 0xFF
  q = layouts.from_gpt_oss(blocks, scales)
  assert q.fmt == fj.MXFP4 and q.axis == -1
  assert q.values.shape == (2, 3, 128) and q.values.dtype == jnp.float4_e2m1fn
  assert q.scales.shape == (2, 3, 4) and q.scales.dtype == jnp.float8_e8m0fnu
  want = _gpt_oss_decode(blocks, scales)
  got = np.asarray(fj.dequantize(q, jnp.float32, backend="xla"))
  np.testing.assert_array_equal(got, want.astype(np.float32))
  assert np.isnan(got[1, 2, 96:]).all() and not np.isnan(got[1, 2, :96]).any()
  # Element order: nibble i of byte j is element 2j + i within the block.
  np.testing.assert_array_equal(np.asarray(q.values).astype(np.float64)[0, 0, :2],
                                E2M1_TABLE[[blocks[0, 0, 0, 0] & 15, blocks[0, 0, 0, 0] >> 4]])


def test_gpt_oss_round_trip_is_bit_exact():
  blocks = _random_bytes((5, 7, 16), seed=13)  # every nibble incl. -0 (code 8)
  scales = _random_bytes((5, 7), seed=14)  # every byte incl. 0x00 and 0xFF
  q = layouts.from_gpt_oss(blocks, scales)
  b2, s2 = layouts.to_gpt_oss(q)
  assert b2.dtype == np.uint8 and s2.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(b2), blocks)
  np.testing.assert_array_equal(np.asarray(s2), scales)
  # float8_e8m0fnu scales are accepted as the same bytes.
  q2 = layouts.from_gpt_oss(blocks, scales.view(ml_dtypes.float8_e8m0fnu))
  np.testing.assert_array_equal(np.asarray(q2.scales).view(np.uint8), scales)


def test_quantized_qarray_round_trips_through_gpt_oss():
  x = jax.random.normal(jax.random.key(0), (6, 96), jnp.float32)
  q = fj.quantize(x, fj.MXFP4, axis=-1)
  blocks, scales = layouts.to_gpt_oss(q)
  assert blocks.shape == (6, 3, 16) and scales.shape == (6, 3)
  back = layouts.from_gpt_oss(blocks, scales)
  np.testing.assert_array_equal(np.asarray(back.values).view(np.uint8), np.asarray(q.values).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(back.scales).view(np.uint8), np.asarray(q.scales).view(np.uint8))
  np.testing.assert_array_equal(_gpt_oss_decode(np.asarray(blocks), np.asarray(scales)).astype(np.float32),
                                np.asarray(fj.dequantize(q, jnp.float32)))


def test_gpt_oss_errors():
  blocks = np.zeros((3, 4, 16), np.uint8)
  scales = np.zeros((3, 4), np.uint8)
  with pytest.raises(ValueError, match="int8"):
    layouts.from_gpt_oss(blocks.view(np.int8), scales)
  with pytest.raises(ValueError, match=r"\(3, 4, 8\)"):
    layouts.from_gpt_oss(np.zeros((3, 4, 8), np.uint8), scales)
  with pytest.raises(ValueError, match=r"\(16,\)"):
    layouts.from_gpt_oss(np.zeros(16, np.uint8), np.zeros((), np.uint8))
  with pytest.raises(ValueError, match=r"scales shape \(3, 5\)"):
    layouts.from_gpt_oss(blocks, np.zeros((3, 5), np.uint8))
  with pytest.raises(ValueError, match="float32"):
    layouts.from_gpt_oss(blocks, np.zeros((3, 4), np.float32))
  x = jnp.ones((32, 32), jnp.float32)
  with pytest.raises(ValueError, match="NVFP4"):
    layouts.to_gpt_oss(fj.quantize(x, fj.NVFP4))
  with pytest.raises(ValueError, match="axis -2"):
    layouts.to_gpt_oss(fj.quantize(x, fj.MXFP4, axis=0))
  with pytest.raises(ValueError, match="ndarray"):
    layouts.to_gpt_oss(np.zeros((2, 32)))
