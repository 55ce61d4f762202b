"""The int8 path of MXFP4 x MXFP4 products (fp4jax.int8_matmul, fp4jax.kernels.int8_rebase)."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import fp4jax as fj
from fp4jax import int8_matmul as im
from fp4jax import kernels
from fp4jax import matmul as mm
from fp4jax.kernels import int8_rebase as ik
from fp4jax.kernels.matmul_common import twice_e2m1

E2M1_VALUES = np.array([float(np.array(c, np.uint8).view(ml_dtypes.float4_e2m1fn)) for c in range(16)])


def exact_rows(data, scales):
  """float64 values of packed MXFP4 byte rows (numpy, independent of fp4jax): NaN blocks NaN."""
  data, scales = np.asarray(data), np.asarray(scales).astype(np.int64)
  codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(data.shape[0], -1)
  v = E2M1_VALUES[codes]
  s = np.repeat(np.where(scales == 255, np.nan, 2.0 ** (scales - 127)), 32, axis=1)
  return v * s


def exact_product(a, b):
  return exact_rows(*a) @ exact_rows(*b).T


def random_rows(key, rows, k, lo=118, hi=121):
  """Byte rows whose scales lie in [lo, hi] (hi - lo < 4: no residual)."""
  k1, k2 = jax.random.split(key)
  data = jax.random.randint(k1, (rows, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = jax.random.randint(k2, (rows, k // 32), lo, hi + 1, jnp.int32).astype(jnp.uint8)
  return data, scales


def product(a, b, out_dtype=jnp.float32, fallback=None, **kw):
  fallback = fallback or (lambda: jnp.full((a[0].shape[0], b[0].shape[0]), -1.0, out_dtype))
  return np.asarray(im.int8_product(*a, *b, out_dtype, fallback, **kw), np.float32)


def test_twice_e2m1_is_exhaustively_twice_the_value():
  got = np.asarray(twice_e2m1(jnp.arange(16, dtype=jnp.int32)))
  np.testing.assert_array_equal(got, 2 * E2M1_VALUES)


def test_the_codes_are_twice_the_e2m1_values_shifted_in_block_order():
  # numpy, independent of fp4jax: element k's int8 value 2 * E2M1 * 2**d, then the block order (inside each
  # block of 32: k = 0..3, 8..11, 16..19, 24..27, then 4..7, ..., 28..31), which the kernel writes.
  data, scales = random_rows(jax.random.key(9), 4, 256)
  base, _ = im.row_bases(scales)
  nibbles = np.stack([np.asarray(data) & 0xF, np.asarray(data) >> 4], axis=-1).reshape(4, 256)
  shift = np.repeat(np.asarray(scales, np.int64) - np.asarray(base, np.int64)[:, None], 32, axis=1)
  assert set(np.unique(shift)) <= {0, 1, 2, 3}
  k_order = (2 * E2M1_VALUES[nibbles] * 2.0 ** shift).astype(np.int64)
  order = [k for half in range(2) for word in range(4) for k in range(8 * word + 4 * half, 8 * word + 4 * half + 4)]
  want = k_order.reshape(4, 8, 32)[:, :, order].reshape(4, 256)
  np.testing.assert_array_equal(np.asarray(im.rebase_codes(data, scales, base)[0]), want)
  np.testing.assert_array_equal(np.asarray(im.block_order(jnp.asarray(k_order))), want)


@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (7, 96, 24), (33, 1024, 40), (64, 4096, 8)])
def test_the_product_is_the_exact_one_rounded_once(m, k, n):
  a, b = random_rows(jax.random.key(m), m, k), random_rows(jax.random.key(n + 1), n, k, 100, 103)
  want = exact_product(a, b)
  np.testing.assert_array_equal(product(a, b), want.astype(np.float32))
  np.testing.assert_array_equal(product(a, b, jnp.bfloat16),
                                np.asarray(jnp.asarray(want.astype(np.float32)).astype(jnp.bfloat16), np.float32))


def test_int32_sums_at_their_largest_do_not_overflow():
  k = im.MAX_K
  a = (jnp.full((2, k // 2), 0x77, jnp.uint8), jnp.full((2, k // 32), 130, jnp.uint8))  # 6 * 2**3 everywhere
  a = (a[0], a[1].at[:, 0].set(127))  # one block 3 binades down: shifts 0..3 all used
  b = (jnp.full((3, k // 2), 0x77, jnp.uint8), jnp.full((3, k // 32), 130, jnp.uint8))
  np.testing.assert_array_equal(product(a, b), exact_product(a, b).astype(np.float32))
  assert "overflow" in im.int8_obstacle(fj.MXFP4, fj.MXFP4, k + 32)


def test_rows_spanning_more_than_four_binades_take_the_fallback():
  a, b = random_rows(jax.random.key(0), 8, 256), random_rows(jax.random.key(1), 4, 256)
  wide = (a[0], a[1].at[5, 3].set(100))  # row 5: a block 18 binades below its top
  assert np.asarray(im.rows_residual(wide[0], wide[1], im.row_bases(wide[1])[0])).tolist() == [
      False] * 5 + [True] + [False] * 2
  assert (product(wide, b) == -1).all()  # the whole product falls back
  assert (product(a, b) != -1).any()
  # ... but a block of zero codes below the span is no residual: it adds nothing.
  zero = (a[0].at[5, 3 * 16:4 * 16].set(0x88), a[1].at[5, 3].set(100))  # -0.0 codes
  assert not np.asarray(im.rows_residual(zero[0], zero[1], im.row_bases(zero[1])[0])).any()
  np.testing.assert_array_equal(product(zero, b), exact_product(zero, b).astype(np.float32))


def test_blocks_at_the_largest_scale_take_the_fallback():
  # 2**127 * E2M1 overflows float32 where the reference dequantizes; the fallback has its semantics.
  a, b = random_rows(jax.random.key(0), 4, 64, 252, 254), random_rows(jax.random.key(1), 4, 64)
  a = (a[0].at[:, :].set(0x11), a[1].at[:, :].set(253))
  assert (product(a, b) != -1).all()
  a = (a[0], a[1].at[2, 1].set(254))
  assert (product(a, b) == -1).all()


def test_nan_blocks_make_their_rows_and_columns_nan():
  a, b = random_rows(jax.random.key(2), 6, 128), random_rows(jax.random.key(3), 5, 128)
  a = (a[0], a[1].at[3, 2].set(255))
  b = (b[0], b[1].at[1, 0].set(255))
  out = product(a, b)
  nan = np.zeros(out.shape, bool)
  nan[3, :] = nan[:, 1] = True
  np.testing.assert_array_equal(np.isnan(out), nan)
  np.testing.assert_array_equal(out[~nan], exact_product(a, b).astype(np.float32)[~nan])


def test_scaled_matmul_auto_on_a_gpu_takes_the_int8_path(monkeypatch):
  # The API path as a GPU runs it, the Pallas passes interpreted: quantized normal data has no residual.
  x = jax.random.normal(jax.random.key(0), (mm.KERNEL_MAX_ROWS["mx"] + 8, 256), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (256, 48), jnp.float32)
  a, q = fj.quantize(x, fj.MXFP4, axis=-1), fj.quantize(w, fj.MXFP4, axis=0).with_layout("rows")
  want = np.asarray(a.dequantize(jnp.float32), np.float64) @ np.asarray(fj.dequantize(q.with_layout(None),
                                                                                       jnp.float32), np.float64)
  a_nv, q_nv = fj.quantize(x, fj.NVFP4, axis=-1), fj.quantize(w, fj.NVFP4, axis=0)
  taken = []
  run_int8 = mm.run_int8
  monkeypatch.setattr(mm, "run_int8", lambda *args, **kw: taken.append(kw) or run_int8(*args, **kw))
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  with kernels.interpret_mode():
    out = fj.scaled_matmul(a, q, preferred_element_type=jnp.float32)
    fj.scaled_matmul(a_nv, q_nv)  # not MXFP4: the two-pass path
    fj.scaled_matmul(fj.quantize(x[:8], fj.MXFP4, axis=-1), q)  # few rows: the mx kernel
  assert taken == [{"kernels": True, "interpret": True}]
  np.testing.assert_array_equal(np.asarray(out), want.astype(np.float32))


def test_the_pallas_passes_give_the_xla_ops_bits():
  # Every scale byte (NaN, 2**127, zero included) and random codes; bases from the rows' own scales.
  # Compiled on a GPU, interpreted elsewhere.
  interpret = not kernels.on_gpu()
  key = jax.random.key(5)
  data = jax.random.randint(key, (16, 512), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = jnp.arange(16 * 32, dtype=jnp.int32).reshape(16, 32).astype(jnp.uint8)
  scales = jnp.concatenate([scales[:8], scales[8:] % 4 + 120])  # rows 8.. without residual
  base, _ = im.row_bases(scales)
  codes, residual = im.rebase_codes(data, scales, base)
  assert residual[:8].any() and not residual[8:].any()
  for tiles in (ik.Tiles(4, 512), ik.Tiles(8, 64), ik.Tiles(1, 16)):
    got_codes, got_residual = ik.rebase(data, scales, base, tiles=tiles, interpret=interpret)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_residual, residual)
  sums = jax.random.randint(key, (16, 64), -2**31 + 1, 2**31 - 1, jnp.int32)
  ea = jax.random.randint(jax.random.key(6), (16,), -140, 130)
  eb = jax.random.randint(jax.random.key(7), (64,), -140, 130)
  na, nb = jnp.arange(16) == 3, jnp.arange(64) == 9
  for dt in (jnp.float32, jnp.bfloat16):
    for tiles in (ik.Tiles(4, 1024), ik.Tiles(2, 16)):
      np.testing.assert_array_equal(
          np.asarray(ik.finish(sums, ea, eb, na, nb, out_dtype=dt, tiles=tiles, interpret=interpret), np.float32),
          np.asarray(im.finish_sums(sums, ea, eb, na, nb, dt), np.float32))


def test_obstacles_name_the_format():
  assert im.int8_obstacle(fj.MXFP4, fj.MXFP4, 4096) is None
  assert "MXFP4" in im.int8_obstacle(fj.MXFP4, fj.NVFP4, 4096)
  assert "MXFP4" in im.int8_obstacle(fj.MXFP8_E4M3, fj.MXFP4, 4096)


def test_the_word_kernel_gives_every_byte_in_every_position_the_xla_ops_bits():
  # Four bytes share a uint32 in the kernel, and a carry or shift across byte lanes would
  # corrupt a neighbour: every byte value sits in each of the four positions of a word, beside
  # neighbours of every sign, under every shift 0..3, a block off the span (main False), a zero
  # block, a NaN block and the 2**127 block; the residual of rows with and without other blocks.
  interpret = not kernels.on_gpu()
  values = np.arange(256, dtype=np.uint8)
  # (16, 512): 32 blocks a row; rolls 0..3 put each value in each position of a word.
  data = jnp.asarray(np.stack([np.concatenate([np.roll(values, r), np.roll(values[::-1], r + 1)])
                               for r in list(range(4)) * 4]))
  scale_of_block = np.array([125, 124, 123, 122] * 6 + [0, 1, 0xFF, 0xFE, 125, 125, 122, 123], np.uint8)
  scales = np.tile(scale_of_block, (16, 1))
  scales[8:, 24:28] = 124  # rows 8.. stay within the span: no residual there
  scales = jnp.asarray(scales)
  base, _ = im.row_bases(scales)
  codes, residual = im.rebase_codes(data, scales, base)
  assert residual[:8].any() and not residual[8:].any()
  assert len(set(np.asarray(scales[0, :24] - base[0]).tolist())) == 4  # shifts 0..3 all occur
  for tiles in (ik.Tiles(4, 512), ik.Tiles(2, 64), ik.Tiles(1, 16)):
    got_codes, got_residual = ik.rebase(data, scales, base, tiles=tiles, interpret=interpret)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_residual, residual)
