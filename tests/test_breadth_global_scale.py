"""NVFP4 global scales per tensor, row, leading axis or calibrated; AmaxHistory for delayed scaling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax as fj
import reference as ref

SPEC = ref.SPECS["nvfp4"]


def _bytes(a):
  return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _x(shape, seed):
  rng = np.random.default_rng(seed)
  # Slices of very different magnitudes, so each group's global scale matters.
  x = rng.standard_normal(shape) * np.exp(rng.uniform(-10, 10, shape[:1] + (1,) * (len(shape) - 1)))
  return x.astype(np.float32)


def _check_slices(q, x, slices, rule, axis=-1, given=None):
  """Each slice of x, quantized alone by the reference (its own tensor amax), is that slice of q."""
  v_all = np.asarray(q.values).astype(np.float64)
  for idx in slices:
    g = None if given is None else np.asarray(given)[idx].reshape(())
    v, s, d = ref.quantize(x[idx], SPEC, rule, axis=axis, global_scale=g)
    np.testing.assert_array_equal(v_all[idx], v)
    np.testing.assert_array_equal(_bytes(q.scales)[idx], s)
    assert np.asarray(q.global_scale)[idx].reshape(()) == d
    want = ref.dequantize(v, s, SPEC, axis=axis, decode=d)
    np.testing.assert_array_equal(np.asarray(fj.dequantize(q))[idx], want)


@pytest.mark.parametrize("rule", ["nearest", "mse"])
def test_per_row(rule):
  x = _x((6, 64), seed=0)
  x[2, 3] = np.nan  # its row's scale skips it; other rows do not see it
  q = fj.quantize(x, fj.NVFP4, scale_rule=rule, granularity="row")
  chex.assert_shape(q.global_scale, (6, 1))
  chex.assert_type(q.global_scale, jnp.float32)
  _check_slices(q, np.where(np.isnan(x), 0, x), [np.s_[i:i + 1] for i in (0, 1, 3, 4, 5)], rule)
  assert np.isnan(np.asarray(fj.dequantize(q))[2, :16]).all()
  # Rows along axis 0 of a (K, N) array blocked along K: one global scale per column.
  qc = fj.quantize(x.T, fj.NVFP4, scale_rule=rule, axis=0, granularity="row")
  chex.assert_shape(qc.global_scale, (1, 6))
  np.testing.assert_array_equal(np.asarray(qc.global_scale).T, np.asarray(q.global_scale))


def test_per_leading_axis_and_axis_tuples():
  w = _x((3, 32, 48), seed=1)  # (experts, in, out) blocked along "in"
  q = fj.quantize(w, fj.NVFP4, axis=1, granularity="leading")
  chex.assert_shape(q.global_scale, (3, 1, 1))
  _check_slices(q, w, [np.s_[e:e + 1] for e in range(3)], "nearest", axis=1)
  q2 = fj.quantize(w, fj.NVFP4, axis=1, granularity=(0, -1))  # per expert and output column
  chex.assert_shape(q2.global_scale, (3, 1, 48))
  _check_slices(q2, w, [np.s_[e:e + 1, :, n:n + 1] for e in range(3) for n in (0, 17, 47)], "nearest", axis=1)
  assert fj.quantize(w, fj.NVFP4, axis=1, granularity=()).global_scale.shape == ()
  # 2-D blocks per expert.
  w3 = w[:, :, :32]
  q3 = fj.quantize(w3, fj.NVFP4, block_shape=(16, 16), granularity="leading")
  chex.assert_shape(q3.global_scale, (3, 1, 1))
  want = [ref.global_factors(np.abs(w3[e]).max())[1] for e in range(3)]
  np.testing.assert_array_equal(np.asarray(q3.global_scale).reshape(3), want)


def test_global_amax_and_global_scale_from_amax_give_what_quantize_stores():
  x = _x((4, 2, 32), seed=2)
  x[1, 0, 5] = np.inf
  for gran, shape in [("tensor", ()), ("row", (4, 2, 1)), ("leading", (4, 1, 1))]:
    a = fj.global_amax(x, gran)
    chex.assert_shape(a, shape)
    finite = np.where(np.isfinite(x), np.abs(x), 0)
    want = finite.max() if gran == "tensor" else finite.max(axis=-1 if gran == "row" else (1, 2), keepdims=True)
    np.testing.assert_array_equal(np.asarray(a), want)
    g = fj.global_scale_from_amax(a, fj.NVFP4)
    q = fj.quantize(x, fj.NVFP4, granularity=gran)
    np.testing.assert_array_equal(np.asarray(q.global_scale), np.asarray(g))
    want_g = np.vectorize(lambda v: ref.global_factors(v)[1], otypes=[np.float32])(want)
    np.testing.assert_array_equal(np.asarray(g), want_g)


def test_calibrated_global_scale_arrays():
  x = _x((5, 32), seed=3)
  given = np.float32(np.abs(x).max(axis=1, keepdims=True) / 2000.0)  # a calibration, not the recipe's
  q = fj.quantize(x, fj.NVFP4, global_scale=given)
  np.testing.assert_array_equal(np.asarray(q.global_scale), given)
  _check_slices(q, x, [np.s_[i:i + 1] for i in range(5)], "nearest", given=given)
  # A scalar calibration is unchanged from the core's behaviour.
  qs = fj.quantize(x, fj.NVFP4, global_scale=np.float32(0.25))
  assert qs.global_scale.shape == ()


def test_validation_accepts_group_shapes_and_rejects_garbage():
  x = _x((4, 32), seed=4)
  q = fj.quantize(x, fj.NVFP4, granularity="row")
  fj.validate_qarray(q)
  g = q.global_scale
  bad = [
      (jnp.ones((4,), jnp.float32), r"has 2 axes"),  # wrong rank
      (jnp.ones((4, 2), jnp.float32), r"length 1 along the block axes \[1\]"),  # varies inside blocks
      (jnp.ones((3, 1), jnp.float32), r"each of length 1 or the values' length"),
      (g.astype(jnp.float16), "needs a float32 scalar global_scale"),
  ]
  for gs, msg in bad:
    with pytest.raises(ValueError, match=msg):
      fj.validate_qarray(fj.QArray(q.values, q.scales, gs, fj.NVFP4, -1))
  with pytest.raises(ValueError, match=r"global_scale must be a float scalar, got shape \(4,\)"):
    fj.quantize(x, fj.NVFP4, global_scale=np.ones(4, np.float32))
  with pytest.raises(ValueError, match=r"global_scale .* \[2\*\*-126, 2\*\*126\], got 0.0"):
    fj.quantize(x, fj.NVFP4, global_scale=np.array([[1.0], [0.0], [1.0], [1.0]], np.float32))
  with pytest.raises(ValueError, match="no global scale"):
    fj.quantize(x, fj.MXFP4, granularity="row")
  with pytest.raises(ValueError, match="not both"):
    fj.quantize(x, fj.NVFP4, granularity="row", global_scale=1.0)
  with pytest.raises(ValueError, match="unknown granularity 'column'"):
    fj.quantize(x, fj.NVFP4, granularity="column")
  with pytest.raises(ValueError, match="keeps axis 1 of an array of rank 2, which is a block axis"):
    fj.quantize(x, fj.NVFP4, granularity=(1,))
  with pytest.raises(ValueError, match="keeps axis 0 .* which is a block axis"):
    fj.quantize(x.T, fj.NVFP4, axis=0, granularity="leading")
  with pytest.raises(ValueError, match="'row' needs 1-D blocks"):
    fj.quantize(np.ones((32, 32), np.float32), fj.NVFP4, block_shape=(16, 16), granularity="row")
  with pytest.raises(ValueError, match="no Pallas quantize kernel.*per row"):
    fj.quantize(x, fj.NVFP4, granularity="row", backend="pallas")
  with pytest.raises(ValueError, match="no Pallas dequantize kernel.*per row"):
    fj.dequantize(q, backend="pallas")


def test_amax_history_delayed_scaling():
  rng = np.random.default_rng(5)
  xs = [rng.standard_normal((4, 32)).astype(np.float32) * s for s in (1.0, 8.0, 2.0, 0.5, 3.0)]
  hist = fj.AmaxHistory.create(xs[0], length=3, granularity="row")
  recent = fj.AmaxHistory.create(xs[0], length=3, granularity="row", algo="most_recent")
  chex.assert_shape(hist.history, (3, 4, 1))
  np.testing.assert_array_equal(np.asarray(hist.global_scale()), np.ones((4, 1), np.float32))

  @jax.jit
  def step(h, x):
    q = fj.quantize(x, fj.NVFP4, global_scale=h.global_scale(fj.NVFP4))  # from earlier steps only
    return h.update(x), fj.dequantize(q)

  rows = []
  for t, x in enumerate(xs):
    rows.append(np.abs(x).max(axis=1, keepdims=True))
    hist, _ = step(hist, jnp.asarray(x))
    recent = recent.update(jnp.asarray(x))
    window = np.max(rows[-3:], axis=0)
    np.testing.assert_array_equal(np.asarray(hist.amax()), window)
    np.testing.assert_array_equal(np.asarray(recent.amax()), rows[-1])
  # Step 5 used the scales of steps 2..4 (their max), computed as the recipe does.
  g = np.vectorize(lambda v: ref.global_factors(v)[1], otypes=[np.float32])(np.max(rows[1:4], axis=0))
  h4 = fj.AmaxHistory(jnp.asarray(np.stack(rows[3:0:-1])), "row")
  np.testing.assert_array_equal(np.asarray(h4.global_scale()), g)
  # A pytree: the history is the leaf, the configuration static.
  leaves, tree = jax.tree_util.tree_flatten(hist)
  assert len(leaves) == 1 and jax.tree_util.tree_unflatten(tree, leaves).granularity == "row"
  with pytest.raises(ValueError, match="length must be a positive int"):
    fj.AmaxHistory.create(xs[0], length=0)
  with pytest.raises(ValueError, match="unknown algo"):
    fj.AmaxHistory.create(xs[0], algo="mean")
  with pytest.raises(ValueError, match=r"x of shape \(2, 32\) gives an amax of shape \(2, 1\)"):
    hist.update(jnp.ones((2, 32)))
  t = fj.AmaxHistory.create(jax.ShapeDtypeStruct((4, 32), jnp.bfloat16), length=2).update(xs[1])
  assert np.float32(t.amax()) == np.abs(xs[1]).max()
