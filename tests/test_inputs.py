"""Inputs as users pass them: numpy's float64, lists, arrays with no elements, and the dtypes that stay refused."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj

RNG = np.random.default_rng(0)
X64 = RNG.standard_normal((64, 64))  # float64, numpy's default
X32 = X64.astype(np.float32)


def same_qarray(a, b):
  assert a.fmt == b.fmt and a.axis == b.axis and a.shape == b.shape
  for x, y in ((a.values, b.values), (a.scales, b.scales)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(a.global_scale if a.global_scale is not None else 0),
                                np.asarray(b.global_scale if b.global_scale is not None else 0))


@pytest.mark.parametrize("fmt", list(fj.ALL_FORMATS.values()), ids=lambda f: f.name)
def test_float64_quantizes_as_its_float32_values(fmt):
  assert X64.dtype == np.float64
  same_qarray(fj.quantize(X64, fmt), fj.quantize(X32, fmt))
  same_qarray(fj.quantize(X64[:, :40], fmt, pad=True), fj.quantize(X32[:, :40], fmt, pad=True))
  same_qarray(fj.quantize(X64.tolist(), fmt, axis=0), fj.quantize(X32, fmt, axis=0))  # a list of Python floats


def test_float64_everywhere_float32_goes():
  key = jax.random.key(3)
  np.testing.assert_array_equal(fj.fake_quant(X64, fj.NVFP4), fj.fake_quant(X32, fj.NVFP4))
  assert fj.fake_quant(X64, fj.MXFP4).dtype == jnp.float32  # as jnp.asarray(X64) is
  same_qarray(fj.stochastic_quantize(X64, fj.MXFP4, key), fj.stochastic_quantize(X32, fj.MXFP4, key))
  np.testing.assert_array_equal(fj.global_amax(X64, "row"), fj.global_amax(X32, "row"))
  same_qarray(fj.quantize(X64, fj.MXFP4, block_shape=(32, 32)), fj.quantize(X32, fj.MXFP4, block_shape=(32, 32)))
  w = fj.quantize(X32[:, :32], fj.MXFP4, axis=0)
  np.testing.assert_array_equal(fj.scaled_matmul(X64, w), fj.scaled_matmul(X32, w))
  np.testing.assert_array_equal(fj.scaled_matmul(X64, X64[:, :8]), fj.scaled_matmul(X32, X32[:, :8]))
  params = fj.quantize_params({"dense": {"kernel": X64, "bias": X64[0]}}, fj.MXFP4)
  same_qarray(params["dense"]["kernel"], fj.quantize(X32, fj.MXFP4, axis=0, layout="rows"))  # quantize_params stores rows
  assert params["dense"]["bias"] is not None and params["dense"]["bias"].dtype == np.float64  # untouched


def test_float64_under_x64_is_still_quantized_from_float32():
  with jax.enable_x64(True):
    x = jnp.asarray(X64)
    assert x.dtype == jnp.float64
    same_qarray(fj.quantize(x, fj.NVFP4), fj.quantize(X32, fj.NVFP4))
    y = fj.fake_quant(x, fj.MXFP4)
    assert y.dtype == jnp.float64  # the input's dtype, as for every other float
    np.testing.assert_array_equal(y, np.asarray(fj.fake_quant(X32, fj.MXFP4), np.float64))
    g = jax.grad(lambda v: fj.fake_quant(v, fj.MXFP4).sum())(x)
    assert g.dtype == jnp.float64


BAD_DTYPES = [np.int8, np.int32, np.uint8, np.bool_, np.complex64, ml_dtypes.float8_e4m3fn]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_other_dtypes_keep_a_clear_error(dtype):
  x = np.ones((4, 32), dtype)
  name = np.dtype(dtype).name
  calls = {
      "quantize": lambda: fj.quantize(x, fj.MXFP4),
      "quantize 2-D blocks": lambda: fj.quantize(np.ones((32, 32), dtype), fj.MXFP4, block_shape=(32, 32)),
      "fake_quant": lambda: fj.fake_quant(x, fj.MXFP4),
      "stochastic_quantize": lambda: fj.stochastic_quantize(x, fj.MXFP4, jax.random.key(0)),
      "quantize_params": lambda: fj.quantize_params({"kernel": np.ones((32, 4), dtype)}, fj.MXFP4),
  }
  if dtype not in (np.complex64, ml_dtypes.float8_e4m3fn):
    calls["global_amax"] = lambda: fj.global_amax(x)
    calls["scaled_matmul"] = lambda: fj.scaled_matmul(x, np.ones((32, 4), np.float32))
  for what, call in calls.items():
    with pytest.raises(ValueError, match=f"dtype {name}"):
      call()
      pytest.fail(what)


def test_not_arrays_are_value_errors():
  for bad in ("abc", None, [[1.0], [1.0, 2.0]], [1.0, "x"]):
    with pytest.raises(ValueError, match="quantize expects an array"):
      fj.quantize(bad, fj.MXFP4)
  with pytest.raises(ValueError, match="key must be one jax.random key"):
    fj.stochastic_quantize(X32, fj.MXFP4, 3)
  for bad in ("foo", jnp.int32):
    with pytest.raises(ValueError, match="must be (a )?floating"):
      fj.dequantize(fj.quantize(X32, fj.MXFP4), bad)
    with pytest.raises(ValueError, match="preferred_element_type must be"):
      fj.scaled_matmul(X32, X32, preferred_element_type=bad)
    with pytest.raises(ValueError, match="dequantize_packed: dtype must be"):
      fj.dequantize_packed(np.zeros((2, 16), np.uint8), np.zeros((2, 1), np.uint8), dtype=bad)
  for bad in (32.0, None, True, 0, 3):
    with pytest.raises(ValueError, match="block_size must be a positive even int"):
      fj.dequantize_packed(np.zeros((2, 16), np.uint8), np.zeros((2, 1), np.uint8), block_size=bad)


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3], ids=lambda f: f.name)
@pytest.mark.parametrize("shape,axis", [((0, 64), -1), ((64, 0), 0), ((3, 0, 32), -1), ((0,), -1), ((2, 0), -1)])
def test_arrays_with_no_elements(fmt, shape, axis):
  """An empty batch (an MoE expert no token was routed to) quantizes to an empty QArray."""
  x = np.ones(shape, np.float32)
  pad = shape[axis] % fmt.block_size != 0
  q = fj.quantize(x, fmt, axis=axis, pad=pad)
  fj.validate_qarray(q)
  assert q.shape == shape and fj.dequantize(q).shape == shape
  assert fj.fake_quant(x, fmt, axis=axis).shape == shape if not pad else True
  assert fj.stochastic_quantize(x, fmt, jax.random.key(0), axis=axis, pad=pad).shape == shape
  if fmt.has_global_scale:
    assert float(q.global_scale) == 1.0  # an all-zero tensor's
    rows = fj.quantize(x, fmt, axis=axis, pad=pad, granularity="row").global_scale
    assert rows.shape == (() if len(shape) == 1 else tuple(1 if a == axis % len(shape) else n
                                                          for a, n in enumerate(shape)))
  assert float(fj.global_amax(x, axis=axis)) == 0.0
  jitted = jax.jit(lambda v: fj.dequantize(fj.quantize(v, fmt, axis=axis, pad=pad)))(x)
  assert jitted.shape == shape


def test_matmul_and_packing_with_no_elements():
  w = fj.quantize(np.ones((32, 8), np.float32), fj.MXFP4, axis=0)
  assert fj.scaled_matmul(np.ones((0, 32), np.float32), w).shape == (0, 8)
  k0 = fj.scaled_matmul(np.ones((4, 0), np.float32), fj.quantize(np.ones((0, 8), np.float32), fj.MXFP4, axis=0))
  np.testing.assert_array_equal(k0, np.zeros((4, 8)))
  g = jax.grad(lambda a: fj.scaled_matmul(a, w, preferred_element_type=jnp.float32).sum())(jnp.ones((0, 32)))
  assert g.shape == (0, 32)
  assert fj.dequantize_packed(np.zeros((0, 16), np.uint8), np.zeros((0, 1), np.uint8)).shape == (0, 32)
  assert fj.unpack_fp4(fj.pack_fp4(jnp.zeros((0, 4), jnp.float4_e2m1fn))).shape == (0, 4)
