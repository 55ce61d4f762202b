"""Features only the XLA path implements are refused by every kernel entry point.

2-D blocks, per-group global scales and elements stored as codes (MXFP6,
MXINT8) must fall back to XLA under backend="auto", raise a ValueError under
backend="pallas", and never reach a kernel that would misread them.
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fp4jax as fj
from fp4jax import checkpoints, kernels, sharding
from fp4jax.qarray import xla_only_reason

CODE_FORMATS = ["mxint8", "mxfp6_e2m3", "mxfp6_e3m2"]


def _weight(shape=(64, 48), seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("name", CODE_FORMATS)
def test_matmul_code_formats_fall_back(name):
  a = jax.random.normal(jax.random.key(0), (16, 64), jnp.bfloat16)
  q = fj.quantize(_weight(), name, axis=0)
  assert "XLA path only" in xla_only_reason(q)
  ref = fj.scaled_matmul(a, q, backend="xla", preferred_element_type=jnp.float32)
  np.testing.assert_array_equal(fj.scaled_matmul(a, q, preferred_element_type=jnp.float32), ref)
  with kernels.interpret_mode(), pytest.raises(ValueError, match="XLA path only"):
    fj.scaled_matmul(a, q, backend="pallas")
  with pytest.raises(ValueError, match="XLA path only"):
    q.with_layout("rows")
  # The reference itself equals a float64 product of the dequantized weight.
  want = np.asarray(a, np.float64) @ np.asarray(fj.dequantize(q), np.float64)
  np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5)


def test_two_d_blocks_and_per_row_global_scale_fall_back():
  w = _weight((64, 64))
  tiles = fj.quantize(w, fj.NVFP4, block_shape=(16, 16))
  per_row = fj.quantize(w, fj.NVFP4, granularity="row")
  a = jax.random.normal(jax.random.key(2), (8, 64), jnp.bfloat16)
  for q in (tiles, per_row):
    assert xla_only_reason(q) is not None
    with kernels.interpret_mode():
      with pytest.raises(ValueError, match="2-D blocks|global scale"):
        fj.dequantize(q, backend="pallas")
      with pytest.raises(ValueError, match="2-D blocks|global scale"):
        fj.scaled_matmul(a, q.T if q is per_row else q, backend="pallas")
    np.testing.assert_array_equal(fj.dequantize(q), fj.dequantize(q, backend="xla"))


@pytest.mark.parametrize("name", CODE_FORMATS)
def test_stochastic_quantize_code_formats_on_grid_and_unbiased(name):
  w = _weight((8, 64), seed=3)
  keys = jax.random.split(jax.random.key(4), 256)
  draws = np.asarray(jax.vmap(
      lambda k: fj.dequantize(fj.stochastic_quantize(w, name, k, scale_rule="ceil")))(keys))
  x = np.asarray(w)
  nearest = np.asarray(fj.dequantize(fj.quantize(w, name, scale_rule="ceil")))
  lo, hi = draws.min(0), draws.max(0)
  # Every draw is one of x's two grid neighbours: at most two values per
  # element; where both were drawn they bracket x; where only one was (x sits
  # next to a grid point, so the far one is improbable) it is the nearest.
  assert np.all((draws == lo) | (draws == hi))
  both = lo != hi
  assert np.all(lo[both] <= x[both]) and np.all(x[both] <= hi[both])
  np.testing.assert_array_equal(lo[~both], nearest[~both])
  # Unbiased: the mean of 256 draws is within 4 standard errors of x.
  err = np.abs(draws.mean(0) - x)[both]
  assert np.all(err <= 4 * (hi - lo)[both] / 2 / np.sqrt(len(keys)))


def test_checkpoint_save_refuses_what_load_cannot_read():
  q = fj.quantize(_weight((64, 64)), fj.NVFP4, block_shape=(16, 16))
  path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
  with pytest.raises(ValueError, match="'w'.*2-D blocks"):
    checkpoints.save(path, {"w": q})
  assert not os.path.exists(path)


def test_qarray_sharding_keeps_block_shape():
  q = fj.quantize(_weight((64, 64)), fj.NVFP4, block_shape=(16, 16))
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  s = sharding.qarray_sharding(q, NamedSharding(mesh, PartitionSpec("x", None)))
  assert jax.tree.structure(s) == jax.tree.structure(q)
  assert s.block_shape == (16, 16)
