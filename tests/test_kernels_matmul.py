"""The matmul kernels against a float64 numpy reference: in Pallas interpret mode
on the CPU, and the W4A16 kernel compiled on the GPU (its inline-PTX decode runs
only there).

Every kernel call writes into a NaN-filled (poisoned) output buffer, so an
element the kernel forgets to write fails the comparison.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import fp4jax as fj
from fp4jax import kernels
from fp4jax.kernels import e2m1_bits
from fp4jax.kernels import matmul_common as common
from fp4jax.kernels import mx_matmul as mk
from fp4jax.kernels import w4a16_matmul as wk
from fp4jax.matmul import byte_matrix

F32, BF16 = np.dtype(np.float32), np.dtype(jnp.bfloat16)
INTERPRET = not kernels.on_gpu()


# ---- independent float64 reference ------------------------------------------------------
def dequant64(q):
  """values * scales (* global) in float64 through ml_dtypes casts, block axis expanded."""
  v = np.asarray(q.values).astype(np.float64)
  s = np.repeat(np.asarray(q.scales).astype(np.float64), q.fmt.block_size, axis=q.axis)
  out = v * s
  if q.global_scale is not None:
    out = out * np.float64(np.asarray(q.global_scale))
  return out


def assert_matches(out, a64, b64, out_dtype):
  """``out`` equals ``a64 @ b64`` up to float32 accumulation error over the K products
  (``4 K 2**-24 (|a| @ |b|)``) and, for bf16 outputs, one final rounding."""
  ref64, bound64, k = a64 @ b64, np.abs(a64) @ np.abs(b64), a64.shape[-1]
  out = np.asarray(out).astype(np.float64)
  assert out.shape == ref64.shape
  assert np.all(np.isfinite(out)), "unwritten (poisoned) or non-finite elements"
  # K, the length of each sum (not the output's last axis, which a (1, K) x (K, 1) call makes 1).
  tol = 4 * k * 2.0**-24 * bound64 + 1e-30
  if out_dtype == BF16:
    tol = tol + 2.0**-8 * np.abs(ref64)
  np.testing.assert_array_less(np.abs(out - ref64), tol + 1e-12)


def quantized(shape, fmt, axis, seed):
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return fj.quantize(x, fmt, axis=axis)


def poisoned(shape, dtype):
  return jnp.full(shape, jnp.nan, dtype)


# ---- building blocks --------------------------------------------------------------------
def test_nibbles_to_e4m3_is_exact_for_every_byte():
  b = np.arange(256, dtype=np.uint8)
  lo, hi = common.nibbles_to_e4m3(jnp.asarray(b))
  e2m1 = lambda c: c.astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
  scale = 2.0**common.E2M1_IN_E4M3_LOG2
  np.testing.assert_array_equal(np.asarray(lo).astype(np.float64), e2m1(b & 15) * scale)
  np.testing.assert_array_equal(np.asarray(hi).astype(np.float64), e2m1(b >> 4) * scale)


def test_e8m0_scale_to_f32_matches_ml_dtypes():
  b = np.arange(256, dtype=np.uint8)
  want = b.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
  got = np.asarray(common.scale_to_f32(jnp.asarray(b), fj.MXFP4)).astype(np.float64)
  normal = want >= 2.0**-126
  np.testing.assert_array_equal(got[normal], want[normal])
  assert np.all(got[~normal & ~np.isnan(want)] == 0)  # flushed, as XLA's CPU does
  assert np.isnan(got[255])


def test_e4m3_scale_to_f32_with_offset():
  b = np.arange(256, dtype=np.uint8)
  want = b.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * 64.0
  got = np.asarray(common.scale_to_f32(jnp.asarray(b), fj.NVFP4, 6)).astype(np.float64)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4], ids=lambda f: f.name)
def test_bf16_pairs_dequantize_every_byte_and_scale_byte_as_the_tile_form(fmt):
  """The two-pass path's XLA dequantization (values joined by a bitcast) against dequantize_tile
  (the kernels' form) bit for bit, and against numpy float64 + ml_dtypes: every element byte
  under every scale byte, one scale per row (NaN scales included)."""
  data = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # (256 rows, 256 bytes)
  scale_bytes = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 512 // fmt.block_size, axis=1)
  got = jax.jit(common.dequantize_bf16_pairs, static_argnums=2)(jnp.asarray(data), jnp.asarray(scale_bytes), fmt)
  tile = jax.jit(common.dequantize_tile, static_argnums=(2, 3))(jnp.asarray(data), jnp.asarray(scale_bytes), fmt,
                                                                 jnp.bfloat16)
  assert got.shape == (256, 512) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(tile).view(np.uint16))
  e2m1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
  codes = np.stack([data & 15, data >> 4], axis=-1).reshape(256, 512)  # low nibble first
  s64 = scale_bytes[:, :1].view(fmt.scale_dtype).astype(np.float64)
  with np.errstate(over="ignore", invalid="ignore"):
    want = (e2m1[codes] * s64).astype(ml_dtypes.bfloat16).astype(np.float64)
  g = np.asarray(got).astype(np.float64)
  # A product below float32's normal range may read 0 (XLA's CPU flushes float32 subnormals).
  g = np.where((np.abs(want) < 2.0**-126) & (g == 0), want, g)
  np.testing.assert_array_equal(g, want)
  with pytest.raises(ValueError, match="4-bit"):
    common.dequantize_bf16_pairs(jnp.asarray(data), jnp.asarray(scale_bytes), fj.MXFP8_E4M3)


# ---- W4A16 ------------------------------------------------------------------------------
W4A16_CASES = [
    # fmt, M, K, N, out dtype: odd M, K and N multiples of the block but not powers of two
    (fj.MXFP4, 1, 96, 48, F32),
    (fj.MXFP4, 3, 160, 80, BF16),
    (fj.MXFP4, 17, 96, 48, F32),
    (fj.NVFP4, 1, 48, 80, BF16),
    (fj.NVFP4, 17, 160, 48, F32),
    (fj.MXFP8_E4M3, 3, 96, 80, F32),
    (fj.MXFP8_E4M3, 17, 160, 48, BF16),
    # K = 48 has no 32-deep chunk: the jnp decode (the bit decode's halves would be 8 deep)
    (fj.NVFP4, 5, 48, 16, BF16),
    # decode shapes whose K the default config splits (2 and 4 ways)
    (fj.NVFP4, 2, 512, 48, F32),
    (fj.MXFP4, 1, 1024, 32, BF16),
    # 16 < M <= 128: the bit decode, split K; 32 rows x @ w.T, then swap_ab with 64 and 128 rows
    (fj.MXFP4, 20, 512, 48, BF16),
    (fj.NVFP4, 33, 1024, 80, F32),
    (fj.MXFP4, 100, 1024, 48, BF16),
]


@pytest.mark.parametrize("fmt,m,k,n,out_dtype", W4A16_CASES)
def test_w4a16_default_config_matches_float64(fmt, m, k, n, out_dtype):
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
  w = quantized((k, n), fmt, 0, seed=k + n)
  p = w.with_layout("rows")
  cfg = wk.default_config(m, k, n, fmt)
  split = cfg.split_k
  assert split == {512: 2, 1024: 4}.get(k, 1)
  if fmt.elem_bits == 4 and k % 32 == 0 and m <= 128:
    assert cfg.decode == "bits" and cfg.swap_ab == (m > 32)
  # Split-K programs write float32 partial sums, one slab each: poison all of them.
  buf = poisoned((m, n), out_dtype) if split == 1 else poisoned((split, m, n), jnp.float32)
  out = wk.w4a16_matmul(x, p.values, p.scales, p.global_scale, fmt=fmt, out_dtype=out_dtype,
                        interpret=INTERPRET, out_buffer=buf)
  assert out.dtype == out_dtype
  x64, w64 = np.asarray(x).astype(np.float64), dequant64(w)
  assert_matches(out, x64, w64, out_dtype)


@pytest.mark.parametrize("cfg,fmt", [
    (wk.Config(block_m=16, block_n=32, block_k=32, split_k=5, swap_ab=True), fj.NVFP4),
    (wk.Config(block_m=32, block_n=16, block_k=64, split_k=1, swap_ab=False), fj.MXFP4),
    (wk.Config(block_m=128, block_n=64, block_k=32, split_k=1, swap_ab=False, num_warps=8), fj.NVFP4),
    (wk.Config(block_m=16, block_n=32, block_k=64, split_k=5, decode="bits"), fj.MXFP4),
    (wk.Config(block_m=16, block_n=16, block_k=32, split_k=1, swap_ab=True, decode="bits"), fj.NVFP4),
    (wk.Config(block_m=32, block_n=128, block_k=64, split_k=1, num_warps=8, decode="bits"), fj.NVFP4),
], ids=["splitk5_swap_nvfp4", "bm32_bn16_mxfp4", "prefill_tile_nvfp4", "bits_splitk5_mxfp4",
        "bits_tiny_swap_nvfp4", "bits_bm32_nvfp4"])
def test_w4a16_configs(cfg, fmt):
  m, k, n = 19, 320, 80
  x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
  w = quantized((k, n), fmt, 0, seed=4)
  p = w.with_layout("rows")
  shape = (m, n) if cfg.split_k == 1 else (cfg.split_k, m, n)
  dtype = BF16 if cfg.split_k == 1 else F32
  out = wk.w4a16_matmul(x, p.values, p.scales, p.global_scale, fmt=fmt, out_dtype=jnp.bfloat16,
                        config=cfg, interpret=INTERPRET, out_buffer=poisoned(shape, dtype))
  x64, w64 = np.asarray(x).astype(np.float64), dequant64(w)
  assert_matches(out, x64, w64, BF16)


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4], ids=lambda f: f.name)
def test_bits_decode_is_exact_for_every_byte_and_scale_byte(fmt):
  """Every element byte x every scale byte through e2m1_bits.decode_scaled in a kernel (the inline
  PTX on the GPU, its jnp twin on the CPU) against numpy float64 and ml_dtypes: both nibbles times
  the scale, rounded once to bfloat16, NaN where the scale is NaN."""
  from jax.experimental import pallas as pl

  data = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
  scale_bytes = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1)
  scales = common.scale_to_f32(jnp.asarray(scale_bytes), fmt).astype(jnp.bfloat16)
  s64 = scale_bytes.view(fmt.scale_dtype).astype(np.float64)
  if fmt.power_of_two_scales:
    s64 = np.where(s64 < 2.0**-126, 0.0, s64)  # below float32's normal range: flushed, as the reference does
  np.testing.assert_array_equal(np.asarray(scales).astype(np.float64), s64)

  def kernel(d_ref, s_ref, lo_ref, hi_ref):
    lo_ref[...], hi_ref[...] = e2m1_bits.decode_scaled(d_ref[...], s_ref[...], interpret=INTERPRET)

  spec = pl.BlockSpec((16, 256), lambda i: (i, 0))
  out = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
  got = pl.pallas_call(kernel, out_shape=(out, out), grid=(16,), in_specs=[spec, spec], out_specs=(spec, spec),
                       interpret=INTERPRET)(jnp.asarray(data), scales)
  e2m1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
  for nibbles, g in zip((data & 15, data >> 4), got):
    with np.errstate(over="ignore", invalid="ignore"):
      want = (e2m1[nibbles] * s64).astype(ml_dtypes.bfloat16)
    g = np.asarray(g)
    if INTERPRET:  # XLA's CPU flushes float32 subnormals: the one such product, 0.5 * 2**-126, may read 0
      sub = (want != 0) & (np.abs(want.astype(np.float64)) < 2.0**-126)
      assert sub.sum() == (32 if fmt.power_of_two_scales else 0)  # the 32 bytes with a nibble of +-0.5, at scale 2**-126
      want = np.where(sub & (g == 0), np.copysign(0.0, want.astype(np.float64)).astype(ml_dtypes.bfloat16), want)
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(g.astype(np.float32)), nan)
    np.testing.assert_array_equal(g.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@st.composite
def w4a16_calls(draw):
  """(fmt, m, k, n, config): odd shapes and any valid tile config, both decodes, both orientations."""
  fmt = draw(st.sampled_from([fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3]))
  k = fmt.block_size * draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
  block_k = draw(st.sampled_from([b for b in (16, 32, 64, 128, 256) if b >= fmt.block_size and k % b == 0] or [0]))
  assume(block_k)
  split_k = draw(st.sampled_from([s for s in (1, 2, 3, 4) if k % (block_k * s) == 0]))
  decode = draw(st.sampled_from(["jnp", "bits"])) if fmt.elem_bits == 4 and block_k >= 32 else "jnp"
  cfg = wk.Config(block_m=draw(st.sampled_from([16, 32, 64])), block_n=draw(st.sampled_from([16, 32, 64, 128])),
                  block_k=block_k, split_k=split_k, swap_ab=draw(st.booleans()),
                  num_warps=draw(st.sampled_from([4, 8])), decode=decode)
  return fmt, draw(st.sampled_from([1, 2, 3, 5, 16, 17, 40])), k, draw(st.sampled_from([1, 3, 16, 48, 130])), cfg


@settings(settings.get_profile("fuzz" if INTERPRET else "fuzz-gpu"))
@given(call=w4a16_calls(), seed=st.integers(0, 2**31 - 1))
# Found on the H200: one (1, 192) x (192, 1) product off by 4.4 float32 ulps of |x| @ |w|, which the
# tolerance refused while it took the output's last axis (1) for K.
@example(call=(fj.MXFP8_E4M3, 1, 192, 1, wk.Config(block_m=16, block_n=16, block_k=32, split_k=1, swap_ab=False,
                                                   num_warps=4, num_stages=3, decode="jnp")), seed=992595)
def test_fuzz_w4a16_matches_float64(call, seed):
  """Random shapes and configs (the bit decode compiled on the GPU, its jnp twin in interpret mode),
  every code, scales over many binades, NaN-poisoned output: float32 accumulation of the float64 product."""
  fmt, m, k, n, cfg = call
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 1 << fmt.elem_bits, (k, n)).astype(np.uint8)
  if fmt.elem_bits == 8:
    codes[(codes & 0x7F) == 0x7F] = 0x30  # no NaN elements: the comparison wants finite sums
  lo, hi = (100, 150) if fmt.power_of_two_scales else (0x08, 0x77)  # E8M0 2**-27..2**23; E4M3 finite, > 0
  scales = rng.integers(lo, hi, (k // fmt.block_size, n)).astype(np.uint8)
  values = jnp.asarray(codes).astype(jnp.uint4) if fmt.elem_bits == 4 else jnp.asarray(codes)
  w = fj.QArray(jax.lax.bitcast_convert_type(values, fmt.elem_dtype),
                jax.lax.bitcast_convert_type(jnp.asarray(scales), fmt.scale_dtype),
                jnp.float32(rng.uniform(0.5, 2)) if fmt.has_global_scale else None, fmt, -2)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  p = w.with_layout("rows")
  shape = (m, n) if cfg.split_k == 1 else (cfg.split_k, m, n)
  out = wk.w4a16_matmul(x, p.values, p.scales, p.global_scale, fmt=fmt, out_dtype=jnp.float32, config=cfg,
                        interpret=INTERPRET, out_buffer=poisoned(shape, jnp.float32))
  x64, w64 = np.asarray(x).astype(np.float64), dequant64(w)
  assert_matches(out, x64, w64, F32)


def test_w4a16_nan_scale_poisons_its_columns_only():
  m, k, n = 3, 96, 48
  x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  w = quantized((k, n), fj.MXFP4, 0, seed=1)
  s = np.asarray(w.scales).view(np.uint8).copy()
  s[1, 7] = 0xFF  # E8M0 NaN: block 1 of column 7
  w = fj.QArray(w.values, jnp.asarray(s).view(jnp.float8_e8m0fnu), None, w.fmt, w.axis)
  p = w.with_layout("rows")
  out = np.asarray(wk.w4a16_matmul(x, p.values, p.scales, None, fmt=fj.MXFP4, out_dtype=jnp.float32,
                                   interpret=INTERPRET))
  assert np.all(np.isnan(out[:, 7]))
  assert np.all(np.isfinite(np.delete(out, 7, axis=1)))


def test_w4a16_extreme_scales_are_exact():
  """Block scales near the bottom and top of the useful range still dequantize exactly."""
  m, k, n = 2, 64, 16
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
  values = jnp.asarray(codes.astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn))
  exps = np.array([[7] * n, [240] * n], np.uint8)  # 2**-120 and 2**113
  w = fj.QArray(values, jnp.asarray(exps).view(jnp.float8_e8m0fnu), None, fj.MXFP4, -2)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  p = w.with_layout("rows")
  out = wk.w4a16_matmul(x, p.values, p.scales, None, fmt=fj.MXFP4, out_dtype=jnp.float32, interpret=INTERPRET)
  x64, w64 = np.asarray(x).astype(np.float64), dequant64(w)
  assert_matches(out, x64, w64, F32)


@pytest.mark.parametrize("decode", ["jnp", "bits"])
@pytest.mark.parametrize("k", [32, 64])
def test_w4a16_top_scales_are_exact(k, decode):
  """E8M0 scales of 2**125, whose products are still finite: the bits decode's interpret twin read
  them as Inf at K = 32 (XLA moved its 2**6 onto the scale); the jnp decode's tile form did from
  2**122 up (its 2**6 was on the scale)."""
  m, n = 2, 16
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
  values = jnp.asarray(codes.astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn))
  exps = np.full((k // 32, n), 252, np.uint8)  # 2**125
  w = fj.QArray(values, jnp.asarray(exps).view(jnp.float8_e8m0fnu), None, fj.MXFP4, -2)
  x = jnp.asarray(rng.standard_normal((m, k)) * 2.0**-10, jnp.bfloat16)  # sums stay below float32's max
  p = w.with_layout("rows")
  cfg = wk.Config(block_m=16, block_n=128, block_k=32, decode=decode)  # the defaults at K = 32; the bits
  # decode needs tiles of 512 bytes or more on a GPU (4 bytes a thread)
  out = wk.w4a16_matmul(x, p.values, p.scales, None, fmt=fj.MXFP4, out_dtype=jnp.float32, config=cfg,
                        interpret=INTERPRET)
  assert_matches(out, np.asarray(x).astype(np.float64), dequant64(w), F32)


def test_e2m1_to_f32_is_exact_for_every_code():
  n = np.arange(16)
  want = n.astype(np.uint8).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
  got = np.asarray(common.e2m1_to_f32(jnp.asarray(n, jnp.int32)))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # -0.0 included


@pytest.mark.parametrize("bad,match", [
    (dict(x=jnp.zeros((2, 64), jnp.float32)), "bfloat16"),
    (dict(x=jnp.zeros((2, 96), jnp.bfloat16)), "does not match"),
    (dict(config=wk.Config(block_k=48)), "power of two"),
    (dict(config=wk.Config(block_k=32, split_k=3)), "multiple of block_k"),
    (dict(global_scale=jnp.float32(1.0)), "global scale"),
    (dict(config=wk.Config(decode="lut")), "decode"),
    (dict(config=wk.Config(block_k=16, decode="bits")), "block_k >= 32"),
])
def test_w4a16_rejects_bad_input(bad, match):
  w = quantized((64, 32), fj.MXFP4, 0, seed=0).with_layout("rows")
  args = dict(x=jnp.zeros((2, 64), jnp.bfloat16), global_scale=None, config=None)
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    wk.w4a16_matmul(args["x"], w.values, w.scales, args["global_scale"], fmt=fj.MXFP4,
                    config=args["config"], interpret=INTERPRET)


# ---- MX x MX -----------------------------------------------------------------------------
MX_CASES = [
    (fj.MXFP4, fj.MXFP4, 3, 96, 48, F32, "fp8"),
    (fj.MXFP4, fj.MXFP4, 17, 160, 80, BF16, "bf16"),
    (fj.MXFP8_E4M3, fj.MXFP8_E4M3, 17, 96, 80, F32, "fp8"),
    (fj.MXFP8_E4M3, fj.MXFP8_E4M3, 1, 160, 48, BF16, "bf16"),
    (fj.MXFP8_E4M3, fj.MXFP4, 3, 160, 48, BF16, "fp8"),
    (fj.MXFP8_E5M2, fj.MXFP8_E5M2, 17, 96, 48, F32, "fp8"),
    (fj.MXFP8_E5M2, fj.MXFP4, 3, 96, 80, F32, "bf16"),
    (fj.NVFP4, fj.NVFP4, 17, 48, 80, F32, "bf16"),
    (fj.NVFP4, fj.NVFP4, 1, 160, 48, BF16, "bf16"),
]


@pytest.mark.parametrize("a_fmt,b_fmt,m,k,n,out_dtype,mma", MX_CASES)
def test_mx_matches_float64(a_fmt, b_fmt, m, k, n, out_dtype, mma):
  a = quantized((m, k), a_fmt, -1, seed=m)
  b = quantized((k, n), b_fmt, 0, seed=n)
  ad, asc = byte_matrix(a)
  p = b.with_layout("rows")
  cfg = mk.default_config(m, k, n, a_fmt, b_fmt)
  cfg = mk.Config(block_m=cfg.block_m, block_n=32, block_k=cfg.block_k, mma=mma)
  out = mk.mx_matmul(ad, asc, a.global_scale, p.values, p.scales, p.global_scale, a_fmt=a_fmt, b_fmt=b_fmt,
                     out_dtype=out_dtype, config=cfg, interpret=True, out_buffer=poisoned((m, n), out_dtype))
  a64, b64 = dequant64(a), dequant64(b)
  assert_matches(out, a64, b64, out_dtype)


def test_mx_default_config_prefill_tile():
  m, k, n = 130, 64, 272
  a = quantized((m, k), fj.MXFP8_E4M3, -1, seed=1)
  b = quantized((k, n), fj.MXFP8_E4M3, 0, seed=2)
  ad, asc = byte_matrix(a)
  p = b.with_layout("rows")
  assert mk.default_config(m, k, n, a.fmt, b.fmt).block_m == 128
  out = mk.mx_matmul(ad, asc, None, p.values, p.scales, None, a_fmt=a.fmt, b_fmt=b.fmt, out_dtype=jnp.float32,
                     interpret=True, out_buffer=poisoned((m, n), F32))
  a64, b64 = dequant64(a), dequant64(b)
  assert_matches(out, a64, b64, F32)


def test_mx_rejects_bad_input():
  a = quantized((4, 64), fj.NVFP4, -1, seed=0)
  b = quantized((64, 32), fj.NVFP4, 0, seed=1)
  ad, asc = byte_matrix(a)
  p = b.with_layout("rows")
  call = functools.partial(mk.mx_matmul, ad, asc, a.global_scale, p.values, p.scales, p.global_scale,
                           a_fmt=a.fmt, b_fmt=b.fmt, interpret=True)
  with pytest.raises(ValueError, match="fp8 path"):
    call(config=mk.Config(16, 16, 32, "fp8"))
  with pytest.raises(ValueError, match="mma"):
    call(config=mk.Config(16, 16, 32, "int8"))
  with pytest.raises(ValueError, match="block sizes differ"):
    mk.mx_matmul(ad, asc, a.global_scale, p.values, p.scales, None, a_fmt=a.fmt, b_fmt=fj.MXFP4,
                 interpret=True)
  with pytest.raises(ValueError, match="do not agree"):
    mk.mx_matmul(ad[:, :-1], asc, a.global_scale, p.values, p.scales, p.global_scale, a_fmt=a.fmt,
                 b_fmt=b.fmt, interpret=True)
