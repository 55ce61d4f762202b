"""QArrays and param trees of them through orbax-checkpoint, bit for bit (float4 and float8 dtypes as is)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fp4jax as fj


def every_bit_pattern_tree():
  """QArrays whose leaves hold every element code and every scale byte (NaN scales, -0, ...)."""
  codes = np.arange(256, dtype=np.uint8)
  fp4 = np.tile((codes % 16).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn), (8, 1))  # (8, 256)
  e8m0 = codes.reshape(32, 8).view(ml_dtypes.float8_e8m0fnu)  # all 256 bytes, 0xFF (NaN) included
  e4m3 = codes.reshape(16, 16).view(ml_dtypes.float8_e4m3fn)
  x = jax.random.normal(jax.random.key(0), (32, 64), jnp.float32)
  return {
      "layer0": {
          "kernel": fj.QArray(jnp.asarray(np.tile(fp4, (4, 1))), jnp.asarray(e8m0), None, fj.MXFP4, -1),
          "bias": jnp.linspace(-1, 1, 7, dtype=jnp.bfloat16),
      },
      "layer1": {"kernel": fj.QArray(jnp.asarray(np.tile(fp4, (2, 1))), jnp.asarray(e4m3), jnp.float32(-0.0), fj.NVFP4, -1)},
      "emb": fj.QArray(jnp.asarray(np.tile(codes, (32, 1)).view(ml_dtypes.float8_e5m2)),
                       jnp.asarray(e8m0), None, fj.MXFP8_E5M2, -1),
      "proj": fj.quantize(x, fj.MXFP8_E4M3, axis=0),
      "step": jnp.int32(7),
  }


def assert_trees_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)  # QArray nodes, fmt and axis included
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.fixture
def checkpointer():
  ckpt = ocp.StandardCheckpointer()
  yield ckpt
  ckpt.close()


def test_param_tree_of_qarrays_round_trips_bit_exact(tmp_path, checkpointer):
  tree = every_bit_pattern_tree()
  for q in (tree["layer0"]["kernel"], tree["layer1"]["kernel"], tree["emb"], tree["proj"]):
    fj.validate_qarray(q)
  checkpointer.save(tmp_path / "params", tree)
  checkpointer.wait_until_finished()
  # The target carries the QArray structure (fmt, axis): abstract, as from model init.
  restored = checkpointer.restore(tmp_path / "params", jax.eval_shape(lambda: tree))
  assert_trees_bit_identical(tree, restored)
  assert restored["layer1"]["kernel"].fmt == fj.NVFP4 and restored["proj"].axis == -2
  np.testing.assert_array_equal(np.asarray(restored["proj"].dequantize()), np.asarray(tree["proj"].dequantize()))


def test_single_qarray_round_trips(tmp_path, checkpointer):
  q = fj.quantize(jax.random.normal(jax.random.key(3), (4, 96), jnp.bfloat16), fj.NVFP4, scale_rule="mse")
  checkpointer.save(tmp_path / "q", q)
  checkpointer.wait_until_finished()
  assert_trees_bit_identical(q, checkpointer.restore(tmp_path / "q", jax.eval_shape(lambda: q)))


def test_rows_qarrays_round_trip(tmp_path, checkpointer):
  """A "rows" QArray is a pytree of uint8 arrays (and NVFP4's float32 scalar): the same QArray comes back."""
  tree = {name: fj.quantize(jax.random.normal(jax.random.key(i), (64, 40)), fmt, axis=0, layout="rows")
          for i, (name, fmt) in enumerate((("mx", fj.MXFP4), ("nv", fj.NVFP4), ("f8", fj.MXFP8_E5M2)))}
  checkpointer.save(tmp_path / "rows", tree)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "rows", jax.eval_shape(lambda: tree))
  assert_trees_bit_identical(tree, restored)
  assert {q.layout for q in restored.values()} == {"rows"} and restored["nv"].shape == (64, 40)
  np.testing.assert_array_equal(restored["nv"].dequantize(), tree["nv"].with_layout(None).dequantize())
