"""Fuzzing the quantize and dequantize kernels against the XLA path.

Random shapes (odd row counts, 1-wide and odd trailing dimensions, lengths that
are not whole blocks), both block-axis layouts, every kernel format, rule and
input dtype, tile configs with partial tiles, data with outliers, zero blocks,
NaN and Inf: every kernel result is bit-equal to the XLA path, or the call
raises a ValueError naming the shape and why no kernel takes it. Any other
exception (one from inside JAX or Triton) fails the test.

On a GPU the real kernels run (40 examples a test: each new shape compiles a Triton kernel,
and the whole suite must finish in benchmarks/gpu_check.py's budget); with ``FP4JAX_FUZZ=gpu``
400 a test; in CI, Pallas interpret mode and a bounded number of examples
(profiles in ``tests/conftest.py``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4jax as fj
from fp4jax import kernels
from fp4jax.kernels import dequantize as dqk
from fp4jax.kernels import quantize_pack as qk
from fp4jax.reference import dequantize_reference, quantize_reference

INTERPRET = not kernels.on_gpu()
if os.environ.get("FP4JAX_FUZZ") == "gpu":
  settings.register_profile("fuzz-long", parent=settings.get_profile("fuzz-gpu"), max_examples=400)
  PROFILE = "fuzz-long"
else:
  PROFILE = "fuzz" if INTERPRET else "fuzz-gpu"
FUZZ = settings.get_profile(PROFILE)

FORMATS = [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _rules(fmt):
  return [r for r in fj.SCALE_RULES if not (r == "nearest" and fmt.power_of_two_scales)]


@st.composite
def layouts(draw):
  """(format, shape, axis): rows, columns or 3-D, sometimes not a whole number of blocks."""
  fmt = draw(st.sampled_from(FORMATS))
  b = fmt.block_size
  k = draw(st.integers(1, 4)) * b
  if draw(st.integers(0, 9)) == 0:  # a partial block: the kernels refuse it
    k += draw(st.integers(1, b - 1))
  rows = draw(st.sampled_from([1, 2, 3, 5, 7, 9, 16, 33]))
  trailing = draw(st.sampled_from([1, 2, 3, 5, 6, 17, 64]))
  kind = draw(st.sampled_from(["rows", "columns", "3d"]))
  if kind == "rows":
    return fmt, (rows, k), draw(st.sampled_from([-1, 1]))
  if kind == "columns":
    return fmt, (k, trailing), 0
  return fmt, (rows, k, trailing), draw(st.sampled_from([1, -2]))


def _data(seed, shape, axis, dtype, block):
  """Gaussian blocks over many binades, with outliers, zero blocks, NaN and Inf."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))
  flat = np.moveaxis(x, axis, -1).copy()
  v = flat.reshape(-1)
  n = v.size
  for value, every in ((np.nan, 53), (np.inf, 71), (-np.inf, 89), (0.0, 7)):
    v[rng.choice(n, max(1, n // every) if rng.random() < 0.7 else 0, replace=False)] = value
  v[rng.choice(n, max(1, n // 97), replace=False)] *= 1e4  # outliers
  if flat.shape[-1] >= block and rng.random() < 0.5:
    flat[..., :block] = 0.0  # whole zero blocks
  x = np.moveaxis(flat, -1, axis)
  fi = ml_dtypes.finfo(dtype)
  with np.errstate(over="ignore", invalid="ignore"):
    x = np.clip(x, -float(fi.max), float(fi.max)) if rng.random() < 0.5 else x  # Inf, or saturate
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _config(draw, fmt):
  if draw(st.booleans()):
    return None
  return qk.Config(block_m=draw(st.sampled_from([1, 2, 4, 8])), block_k=fmt.block_size * draw(st.sampled_from([1, 2, 4])))


def _bits(a):
  a = jnp.asarray(a)
  if a.dtype == jnp.float4_e2m1fn:
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint4)).astype(np.uint8)
  a = np.asarray(a)
  ints = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  if jnp.issubdtype(a.dtype, jnp.floating):
    return np.where(np.isnan(a.astype(np.float32)), 0, a.view(ints))  # any NaN payload
  return a.view(ints)


def _run(call, shape, why, cfg):
  """The kernel's result, or None after a clear refusal; any other exception escapes and fails.

  ``why``: the kernel's own reason not to take the case (then it must raise a
  ValueError naming the shape). A supported case may be refused only for its
  tile config, by a ValueError naming the ``Config`` field; never with the
  default tiles.
  """
  if why is not None:
    with pytest.raises(ValueError) as e:
      call()
    assert str(tuple(shape)) in str(e.value), (str(e.value), why)
    return None
  try:
    return call()
  except ValueError as e:
    assert cfg is not None and "Config." in str(e), f"shape {shape}: refused with {cfg}: {e}"
    return None


@FUZZ
@given(case=layouts(), data=st.data())
def test_fuzz_quantize_kernel_is_bit_exact_or_refuses(case, data):
  fmt, shape, axis = case
  rule = data.draw(st.sampled_from(_rules(fmt)), label="rule")
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  cfg = _config(data.draw, fmt)
  x = _data(data.draw(st.integers(0, 2**31 - 1), label="seed"), shape, axis, dtype, fmt.block_size)
  ax = axis % len(shape)
  why = qk.supported(shape, dtype, fmt, ax - len(shape), rule, pack_last=True)
  q = _run(lambda: qk.quantize(x, fmt, axis=axis, scale_rule=rule, config=cfg, interpret=INTERPRET), shape, why, cfg)
  if q is not None:
    want = quantize_reference(x, None, None, fmt=fmt, axis=ax - len(shape), scale_rule=rule, pad=False)
    np.testing.assert_array_equal(_bits(q.scales), _bits(want.scales))
    np.testing.assert_array_equal(_bits(q.values), _bits(want.values))
    if fmt.has_global_scale:
      assert _bits(q.global_scale) == _bits(want.global_scale)
  # The packed entry point: 4-bit pairs along the block axis.
  why = qk.supported(shape, dtype, fmt, ax - len(shape), rule, pack_last=False)
  out = _run(lambda: qk.quantize_packed(x, fmt, axis=axis, scale_rule=rule, config=cfg, interpret=INTERPRET),
             shape, why, cfg)
  if out is not None:
    rc, rs, _ = qk.quantize_packed_reference(x, fmt, axis=axis, scale_rule=rule)
    np.testing.assert_array_equal(_bits(out[0]), _bits(rc))
    np.testing.assert_array_equal(_bits(out[1]), _bits(rs))


@FUZZ
@given(case=layouts(), data=st.data())
def test_fuzz_dequantize_kernel_is_bit_exact_or_refuses(case, data):
  fmt, shape, axis = case
  out_dtype = data.draw(st.sampled_from(DTYPES), label="out_dtype")
  cfg = _config(data.draw, fmt)
  ax = axis % len(shape)
  if shape[ax] % fmt.block_size:
    return  # no QArray has a partial block (quantize pads or refuses, tested above)
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
  # Every code and scale byte, NaN and Inf codes and scales included.
  codes = rng.integers(0, 1 << fmt.elem_bits, shape).astype(np.uint8)
  sshape = list(shape)
  sshape[ax] //= fmt.block_size
  scales = rng.integers(0, 256, sshape).astype(np.uint8)
  values = jnp.asarray(codes).astype(jnp.uint4) if fmt.elem_bits == 4 else jnp.asarray(codes)
  q = fj.QArray(jax.lax.bitcast_convert_type(values, fmt.elem_dtype),
                jax.lax.bitcast_convert_type(jnp.asarray(scales), fmt.scale_dtype),
                jnp.float32(rng.uniform(0.5, 2) * 2.0**rng.integers(-20, 20)) if fmt.has_global_scale else None,
                fmt, ax - len(shape))
  why = dqk.supported(shape, fmt, ax - len(shape), out_dtype, packed_last=True)
  got = _run(lambda: dqk.dequantize(q, out_dtype, config=cfg, interpret=INTERPRET), shape, why, cfg)
  if got is not None:
    np.testing.assert_array_equal(_bits(got), _bits(dequantize_reference(q, dtype=np.dtype(out_dtype))))
