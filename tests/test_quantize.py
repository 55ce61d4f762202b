"""quantize / dequantize against the float64 reference, edge cases, properties."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4jax as fj
import reference as ref

ALL_FORMATS = list(fj.FORMATS.values())
F32_MAX = np.finfo(np.float32).max


def _rules(fmt):
  return ["floor", "ceil", "mse"] + ([] if fmt.power_of_two_scales else ["nearest"])


def _cases():
  return [(f, r) for f in ALL_FORMATS for r in _rules(f)]


def _bytes(a):
  return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _f64(values):
  return np.asarray(values).astype(np.float64)


def _assert_matches_reference(x, fmt, rule, axis=-1, global_scale=None, dtype=np.float32):
  q = fj.quantize(x, fmt, axis=axis, scale_rule=rule, global_scale=global_scale)
  v, s, d = ref.quantize(np.asarray(x), ref.SPECS[fmt.name], rule, axis=axis, global_scale=global_scale)
  np.testing.assert_array_equal(_f64(q.values), v)
  np.testing.assert_array_equal(np.signbit(_f64(q.values)), np.signbit(v))
  np.testing.assert_array_equal(_bytes(q.scales), s)
  if fmt.has_global_scale:
    assert np.float32(q.global_scale) == d
  else:
    assert q.global_scale is None
  got = np.asarray(fj.dequantize(q, dtype))
  want = ref.dequantize(v, s, ref.SPECS[fmt.name], axis=axis, decode=d, dtype=dtype)
  np.testing.assert_array_equal(_bytes(got), _bytes(want))
  return q


# ---- against the reference --------------------------------------------------------
@pytest.mark.parametrize("fmt,rule", _cases(), ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_matches_reference(fmt, rule, dtype):
  rng = np.random.default_rng(0)
  # Rows of very different magnitudes, heavy tails, exact zeros.
  x = rng.standard_t(3, (4, 64)) * np.exp(rng.uniform(-6, 6, (4, 1)))
  x[1, :5] = 0.0
  x = x.astype(dtype)
  _assert_matches_reference(x, fmt, rule, dtype=dtype)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_any_axis_and_rank(fmt, axis):
  rng = np.random.default_rng(1)
  shape = [3, 3, 3]
  shape[axis] = 2 * fmt.block_size
  x = rng.standard_normal(shape).astype(np.float32)
  q = _assert_matches_reference(x, fmt, fmt.default_scale_rule, axis=axis)
  assert q.axis == axis - 3 if axis >= 0 else axis  # stored negative
  want = list(shape)
  want[axis] = 2
  assert q.scales.shape == tuple(want) and q.values.shape == tuple(shape)
  # Blocking along an axis is blocking the last axis of the transposed array.
  qt = fj.quantize(np.moveaxis(x, axis, -1), fmt)
  np.testing.assert_array_equal(_f64(np.moveaxis(np.asarray(q.values), axis, -1)), _f64(qt.values))


def test_1d_and_4d():
  rng = np.random.default_rng(2)
  for shape, axis in [((64,), 0), ((2, 1, 3, 32), -1), ((2, 32, 1, 1), 1)]:
    _assert_matches_reference(rng.standard_normal(shape).astype(np.float32), fj.MXFP4, "floor", axis=axis)


# ---- input validation -----------------------------------------------------------
def test_non_multiple_length_raises_naming_shape_axis_block():
  x = np.ones((4, 40), np.float32)
  with pytest.raises(ValueError, match=r"shape \(4, 40\) has length 40 along axis -1.*block size 32"):
    fj.quantize(x, fj.MXFP4)
  with pytest.raises(ValueError, match=r"shape \(4, 40\) has length 4 along axis 0.*block size 16"):
    fj.quantize(x, fj.NVFP4, axis=0)


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4], ids=str)
def test_pad_zero_pads_to_whole_blocks(fmt):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 40)).astype(np.float32)
  q = fj.quantize(x, fmt, pad=True, scale_rule="ceil")
  n = -(-40 // fmt.block_size) * fmt.block_size
  assert q.shape == (3, n) and q.scales.shape == (3, n // fmt.block_size)
  padded = np.pad(x, [(0, 0), (0, n - 40)])
  v, s, d = ref.quantize(padded, ref.SPECS[fmt.name], "ceil")
  np.testing.assert_array_equal(_f64(q.values), v)
  np.testing.assert_array_equal(_bytes(q.scales), s)
  assert (np.asarray(fj.dequantize(q))[:, 40:] == 0).all()
  # pad along a leading axis too
  q0 = fj.quantize(x.T, fmt, axis=0, pad=True, scale_rule="ceil")
  np.testing.assert_array_equal(_f64(q0.values), v.T)


def test_bad_inputs_raise_value_errors():
  x = np.ones((2, 32), np.float32)
  with pytest.raises(ValueError, match="dtype complex64"):  # float64 is accepted: tests/test_inputs.py
    fj.quantize(x.astype(np.complex64), fj.MXFP4)
  with pytest.raises(ValueError, match="dtype int32"):
    fj.quantize(x.astype(np.int32), fj.MXFP4)
  with pytest.raises(ValueError, match="scalar"):
    fj.quantize(np.float32(1.0), fj.MXFP4)
  with pytest.raises(ValueError, match=r"axis 2 is out of range for an array of shape \(2, 32\)"):
    fj.quantize(x, fj.MXFP4, axis=2)
  with pytest.raises(ValueError, match="unknown backend"):
    fj.quantize(x, fj.MXFP4, backend="cuda")
  with pytest.raises(ValueError, match="no global scale"):
    fj.quantize(x, fj.MXFP4, global_scale=1.0)
  for bad in (0.0, np.inf, np.nan, 2.0**-127, 2.0**127):
    with pytest.raises(ValueError, match=r"global_scale .* \[2\*\*-126, 2\*\*126\]"):
      fj.quantize(x, fj.NVFP4, global_scale=bad)
  with pytest.raises(ValueError, match=r"global_scale must be a float scalar, got shape \(2,\)"):
    fj.quantize(x, fj.NVFP4, global_scale=np.ones(2, np.float32))
  with pytest.raises(ValueError, match="expects a fp4jax.QArray"):
    fj.dequantize(x)
  with pytest.raises(ValueError, match="must be floating"):
    fj.dequantize(fj.quantize(x, fj.MXFP4), jnp.int32)


def test_backend_xla_and_auto_agree():
  x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
  for fmt in (fj.MXFP4, fj.NVFP4):
    a = fj.quantize(x, fmt, backend="xla")
    b = fj.quantize(x, fmt, backend="auto")
    np.testing.assert_array_equal(_bytes(a.scales), _bytes(b.scales))
    np.testing.assert_array_equal(_f64(a.values), _f64(b.values))
    np.testing.assert_array_equal(fj.dequantize(a, backend="xla"), fj.dequantize(b, backend="auto"))


# ---- element rounding ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_element_rounding_is_ml_dtypes_round_to_nearest_even(fmt):
  """Scale pinned to 1: every element equals ml_dtypes' cast of the clipped
  input, on exact midpoints (ties to even), next to them, and at random."""
  grid = ref.elem_grid(ref.SPECS[fmt.name])
  mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
  rng = np.random.default_rng(5)
  vals = np.concatenate([
      grid.astype(np.float32), mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(9e9)),
      # up to 1.1 * elem_max: saturation, without moving the scale off 1
      rng.uniform(-fmt.elem_max * 1.1, fmt.elem_max * 1.1, 3000).astype(np.float32),
      (rng.uniform(-1, 1, 1000) * float(grid[1]) * 4).astype(np.float32),
  ])
  vals = np.concatenate([vals, -vals])
  b = fmt.block_size
  per_block = b - 1
  nblk = -(-vals.size // per_block)
  body = np.resize(vals, nblk * per_block).reshape(nblk, per_block)
  x = np.concatenate([np.full((nblk, 1), fmt.elem_max, np.float32), body], axis=1)
  kw = {"global_scale": 1.0} if fmt.has_global_scale else {}
  q = fj.quantize(x, fmt, scale_rule="floor", **kw)
  # amax = elem_max: the floor scale is 1 (for NVFP4 with decode 1, the ideal E4M3 scale is 1).
  assert (np.asarray(q.scales).astype(np.float32) == 1.0).all()
  want = np.clip(x, -fmt.elem_max, fmt.elem_max).astype(fmt.elem_dtype).astype(np.float64)
  np.testing.assert_array_equal(_f64(q.values), want)
  np.testing.assert_array_equal(np.signbit(_f64(q.values)), np.signbit(want))


def test_bf16_inputs_on_e2m1_midpoints_tie_to_even():
  """bf16 data hits E2M1 midpoints often; each tie goes to the even code."""
  x = np.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0] + [0.0] * 20,
               ml_dtypes.bfloat16)
  q = fj.quantize(x, fj.MXFP4, scale_rule="floor")
  want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -2.0, -4.0] + [0.0] * 20
  np.testing.assert_array_equal(_f64(q.values), want)
  np.testing.assert_array_equal(np.signbit(_f64(q.values)), np.signbit(want))


# ---- edge cases -------------------------------------------------------------------
@pytest.mark.parametrize("fmt,rule", _cases(), ids=lambda c: str(c))
def test_zero_blocks_are_exact_zeros(fmt, rule):
  x = np.zeros((3, 2 * fmt.block_size), np.float32)
  x[1, : fmt.block_size] = np.linspace(-1, 1, fmt.block_size)
  x[2] = -0.0
  q = fj.quantize(x, fmt, scale_rule=rule)
  out = np.asarray(fj.dequantize(q))
  assert (out[0] == 0).all() and (out[2] == 0).all() and (out[1, fmt.block_size:] == 0).all()
  assert np.isfinite(_f64(q.scales.astype(jnp.float32))).all()
  if fmt.has_global_scale:
    assert np.float32(fj.quantize(np.zeros((1, 16), np.float32), fmt, scale_rule=rule).global_scale) == 1.0


@pytest.mark.parametrize("fmt,rule", _cases(), ids=lambda c: str(c))
def test_nan_and_inf_poison_only_their_block(fmt, rule):
  b = fmt.block_size
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 4 * b)).astype(np.float32)
  x[0, 1] = np.nan
  x[0, b + 2] = np.inf
  x[1, 2 * b + 3] = -np.inf
  x[1, 3 * b] = 1e4  # a big finite element in the same block as -Inf: NVFP4's amax counts it
  q = fj.quantize(x, fmt, scale_rule=rule)
  out = np.asarray(fj.dequantize(q))
  bad = [(0, 0), (0, 1), (1, 2)]
  for r, blk in bad:
    assert np.isnan(out[r, blk * b:(blk + 1) * b]).all()
    assert _bytes(q.scales)[r, blk] == fmt.scale_nan_byte
  clean = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
  qc = fj.quantize(clean, fmt, scale_rule=rule)
  outc = np.asarray(fj.dequantize(qc))
  for r in range(2):
    for blk in range(4):
      if (r, blk) not in bad:
        np.testing.assert_array_equal(out[r, blk * b:(blk + 1) * b], outc[r, blk * b:(blk + 1) * b])
  if fmt.has_global_scale:
    assert np.float32(q.global_scale) == np.float32(qc.global_scale) == ref.global_factors(1e4)[1]


def test_nvfp4_global_scale_corner_cases():
  # An all-NaN tensor has no finite amax: decode 1.
  q = fj.quantize(np.full((1, 16), np.nan, np.float32), fj.NVFP4)
  assert np.float32(q.global_scale) == 1.0 and np.isnan(np.asarray(fj.dequantize(q))).all()
  for amax in [2.0**-126, 2.0**-118, 1.0, 3.0e38, F32_MAX]:
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 20] = amax, -amax / 7
    q = fj.quantize(x, fj.NVFP4)
    assert np.float32(q.global_scale) == ref.global_factors(amax)[1]
    _assert_matches_reference(x, fj.NVFP4, "nearest")
    out = np.asarray(fj.dequantize(q))
    assert np.isfinite(out).all()
  assert np.float32(fj.global_scale_from_amax(2.0**-120, fj.NVFP4)) == np.float32(2.0**-126)
  assert np.float32(fj.global_scale_from_amax(np.inf, fj.NVFP4)) == 1.0
  # A given decode factor is stored verbatim and used for every block.
  x = np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32)
  q = _assert_matches_reference(x, fj.NVFP4, "nearest", global_scale=np.float32(0.01))
  assert np.float32(q.global_scale) == np.float32(0.01)


def test_e2m1_subnormal_elements():
  """0.5 is E2M1's only subnormal: 0.25 ties to 0, 0.75 to 1, 0.3 and 0.7 to 0.5."""
  x = np.zeros(32, np.float32)
  x[:6] = [6.0, 0.5, 0.25, 0.75, 0.3, 0.7]
  q = fj.quantize(x, fj.MXFP4, scale_rule="floor")
  np.testing.assert_array_equal(_f64(q.values)[:6], [6.0, 0.5, 0.0, 1.0, 0.5, 0.5])
  np.testing.assert_array_equal(np.asarray(fj.dequantize(q))[:6], [6.0, 0.5, 0.0, 1.0, 0.5, 0.5])


def test_bottom_of_the_e8m0_range():
  """Scales 2**-127 and 2**-126 apply exactly although 2**-127 is a float32
  subnormal; float32 subnormal inputs count as zero."""
  x = np.zeros((2, 32), np.float32)
  x[0, :4] = [2.0**-126, 1.5 * 2.0**-126, 3 * 2.0**-126, 2.0**-130]
  x[1, :2] = [2.0**-124, 2.0**-126]
  q = fj.quantize(x, fj.MXFP4, scale_rule="floor")
  # floor exponents: -125 - 2 = -127 (byte 0) and -124 - 2 = -126 (byte 1)
  assert list(_bytes(q.scales)[:, 0]) == [0, 1]
  np.testing.assert_array_equal(_f64(q.values)[0, :4], [2.0, 3.0, 6.0, 0.0])
  out = np.asarray(fj.dequantize(q))
  np.testing.assert_array_equal(out[0, :4], np.array([2.0**-126, 1.5 * 2.0**-126, 3 * 2.0**-126, 0.0], np.float32))
  np.testing.assert_array_equal(out[1, :2], np.array([2.0**-124, 2.0**-126], np.float32))
  for rule in ("ceil", "mse"):
    _assert_matches_reference(x, fj.MXFP4, rule)


@pytest.mark.parametrize("fmt,rule", [(f, r) for f in ALL_FORMATS for r in ("floor", "ceil", "mse")],
                         ids=lambda c: str(c))
def test_top_of_float32_range_stays_finite(fmt, rule):
  """Near float32's maximum, rounding up (ceil, mse) would pass 2**128: the
  dequantized value saturates to float32's maximum instead of becoming Inf."""
  x = np.zeros((2, fmt.block_size), np.float32)
  x[0, :3] = [F32_MAX, -F32_MAX, 2.0**127]
  x[1, :2] = [1.5 * 2.0**127, 2.0**120]
  out = np.asarray(fj.dequantize(fj.quantize(x, fmt, scale_rule=rule)))
  assert np.isfinite(out).all()
  _assert_matches_reference(x, fmt, rule)
  if fmt.power_of_two_scales and rule == "floor":
    q = fj.quantize(x, fmt, scale_rule=rule)
    assert _bytes(q.scales)[0, 0] == 127 + 127 - fmt.elem_emax  # 2**(127 - emax), in range


@pytest.mark.parametrize("rule", ["floor", "ceil", "mse"])
def test_float16_output_saturates(rule):
  x = np.zeros(32, np.float16)
  x[:3] = [65504, -65504, 1.0]
  q = fj.quantize(x, fj.MXFP4, scale_rule=rule)
  out = np.asarray(fj.dequantize(q, jnp.float16))
  assert np.isfinite(out).all()
  assert out[0] <= 65504 and out[0] >= 49152
  _assert_matches_reference(x, fj.MXFP4, rule, dtype=np.float16)


# ---- properties --------------------------------------------------------------------
_PROPERTY_FORMATS = st.sampled_from(ALL_FORMATS)


@st.composite
def _representable(draw):
  """A (4, 2 blocks) float32 array whose every block is exactly codes * scale."""
  fmt = draw(_PROPERTY_FORMATS)
  b = fmt.block_size
  bits = fmt.elem_bits
  codes = np.array(draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=8 * b, max_size=8 * b)), np.uint8)
  if bits == 4:
    v = codes.astype(ml_dtypes.uint4).view(fmt.elem_dtype).astype(np.float64)
  else:
    v = codes.view(fmt.elem_dtype).astype(np.float64)
  v = np.where(np.isfinite(v), v, 0.0).reshape(8, b)
  if fmt.power_of_two_scales:
    e = np.array(draw(st.lists(st.integers(-100, 100), min_size=8, max_size=8)))
    s = np.ldexp(1.0, e)
  else:
    _, table = ref.scale_table(ref.SPECS["nvfp4"])
    s = table[np.array(draw(st.lists(st.integers(8, 126), min_size=8, max_size=8)))]
    v[:, 0] = 6.0  # pins the ideal scale to s itself (decode 1)
  return fmt, (v * s[:, None]).astype(np.float32).reshape(4, 2 * b)


@settings(max_examples=25)
@given(_representable(), st.sampled_from(["ceil", "mse"]))
def test_round_trip_is_exact_on_representable_values(case, rule):
  fmt, x = case
  kw = {"global_scale": 1.0} if fmt.has_global_scale else {}
  out = np.asarray(fj.dequantize(fj.quantize(x, fmt, scale_rule=rule, **kw)))
  np.testing.assert_array_equal(out, ref.flush_f32_subnormals(x))


@settings(max_examples=25)
@given(_PROPERTY_FORMATS,
       st.lists(st.floats(-(2.0**80), 2.0**80, width=32, allow_subnormal=False), min_size=64, max_size=64),
       st.integers(-40, 40))
def test_ceil_error_is_at_most_half_an_element_step(fmt, vals, shift):
  """With "ceil" nothing clips, and |x - dq| <= half the element spacing at
  |x| / s, times s (times the decode factor)."""
  x = (np.array(vals, np.float64).reshape(2, 32) * 2.0**shift).astype(np.float32)
  x = ref.flush_f32_subnormals(x)
  q = fj.quantize(x, fmt, scale_rule="ceil")
  dq = np.asarray(fj.dequantize(q)).astype(np.float64)
  spec = ref.SPECS[fmt.name]
  s = ref.decode_scale_bytes(_bytes(q.scales), spec).repeat(fmt.block_size, axis=-1)
  if fmt.has_global_scale:
    s = s * np.float64(np.float32(q.global_scale))
  assert (x[s == 0] == 0).all()  # only an all-zero block gets the zero scale
  y = np.abs(x.astype(np.float64)) / np.where(s > 0, s, 1.0)
  assert (y <= fmt.elem_max * (1 + 2.0**-20)).all()
  bound = ref.half_ulp(np.minimum(y, fmt.elem_max), spec) * s
  err = np.abs(x - dq)
  # float32 products below 2**-126 flush; NVFP4's reciprocal adds an ulp of float32.
  slack = 2.0**-126 + np.abs(x) * 2.0**-21 if fmt.has_global_scale else 2.0**-126
  assert (err <= bound + slack).all()


@settings(max_examples=8)
@given(st.sampled_from([((32, 3), 0), ((2, 40), -1), ((2, 96, 1), 1)]),
       _PROPERTY_FORMATS, st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]), st.integers(0, 2**31 - 1))
def test_shapes_and_dtypes(shape_axis, fmt, dtype, seed):
  shape, axis = shape_axis
  x = jax.random.normal(jax.random.key(seed), shape, dtype)
  q = fj.quantize(x, fmt, axis=axis, pad=True)
  n = -(-shape[axis] // fmt.block_size) * fmt.block_size
  padded = list(shape)
  padded[axis] = n
  chex.assert_shape(q.values, tuple(padded))
  chex.assert_type(q.values, fmt.elem_dtype)
  scale_shape = list(padded)
  scale_shape[axis] = n // fmt.block_size
  chex.assert_shape(q.scales, tuple(scale_shape))
  chex.assert_type(q.scales, fmt.scale_dtype)
  if fmt.has_global_scale:
    chex.assert_shape(q.global_scale, ())
    chex.assert_type(q.global_scale, jnp.float32)
  else:
    assert q.global_scale is None
  assert q.axis < 0 and q.axis % len(shape) == axis % len(shape)
  out = fj.dequantize(q, dtype)
  chex.assert_shape(out, tuple(padded))
  chex.assert_type(out, dtype)
  assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_a_bfloat16_computed_in_the_same_jit_is_quantized_as_stored(fmt):
  # XLA drops float32 -> bfloat16 -> float32 convert pairs inside one jit (excess precision): the
  # XLA path quantized the unrounded float32 of h = silu(x w1) * (x w3), a SwiGLU activation, on
  # the CPU (37 MXFP4 codes, 6746 NVFP4 ones here) and QAT cotangents on an H200. The codes, scales
  # and global scale of the in-program bfloat16 must be those of the stored array.
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (64, 256), jnp.bfloat16)
  w1 = jax.random.normal(k[1], (256, 256), jnp.bfloat16)
  w3 = jax.random.normal(k[2], (256, 256), jnp.bfloat16)

  def make(x, w1, w3):
    return jax.nn.silu(x @ w1) * (x @ w3)

  # One program returns the activation and its quantization (on a GPU two programs could round the
  # GEMMs' outputs differently); the stored activation is then quantized on its own.
  key = jax.random.key(1)
  for quant in (lambda v: fj.quantize(v, fmt, backend="xla"), lambda v: fj.stochastic_quantize(v, fmt, key)):
    stored, fused = jax.jit(lambda *a: (lambda h: (h, quant(h)))(make(*a)))(x, w1, w3)
    want = quant(stored)
    np.testing.assert_array_equal(np.asarray(fused.values).view(np.uint8), np.asarray(want.values).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(fused.scales).view(np.uint8), np.asarray(want.scales).view(np.uint8))
    if want.global_scale is not None:
      np.testing.assert_array_equal(np.asarray(fused.global_scale), np.asarray(want.global_scale))
  stored, fused = jax.jit(lambda *a: (lambda h: (h, fj.fake_quant(h, fmt)))(make(*a)))(x, w1, w3)
  np.testing.assert_array_equal(np.asarray(fused).view(np.uint16), np.asarray(fj.fake_quant(stored, fmt)).view(np.uint16))
