"""QArray as a pytree: jit, vmap, lax.scan, tree_map, static format, validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import fp4jax as fj

FORMATS = list(fj.FORMATS.values())


def _x(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _same(a: fj.QArray, b: fj.QArray):
  assert a.fmt == b.fmt and a.axis == b.axis
  chex.assert_trees_all_equal(
      jax.lax.bitcast_convert_type(a.scales, jnp.uint8), jax.lax.bitcast_convert_type(b.scales, jnp.uint8))
  chex.assert_trees_all_equal(a.values.astype(jnp.float32), b.values.astype(jnp.float32))
  chex.assert_trees_all_equal(a.global_scale, b.global_scale)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_shapes_with_chex_dimensions(fmt):
  dims = chex.Dimensions(N=3, K=4 * fmt.block_size, S=4)
  q = fj.quantize(_x(dims["NK"]), fmt, axis=-1)
  chex.assert_shape(q.values, dims["NK"])
  chex.assert_shape(q.scales, dims["NS"])
  chex.assert_type(q.values, fmt.elem_dtype)
  chex.assert_type(q.scales, fmt.scale_dtype)
  qk = fj.quantize(_x(dims["KN"]), fmt, axis=0)
  chex.assert_shape(qk.scales, dims["SN"])
  assert qk.axis == -2 and q.axis == -1
  assert q.shape == dims["NK"] and q.ndim == 2 and q.block_size == fmt.block_size
  assert fmt.name.upper() in repr(q)


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4], ids=str)
def test_pytree_flatten_unflatten_and_tree_map(fmt):
  q = fj.quantize(_x((2, 64)), fmt)
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == (3 if fmt.has_global_scale else 2)
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(back, fj.QArray)
  _same(back, q)
  # tree_map keeps the static format and axis, touches only the arrays.
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), q)
  assert isinstance(stacked, fj.QArray) and stacked.fmt is fmt and stacked.axis == -1
  chex.assert_shape(stacked.values, (2, 2, 64))
  np.testing.assert_array_equal(jax.vmap(fj.dequantize)(stacked)[1], fj.dequantize(q))
  # A different format is a different tree structure.
  other = fj.quantize(_x((2, 64)), fj.MXFP8_E4M3)
  assert jax.tree_util.tree_structure(other) != treedef


class QuantizeVariantsTest(parameterized.TestCase):
  """The same results traced under jit and run eagerly."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("mxfp4", "nvfp4", "mxfp8_e5m2")
  def test_quantize_dequantize(self, name):
    fmt = fj.get_format(name)
    x = _x((4, 64), seed=1)
    want = fj.dequantize(fj.quantize(x, fmt))
    fn = self.variant(lambda x: fj.dequantize(fj.quantize(x, fmt)))
    chex.assert_trees_all_equal(fn(x), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_qarray_argument_and_result(self):
    q = fj.quantize(_x((2, 32)), fj.NVFP4)
    fn = self.variant(lambda q: jax.tree_util.tree_map(lambda a: a, q))
    out = fn(q)
    assert isinstance(out, fj.QArray)
    _same(out, q)


def test_static_format_does_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def dq(q):
    return fj.dequantize(q)

  for seed in range(3):  # new data, same format and shapes: one trace
    dq(fj.quantize(_x((2, 64), seed), fj.MXFP4))
  # A different format is new static data: it must trace again.
  with pytest.raises(AssertionError, match="traced > 1 times"):
    dq(fj.quantize(_x((2, 64)), fj.MXFP8_E4M3))
  chex.clear_trace_counter()


def test_vmap_quantize_and_dequantize():
  xs = _x((3, 64, 5))
  # Per sample (64, 5) blocked along axis 0, which the QArray stores as -2, so
  # the batched QArray (3, 64, 5) still blocks the right axis.
  qb = jax.vmap(lambda x: fj.quantize(x, fj.MXFP4, axis=0))(xs)
  assert qb.axis == -2
  chex.assert_shape(qb.scales, (3, 2, 5))
  for i in range(3):
    _same(jax.tree_util.tree_map(lambda a: a[i], qb), fj.quantize(xs[i], fj.MXFP4, axis=0))
  np.testing.assert_array_equal(jax.vmap(fj.dequantize)(qb), fj.dequantize(qb))
  fj.validate_qarray(qb)
  # NVFP4 "mse" under vmap: one global scale per sample, the same search.
  qn = jax.vmap(lambda x: fj.quantize(x, fj.NVFP4, axis=0, scale_rule="mse"))(xs)
  chex.assert_shape(qn.global_scale, (3,))
  np.testing.assert_array_equal(jax.vmap(fj.dequantize)(qn)[1],
                                fj.dequantize(fj.quantize(xs[1], fj.NVFP4, axis=0, scale_rule="mse")))


def test_lax_scan_over_qarrays():
  xs = _x((4, 2, 32))
  qs = jax.vmap(lambda x: fj.quantize(x, fj.MXFP4))(xs)

  def step(acc, q):
    assert isinstance(q, fj.QArray)
    return acc + fj.dequantize(q), q.scales

  total, scales = jax.lax.scan(step, jnp.zeros((2, 32)), qs)
  want = sum(fj.dequantize(fj.quantize(xs[i], fj.MXFP4)) for i in range(4))
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(scales, jnp.uint8),
                                jax.lax.bitcast_convert_type(qs.scales, jnp.uint8))
  # Producing QArrays from a scan body works too.
  _, qout = jax.lax.scan(lambda c, x: (c, fj.quantize(x, fj.NVFP4)), 0, xs)
  chex.assert_shape(qout.global_scale, (4,))


def test_validate_qarray_errors():
  q = fj.quantize(_x((2, 64)), fj.MXFP4)
  n = fj.quantize(_x((2, 64)), fj.NVFP4)
  bad = [
      (fj.QArray(q.values.astype(jnp.float32), q.scales, None, fj.MXFP4, -1), "values dtype is float32"),
      (fj.QArray(q.values, q.scales.astype(jnp.float32), None, fj.MXFP4, -1), "scales dtype is float32"),
      (fj.QArray(q.values, q.scales[:, :1], None, fj.MXFP4, -1), r"scales shape \(2, 1\) .* expected \(2, 2\)"),
      (fj.QArray(q.values, q.scales, None, fj.MXFP4, 1), "axis 1 must be negative"),
      (fj.QArray(q.values[:, :40], q.scales, None, fj.MXFP4, -1), "not a multiple of block size 32"),
      (fj.QArray(n.values, n.scales, None, fj.NVFP4, -1), "needs a float32 scalar global_scale"),
      (fj.QArray(q.values, q.scales, jnp.float32(1), fj.MXFP4, -1), "has no global scale"),
      (fj.QArray(q.values, q.scales, None, "mxfp4", -1), "must be a fp4jax.Format"),
  ]
  for qa, msg in bad:
    with pytest.raises(ValueError, match=msg):
      fj.validate_qarray(qa)
  with pytest.raises(ValueError, match="values dtype"):
    fj.dequantize(bad[0][0])


def test_nbytes_counts_packed_elements_and_scales():
  assert fj.quantize(_x((64, 64)), fj.MXFP4).nbytes == 64 * 64 // 2 + 64 * 2
  assert fj.quantize(_x((64, 64)), fj.NVFP4).nbytes == 64 * 64 // 2 + 64 * 4 + 4
  assert fj.quantize(_x((64, 64)), fj.MXFP8_E4M3).nbytes == 64 * 64 + 64 * 2


def test_method_dequantize_matches_function():
  q = fj.quantize(_x((2, 32), dtype=jnp.bfloat16), fj.MXFP4)
  out = q.dequantize(jnp.bfloat16)
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_trees_all_equal(out, fj.dequantize(q, jnp.bfloat16))
