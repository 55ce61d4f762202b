"""2-D blocks: one scale per B x B tile, transpose-exact, against the 1-D reference on flattened tiles."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
import reference as ref
from fp4jax import scales as S


def _bytes(a):
  return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _rules(fmt):
  return ["floor", "ceil", "mse"] + (["even"] if fmt.power_of_two_scales else ["nearest", "4over6"])


CASES = [(f, r) for f in (fj.NVFP4, fj.MXFP4, fj.MXFP8_E4M3, fj.MXFP6_E3M2, fj.MXINT8) for r in _rules(f)]
# Every rule of the two 4-bit formats; the searched rule ("mse", whose loss
# order matters) for the others.
TRANSPOSE_CASES = [(f, r) for f, r in CASES if f in (fj.NVFP4, fj.MXFP4) or r == "mse"]


def _w(shape, seed):
  rng = np.random.default_rng(seed)
  w = rng.standard_t(5, shape) * np.exp(rng.uniform(-2, 2, shape[:-1] + (1,)))
  return w.astype(np.float32)


@pytest.mark.parametrize("fmt,rule", TRANSPOSE_CASES, ids=lambda c: str(c))
def test_transpose_is_bit_exact(fmt, rule):
  b = fmt.block_size
  w = _w((2 * b, 2 * b), seed=len(rule))  # square: w and w.T share one compiled quantize
  q = fj.quantize(w, fmt, scale_rule=rule, block_shape=(b, b))
  qt = fj.quantize(w.T, fmt, scale_rule=rule, block_shape=(b, b))
  np.testing.assert_array_equal(_bytes(np.asarray(fj.dequantize(q)).T), _bytes(fj.dequantize(qt)))
  np.testing.assert_array_equal(_bytes(np.asarray(q.values).T), _bytes(qt.values))
  np.testing.assert_array_equal(_bytes(np.asarray(q.scales).T), _bytes(qt.scales))
  # QArray.T is that same QArray, without re-quantizing.
  np.testing.assert_array_equal(_bytes(fj.dequantize(q.T)), _bytes(fj.dequantize(qt)))
  chex.assert_shape(q.scales, (2, 2))
  assert q.block_shape == (b, b) and q.axis == -1


def _tile_spec(fmt):
  specs = {**ref.SPECS, **ref.SPECS_BREADTH}
  s = specs.get(fmt.name)
  return None if s is None else ref.Spec(s.name, s.elem, s.scale, fmt.block_size**2, s.global_scale)


@pytest.mark.parametrize("fmt,rule", [c for c in CASES if c[1] != "mse"], ids=lambda c: str(c))
def test_matches_the_reference_on_flattened_tiles(fmt, rule):
  """A tile is a block of B*B elements: the 1-D references apply to the flattened tiles."""
  b = fmt.block_size
  x = _w((2, 2 * b, 2 * b), seed=7)  # a leading (expert) axis too
  x[0, :b, :b] = 0.0  # an all-zero tile
  q = fj.quantize(x, fmt, scale_rule=rule, block_shape=(b, b))
  chex.assert_shape(q.scales, (2, 2, 2))
  tiles = ref.to_tiles(x, b)  # (2, 4, b*b)
  if rule == "4over6":
    v, s, d, _, _ = ref.nvfp4_four_over_six(tiles, block=b * b)
  elif fmt.has_global_scale:
    v, s, d = ref.quantize(tiles, _tile_spec(fmt), rule)
  else:
    v, s = ref.quantize_mx(tiles, ref.ELEMS[fmt.name], rule, block=b * b)
  np.testing.assert_array_equal(_bytes(q.scales).reshape(2, 4), s.reshape(2, 4))
  vals = np.asarray(S.decode_elements(q.values, fmt)).astype(np.float64)
  np.testing.assert_array_equal(vals, ref.from_tiles(v, b, 2 * b, 2 * b))
  if fmt.has_global_scale:
    assert np.float32(q.global_scale) == d
  dq = ref.from_tiles(ref.to_tiles(vals, b) * np.repeat(
      np.asarray(q.scales).astype(np.float64).reshape(2, 4)[..., None], b * b, -1), b, 2 * b, 2 * b)
  if fmt.has_global_scale:
    dq = dq * np.float64(np.float32(q.global_scale))
  np.testing.assert_array_equal(np.asarray(fj.dequantize(q)), dq.astype(np.float32))


@pytest.mark.parametrize("fmt", [fj.NVFP4, fj.MXFP4, fj.MXINT8], ids=str)
def test_mse_search_on_tiles_finds_the_brute_force_optimum(fmt):
  """The wide window is a search over tiles of B*B elements: its loss equals the best of all scales."""
  b = fmt.block_size
  x = _w((2 * b, 2 * b), seed=11)
  q = fj.quantize(x, fmt, scale_rule="mse", block_shape=(b, b))
  dq = np.asarray(fj.dequantize(q)).astype(np.float64)
  got = np.sum((ref.to_tiles(dq, b) - ref.to_tiles(x, b)) ** 2, -1)
  tiles = ref.to_tiles(x, b)
  if fmt.has_global_scale:
    _, losses, _ = ref.brute_force_mse(tiles, _tile_spec(fmt), decode=np.float32(q.global_scale))
    best = losses.min(-1)
  else:
    elem = ref.ELEMS[fmt.name]
    ks = np.arange(-127, 128)
    best = np.min([np.sum((tiles - elem.round(tiles / 2.0**k) * 2.0**k) ** 2, -1) for k in ks], axis=0)
  np.testing.assert_allclose(got, best, rtol=1e-6)
  floor = np.asarray(fj.dequantize(fj.quantize(x, fmt, scale_rule="floor", block_shape=(b, b))))
  assert np.sum((dq - x) ** 2) <= np.sum((floor - x) ** 2)


def test_transpose_holds_at_float32_ties():
  """Tiles whose candidate losses tie in float32: the loss order is the same for a tile and its
  transpose (pairs (i, j), (j, i) are summed first), so the choice is too."""
  g = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
  rng = np.random.default_rng(12)
  w = (rng.choice(g, (32, 32)) * rng.choice([-1, 1], (32, 32)) * np.float32(1.25)).astype(np.float32)
  for fmt in (fj.NVFP4, fj.MXFP4):
    b = fmt.block_size
    q = fj.quantize(w, fmt, scale_rule="mse", block_shape=(b, b))
    qt = fj.quantize(w.T.copy(), fmt, scale_rule="mse", block_shape=(b, b))
    np.testing.assert_array_equal(_bytes(np.asarray(q.scales).T), _bytes(qt.scales))


def test_vmap_jit_and_pytree():
  x = jnp.asarray(_w((3, 32, 64), seed=13))
  f = jax.jit(lambda v: fj.quantize(v, fj.NVFP4, block_shape=(16, 16)))
  q = f(x)
  per = jax.vmap(lambda v: fj.quantize(v, fj.NVFP4, block_shape=(16, 16), global_scale=q.global_scale))(x)
  np.testing.assert_array_equal(_bytes(per.scales), _bytes(q.scales))
  leaves, tree = jax.tree_util.tree_flatten(q)
  back = jax.tree_util.tree_unflatten(tree, leaves)
  assert back.block_shape == (16, 16) and back.fmt is fj.NVFP4
  assert tree != jax.tree_util.tree_structure(fj.quantize(x, fj.NVFP4))  # block_shape is static
  assert "block_shape=(16, 16)" in repr(q)
  assert q.nbytes == 3 * 32 * 64 // 2 + 3 * 2 * 4 + 4


def test_validation_and_bad_inputs():
  x = np.ones((32, 64), np.float32)
  with pytest.raises(ValueError, match=r"block_shape must be None or \(16, 16\) for fp4jax.NVFP4"):
    fj.quantize(x, fj.NVFP4, block_shape=(32, 32))
  with pytest.raises(ValueError, match=r"block_shape must be None or \(32, 32\)"):
    fj.quantize(x, fj.MXFP4, block_shape=32)
  with pytest.raises(ValueError, match=r"shape \(32, 40\) is not a whole number of 16x16 tiles"):
    fj.quantize(np.ones((32, 40), np.float32), fj.NVFP4, block_shape=(16, 16))
  with pytest.raises(ValueError, match="tiles the last two axes; got shape \\(64,\\)"):
    fj.quantize(np.ones(64, np.float32), fj.NVFP4, block_shape=(16, 16))
  with pytest.raises(ValueError, match="got axis 0"):
    fj.quantize(x, fj.NVFP4, block_shape=(16, 16), axis=0)
  with pytest.raises(ValueError, match="pad=True"):
    fj.quantize(x, fj.NVFP4, block_shape=(16, 16), pad=True)
  with pytest.raises(ValueError, match="dtype int32"):
    fj.quantize(x.astype(np.int32), fj.NVFP4, block_shape=(16, 16))
  with pytest.raises(ValueError, match="hessian= weights 1-D blocks"):
    fj.quantize(x, fj.MXFP4, scale_rule="mse", block_shape=(32, 32), hessian=np.ones((2, 32, 32), np.float32))
  with pytest.raises(ValueError, match="no Pallas quantize kernel.*2-D blocks"):
    fj.quantize(x, fj.MXFP4, block_shape=(32, 32), backend="pallas")
  q = fj.quantize(x, fj.MXFP4, block_shape=(32, 32))
  with pytest.raises(ValueError, match="no Pallas dequantize kernel.*2-D blocks"):
    fj.dequantize(q, backend="pallas")
  bad = [
      (fj.QArray(q.values, q.scales, None, fj.MXFP4, -1, (16, 16)), r"2-D blocks are \(32, 32\) tiles"),
      (fj.QArray(q.values, q.scales, None, fj.MXFP4, -2, (32, 32)), "with axis -1"),
      (fj.QArray(q.values, q.scales[:, :1], None, fj.MXFP4, -1, (32, 32)), r"expected \(1, 2\)"),
      (fj.QArray(q.values[:, :48], q.scales, None, fj.MXFP4, -1, (32, 32)), "not a whole number of 32x32"),
  ]
  for qa, msg in bad:
    with pytest.raises(ValueError, match=msg):
      fj.validate_qarray(qa)
  with pytest.raises(ValueError, match="QArray.T needs a 2-D QArray"):
    fj.quantize(np.ones((2, 32, 32), np.float32), fj.MXFP4, block_shape=(32, 32)).T
  one_d = fj.quantize(x, fj.MXFP4)
  assert one_d.T.axis == -2 and one_d.T.shape == (64, 32)
  np.testing.assert_array_equal(np.asarray(fj.dequantize(one_d.T)), np.asarray(fj.dequantize(one_d)).T)
  assert ml_dtypes.float8_e8m0fnu == q.scales.dtype
