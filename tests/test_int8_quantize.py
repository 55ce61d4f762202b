"""Activations quantized straight into the int8 path's codes (fp4jax.kernels.int8_quantize)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import fp4jax as fj
from fp4jax import int8_matmul as im
from fp4jax import kernels
from fp4jax.kernels import int8_quantize as iq
from fp4jax.prepared import byte_matrix


def two_steps(x):
  """What the int8 path did before: quantize to byte rows, then the row bases and the re-basing (XLA ops)."""
  data, scales = byte_matrix(fj.quantize(x, fj.MXFP4, axis=-1, layout="rows"))
  base, nan = im.row_bases(scales)
  codes, residual = im.rebase_codes(data, scales, base)
  return codes, base, nan, residual


def special_rows(shape, dtype, key):
  """Normal rows, and rows with a NaN, an Inf, zero and subnormal blocks, -0, a huge element (residual: the
  other blocks fall more than 4 binades below it) and a heavy-tailed row."""
  m, k = shape
  x = jax.random.normal(key, shape, jnp.float32)
  tiny = float(jnp.finfo(dtype).smallest_normal) / 4  # subnormal in the input dtype
  x = x.at[1, 3].set(jnp.nan).at[2, 40].set(jnp.inf).at[3, :64].set(0.0).at[4, 32:64].set(tiny)
  x = x.at[5, :].set(-0.0).at[6, 7].set(2000.0)
  x = x.at[7].set(jax.random.t(jax.random.fold_in(key, 1), 3.0, (k,)))
  return x.astype(dtype)


@pytest.mark.parametrize("dtype", iq.INPUT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("tiles", [iq.TILES, iq.Tiles(1, 1), iq.Tiles(8, 4, 8), iq.Tiles(2, 64)], ids=str)
def test_the_kernel_gives_quantize_then_rebase_bits(dtype, tiles):
  # Compiled on a GPU, interpreted elsewhere.
  x = special_rows((16, 1024), dtype, jax.random.key(0))
  want = two_steps(x)
  assert np.asarray(want[2]).tolist()[1:3] == [True, True] and np.asarray(want[3])[6]  # the cases occur
  got = iq.quantize_codes(x, tiles=tiles, interpret=not kernels.on_gpu())
  for name, g, w in zip(("codes", "base", "nan", "residual"), got, want):
    assert g.dtype == w.dtype, name
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@pytest.mark.parametrize("m,k", [(1, 32), (3, 96), (24, 448), (64, 2048)])
def test_shapes_whose_rows_and_blocks_are_not_powers_of_two(m, k):
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16) * 3
  got = iq.quantize_codes(x, interpret=not kernels.on_gpu())
  for g, w in zip(got, two_steps(x)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bad_inputs_are_refused_with_the_shape_or_dtype():
  with pytest.raises(ValueError, match="2-D"):
    iq.quantize_codes(jnp.zeros((2, 4, 32), jnp.bfloat16))
  with pytest.raises(ValueError, match="int32"):
    iq.quantize_codes(jnp.zeros((2, 32), jnp.int32))
  with pytest.raises(ValueError, match=r"\(2, 48\)"):
    iq.quantize_codes(jnp.zeros((2, 48), jnp.bfloat16))


@pytest.mark.parametrize("heavy", [False, True], ids=["int8", "fallback"])
def test_the_w4a4_layer_path_quantizes_straight_into_codes(heavy, monkeypatch):
  # quantized_dot_general's W4A4 inference path as a GPU runs it (the Pallas passes interpreted), with the
  # fused quantize on: the kernel runs, and the output is the byte-rows path's, bit for bit, whether the
  # product takes the int8 path or (heavy tails: residual rows) the two-pass fallback.
  from fp4jax import matmul as mm
  from fp4jax import qat
  from fp4jax.qat import OperandConfig, QatConfig

  rows = mm.KERNEL_MAX_ROWS["mx"] + 16
  key = jax.random.key(3)
  x = (jax.random.t(key, 3.0, (2, rows // 2, 256)) if heavy else jax.random.normal(key, (2, rows // 2, 256)))
  x = x.astype(jnp.bfloat16)
  w = fj.quantize(jax.random.normal(jax.random.key(4), (256, 64)), fj.MXFP4, axis=0, layout="rows")
  cfg = QatConfig(lhs=OperandConfig(fj.MXFP4), rhs=OperandConfig(None), grad=OperandConfig(None))
  dims = (((2,), (0,)), ((), ()))
  assert bool(jnp.any(two_steps(x.reshape(rows, 256))[3])) == heavy
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  ran = []
  real = iq.quantize_codes
  monkeypatch.setattr(iq, "quantize_codes", lambda *a, **kw: ran.append(a[0].shape) or real(*a, **kw))
  with kernels.interpret_mode():
    want = qat.quantized_dot_general(x, w, dims, preferred_element_type=jnp.float32, config=cfg)
    assert ran == []
    monkeypatch.setattr(mm, "FUSED_ACTIVATION_QUANTIZE", True)
    got = qat.quantized_dot_general(x, w, dims, preferred_element_type=jnp.float32, config=cfg)
  assert ran == [(rows, 256)]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
