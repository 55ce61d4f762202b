"""fp4jax.scaled_matmul / scaled_dot_general: API, validation, dispatch, the "rows" weight layout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax as fj
from fp4jax import matmul as mm
from fp4jax import kernels
from fp4jax.matmul import prepare_weight
from kernel_operands import jaxpr_weight_path

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


# ---- the kernels' weight layout ("rows") in the matmul ------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("k_axis", [0, 1])
def test_rows_weight_gives_the_same_product_on_every_backend(fmt, k_axis):
  k, n = 96, 40
  w = quantized((k, n) if k_axis == 0 else (n, k), fmt, k_axis)
  r = w.with_layout("rows")
  x = jax.random.normal(jax.random.key(1), (3, k), jnp.bfloat16)
  dims = (((1,), (k_axis,)), ((), ()))
  ref = fj.scaled_dot_general(x, w, dims, backend="xla")
  np.testing.assert_array_equal(fj.scaled_dot_general(x, r, dims, backend="xla"), ref)
  out = fj.scaled_dot_general(x, r, dims, backend="pallas")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out, fj.scaled_dot_general(x, w, dims, backend="pallas"))
  # "auto" runs the kernel on a GPU (its float32 sums in another order) and the reference elsewhere.
  np.testing.assert_array_equal(fj.scaled_dot_general(x, r, dims, backend="auto"),
                                out if kernels.on_gpu() else ref)
  np.testing.assert_array_equal(mm.run_two_pass("w4a16", x, r, dims, jnp.float32),
                                mm.run_two_pass("w4a16", x, w, dims, jnp.float32))


def test_prepared_weight_is_gone_and_prepare_weight_is_a_deprecated_alias():
  w = quantized((64, 16), fj.NVFP4, 0)
  with pytest.warns(DeprecationWarning, match="with_layout"):
    p = prepare_weight(w)
  assert isinstance(p, fj.QArray) and p.layout == "rows" and p.shape == w.shape
  chex.assert_trees_all_equal(p, w.with_layout("rows"))
  for module in (fj, mm):
    with pytest.raises(AttributeError, match=r"with_layout\('rows'\)"):
      module.PreparedWeight
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="QArray"):
    prepare_weight(jnp.ones((32, 4)))
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="2-D"):
    prepare_weight(quantized((2, 32, 4), fj.MXFP4, 1))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_rows_weight_reaches_the_kernel_with_no_op_over_it(fmt):
  """The jaxpr of a jitted ``scaled_matmul`` passes a "rows" weight's leaves straight to ``pallas_call``."""
  w = quantized((64, 48), fmt, 0)
  x = jnp.ones((2, 64), jnp.bfloat16)
  f = jax.jit(lambda x, w: fj.scaled_matmul(x, w, backend="pallas"))
  r = w.with_layout("rows")
  seen, others = jaxpr_weight_path(f, (x, r), r)
  assert others == [] and sorted(seen) == ["scales", "values"]
  a = quantized((2, 64), fmt, -1, seed=1)  # the MX kernel: a block-scaled lhs
  seen, others = jaxpr_weight_path(f, (a, r), r)
  assert others == [] and sorted(seen) == ["scales", "values"]
  # The check can fail: a plain weight is transposed and packed on every call.
  seen, others = jaxpr_weight_path(f, (x, w), w)
  assert others and "transpose" in " ".join(others)


# ---- the XLA reference against float64 ----------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_xla_backend_matches_float64(fmt):
  x = jax.random.normal(jax.random.key(1), (2, 3, 64), jnp.bfloat16)
  w = quantized((64, 24), fmt, 0)
  x64, w64 = np.asarray(x).astype(np.float64), dequant64(w)
  for b in (w, w.with_layout("rows")):
    out = fj.scaled_matmul(x, b, preferred_element_type=jnp.float32, backend="xla")
    close64(out, x64 @ w64, np.abs(x64) @ np.abs(w64), 64)
  a = quantized((5, 64), fmt, -1, seed=2)
  a64 = dequant64(a)
  out = fj.scaled_matmul(a, w.with_layout("rows"), preferred_element_type=jnp.float32, backend="xla")
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
  for b in (w, w.with_layout("rows")):
    out = fj.scaled_matmul(x, b, preferred_element_type=jnp.float32, backend="pallas")
    chex.assert_shape(out, (2, 3, 40))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # lhs contracting axis first, rhs as (N, K)
  wt = quantized((40, 96), fmt, 1)
  xt = jnp.moveaxis(x, -1, 0)
  out = fj.scaled_dot_general(xt, wt.with_layout("rows"), (((0,), (1,)), ((), ())), backend="pallas")
  ref = fj.scaled_dot_general(xt, wt, (((0,), (1,)), ((), ())), backend="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_pallas_backend_mx_through_the_api():
  a = quantized((2, 3, 64), fj.MXFP8_E4M3, -1, seed=1)
  w = quantized((64, 40), fj.MXFP4, 0)
  out = fj.scaled_matmul(a, w.with_layout("rows"), preferred_element_type=jnp.bfloat16, backend="pallas")
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


@pytest.mark.parametrize("kind", ["w4a16", "mx"])
def test_two_pass_bf16_output_rounds_float32_sums_once(kind):
  """MXFP4 (no global scale): the GEMM writes bfloat16 itself. Its sums must still be float32 ones,
  rounded once: within half a bfloat16 ulp of the float64 product plus float32 accumulation
  (summing K = 4096 products in bfloat16 would miss by tens of ulps)."""
  fmt, k = fj.MXFP4, 4096
  if kind == "w4a16":
    lhs = jax.random.normal(jax.random.key(0), (8, k), jnp.bfloat16)
    x64 = np.asarray(lhs, np.float64)
  else:
    lhs = quantized((8, k), fmt, -1, seed=5)
    x64 = dequant64(lhs)
  w = quantized((k, 16), fmt, 0)
  out = mm.run_two_pass(kind, lhs, w, (((1,), (0,)), ((), ())), jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  w64 = dequant64(w)
  ref, mag = x64 @ w64, np.abs(x64) @ np.abs(w64)
  err = np.abs(np.asarray(out, np.float64) - ref)
  np.testing.assert_array_less(err, 2.0**-8 * np.abs(ref) + 2 * k * 2.0**-24 * mag + 1e-30)


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
                      jnp.zeros((a[0].shape[0], a[1].shape[1])))
  monkeypatch.setattr(mm, "run_two_pass", lambda kind, *a, **k: seen.append(("two_pass", kind)) or
                      jnp.zeros((a[0].shape[0], a[1].shape[1])))
  return seen


def test_auto_on_cpu_runs_the_reference(monkeypatch):
  seen = _record_strategies(monkeypatch, gpu=False)
  x = jnp.ones((4, 64), jnp.bfloat16)
  fj.scaled_matmul(x, quantized((64, 16), fj.MXFP4, 0))
  assert seen == []


def test_auto_on_gpu_picks_kernel_or_two_pass_by_rows(monkeypatch):
  # Quantize first: with on_gpu patched, quantize itself would pick its GPU kernel.
  w = quantized((64, 16), fj.MXFP4, 0).with_layout("rows")
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
