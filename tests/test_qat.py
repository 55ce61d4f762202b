"""fp4jax.qat: fake_quant, quantized_dot_general, stochastic rounding, Hadamard.

References are numpy float64 with ml_dtypes casts, written here independently
of fp4jax's quantizer.
"""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg
from jax import lax

import fp4jax as fj
from fp4jax import qat
from fp4jax.qat import OperandConfig, QatConfig
from fp4jax.qat.dot import _backward_operand
from fp4jax.qat.fake import fake_quantize_operand
from fp4jax.reference import pad_axis

MM = (((1,), (0,)), ((), ()))  # (M, K) x (K, N)


# ---- independent references ---------------------------------------------------
def np_mx_fake(x, axis, elem=ml_dtypes.float4_e2m1fn, block=32):
  """OCP MX "floor" rule in float64: s = 2**(floor(log2 amax) - emax), RNE, saturate."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  pad = -x.shape[-1] % block
  xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  b = xp.reshape(*xp.shape[:-1], -1, block)
  fi = ml_dtypes.finfo(elem)
  amax = np.abs(b).max(-1, keepdims=True)
  e = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - (int(fi.maxexp) - 1)
  e = np.clip(e, -127, 127)
  y = np.clip(b / 2.0**e, -float(fi.max), float(fi.max))
  out = (y.astype(elem).astype(np.float64) * 2.0**e).reshape(xp.shape)[..., :x.shape[-1]]
  return np.moveaxis(out, -1, axis)


def grid(elem):
  codes = np.arange(256 if ml_dtypes.finfo(elem).bits == 8 else 16, dtype=np.uint8)
  vals = codes.view(elem).astype(np.float64)
  return np.unique(np.abs(vals[np.isfinite(vals)]))


def normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def rel(a, b):
  return float(np.linalg.norm(f64(a) - f64(b)) / np.linalg.norm(f64(b)))


# ---- configs -------------------------------------------------------------------
def test_config_validation():
  with pytest.raises(ValueError, match="scale_rule"):
    OperandConfig(fj.MXFP4, scale_rule="bogus")
  with pytest.raises(ValueError, match="rounding"):
    OperandConfig(fj.MXFP4, rounding="up")
  with pytest.raises(ValueError, match="hadamard"):
    QatConfig(hadamard=24)
  with pytest.raises(ValueError, match="OperandConfig"):
    QatConfig(lhs=fj.MXFP4)
  cfg = QatConfig.uniform("mxfp4")
  assert cfg.lhs.fmt is fj.MXFP4 and cfg.grad.rounding == "stochastic" and cfg.needs_key
  assert cfg.grad.rule == "ceil"  # no saturation: keeps stochastic rounding unbiased
  assert hash(cfg) == hash(QatConfig.uniform(fj.MXFP4))  # static under jit
  assert not QatConfig.uniform(fj.NVFP4, backward=False).needs_key


# ---- fake_quant ------------------------------------------------------------------
@pytest.mark.parametrize("elem,fmt", [(ml_dtypes.float4_e2m1fn, fj.MXFP4),
                                      (ml_dtypes.float8_e4m3fn, fj.MXFP8_E4M3)])
def test_fake_quant_forward_matches_reference(elem, fmt):
  x = normal(0, (8, 96)) * 3
  for axis in (0, 1) if fmt is fj.MXFP4 else (1,):
    xs = x if axis == 1 else x.T
    got = qat.fake_quant(xs, fmt, axis=axis, scale_rule="floor")
    chex.assert_shape(got, xs.shape)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_array_equal(f64(got), np_mx_fake(xs, axis, elem))


def test_fake_quant_ste_identity_is_gradient_at_quantized_input():
  x, w = normal(1, (16, 64)), normal(2, (64, 8))

  def loss(v):
    return jnp.sum(jnp.sin(v @ w))

  got = jax.jit(jax.grad(lambda v: loss(qat.fake_quant(v, fj.MXFP4))))(x)
  want = jax.grad(loss)(jnp.asarray(np_mx_fake(x, 1), jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fake_quant_clipped_ste_zeroes_saturated_elements():
  x = normal(3, (32, 64)) * 2
  g = jax.grad(lambda v: jnp.sum(qat.fake_quant(v, fj.MXFP4, scale_rule="floor", ste="clipped") * 3.0))(x)
  b = f64(x).reshape(32, 2, 32)
  amax = np.abs(b).max(-1, keepdims=True)
  s = 2.0 ** (np.floor(np.log2(amax)) - 2)
  inside = (np.abs(b) <= 6.0 * s).reshape(32, 64)
  assert 0 < (~inside).sum() < inside.sum()  # the floor rule does saturate some
  np.testing.assert_array_equal(f64(g), np.where(inside, 3.0, 0.0))
  # The "ceil" rule never saturates, so the clipped STE is the identity there.
  g = jax.grad(lambda v: jnp.sum(qat.fake_quant(v, fj.MXFP4, scale_rule="ceil", ste="clipped")))(x)
  np.testing.assert_array_equal(f64(g), 1.0)


def test_fake_quant_dtype_and_errors():
  x = normal(4, (4, 32), jnp.bfloat16)
  y = qat.fake_quant(x, fj.NVFP4)
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_type(jax.grad(lambda v: jnp.sum(qat.fake_quant(v, fj.NVFP4)).astype(jnp.float32))(x),
                   jnp.bfloat16)
  with pytest.raises(ValueError, match="dtype int32"):
    qat.fake_quant(jnp.ones((4, 32), jnp.int32), fj.MXFP4)
  with pytest.raises(ValueError, match=r"shape \(4, 30\).*block size 32"):
    qat.fake_quant(jnp.ones((4, 30)), fj.MXFP4)
  with pytest.raises(ValueError, match="ste"):
    qat.fake_quant(jnp.ones((4, 32)), fj.MXFP4, ste="zero")
  with pytest.raises(ValueError, match="axis 2"):
    qat.fake_quant(jnp.ones((4, 32)), fj.MXFP4, axis=2)


def test_fake_quant_under_vmap_remat_scan_and_one_trace():
  xs = normal(5, (3, 4, 64))
  f = lambda v: qat.fake_quant(v, fj.MXFP4, ste="clipped")  # noqa: E731
  np.testing.assert_array_equal(jax.jit(jax.vmap(f))(xs), f(xs))
  sq = jax.grad(lambda v: jnp.sum(f(v) ** 2))
  np.testing.assert_array_equal(jax.jit(jax.vmap(sq))(xs), jax.jit(sq)(xs))
  loss = lambda v: jnp.sum(jnp.tanh(f(v)))  # noqa: E731
  np.testing.assert_array_equal(jax.jit(jax.grad(jax.checkpoint(loss)))(xs), jax.jit(jax.grad(loss))(xs))

  def scanned(v):
    def body(c, x):
      return c + jnp.sum(f(x) * c), None
    return lax.scan(body, 1.0, v)[0]

  def unrolled(v):
    c = 1.0
    for i in range(v.shape[0]):
      c = c + jnp.sum(f(v[i]) * c)
    return c

  np.testing.assert_allclose(jax.jit(jax.grad(scanned))(xs), jax.jit(jax.grad(unrolled))(xs), rtol=1e-5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def jitted(v):
    return qat.fake_quant(v, fj.MXFP4)

  jitted(xs[0])
  jitted(xs[1])


# ---- stochastic rounding -------------------------------------------------------------
def _sr_samples(x, fmt, n, scale_rule="ceil"):
  keys = jax.random.split(jax.random.key(11), n)
  sample = jax.jit(jax.vmap(lambda k: fj.dequantize(qat.stochastic_quantize(x, fmt, k, scale_rule=scale_rule))))
  return f64(sample(keys))


@pytest.mark.parametrize("fmt,elem", [(fj.MXFP4, ml_dtypes.float4_e2m1fn),
                                      (fj.MXFP8_E4M3, ml_dtypes.float8_e4m3fn)])
def test_stochastic_rounding_picks_grid_neighbours_and_is_unbiased(fmt, elem):
  x = normal(6, (16, 64)) * 5
  n = 2000
  q = qat.stochastic_quantize(x, fmt, jax.random.key(0), scale_rule="ceil")
  chex.assert_shape(q.values, (16, 64))
  chex.assert_shape(q.scales, (16, 2))
  chex.assert_type(q.values, fmt.elem_dtype)
  nearest = fj.quantize(x, fmt, scale_rule="ceil")
  np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(nearest.scales))

  s = np.repeat(np.asarray(q.scales).astype(np.float64), 32, axis=1)
  y = f64(x) / s
  g = grid(elem)
  idx = np.searchsorted(g, np.abs(y))  # g[idx-1] < |y| <= g[idx]
  hi = g[np.minimum(idx, len(g) - 1)]
  lo = np.where(hi == np.abs(y), hi, g[np.maximum(idx - 1, 0)])
  samples = _sr_samples(x, fmt, n) / s / np.sign(y)
  assert np.all((samples == lo) | (samples == hi))

  p = np.where(hi > lo, (np.abs(y) - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
  sigma = s * (hi - lo) * np.sqrt(p * (1 - p) / n)
  err = np.abs(samples.mean(0) * np.sign(y) * s - f64(x))
  assert np.all(err <= 6 * sigma + 1e-12 * np.abs(f64(x)))
  # The same test catches the bias of nearest rounding.
  bias = np.abs(f64(fj.dequantize(nearest)) - f64(x))
  assert np.mean(bias > 6 * sigma + 1e-12) > 0.5


def test_stochastic_rounding_nvfp4_mean():
  x = normal(7, (8, 64))
  n = 2000
  mean = _sr_samples(x, fj.NVFP4, n, scale_rule="ceil").mean(0)
  q = fj.quantize(x, fj.NVFP4, scale_rule="ceil")
  step = np.repeat(np.asarray(q.scales).astype(np.float64), 16, axis=1) * float(q.global_scale)
  # Largest E2M1 gap is 2 (between 4 and 6): sigma of a mean <= step * 2 * 0.5 / sqrt(n).
  np.testing.assert_array_less(np.abs(mean - f64(x)), 6 * step / np.sqrt(n) + 1e-7)
  assert np.abs(f64(fj.dequantize(q)) - f64(x)).max() > 10 * (step / np.sqrt(n)).max()


# ---- Hadamard ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [16, 32])
def test_hadamard_is_exact_orthonormal_transform(n):
  q = qat.hadamard_matrix(n, seed=3)
  h = scipy.linalg.hadamard(n).astype(np.float64)
  signs = q[0] * np.sqrt(n)  # row 0 of H is all ones
  assert set(np.unique(signs)) == {-1.0, 1.0}
  np.testing.assert_array_equal(q * np.sqrt(n), h * signs[None, :])
  np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-15)

  a, b = normal(8, (6, 4 * n)), normal(9, (4 * n, 5))
  ta = qat.random_hadamard(a, n, axis=1, seed=3)
  want = (f64(a).reshape(6, 4, n) @ q.T).reshape(6, 4 * n)
  np.testing.assert_allclose(f64(ta), want, rtol=1e-6, atol=1e-6)
  tb = qat.random_hadamard(b, n, axis=0, seed=3)
  np.testing.assert_allclose(f64(ta) @ f64(tb), f64(a) @ f64(b), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not a multiple"):
    qat.random_hadamard(a[:, :-1], n, axis=1)


# ---- quantized_dot_general -------------------------------------------------------------
FWD_ONLY = QatConfig(lhs=OperandConfig(fj.MXFP4, "floor"), rhs=OperandConfig(fj.MXFP4, "floor"))
BWD_NEAREST = QatConfig(lhs=OperandConfig(fj.MXFP4, "floor"), rhs=OperandConfig(fj.MXFP4, "floor"),
                        grad=OperandConfig(fj.MXFP4, "floor"))


def _grads(cfg, x, w, g, key=None, precision=None):
  f = lambda a, b: qat.quantized_dot_general(a, b, MM, precision, config=cfg, key=key)  # noqa: E731
  out, vjp = jax.vjp(f, x, w)
  return (out, *vjp(g))


# float32 operands compared with float64 at rtol 1e-5 need float32 products: the
# GPU's default precision rounds float32 dot operands to TF32 / bfloat16 (the
# quantized operands are exact there, the unquantized gradient is not).
HIGHEST = lax.Precision.HIGHEST


_grads_jit = jax.jit(_grads, static_argnums=0)


def test_quantized_dot_forward_and_ste_backward():
  x, w, g = normal(10, (64, 96)), normal(11, (96, 64)), normal(12, (64, 64))
  out, dx, dw = jax.jit(lambda x, w, g: _grads(FWD_ONLY, x, w, g, precision=HIGHEST))(x, w, g)
  xq, wq = np_mx_fake(x, 1), np_mx_fake(w, 0)
  np.testing.assert_allclose(f64(out), xq @ wq, rtol=1e-5, atol=1e-4)
  # grad.fmt=None: the gradient of the unquantized product at the quantized inputs.
  np.testing.assert_allclose(f64(dx), f64(g) @ wq.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(f64(dw), xq.T @ f64(g), rtol=1e-5, atol=1e-4)


def test_ste_gradient_matches_finite_differences_where_linear():
  # Only rhs is quantized; the op is linear in lhs, so finite differences are exact.
  cfg = QatConfig(rhs=OperandConfig(fj.MXFP4))
  w = normal(13, (64, 32))
  # Finite differences of float32 sums: the unquantized lhs needs float32 products (HIGHEST).
  f = lambda x: jnp.sum(jnp.sin(qat.quantized_dot_general(x, w, MM, HIGHEST, config=cfg)))  # noqa: E731
  jax.test_util.check_grads(f, (normal(14, (4, 64)),), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n_out", [64, 48])
def test_backward_gemms_requantize_along_their_own_contracting_axis(n_out):
  x, w, g = normal(15, (64, 96)), normal(16, (96, n_out)), normal(17, (64, n_out))
  _, dx, dw = jax.jit(lambda x, w, g: _grads_jit(BWD_NEAREST, x, w, g))(x, w, g)
  # dx = g . w^T sums over N: g and w both blocked along N (zero-padded to 64).
  np.testing.assert_allclose(f64(dx), np_mx_fake(g, 1) @ np_mx_fake(w, 1).T, rtol=1e-5, atol=1e-4)
  # dw = x^T . g sums over M: x and g both blocked along M.
  np.testing.assert_allclose(f64(dw), np_mx_fake(x, 0).T @ np_mx_fake(g, 0), rtol=1e-5, atol=1e-4)
  # Reusing the forward (K-blocked) w would be a different, wrong product.
  assert rel(dx, np_mx_fake(g, 1) @ np_mx_fake(w, 0).T) > 1e-2


def test_backward_hadamard_transforms_both_operands_on_the_contracting_axis():
  cfg = QatConfig(lhs=OperandConfig(fj.MXFP4, "floor"), rhs=OperandConfig(fj.MXFP4, "floor"),
                  grad=OperandConfig(fj.MXFP4, "floor"), hadamard=32, seed=5)
  x, w, g = normal(18, (64, 64)), normal(19, (64, 64)), normal(20, (64, 64))
  g = g.at[3, 7].set(40.0)  # an outlier, which the transform spreads over its block
  _, dx, dw = _grads_jit(cfg, x, w, g)
  h = lambda v, ax: qat.random_hadamard(v, 32, axis=ax, seed=5)  # noqa: E731
  np.testing.assert_allclose(f64(dx), np_mx_fake(h(g, 1), 1) @ np_mx_fake(h(w, 1), 1).T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(f64(dw), np_mx_fake(h(x, 0), 0).T @ np_mx_fake(h(g, 0), 0), rtol=1e-5, atol=1e-4)
  exact = f64(g) @ f64(w).T
  _, dx_plain, _ = _grads_jit(BWD_NEAREST, x, w, g)
  assert rel(dx, exact) < rel(dx_plain, exact)


def test_stochastic_backward_is_unbiased():
  op = OperandConfig(fj.MXFP4, "ceil", "stochastic")
  cfg = QatConfig(lhs=op, rhs=op, grad=op)
  x, w, g = normal(21, (32, 64)), normal(22, (64, 32)), normal(23, (32, 32))
  n = 1000
  dxs = jax.jit(jax.vmap(lambda c: _grads(cfg, x, w, g, key=c)[1]))(jnp.arange(n))
  dxs = f64(dxs)
  exact = f64(g) @ f64(w).T
  err = np.abs(dxs.mean(0) - exact)
  assert np.all(err <= 6 * dxs.std(0) / np.sqrt(n) + 1e-6)
  assert np.abs(dxs[0] - exact).max() > 10 * err.max()  # single draws are noisy; the mean is not


def test_keys_counters_and_missing_key():
  cfg = QatConfig.uniform(fj.MXFP4)
  x, w, g = normal(24, (32, 64)), normal(25, (64, 32)), normal(26, (32, 32))
  a = _grads_jit(cfg, x, w, g, key=7)[1]
  np.testing.assert_array_equal(a, _grads_jit(cfg, x, w, g, key=7)[1])
  assert not np.array_equal(a, _grads_jit(cfg, x, w, g, key=8)[1])
  k = jax.random.key(3)
  np.testing.assert_array_equal(_grads_jit(cfg, x, w, g, key=k)[1],
                                _grads_jit(cfg, x, w, g, key=jax.random.key_data(k))[1])
  with pytest.raises(ValueError, match="key="):
    qat.quantized_dot_general(x, w, MM, config=cfg)
  with pytest.raises(ValueError, match="key must be"):
    qat.quantized_dot_general(x, w, MM, config=cfg, key=jnp.ones(3))


def test_quantized_dot_errors():
  x, w = jnp.ones((4, 64)), jnp.ones((64, 8))
  with pytest.raises(ValueError, match="lhs must be a floating array, got dtype int32"):
    qat.quantized_dot_general(x.astype(jnp.int32), w, MM, config=FWD_ONLY)
  with pytest.raises(ValueError, match=r"lhs shape \(4, 64\) axis 1 and rhs shape \(32, 8\)"):
    qat.quantized_dot_general(x, w[:32], MM, config=FWD_ONLY)
  with pytest.raises(ValueError, match="dimension_numbers"):
    qat.quantized_dot_general(x, w, ((1,), (0,)), config=FWD_ONLY)
  with pytest.raises(ValueError, match="QatConfig"):
    qat.quantized_dot_general(x, w, MM, config="mxfp4")
  q = fj.quantize(w, fj.MXFP4, axis=1 - 1)
  with pytest.raises(ValueError, match="not along a contracting axis"):
    qat.quantized_dot_general(jnp.ones((4, 8)), fj.quantize(jnp.ones((8, 64)), fj.MXFP4, axis=1),
                              (((1,), (0,)), ((), ())))
  chex.assert_shape(qat.quantized_dot_general(x, q, MM), (4, 8))


def test_bf16_batched_einsum_under_transforms():
  cfg = QatConfig.uniform(fj.MXFP8_E4M3, grad_rounding="nearest")
  x = normal(27, (2, 8, 64), jnp.bfloat16)
  k = normal(28, (64, 4, 16), jnp.bfloat16)
  y = qat.quantized_einsum("btd,dhk->bthk", x, k, config=cfg)
  chex.assert_shape(y, (2, 8, 4, 16))
  chex.assert_type(y, jnp.bfloat16)
  want = jnp.einsum("btd,dhk->bthk", qat.fake_quant(x, fj.MXFP8_E4M3, axis=2),
                    qat.fake_quant(k, fj.MXFP8_E4M3, axis=0), preferred_element_type=jnp.float32)
  assert rel(y, want) < 1e-2

  loss = lambda x, k: jnp.sum(qat.quantized_einsum("btd,dhk->bthk", x, k, config=cfg)  # noqa: E731
                              .astype(jnp.float32) ** 2)
  dx, dk = jax.jit(jax.grad(loss, (0, 1)))(x, k)
  chex.assert_trees_all_equal_shapes_and_dtypes((dx, dk), (x, k))
  dx_r, dk_r = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))(x, k)
  chex.assert_trees_all_close((dx, dk), (dx_r, dk_r))
  dxv = jax.jit(jax.vmap(jax.grad(loss), (0, None)))(x[:, None], k)[:, 0]
  assert rel(dxv, dx) < 2e-2  # same blocks per example; bf16 accumulation order differs
  want_dx = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.einsum("btd,dhk->bthk", x, k,
                                                   preferred_element_type=jnp.float32) ** 2)))(x, k)
  assert rel(dx, want_dx) < 0.1  # MXFP8 gradients stay close to exact ones

  def scanned(ks):
    def body(h, kk):
      return qat.quantized_dot_general(h, kk, MM, config=cfg), None
    return jnp.sum(lax.scan(body, x[0].astype(jnp.float32), ks)[0])

  ks = normal(29, (3, 64, 64))
  gs = jax.jit(jax.grad(scanned))(ks)
  chex.assert_shape(gs, (3, 64, 64))
  chex.assert_tree_all_finite(gs)


def test_einsum_dimension_numbers():
  dims, perm, out, rt = qat.einsum_dimension_numbers("btd,dhk->bthk", 3, 3)
  assert dims == (((2,), (0,)), ((), ())) and perm == (0, 1, 2, 3) and rt == "dhk"
  dims, perm, out, _ = qat.einsum_dimension_numbers("...d,hd->...h", 4, 2)
  assert dims == (((3,), (1,)), ((), ())) and len(out) == 4
  dims, perm, _, _ = qat.einsum_dimension_numbers("bhqd,bhkd->bhqk", 4, 4)
  assert dims == (((3,), (3,)), ((0, 1), (0, 1))) and perm == (0, 1, 2, 3)
  a, b = normal(30, (2, 3, 4, 32)), normal(31, (2, 3, 5, 32))
  np.testing.assert_allclose(qat.quantized_einsum("bhqd,bhkd->bhkq", a, b),
                             jnp.einsum("bhqd,bhkd->bhkq", a, b), rtol=1e-5, atol=1e-5)
  for bad in ("ab,bc", "ab,bc,cd->ad", "aa,ab->b", "ab,cd->ad"):
    with pytest.raises(ValueError, match="einsum"):
      qat.einsum_dimension_numbers(bad, 2, 2)


@pytest.mark.parametrize("hadamard", [None, 16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_leading_axis_backward_operands_keep_the_direct_values(rounding, hadamard):
  # The backward GEMMs quantize an operand blocked along a leading axis (the tokens of a weight
  # gradient) after moving that axis last (fp4jax/qat/dot.py, for XLA's layouts on the GPU); blocks,
  # scales, padding, the Hadamard signs and the stochastic draws must be those of the direct route.
  op = OperandConfig(fj.NVFP4, "ceil", rounding)
  cfg = QatConfig(lhs=op, rhs=op, grad=op, hadamard=hadamard, seed=3)
  x = normal(40, (40, 3, 24)).astype(jnp.bfloat16)  # 40 rows: padded to 48 along axis 0
  key = jax.random.key(7)
  got = jax.jit(lambda x: _backward_operand(x, 0, op, cfg, key, jnp.bfloat16, 16))(x)
  direct = pad_axis(x, 0, 16)
  if hadamard:
    direct = qat.random_hadamard(direct, hadamard, axis=0, seed=3)
  direct = fake_quantize_operand(direct, op, 0, jnp.bfloat16, key)
  assert got.shape == (48, 3, 24)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(direct, np.float32))


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3], ids=lambda f: f.name)
def test_w4a4_inference_quantizes_activations_as_byte_rows(fmt, monkeypatch):
  # PTQ inference with a stored weight: (..., K) activations go to scaled_dot_general as one 2-D "rows"
  # QArray (what the quantize kernel writes), with the codes and scales of quantizing them as they are.
  from fp4jax import matmul as mm

  x = normal(40, (2, 6, 128), jnp.float32)
  w = fj.quantize(normal(41, (128, 48), jnp.float32), fmt, axis=0, layout="rows")
  cfg = QatConfig(lhs=OperandConfig(fmt), rhs=OperandConfig(None), grad=OperandConfig(None))
  seen = []
  real = mm._dot
  monkeypatch.setattr(mm, "_dot", lambda lhs, *a: seen.append(lhs) or real(lhs, *a))
  got = qat.quantized_dot_general(x, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32, config=cfg)
  assert [(q.shape, q.layout) for q in seen] == [((12, 128), "rows")]
  want = fj.scaled_dot_general(fj.quantize(x, fmt, axis=-1), w, (((2,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  chex.assert_shape(got, (2, 6, 48))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Contracting another axis than the last: the activations keep their shape and logical layout.
  seen.clear()
  qat.quantized_dot_general(x, w, (((2,), (0,)), ((), ())), config=cfg)  # still rows
  qat.quantized_dot_general(x[0].T, w, (((0,), (0,)), ((), ())), config=cfg)
  assert [q.layout for q in seen] == ["rows", None]


def test_int8_forward_gives_the_exact_product_and_the_same_gradients(monkeypatch):
  # qat.dot.INT8_FORWARD: an MXFP4 x MXFP4 forward takes scaled_dot_general's int8 path where it would run
  # (as a GPU runs it; here on a CPU the Pallas passes interpreted): the fake-quantized operands' product, exact and
  # rounded once to float32; the backward is the library's, so the gradients are bit for bit the same.
  from fp4jax import kernels
  from fp4jax import matmul as mm
  from fp4jax.qat import dot as qdot

  rows = mm.KERNEL_MAX_ROWS["mx"] + 32
  x = jax.random.normal(jax.random.key(0), (2, rows // 2, 256), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (256, 64), jnp.float32) * 0.1
  cfg = QatConfig.uniform(fj.MXFP4)
  dims = (((2,), (0,)), ((), ()))
  loss = lambda x, w: jnp.sum(jnp.sin(qat.quantized_dot_general(x, w, dims, config=cfg, key=3)))
  interpret = not kernels.on_gpu()  # compiled on a GPU
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  taken = []
  real = qdot.residual_free_product  # the int8 branch's GEMM: its lhs codes are the activations' rows
  monkeypatch.setattr(qdot, "residual_free_product", lambda *a, **kw: taken.append(a[0][0].shape) or real(*a, **kw))
  # A row of x with a block 12 binades above its others: wider than the int8 values hold.
  wide = x.at[1, 5, :32].multiply(2.0**12)
  monkeypatch.setattr(qdot, "INT8_BACKWARD", False)  # the forward's switch alone
  with kernels.interpret_mode(interpret):
    monkeypatch.setattr(qdot, "INT8_FORWARD", False)
    y0 = qat.quantized_dot_general(x, w, dims, config=cfg, key=3)
    g0 = jax.grad(loss, argnums=(0, 1))(x, w)
    w0 = qat.quantized_dot_general(wide, w, dims, config=cfg, key=3)
    assert taken == []
    monkeypatch.setattr(qdot, "INT8_FORWARD", True)
    y1 = qat.quantized_dot_general(x, w, dims, config=cfg, key=3)
    g1 = jax.grad(loss, argnums=(0, 1))(x, w)
    assert taken == [(rows, 256), (rows, 256)]  # the activations as 2-D rows: the forward, and the grad's forward
    # Not taken: NVFP4, the straight-through backward, too few rows.
    qat.quantized_dot_general(x, w, dims, config=QatConfig.uniform(fj.NVFP4), key=3)
    qat.quantized_dot_general(x, w, dims, config=QatConfig.uniform(fj.MXFP4, backward=False))
    qat.quantized_dot_general(x[:1, :8], w, dims, config=cfg, key=3)
    assert len(taken) == 2
    # The wide row sends the product to the GEMM it replaces, read from the scales: the same bits as off.
    w1 = qat.quantized_dot_general(wide, w, dims, config=cfg, key=3)
  np.testing.assert_array_equal(np.asarray(w1), np.asarray(w0))
  lq = np.asarray(fake_quantize_operand(x, cfg.lhs, 2, jnp.float32), np.float64)
  rq = np.asarray(fake_quantize_operand(w, cfg.rhs, 0, jnp.float32), np.float64)
  exact = np.einsum("abk,kn->abn", lq, rq)
  np.testing.assert_array_equal(np.asarray(y1), exact.astype(np.float32))
  bound = (256 + 2) * 2.0**-24 * np.einsum("abk,kn->abn", np.abs(lq), np.abs(rq))
  assert np.all(np.abs(np.asarray(y0, np.float64) - exact) <= bound)
  for a, b in zip(g0, g1):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("rule,rounding", [("floor", "nearest"), ("ceil", "stochastic"), ("ceil", "nearest"),
                                           ("floor", "stochastic")])
def test_fake_quantized_mxfp4_values_quantize_again_exactly(rule, rounding):
  # What the int8 backward relies on: quantize(fake_quant(x), MXFP4, "floor") dequantizes to fake_quant(x) bit
  # for bit, whatever rule and rounding made it. Blocks of every largest E2M1 magnitude (0.5 .. 6, so the new
  # scale lies 0..3 binades below the old) at scales across the range, zero blocks included.
  op = OperandConfig(fj.MXFP4, rule, rounding)
  key = jax.random.key(7)
  top = jnp.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0])
  x = jax.random.uniform(key, (64, 8, 32), jnp.float32, -1.0, 1.0) * top[None, :, None]
  x = x * (2.0 ** jax.random.randint(jax.random.key(8), (64, 1, 1), -100, 100)).astype(jnp.float32)
  x = x.reshape(64, 256)
  for dtype in (jnp.bfloat16, jnp.float32):
    fake = fake_quantize_operand(x, op, 1, dtype, key=jax.random.key(9) if rounding == "stochastic" else None)
    again = fj.dequantize(fj.quantize(fake, fj.MXFP4, axis=-1, scale_rule="floor"), jnp.float32)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(fake, np.float32))


@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_the_int8_forward_fallback_dequantizes_the_rows_to_the_fake_quantized_values(rule):
  # A wide product's fallback takes its lhs from the quantized rows the int8 attempt made (qat.dot._rows_dequantized,
  # the dequantize kernel on the byte rows; compiled on a GPU, interpreted elsewhere) instead of fake-quantizing lhs
  # again: bit for bit the fake quantization's values, special blocks included (NaN, inf, zero, scales at both
  # ends of E8M0's range, float32 subnormals, values that overflow bfloat16 after scaling).
  from fp4jax import kernels
  from fp4jax.qat.dot import _rows_dequantized

  x = normal(3, (16, 256)) * (2.0 ** jnp.arange(-120, 120, 15, dtype=jnp.float32))[:, None]
  x = x.at[0, :32].set(jnp.nan).at[1, 32:64].set(jnp.inf).at[2, 64:96].set(0.0).at[3, :32].set(2.0**-130)
  x = x.at[4, :32].set(3.0e38).at[5, 32:64].set(-3.3e38).at[6, :8].set(jnp.float32(1.5e-45))
  op = OperandConfig(fj.MXFP4, rule, "nearest")
  with kernels.interpret_mode(not kernels.on_gpu()):
    for xin in (x, x.astype(jnp.bfloat16)):
      q = fj.quantize(xin, fj.MXFP4, axis=-1, scale_rule=rule, layout="rows")
      for dtype in (jnp.bfloat16, jnp.float32):
        got = _rows_dequantized(q, dtype, not kernels.on_gpu())
        want = fake_quantize_operand(xin, op, 1, dtype)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
                                      np.asarray(want).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32))


def test_int8_backward_gives_the_exact_product_of_the_same_operands(monkeypatch):
  # qat.dot.INT8_BACKWARD: dlhs (g . rhs^T) of the fake-quantized MXFP4 operands (stochastic draws, Hadamard)
  # on the int8 path (compiled on a GPU, interpreted elsewhere): their exact product rounded once; drhs unchanged.
  from fp4jax import kernels
  from fp4jax import matmul as mm
  from fp4jax.qat import dot as qdot

  rows = mm.KERNEL_MAX_ROWS["mx"] + 32
  x = jax.random.normal(jax.random.key(0), (2, rows // 2, 128), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (128, 96), jnp.float32) * 0.1
  dims = (((2,), (0,)), ((), ()))
  interpret = not kernels.on_gpu()  # compiled on a GPU
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  monkeypatch.setattr(qdot, "INT8_FORWARD", False)  # the backward's switch alone
  real, seen = qdot._int8_backward_lhs, []
  # (gq, fq'(w), dlhs or None): the spy computes fq'(w) itself, which the int8 branch need not.
  monkeypatch.setattr(qdot, "_int8_backward_lhs", lambda gq, other, oq, *a: seen.append(
      (gq, oq(), real(gq, other, oq, *a))) or seen[-1][2])
  for cfg in (QatConfig.uniform(fj.MXFP4), QatConfig.uniform(fj.MXFP4, hadamard=32)):
    loss = lambda x, w: jnp.sum(jnp.sin(qat.quantized_dot_general(x, w, dims, config=cfg, key=5)))
    seen.clear()
    with kernels.interpret_mode(interpret):
      monkeypatch.setattr(qdot, "INT8_BACKWARD", False)
      g0 = jax.grad(loss, argnums=(0, 1))(x, w)
      monkeypatch.setattr(qdot, "INT8_BACKWARD", True)
      g1 = jax.grad(loss, argnums=(0, 1))(x, w)
      monkeypatch.setattr(qdot, "INT8_BACKWARD", False)
    assert [s[2] is None for s in seen] == [True, False]  # off, then on
    gq, oq, dx = (np.asarray(v, np.float64) for v in seen[1])
    assert gq.shape == (2, rows // 2, 96) and oq.shape == (128, 96)
    exact = np.einsum("abn,kn->abk", gq, oq)
    np.testing.assert_array_equal(np.asarray(g1[0], np.float32), exact.astype(np.float32))
    bound = (96 + 2) * 2.0**-24 * np.einsum("abn,kn->abk", np.abs(gq), np.abs(oq))
    assert np.all(np.abs(np.asarray(g0[0], np.float64) - exact) <= bound)
    np.testing.assert_array_equal(np.asarray(g0[1]), np.asarray(g1[1]))  # drhs: not on the int8 path
    # An output gradient with a row 12 binades wider than the int8 values hold: dlhs is the GEMM it replaces.
    c = jnp.ones((2, rows // 2, 96), jnp.float32).at[1, 5, :32].set(2.0**12)
    loss_c = lambda x, w: jnp.sum(jnp.sin(qat.quantized_dot_general(x, w, dims, config=cfg, key=5)) * c)
    with kernels.interpret_mode(interpret):
      w0 = jax.grad(loss_c, argnums=(0, 1))(x, w)
      monkeypatch.setattr(qdot, "INT8_BACKWARD", True)
      w1 = jax.grad(loss_c, argnums=(0, 1))(x, w)
      monkeypatch.setattr(qdot, "INT8_BACKWARD", False)
    for a, b in zip(w0, w1):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
