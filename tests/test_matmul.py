"""fp4jax.scaled_matmul / scaled_dot_general: API, validation, dispatch, pre-layout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4jax as fj
from fp4jax import matmul as mm
from fp4jax import kernels
from fp4jax.matmul import PreparedWeight, prepare_weight

FORMATS = [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2]


def quantized(shape, fmt, axis, seed=0):
  return fj.quantize(jax.random.normal(jax.random.key(seed), shape, jnp.float32), fmt, axis=axis)


def dequant64(q):
  """float64 values * scales (* global) via ml_dtypes casts, independent of fp4jax."""
  v = np.asarray(q.values).astype(np.float64)
  s = np.repeat(np.asarray(q.scales).astype(np.float64), q.fmt.block_size, axis=q.axis)
  g = 1.0 if q.global_scale is None else np.float64(np.asarray(q.global_scale))
  return v * s * g


def close64(out, ref64, bound64, k):
  out = np.asarray(out).astype(np.float64)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_less(np.abs(out - ref64), 4 * k * 2.0**-24 * bound64 + 1e-12)


def raw(a):
  """Bit patterns of a 4- or 8-bit array as uint8."""
  if a.dtype == jnp.float4_e2m1fn:
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint4)).astype(np.uint8)
  return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))


# ---- pre-layout -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("k_axis", [0, 1])
def test_prepare_weight_round_trip(fmt, k_axis):
  shape = (96, 40) if k_axis == 0 else (40, 96)
  w = quantized(shape, fmt, k_axis)
  p = prepare_weight(w)
  chex.assert_shape(p.data, (40, 96 * fmt.elem_bits // 8))
  chex.assert_shape(p.scales, (40, 96 // fmt.block_size))
  assert p.data.dtype == jnp.uint8 and p.shape == shape
  back = p.to_qarray()
  assert back.fmt == w.fmt and back.axis == w.axis
  np.testing.assert_array_equal(raw(back.values), raw(w.values))
  np.testing.assert_array_equal(raw(back.scales), raw(w.scales))
  if fmt.has_global_scale:
    assert np.asarray(back.global_scale) == np.asarray(w.global_scale)


def test_prepare_weight_layout_is_n_major_packed_along_k():
  """Row n of ``data`` holds column n of the weight, low nibble = even k (pack_fp4's rule)."""
  w = quantized((64, 8), fj.MXFP4, 0)
  p = prepare_weight(w)
  codes = raw(w.values)
  want = codes[0::2, :].T | (codes[1::2, :].T << 4)
  np.testing.assert_array_equal(np.asarray(p.data), want)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 5), kb=st.integers(1, 4), k_axis=st.sampled_from([0, 1]),
       fmt=st.sampled_from(FORMATS))
def test_prepare_weight_round_trip_any_shape(n, kb, k_axis, fmt):
  k = kb * fmt.block_size
  shape = (k, n) if k_axis == 0 else (n, k)
  w = quantized(shape, fmt, k_axis, seed=n * 7 + kb)
  back = prepare_weight(w).to_qarray()
  np.testing.assert_array_equal(dequant64(back), dequant64(w))


def test_prepared_weight_is_a_pytree_and_jit_stable():
  w = prepare_weight(quantized((64, 16), fj.NVFP4, 0))
  leaves, tree = jax.tree_util.tree_flatten(w)
  assert len(leaves) == 3
  again = jax.tree_util.tree_unflatten(tree, leaves)
  assert isinstance(again, PreparedWeight) and again.fmt == w.fmt and again.k_axis == w.k_axis
  x = jnp.ones((2, 64), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, w):
    return fj.scaled_matmul(x, w, preferred_element_type=jnp.float32, backend="xla")

  f(x, w)
  f(x + 1, prepare_weight(quantized((64, 16), fj.NVFP4, 0, seed=3)))


def test_prepare_weight_rejects_bad_input():
  with pytest.raises(ValueError, match="QArray"):
    prepare_weight(jnp.ones((32, 4)))
  with pytest.raises(ValueError, match="2-D"):
    prepare_weight(quantized((2, 32, 4), fj.MXFP4, 1))


# ---- the XLA reference against float64 ----------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_xla_backend_matches_float64(fmt):
  x = jax.random.normal(jax.random.key(1), (2, 3, 64), jnp.bfloat16)
  w = quantized((64, 24), fmt, 0)
  x64, w64 = np.asarray(x).astype(np.float64), dequant64(w)
  for b in (w, prepare_weight(w)):
    out = fj.scaled_matmul(x, b, preferred_element_type=jnp.float32, backend="xla")
    close64(out, x64 @ w64, np.abs(x64) @ np.abs(w64), 64)
  a = quantized((5, 64), fmt, -1, seed=2)
  a64 = dequant64(a)
  out = fj.scaled_matmul(a, prepare_weight(w), preferred_element_type=jnp.float32, backend="xla")
  close64(out, a64 @ w64, np.abs(a64) @ np.abs(w64), 64)


def test_dot_general_batch_and_any_block_axis_on_xla():
  """The reference takes batch axes and QArrays blocked along a non-contracting axis."""
  lhs = jax.random.normal(jax.random.key(0), (4, 3, 32), jnp.float32)
  rhs = quantized((4, 32, 64), fj.MXFP8_E4M3, -1)  # blocked along N, not the contracting K
  dims = (((2,), (1,)), ((0,), (0,)))
  out = fj.scaled_dot_general(lhs, rhs, dims, backend="auto")
  ref = np.einsum("bmk,bkn->bmn", np.asarray(lhs, np.float64), dequant64(rhs))
  close64(out, ref, np.einsum("bmk,bkn->bmn", np.abs(np.asarray(lhs, np.float64)),
                              np.abs(dequant64(rhs))), 32)


# ---- the Pallas path through the API (interpret mode on the CPU) --------------------------
@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4], ids=lambda f: f.name)
def test_pallas_backend_w4a16_through_the_api(fmt):
  x = jax.random.normal(jax.random.key(1), (2, 3, 96), jnp.bfloat16)
  w = quantized((96, 40), fmt, 0)
  ref = fj.scaled_matmul(x, w, preferred_element_type=jnp.float32, backend="xla")
  for b in (w, prepare_weight(w)):
    out = fj.scaled_matmul(x, b, preferred_element_type=jnp.float32, backend="pallas")
    chex.assert_shape(out, (2, 3, 40))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # lhs contracting axis first, rhs as (N, K)
  wt = quantized((40, 96), fmt, 1)
  xt = jnp.moveaxis(x, -1, 0)
  out = fj.scaled_dot_general(xt, prepare_weight(wt), (((0,), (1,)), ((), ())), backend="pallas")
  ref = fj.scaled_dot_general(xt, wt, (((0,), (1,)), ((), ())), backend="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_pallas_backend_mx_through_the_api():
  a = quantized((2, 3, 64), fj.MXFP8_E4M3, -1, seed=1)
  w = quantized((64, 40), fj.MXFP4, 0)
  out = fj.scaled_matmul(a, prepare_weight(w), preferred_element_type=jnp.bfloat16, backend="pallas")
  ref = fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16, backend="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("kind", ["w4a16", "mx"])
def test_two_pass_path_matches_reference(kind):
  fmt = fj.NVFP4
  lhs = (jax.random.normal(jax.random.key(0), (7, 96), jnp.bfloat16) if kind == "w4a16"
         else quantized((7, 96), fmt, -1, seed=5))
  w = quantized((96, 24), fmt, 0)
  dims = (((1,), (0,)), ((), ()))
  out = mm.run_two_pass(kind, lhs, w, dims, jnp.float32)
  ref = fj.scaled_dot_general(lhs, w, dims, backend="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_gradients_through_the_kernel_use_the_reference_vjp():
  x = jax.random.normal(jax.random.key(0), (3, 64), jnp.bfloat16)
  w = quantized((64, 16), fj.MXFP4, 0)
  loss = lambda x, backend: fj.scaled_matmul(x, w, preferred_element_type=jnp.float32,
                                             backend=backend).sum()
  g_pallas = jax.grad(loss)(x, "pallas")
  g_xla = jax.grad(loss)(x, "xla")
  np.testing.assert_array_equal(np.asarray(g_pallas, np.float32), np.asarray(g_xla, np.float32))


# ---- dispatch -------------------------------------------------------------------------------
def _record_strategies(monkeypatch, gpu):
  seen = []
  monkeypatch.setattr(kernels, "on_gpu", lambda: gpu)
  monkeypatch.setattr(mm, "run_kernel", lambda kind, *a, **k: seen.append(("kernel", kind)) or
                      jnp.zeros((a[0].shape[0], a[1].n if isinstance(a[1], PreparedWeight) else a[1].shape[1])))
  monkeypatch.setattr(mm, "run_two_pass", lambda kind, *a, **k: seen.append(("two_pass", kind)) or
                      jnp.zeros((a[0].shape[0], a[1].n if isinstance(a[1], PreparedWeight) else a[1].shape[1])))
  return seen


def test_auto_on_cpu_runs_the_reference(monkeypatch):
  seen = _record_strategies(monkeypatch, gpu=False)
  x = jnp.ones((4, 64), jnp.bfloat16)
  fj.scaled_matmul(x, quantized((64, 16), fj.MXFP4, 0))
  assert seen == []


def test_auto_on_gpu_picks_kernel_or_two_pass_by_rows(monkeypatch):
  # Quantize first: with on_gpu patched, quantize itself would pick its GPU kernel.
  w = prepare_weight(quantized((64, 16), fj.MXFP4, 0))
  a = quantized((2, 64), fj.MXFP4, -1)
  seen = _record_strategies(monkeypatch, gpu=True)
  small = mm.KERNEL_MAX_ROWS["w4a16"]
  fj.scaled_matmul(jnp.ones((small, 64), jnp.bfloat16), w)
  fj.scaled_matmul(jnp.ones((small + 1, 64), jnp.bfloat16), w)
  fj.scaled_matmul(a, w)
  fj.scaled_matmul(jnp.ones((4, 64), jnp.float32), w)  # f32 activations: reference
  fj.scaled_matmul(jnp.ones((small + 1, 64), jnp.bfloat16), w, backend="pallas")
  assert seen == [("kernel", "w4a16"), ("two_pass", "w4a16"), ("kernel", "mx"), ("kernel", "w4a16")]


# ---- validation -----------------------------------------------------------------------------
W = None


def _w():
  global W
  if W is None:
    W = quantized((64, 16), fj.MXFP4, 0)
  return W


@pytest.mark.parametrize("call,match", [
    (lambda: fj.scaled_matmul(jnp.ones((2, 32)), _w()), r"\(2, 32\).*\(64, 16\)"),
    (lambda: fj.scaled_matmul(jnp.ones((2, 64)), jnp.ones((64,))), "expects a"),
    (lambda: fj.scaled_matmul(jnp.ones((2, 64), jnp.int32), _w()), "int32"),
    (lambda: fj.scaled_matmul(jnp.ones((2, 64)), _w(), backend="cuda"), "unknown backend"),
    (lambda: fj.scaled_matmul(jnp.ones((2, 64)), _w(), preferred_element_type=jnp.int8), "floating"),
    (lambda: fj.scaled_dot_general(jnp.ones((2, 64)), _w(), (((2,), (0,)), ((), ()))), "out of range"),
    (lambda: fj.scaled_dot_general(jnp.ones((2, 64)), _w(), (((1,), (1,)), ((), ()))), "sizes differ"),
    (lambda: fj.scaled_dot_general(jnp.ones((2, 64)), _w(), (((1, 1), (0, 0)), ((), ()))), "repeated"),
    (lambda: fj.scaled_dot_general(jnp.ones((2, 64)), _w(), ((1,), (0,))), "dimension_numbers"),
    (lambda: fj.scaled_dot_general(jnp.ones((2, 64)), _w(), (((1,), (0,)), ((0,), ()))), "batch"),
    # cases no kernel takes, forced onto Pallas
    (lambda: fj.scaled_matmul(jnp.ones((2, 64), jnp.float32), _w(), backend="pallas"), "bfloat16"),
    (lambda: fj.scaled_matmul(jnp.ones((2, 64), jnp.bfloat16), quantized((64, 32), fj.MXFP4, 1),
                              backend="pallas"), "blocked along axis 1"),
    (lambda: fj.scaled_matmul(quantized((2, 64), fj.NVFP4, -1), _w(), backend="pallas"), "block sizes"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
