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


@pytest.mark.parametrize("seed", range(4))
def test_rows_may_be_residual_flags_every_residual_row_from_the_scales(seed):
  # The scale-only check QAT reads before re-basing: every residual row is flagged (so an unflagged product
  # needs no fallback), and the rows it adds are those whose out-of-span blocks all have zero codes.
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  data, scales = random_rows(k1, 64, 256)
  scales = jnp.where(jax.random.bernoulli(k2, 0.05, scales.shape),
                     jax.random.choice(k3, jnp.array([0, 1, 100, 117, 122, 254, 255], jnp.uint8), scales.shape),
                     scales)
  zero_block = jnp.repeat(jax.random.bernoulli(k4, 0.3, scales.shape), 16, axis=1)
  data = jnp.where(zero_block, jnp.uint8(0x80), data)  # blocks of -0.0 and 0.0 codes
  flagged = np.asarray(im.rows_may_be_residual(scales))
  residual = np.asarray(im.rows_residual(data, scales, im.row_bases(scales)[0]))
  assert residual.any() and (flagged & ~residual).any()  # both kinds drawn
  assert not (residual & ~flagged).any()
  base = np.asarray(im.row_bases(scales)[0]).astype(np.int64)[:, None]
  s = np.asarray(scales).astype(np.int64)
  outside = (s != 255) & ((s < base) | (s == 254))  # independent restatement: finite, off the span
  np.testing.assert_array_equal(flagged, outside.any(axis=1))


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
  assert [(kw["kernels"], kw["interpret"], kw["fallback"]) for kw in taken] == [(True, True, "cond")]
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


def test_residual_tiles_are_patched_on_the_device_and_only_they():
  # The GPU fallback without a cond: the int8 product (whose residual rows lack their far blocks), then the
  # mx kernel again over every tile with a residual row of A or of B. Compiled on a GPU, interpreted
  # elsewhere. Tiles (default config): 128 x 256 here, so rows 0..127 x cols 0..255 form tile (0, 0).
  from fp4jax.kernels import mx_matmul

  interpret = not kernels.on_gpu()
  m, n, k = 256, 512, 128
  a, b = random_rows(jax.random.key(11), m, k), random_rows(jax.random.key(12), n, k, 126, 129)
  a = (a[0], a[1].at[200, 1].set(100))  # row 200 (second row tile): a block 20 binades down
  b = (b[0], b[1].at[300, 2].set(250).at[300, 3].set(254))  # column 300 (second column tile): 2**127 block
  base_a, _ = im.row_bases(a[1])
  base_b, _ = im.row_bases(b[1])
  res_a, res_b = im.rows_residual(*a, base_a), im.rows_residual(*b, base_b)
  assert np.flatnonzero(res_a).tolist() == [200] and np.flatnonzero(res_b).tolist() == [300]
  assert (product(a, b) == -1).all()  # off the GPU path: the cond takes the fallback for the whole product
  sums = jax.lax.dot_general(im.rebased(*a)[0], im.rebased(*b)[0], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.int32)
  int8_out = im.finish_sums(sums, im.row_exponent(base_a), im.row_exponent(base_b), jnp.zeros(m, bool),
                            jnp.zeros(n, bool), jnp.float32)
  got = np.asarray(im.patch_residual_tiles(int8_out, a, b, res_a, res_b, interpret=interpret))
  full = np.asarray(mx_matmul.mx_matmul(*a, None, *b, None, a_fmt=fj.MXFP4, b_fmt=fj.MXFP4, out_dtype=jnp.float32,
                                        interpret=interpret))
  patched = np.zeros((m, n), bool)
  patched[128:256, :] = True  # row 200's tiles
  patched[:, 256:512] = True  # column 300's tiles
  np.testing.assert_array_equal(got[patched], full[patched])
  np.testing.assert_array_equal(got[~patched], np.asarray(int8_out)[~patched])
  # Column 300's 2**127 block overflows to inf in bfloat16 (and float32), as in the two-pass fallback of the cond.
  qa, qb = (fj.QArray(*ops, None, fj.MXFP4, -1, layout="rows") for ops in (a, b))
  two_pass = np.asarray(mm.run_two_pass("mx", qa, qb, (((1,), (1,)), ((), ())), jnp.float32))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(two_pass))
  want, finite = exact_product(a, b), np.isfinite(two_pass)
  assert finite.sum() == m * (n - 1)
  # float32 accumulation in any order: within (K + 2) * 2**-24 * sum |a_k b_k| of the exact sum.
  bound = (k + 2) * 2.0**-24 * (np.abs(exact_rows(*a)) @ np.abs(exact_rows(*b)).T)
  assert np.all(np.abs(got[finite] - want[finite]) <= bound[finite])
  assert not np.allclose(np.asarray(int8_out)[200], want[200], rtol=1e-6)  # the patch was needed there
  # With no flag set nothing is computed: the buffer comes back as it went in.
  nan = jnp.full((m, n), jnp.nan, jnp.float32)
  none = np.asarray(im.patch_residual_tiles(nan, a, b, jnp.zeros(m, bool), jnp.zeros(n, bool), interpret=interpret))
  assert np.isnan(none).all()


def test_row_flags_need_a_buffer_and_their_shapes():
  from fp4jax.kernels import mx_matmul

  a, b = random_rows(jax.random.key(0), 64, 64), random_rows(jax.random.key(1), 32, 64)
  kw = {"a_fmt": fj.MXFP4, "b_fmt": fj.MXFP4, "interpret": True}
  with pytest.raises(ValueError, match="out_buffer"):
    mx_matmul.mx_matmul(*a, None, *b, None, row_flags=(jnp.zeros(64, bool), jnp.zeros(32, bool)), **kw)
  with pytest.raises(ValueError, match=r"\(64,\) and \(32,\)"):
    mx_matmul.mx_matmul(*a, None, *b, None, out_buffer=jnp.zeros((64, 32), jnp.bfloat16),
                        row_flags=(jnp.zeros(32, bool), jnp.zeros(32, bool)), **kw)


def test_int8_weights_fallback_decides_between_the_cond_and_the_patch(monkeypatch):
  # Traced only (make_jaxpr; nothing lowers): scaled_matmul as a GPU runs it, kernels compiled. A plain
  # QArray or fallback="cond" puts the product under a cond; fallback="tiles" patches on the device (the mx
  # kernel with row flags), no cond. In interpret mode the cond either way.
  from fp4jax.kernels import int8_gemm as gk
  from fp4jax.kernels import mx_matmul

  rows = mm.KERNEL_MAX_ROWS["mx"] + 8
  a = fj.quantize(jax.random.normal(jax.random.key(0), (rows, 256)), fj.MXFP4, axis=-1, layout="rows")
  w = fj.quantize(jax.random.normal(jax.random.key(1), (256, 128)), fj.MXFP4, axis=0, layout="rows")
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  monkeypatch.setattr(gk, "on_hopper", lambda: False)  # XLA's int8 GEMM: the trace needs no Mosaic GPU
  flagged = []
  real = mx_matmul.mx_matmul
  monkeypatch.setattr(mx_matmul, "mx_matmul", lambda *ops, **kw: flagged.append(kw["row_flags"]) or real(*ops, **kw))

  def prims(w):
    jaxpr = jax.make_jaxpr(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.float32))(a, w)
    names = set()

    def walk(j):
      for e in j.eqns:
        names.add(e.primitive.name)
        if e.primitive.name == "pallas_call":
          continue  # a kernel's own control flow (pl.when) is no XLA conditional
        for p in e.params.values():
          for sub in (p if isinstance(p, (list, tuple)) else [p]):
            if hasattr(sub, "jaxpr"):
              walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
    walk(jaxpr.jaxpr)
    return names

  assert "cond" in prims(w) and "cond" in prims(fj.int8_weight(w, "cond"))
  assert flagged == []
  assert "cond" not in prims(fj.int8_weight(w))
  assert len(flagged) == 1 and [f.shape for f in flagged[0]] == [(rows,), (128,)]
  with kernels.interpret_mode():
    assert "cond" in prims(fj.int8_weight(w, "tiles"))
  with pytest.raises(ValueError, match="fallback"):
    fj.int8_weight(w, "device")


def test_a_stored_int8_weight_gives_the_qarray_s_products_and_gradients(monkeypatch):
  # fj.int8_weight(w): the codes made once. Every path gives the QArray's bits (on the CPU: the reference;
  # as a GPU runs the API, the Pallas passes interpreted: the int8 path with the stored codes, not re-based
  # again); the activations' gradients as with the QArray.
  rows = mm.KERNEL_MAX_ROWS["mx"] + 8
  x = jax.random.normal(jax.random.key(0), (rows, 256), jnp.float32)
  w = fj.quantize(jax.random.normal(jax.random.key(1), (256, 48), jnp.float32), fj.MXFP4, axis=0)
  a, iw = fj.quantize(x, fj.MXFP4, axis=-1), fj.int8_weight(w)
  assert isinstance(iw, fj.Int8Weight) and iw.shape == (256, 48) and iw.codes.shape == (48, 256)
  again = fj.int8_weight(iw, "cond")  # a new fallback, the same codes
  assert again.fallback == "cond" and iw.fallback == "tiles" and again.codes is iw.codes
  np.testing.assert_array_equal(fj.scaled_matmul(a, iw, preferred_element_type=jnp.float32),
                                fj.scaled_matmul(a, w, preferred_element_type=jnp.float32))
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  rebased_calls = []
  real = im.rebased
  monkeypatch.setattr(im, "rebased", lambda *ops, **kw: rebased_calls.append(ops[0].shape) or real(*ops, **kw))
  with kernels.interpret_mode():
    got = jax.jit(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.float32))(a, iw)
    assert rebased_calls == [(rows, 128)]  # the activation only
    want = fj.scaled_matmul(a, w, preferred_element_type=jnp.float32)
  np.testing.assert_array_equal(got, want)
  loss = lambda x, w: jnp.sum(fj.scaled_matmul(x, w, preferred_element_type=jnp.float32) ** 2)
  np.testing.assert_array_equal(jax.grad(loss)(x, iw), jax.grad(loss)(x, w))


def test_int8_weight_names_what_it_cannot_take():
  w = jax.random.normal(jax.random.key(1), (64, 32), jnp.float32)
  with pytest.raises(ValueError, match="QArray"):
    fj.int8_weight(w)
  with pytest.raises(ValueError, match="NVFP4"):
    fj.int8_weight(fj.quantize(w, fj.NVFP4, axis=0))
  with pytest.raises(ValueError, match=r"2-D.*\(2, 64, 32\)"):
    fj.int8_weight(fj.quantize(jnp.stack([w, w]), fj.MXFP4, axis=1))
  # One made by hand must fit together: products check it before they run.
  iw = fj.int8_weight(fj.quantize(w, fj.MXFP4, axis=0))
  bad = fj.Int8Weight(iw.qarray, iw.codes[:, :32], iw.base, iw.nan, iw.residual)
  with pytest.raises(ValueError, match=r"codes must be int8 \(32, 64\).*got int8 \(32, 32\)"):
    fj.scaled_matmul(jnp.ones((4, 64)), bad)
  with pytest.raises(ValueError, match="fallback"):
    fj.scaled_matmul(jnp.ones((4, 64)), fj.Int8Weight(*iw.tree_flatten()[0], fallback="never"))
