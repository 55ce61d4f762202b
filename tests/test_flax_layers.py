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
from fp4jax import kernels
from fp4jax.qat import dot as qat
from fp4jax.flax import QDense, QEinsum
from fp4jax.nnx import QEinsum as NQEinsum
from fp4jax.nnx import QLinear
from fp4jax.params import quantize_params
from fp4jax.qat import OperandConfig, QatConfig
from kernel_operands import hlo_param_users, jaxpr_weight_path

W4A4 = QatConfig(lhs=OperandConfig(fj.MXFP4), rhs=OperandConfig(fj.MXFP4))
W4A4_SR = QatConfig.uniform(fj.MXFP4)
HIGHEST = jax.lax.Precision.HIGHEST


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
    assert q.axis == -2 and q.shape == params["params"][layer]["kernel"].shape
    assert q.layout == "rows" and q.values.dtype == jnp.uint8  # the kernels' byte rows, by default
    np.testing.assert_array_equal(qparams["params"][layer]["bias"], params["params"][layer]["bias"])
  # Same numbers as QAT's forward with those weights, in either storage layout...
  np.testing.assert_allclose(model.apply(qparams, x), model.apply(params, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model.apply(qparams, x), model.apply(quantize_params(params, fj.MXFP4, layout=None), x))
  # ...and only the activations are quantized per call: once per layer.
  # (The W4A4 product quantizes (..., K) activations in fp4jax.matmul.quantized_lhs_dot; anything else here.)
  calls = []
  for module in (qat, fj.matmul):
    monkeypatch.setattr(module, "quantize",
                        lambda v, *a, orig=module.quantize, **k: calls.append(v.shape) or orig(v, *a, **k))
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


def test_quantize_params_layout():
  params = {"dense": {"kernel": data(11, (64, 32))}, "experts": {"kernel": data(12, (2, 64, 32))}}
  in_axis = lambda path, leaf: leaf.ndim - 2  # (..., in, out) kernels
  auto = quantize_params(params, fj.NVFP4, axis=in_axis)
  assert auto["dense"]["kernel"].layout == "rows" and auto["experts"]["kernel"].layout is None
  plain = quantize_params(params, fj.NVFP4, axis=in_axis, layout=None)
  assert {q.layout for q in jax.tree.leaves(plain, is_leaf=lambda l: isinstance(l, fj.QArray))} == {None}
  chex.assert_trees_all_equal(auto["dense"]["kernel"], plain["dense"]["kernel"].with_layout("rows"))
  assert quantize_params(params, "mxint8", axis=in_axis)["dense"]["kernel"].layout is None  # codes: the XLA path's
  with pytest.raises(ValueError, match=r"'experts/kernel' \(shape \(2, 64, 32\).*cannot store .* as 'rows'"):
    quantize_params(params, fj.MXFP4, axis=in_axis, layout="rows")
  with pytest.raises(ValueError, match="unknown layout 'cols'"):
    quantize_params(params, fj.MXFP4, layout="cols")
  # A 2-D Einsum kernel (contracted over its first axis) is stored as rows too, with the same numbers.
  x = data(13, (3, 64))
  einsum = QEinsum((64, 32), "bd,df->bf", use_bias=False)
  p = jax.jit(einsum.init)(jax.random.key(0), x)
  rows, logical = quantize_params(p, fj.MXFP4), quantize_params(p, fj.MXFP4, layout=None)
  assert rows["params"]["kernel"].layout == "rows"
  np.testing.assert_array_equal(einsum.apply(rows, x), einsum.apply(logical, x))


# ---- the weight reaches the kernel with no op over it -------------------------------------------
LAYOUT_FORMATS = [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3]


@pytest.mark.parametrize("fmt", LAYOUT_FORMATS, ids=lambda f: f.name)
def test_qdense_and_qlinear_pass_the_stored_weight_straight_to_the_kernel(monkeypatch, fmt):
  """Under jit, ``backend="auto"`` as on a GPU (kernel interpreted): the weight's leaves reach ``pallas_call``."""
  x = data(14, (4, 64)).astype(jnp.bfloat16)
  model = QDense(48, dtype=jnp.bfloat16)
  params = jax.jit(model.init)(jax.random.key(0), x)
  qparams = quantize_params(params, fmt)
  want = model.apply(qparams, x)  # the CPU's "auto": the XLA reference
  layer = QLinear(64, 48, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(layer, quantize_params(nnx.state(layer, nnx.Param), fmt))
  graphdef, state = nnx.split(layer)
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  with kernels.interpret_mode():
    seen, others = jaxpr_weight_path(jax.jit(model.apply), (qparams, x), qparams["params"]["kernel"])
    assert others == [] and sorted(seen) == ["scales", "values"]
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(qparams, x), np.float32), np.asarray(want, np.float32),
                               rtol=2**-7, atol=1e-6)
    call = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    seen, others = jaxpr_weight_path(call, (state, x), layer.kernel.get_value())
    assert others == [] and sorted(seen) == ["scales", "values"]
    # The check can fail: a weight in the logical layout is relaid on every call.
    plain = quantize_params(params, fmt, layout=None)
    seen, others = jaxpr_weight_path(jax.jit(model.apply), (plain, x), plain["params"]["kernel"])
    assert others


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the kernel's custom call is in the optimized HLO on a GPU only; on the CPU, "
                           "test_qdense_and_qlinear_pass_the_stored_weight_straight_to_the_kernel checks the jaxpr")
@pytest.mark.parametrize("fmt", LAYOUT_FORMATS, ids=lambda f: f.name)
def test_qdense_hlo_feeds_the_weight_buffers_to_the_kernel_custom_call(fmt):
  """The compiled jitted ``QDense.apply``: each of the weight's buffers is read by the kernel's custom call only."""
  k, n = 512, 384
  x = jax.random.normal(jax.random.key(0), (4, k), jnp.bfloat16)
  model = QDense(n, dtype=jnp.bfloat16)
  qparams = quantize_params(jax.jit(model.init)(jax.random.key(1), x), fmt)
  hlo = jax.jit(model.apply).lower(qparams, x).compile().as_text()
  shapes = {f"u8[{n},{k * fmt.elem_bits // 8}]", f"u8[{n},{k // fmt.block_size}]"}
  users = hlo_param_users(hlo, shapes)
  assert len(users) == 2, f"no entry parameters of shapes {shapes} in the HLO:\n{hlo}"
  for name, readers in users.items():
    assert readers and all(r.startswith("custom-call") for r in readers), (
        f"weight parameter {name} is read by {readers}, not only by the kernel:\n{hlo}")


def test_int8_weights_from_quantize_params_run_the_w4a4_layers(monkeypatch):
  # quantize_params(..., layout="int8"): 2-D MXFP4 kernels as fj.Int8Weight (the others as "auto"). QDense and
  # QLinear take them as they take the QArrays: the same outputs on the CPU (the reference reads the QArray);
  # as a GPU runs the W4A4 product (interpreted here), the int8 path with the stored codes, the activations
  # alone re-based per call.
  from fp4jax import int8_matmul
  from fp4jax import matmul as mm

  rows = mm.KERNEL_MAX_ROWS["mx"] + 32
  x = data(3, (2, rows // 2, 64))
  model = nn.Sequential([QDense(64, config=W4A4), nn.relu, QDense(32, config=W4A4)])
  params = model.init(jax.random.key(0), x)
  i8 = quantize_params(params, fj.MXFP4, layout="int8")
  kernels_ = [i8["params"][name]["kernel"] for name in ("layers_0", "layers_2")]
  assert all(isinstance(k, fj.Int8Weight) and k.fallback == "tiles" for k in kernels_)
  assert quantize_params(i8, fj.MXFP4, layout="int8") is not None  # stored leaves are left alone
  assert isinstance(quantize_params(params, fj.NVFP4, layout="int8")["params"]["layers_0"]["kernel"], fj.QArray)
  rows_params = quantize_params(params, fj.MXFP4)
  np.testing.assert_array_equal(model.apply(i8, x), model.apply(rows_params, x))
  layer, layer_i8 = (QLinear(64, 32, config=W4A4, rngs=nnx.Rngs(1)) for _ in range(2))
  nnx.update(layer, quantize_params(nnx.state(layer, nnx.Param), fj.MXFP4))
  nnx.update(layer_i8, quantize_params(nnx.state(layer_i8, nnx.Param), fj.MXFP4, layout="int8"))
  assert isinstance(layer_i8.kernel.get_value(), fj.Int8Weight)
  np.testing.assert_array_equal(layer_i8(x[0]), layer(x[0]))
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  rebased = []
  real = int8_matmul.rebased
  monkeypatch.setattr(int8_matmul, "rebased", lambda *a, **kw: rebased.append(a[0].shape) or real(*a, **kw))
  with kernels.interpret_mode():
    got = jax.jit(model.apply)(i8, x)
    assert rebased == [(rows, 32), (rows, 32)]  # the two layers' activations (K = 64: 32 bytes a row)
    rebased.clear()
    want = jax.jit(model.apply)(rows_params, x)
    assert len(rebased) == 4  # the QArray weights are re-based per call too
  np.testing.assert_array_equal(got, want)
