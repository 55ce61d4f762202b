"""The int8 GEMM with its finish as the epilogue (fp4jax.kernels.int8_gemm): XLA's bits, on a Hopper GPU.

The kernel is Mosaic GPU (wgmma, TMA, warp specialisation): it runs on a Hopper GPU only (Pallas' Mosaic GPU
interpreter does not finish a warp-specialised pipeline on the CPU), so the bit tests below run in the GPU
suite (``benchmarks/gpu_check.py``) and CI checks what a CPU can: the obstacles, the dispatch, and (in
tests/test_kernels_lowering.py) that the kernel lowers for CUDA.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fp4jax import int8_matmul as im
from fp4jax.kernels import int8_gemm as gk

hopper = pytest.mark.skipif(not gk.on_hopper(), reason="the Mosaic GPU int8 GEMM compiles for Hopper (sm_90) only")


def codes(key, shape, top=12 << 3):
  """int8 values as the int8 path makes them: 2 * E2M1 magnitudes shifted by 0..3, signed."""
  kv, ks, kg = jax.random.split(key, 3)
  vals = jnp.array([0, 1, 2, 3, 4, 6, 8, 12], jnp.int32)
  v = vals[jax.random.randint(kv, shape, 0, 8)] << jax.random.randint(ks, shape, 0, 4)
  return jnp.where(jax.random.bernoulli(kg, 0.5, shape), -v, v).clip(-top, top).astype(jnp.int8)


def xla_ops(a, b, ea, eb, nan_a, nan_b, out_dtype):
  sums = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  return im.finish_sums(sums, ea, eb, nan_a, nan_b, out_dtype)


def assert_same_bits(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(got)], want.view(np.uint32)[~np.isnan(want)])


def test_obstacles_name_the_shapes_and_dtype():
  assert gk.gemm_obstacle(256, 512, 384, jnp.bfloat16) is None
  assert "does not tile" in gk.gemm_obstacle(200, 512, 384, jnp.bfloat16)
  assert "does not tile" in gk.gemm_obstacle(256, 384, 384, jnp.float32)
  assert "does not tile" in gk.gemm_obstacle(256, 512, 320, jnp.float32)
  assert "int32" in gk.gemm_obstacle(256, 512, 384, jnp.int32)
  assert "shorter than the pipeline" in gk.gemm_obstacle(256, 512, 256, jnp.float32)
  with pytest.raises(ValueError, match="does not tile"):
    gk.scaled_gemm(jnp.zeros((200, 128), jnp.int8), jnp.zeros((256, 128), jnp.int8), jnp.zeros(200), jnp.zeros(256),
                   jnp.zeros(200, bool), jnp.zeros(256, bool), out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_the_epilogue_arithmetic_is_int8_finish(out_dtype):
  # The kernel's epilogue (_finish_tile) is plain jnp on the accumulator tile: here on the CPU against the
  # int8 path's finish for every pair of row exponents the path makes (-128..123), NaN rows and columns,
  # and sums from 0 to the largest int32 ones (rounded to float32), so bits outside the kernel are checked too.
  e = jnp.concatenate([jnp.arange(-128, 124, dtype=jnp.int32), jnp.array([0, 0], jnp.int32)])
  nan = jnp.arange(e.size) >= e.size - 1
  sums = jnp.array([0, 1, -1, 3, 96 * 96, -(2**24 + 1), 2**31 - 1, -(2**31) + 1, 12345677], jnp.int32)
  acc = jnp.broadcast_to(sums[:, None, None], (sums.size, e.size, e.size)).reshape(-1, e.size)
  ea = jnp.tile(e, sums.size)
  ea_folded = jnp.where(jnp.tile(nan, sums.size), gk.NAN_EXPONENT, ea)
  eb_folded = jnp.where(nan, gk.NAN_EXPONENT, e)
  got = gk._finish_tile(acc, ea_folded, eb_folded, out_dtype)
  want = im.finish_sums(acc, ea, e, jnp.tile(nan, sums.size), nan, out_dtype)
  assert_same_bits(got, want)


def test_int8_product_takes_the_fused_gemm_only_where_it_runs(monkeypatch):
  # Off a Hopper GPU, in interpret mode and for shapes no tile divides, the int8 path keeps XLA's GEMM
  # and finish. Traced only (make_jaxpr): nothing compiles, so this runs on any machine.
  assert im.fused_gemm_runs(256, 512, 384, jnp.bfloat16) == gk.on_hopper()
  monkeypatch.setattr(gk, "on_hopper", lambda: True)
  assert im.fused_gemm_runs(256, 512, 384, jnp.bfloat16)
  assert not im.fused_gemm_runs(256, 500, 384, jnp.bfloat16)
  assert not im.fused_gemm_runs(256, 512, 384, jnp.int32)
  called = []
  monkeypatch.setattr(gk, "scaled_gemm", lambda *a, **kw: called.append(kw) or xla_ops(*a, kw["out_dtype"]))
  data = jax.random.randint(jax.random.key(0), (256, 192), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = jnp.full((256, 12), 120, jnp.uint8)

  def trace(rows=256, **kw):
    fallback = lambda: jnp.zeros((rows, 256), jnp.float32)
    jax.make_jaxpr(lambda d, s: im.int8_product(d, s, data, scales, jnp.float32, fallback, **kw))(
        data[:rows], scales[:rows])

  trace(kernels=True, interpret=True)  # interpret mode: no Mosaic GPU
  trace(kernels=False)  # XLA ops asked for
  trace(rows=200, kernels=True)  # M = 200 does not tile
  assert called == []
  trace(kernels=True)
  assert called == [{"out_dtype": jnp.float32}]


@hopper
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("m,k,n", [(128, 384, 256), (384, 1152, 768), (1024, 4096, 2048)])
def test_the_kernel_gives_xla_s_bits(m, k, n, out_dtype):
  # Exponents over the whole range (the clamp at -200, float16 / bfloat16 overflow to inf, subnormal
  # outputs), NaN rows and columns, and sums at their largest (int32 -> float32 rounds).
  ka, kb, ke, kf = jax.random.split(jax.random.key(m + k + n), 4)
  a, b = codes(ka, (m, k)), codes(kb, (n, k))
  a = a.at[1].set(96).at[2].set(-96)
  b = b.at[0].set(96)
  ea = jax.random.randint(ke, (m,), -128, 124)
  eb = jax.random.randint(kf, (n,), -128, 124)
  ea = jnp.where(jnp.arange(m) % 2 == 0, ea // 16, ea).at[0].set(-128).at[4].set(123)
  eb = jnp.where(jnp.arange(n) % 2 == 0, eb // 16, eb).at[1].set(-128).at[2].set(123)
  nan_a, nan_b = jnp.arange(m) == 3, jnp.arange(n) == min(5, n - 1)
  got = gk.scaled_gemm(a, b, ea, eb, nan_a, nan_b, out_dtype=out_dtype)
  assert got.dtype == out_dtype and got.shape == (m, n)
  assert_same_bits(got, xla_ops(a, b, ea, eb, nan_a, nan_b, out_dtype))


@hopper
def test_int8_product_on_hopper_equals_the_xla_ops():
  # The whole int8 path, fused GEMM against XLA's GEMM and finish, on packed MXFP4 rows with NaN blocks.
  key = jax.random.key(3)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  a = jax.random.randint(k1, (256, 512), 0, 256, jnp.int32).astype(jnp.uint8)
  b = jax.random.randint(k2, (512, 512), 0, 256, jnp.int32).astype(jnp.uint8)
  sa = jax.random.randint(k3, (256, 32), 100, 103, jnp.int32).astype(jnp.uint8).at[7, 3].set(255)
  sb = jax.random.randint(k4, (512, 32), 140, 143, jnp.int32).astype(jnp.uint8).at[9, 0].set(255)
  fallback = lambda: jnp.zeros((256, 512), jnp.bfloat16)
  assert im.fused_gemm_runs(256, 512, 1024, jnp.bfloat16)
  got = im.int8_product(a, sa, b, sb, jnp.bfloat16, fallback, kernels=True)
  want = im.int8_product(a, sa, b, sb, jnp.bfloat16, fallback, kernels=False)
  assert_same_bits(got, want)
  assert np.isnan(np.asarray(got, np.float32)[7]).all() and np.isnan(np.asarray(got, np.float32)[:, 9]).all()
