"""fp4jax.flax (linen) and fp4jax.nnx layers, and post-training quantization."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import fp4jax as fj
from fp4jax.qat import dot as qat
from fp4jax.flax import QDense, QEinsum
from fp4jax.nnx import QEinsum as NQEinsum
from fp4jax.nnx import QLinear
from fp4jax.params import quantize_params
from fp4jax.qat import OperandConfig, QatConfig

W4A4 = QatConfig(lhs=OperandConfig(fj.MXFP4), rhs=OperandConfig(fj.MXFP4))
W4A4_SR = QatConfig.uniform(fj.MXFP4)


def np_mxfp4(x, axis):
  """OCP MXFP4 "floor" fake quantization in float64 (independent of fp4jax)."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  b = x.reshape(*x.shape[:-1], -1, 32)
  amax = np.abs(b).max(-1, keepdims=True)
  s = 2.0 ** (np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2)
  q = np.clip(b / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * s
  return np.moveaxis(q.reshape(x.shape), -1, axis)


def data(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ---- linen -------------------------------------------------------------------------
# Products compared with float64 at rtol 1e-5, or between two different dot paths,
# need float32 products: the GPU's default precision rounds float32 operands to
# TF32 / bfloat16. The layers take nn.Dense's precision attribute.
HIGHEST = jax.lax.Precision.HIGHEST


def _same_init(ref, layer, *args):
  """``layer`` initializes the parameters ``ref`` does: the same names, shapes, dtypes and values.

  Both eagerly, for the values: a jitted and an op-by-op random initializer need
  not round alike on a GPU (fused ops may contract into FMAs). Jitted, the tree's
  structure, shapes and dtypes.
  """
  p = ref.init(jax.random.key(1), *args)
  chex.assert_trees_all_equal(p, layer.init(jax.random.key(1), *args))
  chex.assert_trees_all_equal_shapes_and_dtypes(p, jax.jit(layer.init)(jax.random.key(1), *args))
  return p


def test_qdense_is_a_drop_in_dense():
  x = data(0, (4, 64))
  ref = nn.Dense(32, precision=HIGHEST)
  p = _same_init(ref, QDense(32, config=W4A4, precision=HIGHEST), x)
  np.testing.assert_array_equal(QDense(32, precision=HIGHEST).apply(p, x), ref.apply(p, x))
  k, b = np.asarray(p["params"]["kernel"], np.float64), np.asarray(p["params"]["bias"], np.float64)
  got = jax.jit(QDense(32, config=W4A4, precision=HIGHEST).apply)(p, x)
  chex.assert_shape(got, (4, 32))
  np.testing.assert_allclose(got, np_mxfp4(x, 1) @ np_mxfp4(k, 0) + b, rtol=1e-5, atol=1e-5)
  # An injected dot_general wins over the config, as in nn.Dense.
  np.testing.assert_array_equal(
      QDense(32, config=W4A4, dot_general=jax.lax.dot_general, precision=HIGHEST).apply(p, x), ref.apply(p, x))


def test_qdense_trains_with_optax_and_needs_a_quant_rng():
  x = data(2, (32, 64))
  y = jnp.sin(x[:, :8] * 2)
  model = nn.Sequential([QDense(64, config=W4A4_SR), nn.relu, QDense(8, config=W4A4_SR)])
  params = jax.jit(model.init)(jax.random.key(0), x)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, i):
    def loss(p):
      return jnp.mean((model.apply(p, x, rngs={"quant": jax.random.fold_in(jax.random.key(5), i)}) - y) ** 2)
    v, g = jax.value_and_grad(loss)(params)
    upd, opt = tx.update(g, opt)
    return optax.apply_updates(params, upd), opt, v

  losses = []
  for i in range(15):
    params, opt, v = step(params, opt, i)
    losses.append(float(v))
  assert losses[-1] < 0.5 * losses[0]
  with pytest.raises(ValueError, match="rngs=.*quant"):
    jax.grad(lambda p: model.apply(p, x).sum())(params)


def test_linen_ptq_runs_from_stored_qarrays(monkeypatch):
  x = data(3, (4, 64))
  model = nn.Sequential([QDense(64, config=W4A4), nn.relu, QDense(32, config=W4A4)])
  params = model.init(jax.random.key(0), x)
  qparams = quantize_params(params, fj.MXFP4)
  leaves = jax.tree_util.tree_leaves(qparams, is_leaf=lambda l: isinstance(l, fj.QArray))
  assert sum(isinstance(leaf, fj.QArray) for leaf in leaves) == 2
  for layer in ("layers_0", "layers_2"):
    q = qparams["params"][layer]["kernel"]
    assert q.axis == -2 and q.values.dtype == jnp.float4_e2m1fn
    np.testing.assert_array_equal(qparams["params"][layer]["bias"], params["params"][layer]["bias"])
  # Same numbers as QAT's forward with those weights...
  np.testing.assert_allclose(model.apply(qparams, x), model.apply(params, x), rtol=1e-5, atol=1e-5)
  # ...and only the activations are quantized per call: once per layer.
  calls = []
  orig = qat.quantize
  monkeypatch.setattr(qat, "quantize", lambda v, *a, **k: calls.append(v.shape) or orig(v, *a, **k))
  model.apply(qparams, x)
  assert calls == [(4, 64), (4, 64)]
  calls.clear()
  nn.Sequential([QDense(64), nn.relu, QDense(32)]).apply(qparams, x)  # weight-only
  assert calls == []


def test_linen_qeinsum_matches_einsum_params_and_numerics():
  x = data(4, (2, 8, 64))
  eq = "btd,dhk->bthk"
  ref = nn.Einsum((64, 4, 8), eq, precision=HIGHEST)
  p = _same_init(ref, QEinsum((64, 4, 8), eq, config=W4A4, precision=HIGHEST), x)
  # einsum and dot_general + transpose are different dot paths: float32 products (HIGHEST).
  np.testing.assert_allclose(QEinsum((64, 4, 8), eq, precision=HIGHEST).apply(p, x), ref.apply(p, x),
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(QEinsum((64, 4, 8), eq, config=W4A4, precision=HIGHEST).apply)(p, x)
  k = np.asarray(p["params"]["kernel"], np.float64)
  want = np.einsum(eq, np_mxfp4(x, 2), np_mxfp4(k, 0)) + np.asarray(p["params"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  qp = quantize_params(p, fj.MXFP4)
  np.testing.assert_allclose(jax.jit(QEinsum((64, 4, 8), eq, config=W4A4, precision=HIGHEST).apply)(qp, x), got,
                             rtol=1e-5, atol=1e-5)


# ---- nnx -----------------------------------------------------------------------------
def test_qlinear_is_a_drop_in_linear_and_trains():
  ref = nnx.Linear(64, 16, rngs=nnx.Rngs(0))
  layer = QLinear(64, 16, config=W4A4_SR, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal(nnx.state(ref, nnx.Param), nnx.state(layer, nnx.Param))
  x = data(5, (32, 64))
  np.testing.assert_array_equal(QLinear(64, 16, rngs=nnx.Rngs(0))(x), ref(x))
  k = np.asarray(layer.kernel[...], np.float64)
  np.testing.assert_allclose(layer(x), np_mxfp4(x, 1) @ np_mxfp4(k, 0), rtol=1e-5, atol=1e-5)

  y = jnp.cos(x[:, :16])
  opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(layer, opt):
    v, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(layer)
    opt.update(layer, g)
    return v

  losses = [float(step(layer, opt)) for _ in range(20)]
  assert losses[-1] < 0.8 * losses[0]
  params = nnx.state(layer, nnx.Param)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, nnx.state(ref, nnx.Param))


def test_nnx_ptq_and_qeinsum():
  layer = QLinear(64, 32, config=W4A4, rngs=nnx.Rngs(1))
  x = data(6, (4, 64))
  before = layer(x)
  nnx.update(layer, quantize_params(nnx.state(layer, nnx.Param), fj.MXFP4))
  assert isinstance(layer.kernel.get_value(), fj.QArray)
  np.testing.assert_allclose(layer(x), before, rtol=1e-5, atol=1e-5)

  ref = nnx.Einsum("btd,dhk->bthk", (64, 4, 8), (4, 8), rngs=nnx.Rngs(2))
  e = NQEinsum("btd,dhk->bthk", (64, 4, 8), (4, 8), config=W4A4, rngs=nnx.Rngs(2))
  chex.assert_trees_all_equal(nnx.state(ref, nnx.Param), nnx.state(e, nnx.Param))
  xe = data(7, (2, 3, 64))
  np.testing.assert_allclose(NQEinsum("btd,dhk->bthk", (64, 4, 8), (4, 8), rngs=nnx.Rngs(2))(xe), ref(xe),
                             rtol=1e-5, atol=1e-5)
  want = qat.quantized_einsum("btd,dhk->bthk", xe, e.kernel[...], config=W4A4) + e.bias[...]
  np.testing.assert_allclose(e(xe), want, rtol=1e-6, atol=1e-6)
  nnx.update(e, quantize_params(nnx.state(e, nnx.Param), fj.MXFP4))
  np.testing.assert_allclose(e(xe), want, rtol=1e-5, atol=1e-5)


def test_quantize_params_predicate_axis_and_errors():
  params = {"enc": {"kernel": data(8, (64, 32)), "bias": jnp.zeros(32)},
            "emb": {"embedding": data(9, (10, 64))}, "head": {"kernel": data(10, (32, 64))}}
  q = quantize_params(params, "nvfp4", predicate=lambda path, leaf: path.startswith("enc/"))
  assert isinstance(q["enc"]["kernel"], fj.QArray) and not isinstance(q["head"]["kernel"], fj.QArray)
  q = quantize_params(params, fj.MXFP8_E4M3, axis=lambda path, leaf: 1 if "emb" in path else 0,
                      predicate=lambda path, leaf: leaf.ndim == 2)
  assert q["emb"]["embedding"].axis == -1 and q["head"]["kernel"].axis == -2
  with pytest.raises(ValueError, match=r"'enc/kernel' \(shape \(64, 30\)"):
    quantize_params({"enc": {"kernel": jnp.ones((64, 30))}}, fj.MXFP4, axis=1)
