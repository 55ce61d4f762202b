"""The dequantize kernel (on a GPU the real kernel, else Pallas interpret mode): every code and
scale byte, both layouts, every output dtype; against the jnp reference and a numpy float64 decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
from fp4jax import kernels
from fp4jax.kernels import dequantize as dqk
from fp4jax.kernels import quantize_pack as qk
from fp4jax.qarray import QArray
from fp4jax.reference import dequantize_reference

# Interpret mode proves nothing about the compiled kernel: on a GPU these tests run the real one.
INTERPRET = not kernels.on_gpu()
FORMATS = [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2]
OUT = [jnp.float32, jnp.bfloat16, jnp.float16]


def _same(a, b):
  """Bit equality, NaN equal to NaN whatever its payload."""
  a, b = np.asarray(a), np.asarray(b)
  ints = np.uint16 if a.dtype.itemsize == 2 else np.uint32
  nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
  bad = (a.view(ints) != b.view(ints)) & ~nan
  assert not bad.any(), f"{bad.sum()} of {bad.size} differ, e.g. {a[bad][:4]} vs {b[bad][:4]}"


def _random_qarray(rng, fmt, shape, axis):
  """Every element code and every scale byte appear (NaN and Inf codes too)."""
  axis = axis % len(shape)
  sshape = list(shape)
  sshape[axis] //= fmt.block_size
  codes = rng.integers(0, 1 << fmt.elem_bits, shape).astype(np.uint8)
  scales = rng.integers(0, 256, sshape).astype(np.uint8)
  if fmt.elem_bits == 4:
    values = jax.lax.bitcast_convert_type(jnp.asarray(codes).astype(jnp.uint4), fmt.elem_dtype)
  else:
    values = jax.lax.bitcast_convert_type(jnp.asarray(codes), fmt.elem_dtype)
  gs = jnp.float32(rng.uniform(0.5, 2.0) * 2.0**-10) if fmt.has_global_scale else None
  return QArray(values, jax.lax.bitcast_convert_type(jnp.asarray(scales), fmt.scale_dtype), gs, fmt,
                axis - len(shape))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_kernel_matches_reference_every_code_and_scale(fmt):
  rng = np.random.default_rng(len(fmt.name))
  b = fmt.block_size
  for shape, axis in (((16, 8 * b), -1), ((4 * b, 6), 0), ((2, 2 * b, 4), 1)):
    q = _random_qarray(rng, fmt, shape, axis)
    for dtype in OUT:
      _same(dqk.dequantize(q, dtype, interpret=INTERPRET), dequantize_reference(q, dtype=np.dtype(dtype)))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cast_overflow_gives_the_float32_values_cast(fmt):
  # overflow="cast" (what the QAT int8 fallback reads its fake-quantized operand with): the float32 dequantize,
  # then a plain cast, so values past the output's range are inf, not its largest finite value.
  rng = np.random.default_rng(7 + len(fmt.name))
  q = _random_qarray(rng, fmt, (16, 8 * fmt.block_size), -1)
  codes = fj.pack_fp4(q.values) if fmt.elem_bits == 4 else q.values
  want32 = dequantize_reference(q, dtype=np.dtype(np.float32))
  for dtype in OUT:
    got = dqk.dequantize_packed(codes, q.scales, q.global_scale, fmt=fmt, dtype=dtype, interpret=INTERPRET,
                                overflow="cast")
    _same(got, want32.astype(dtype))
    if dtype != jnp.float32 and fmt.power_of_two_scales:  # E8M0 scales reach past bfloat16's range
      assert np.isinf(np.asarray(got, np.float32)).any()  # the case differs from "saturate" here
  with pytest.raises(ValueError, match="overflow"):
    dqk.dequantize_packed(codes, q.scales, q.global_scale, fmt=fmt, interpret=INTERPRET, overflow="clip")


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.MXFP8_E4M3], ids=lambda f: f.name)
def test_kernel_matches_float64_decoder(fmt):
  """Independent of the jnp code: ml_dtypes values times 2**(byte - 127) in float64,
  NaN for byte 0xFF, float32 subnormals flushed, saturated to the output range."""
  rng = np.random.default_rng(5)
  q = _random_qarray(rng, fmt, (8, 4 * fmt.block_size), -1)
  v = np.asarray(q.values).astype(np.float64)
  e = np.asarray(jax.lax.bitcast_convert_type(q.scales, jnp.uint8)).astype(np.int64)
  want = v * np.exp2(np.repeat(e, fmt.block_size, axis=-1) - 127.0)
  want[np.repeat(e == 255, fmt.block_size, axis=-1)] = np.nan
  want = np.where(np.abs(want) < 2.0**-126, np.copysign(0.0, want), want)
  for dtype in OUT:
    big = float(ml_dtypes.finfo(dtype).max)
    w = np.clip(want, -big, big).astype(np.float32).astype(dtype)
    _same(dqk.dequantize(q, dtype, interpret=INTERPRET), w)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("axis", [-1, 0])
def test_dequantize_packed_inverts_quantize_packed(fmt, axis):
  rng = np.random.default_rng(9)
  x = jnp.asarray((rng.standard_normal((4 * fmt.block_size, 6)) * 3).astype(np.float32))
  x = x if axis == 0 else x.T
  codes, scales, gs = qk.quantize_packed(x, fmt, axis=axis, interpret=INTERPRET)
  got = dqk.dequantize_packed(codes, scales, gs, fmt=fmt, axis=axis, dtype=jnp.float32, interpret=INTERPRET)
  want = fj.dequantize(fj.quantize(x, fmt, axis=axis, backend="xla"), jnp.float32, backend="xla")
  _same(got, want)
  _same(got, dqk.dequantize_packed_reference(codes, scales, gs, fmt=fmt, axis=axis, dtype=jnp.float32))


def test_partial_tiles_are_masked_and_every_element_written():
  # Interpret mode fills outputs with NaN: an unwritten element would show.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(0.5, 4.0, (6, 96)).astype(np.float32))
  for axis, cfg, xx in ((-1, dqk.Config(2, 64), x), (0, dqk.Config(4, 64), x.T)):
    q = fj.quantize(xx, fj.MXFP4, axis=axis, backend="xla")
    for dtype in (jnp.float32, jnp.bfloat16):
      out = dqk.dequantize(q, dtype, config=cfg, interpret=INTERPRET)
      assert not np.isnan(np.asarray(out, np.float32)).any()
      _same(out, dequantize_reference(q, dtype=np.dtype(dtype)))


def test_backend_dispatch():
  rng = np.random.default_rng(4)
  q = _random_qarray(rng, fj.NVFP4, (4, 64), -1)
  with kernels.interpret_mode():
    _same(fj.dequantize(q, jnp.bfloat16, backend="pallas"), fj.dequantize(q, jnp.bfloat16, backend="xla"))
  if not kernels.on_gpu():
    with pytest.raises(ValueError, match="GPU"):
      fj.dequantize(q, jnp.bfloat16, backend="pallas")
  with kernels.interpret_mode(), pytest.raises(ValueError, match="float64"):
    jax.config.update("jax_enable_x64", True)
    try:
      fj.dequantize(q, jnp.float64, backend="pallas")
    finally:
      jax.config.update("jax_enable_x64", False)


def test_bad_inputs_raise_value_errors():
  codes = jnp.zeros((4, 16), jnp.uint8)
  with pytest.raises(ValueError, match="scales"):
    dqk.dequantize_packed(codes, jnp.zeros((4, 2), jnp.uint8), fmt=fj.MXFP4, interpret=INTERPRET)
  with pytest.raises(ValueError, match="uint8"):
    dqk.dequantize_packed(codes.astype(jnp.int32), jnp.zeros((4, 1), jnp.uint8), fmt=fj.MXFP4, interpret=INTERPRET)
  with pytest.raises(ValueError, match="global_scale"):
    dqk.dequantize_packed(codes, jnp.zeros((4, 2), jnp.uint8), fmt=fj.NVFP4, interpret=INTERPRET)
  with pytest.raises(ValueError, match="int32"):
    dqk.dequantize_packed(codes, jnp.zeros((4, 1), jnp.uint8), fmt=fj.MXFP4, dtype=jnp.int32, interpret=INTERPRET)


def test_dequantize_kernel_takes_a_non_last_axis_on_gpu(monkeypatch):
  # It once was refused there; the GPU runs since (tests/test_cross_platform.py, recorded in
  # benchmarks/results/gpu_tests.md) found it bit-exact along every axis.
  import fp4jax.kernels as kernels_pkg
  from fp4jax import backend

  q = fj.quantize(jnp.ones((64, 16), jnp.float32), fj.MXFP4, axis=0, backend="xla")
  monkeypatch.setattr(kernels_pkg, "on_gpu", lambda: True)
  assert backend.dequantize_obstacle(q, jnp.float32) is None
  assert backend.choose("dequantize", "auto", backend.dequantize_obstacle(q, jnp.float32)).impl == "kernel"
