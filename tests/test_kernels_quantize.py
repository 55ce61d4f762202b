"""The fused quantize + pack kernel against the jnp reference: on a GPU the real kernel, else Pallas interpret mode.

Every check is bit-exact: codes, scale bytes and NVFP4's global scale, over
random shapes, both block-axis layouts, every format and rule, float32 /
bfloat16 / float16 inputs, and blocks holding NaN, Inf, zeros, float32
subnormals and values near float32's maximum. The element rounding itself is
checked exhaustively against ml_dtypes' casts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4jax as fj
from fp4jax import backend, kernels
from fp4jax.kernels import common as C
from fp4jax.kernels import quantize_pack as qk
from fp4jax.packing import pack_fp4
from fp4jax.reference import quantize_reference

import reference as ref

# Interpret mode proves nothing about the compiled kernel: on a GPU these tests run the real one.
INTERPRET = not kernels.on_gpu()
RULES = {"mxfp4": ("floor", "ceil", "mse"), "nvfp4": ("nearest", "floor", "ceil", "mse"),
         "mxfp8_e4m3": ("floor", "ceil", "mse"), "mxfp8_e5m2": ("floor", "ceil", "mse")}
CASES = [(f, r) for f in (fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2) for r in RULES[f.name]]


def _bytes(a):
  """Integer view of any fp4jax array (float4 one code per element)."""
  a = jnp.asarray(a)
  if a.dtype == jnp.float4_e2m1fn:
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint4)).astype(np.uint8)
  return np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a)


def _data(rng, shape, dtype, specials=True):
  """Gaussian blocks of widely varying magnitude, with special values sprinkled in."""
  x = rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, shape[:-1] + (1,)))
  x = x.astype(np.float32)
  if specials:
    flat = x.reshape(-1)
    n = flat.size
    pick = lambda k: rng.choice(n, size=max(1, n // k), replace=False)
    flat[pick(97)] = np.nan
    flat[pick(131)] = np.inf
    flat[pick(131)] = -np.inf
    flat[pick(53)] = 0.0
    flat[pick(61)] = np.float32(3e-39) * rng.choice([-1, 1])  # float32 subnormals
    flat[pick(211)] = np.float32(3.3e38)
    if n >= 64:
      start = rng.integers(0, n - 32)
      flat[start:start + 32] = 0.0
  return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _reference(x, fmt, axis, rule, global_scale=None):
  return quantize_reference(x, global_scale, None, fmt=fmt, axis=axis % x.ndim - x.ndim, scale_rule=rule, pad=False)


def _assert_same(got, want):
  """Bit equality of values, scale bytes and NVFP4's global scale, for every rule ("mse" included:
  the reference sums its losses in the kernel's fixed order)."""
  if want.fmt.has_global_scale:
    assert np.asarray(got.global_scale).view(np.uint32) == np.asarray(want.global_scale).view(np.uint32)
  np.testing.assert_array_equal(_bytes(got.scales), _bytes(want.scales))
  np.testing.assert_array_equal(_bytes(got.values), _bytes(want.values))


# ---- the element / scale rounding, exhaustively ----------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float4_e2m1fn, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_round_to_grid_matches_ml_dtypes_on_every_float32_of_the_range(dtype):
  codec = C.ElemCodec.of(dtype)
  fi = ml_dtypes.finfo(dtype)
  # Every float32 bit pattern from below half the smallest subnormal up to the
  # maximum, mantissa step 2**7 (every pattern for E2M1): ties, near-ties, all binades.
  lo_exp = int(fi.minexp) - int(fi.nmant) - 2
  hi_exp = int(fi.maxexp)
  step = 1 if codec.nmant == 1 else 2**7
  mant = np.arange(0, 1 << 23, step, dtype=np.uint32)
  exps = np.arange(lo_exp + 127, hi_exp + 127, dtype=np.uint32)
  bits = ((exps[:, None] << 23) | mant[None, :]).reshape(-1)
  a = np.minimum(bits.view(np.float32), np.float32(fi.max))
  a = np.concatenate([a, np.float32([0.0, fi.max, fi.smallest_subnormal])])
  code, val = jax.jit(lambda t: C.round_to_grid(t, codec))(a)
  want = a.astype(dtype)
  np.testing.assert_array_equal(np.asarray(val), want.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(code), want.view(np.uint8) & ((1 << codec.sign_shift) - 1))


# ---- kernel vs reference ------------------------------------------------------------------
@pytest.mark.parametrize("fmt,rule", CASES, ids=[f"{f.name}-{r}" for f, r in CASES])
def test_kernel_matches_reference_rows_and_columns(fmt, rule):
  rng = np.random.default_rng(hash((fmt.name, rule)) % 2**32)
  b = fmt.block_size
  for shape, axis, dtype in (((6, 4 * b), -1, jnp.bfloat16), ((2 * b, 6), 0, jnp.float32), ((3, 2 * b, 4), 1, jnp.float16)):
    x = _data(rng, shape, dtype)
    q = qk.quantize(x, fmt, axis=axis, scale_rule=rule, interpret=INTERPRET)
    _assert_same(q, _reference(x, fmt, axis, rule))
    codes, scales, gs = qk.quantize_packed(x, fmt, axis=axis, scale_rule=rule, interpret=INTERPRET)
    want = _reference(x, fmt, axis, rule)
    want_codes = pack_fp4(want.values, axis=axis) if fmt.elem_bits == 4 else want.values
    np.testing.assert_array_equal(_bytes(codes), _bytes(want_codes))
    np.testing.assert_array_equal(_bytes(scales), _bytes(want.scales))


@settings(max_examples=8, deadline=None)
@given(
    case=st.sampled_from(CASES),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    rows=st.integers(1, 5),
    nblocks=st.integers(1, 5),
    cols=st.integers(1, 3),
    col_layout=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_matches_reference_random_shapes(case, dtype, rows, nblocks, cols, col_layout, seed):
  fmt, rule = case
  rng = np.random.default_rng(seed)
  k = nblocks * fmt.block_size
  shape, axis = ((k, 2 * cols), 0) if col_layout else ((rows, k), -1)
  x = _data(rng, shape, dtype)
  cfg = qk.Config(block_m=2, block_k=2 * fmt.block_size)  # partial tiles on both axes
  q = qk.quantize(x, fmt, axis=axis, scale_rule=rule, config=cfg, interpret=INTERPRET)
  _assert_same(q, _reference(x, fmt, axis, rule))


@pytest.mark.parametrize("name,gs", [("mxfp4", None), ("nvfp4", 1 / 2000)])
def test_mse_near_ties_choose_the_references_scale(name, gs):
  """Blocks whose two best scales have losses a few float32 ulps apart (ref.near_tie_blocks):
  there the choice depends on how each loss is rounded and summed, so the kernel must compute
  the reference's losses in the reference's order (a plain ``jnp.sum`` of ``r * r`` in the
  kernel picks the other scale in some of these)."""
  fmt = fj.get_format(name)
  blocks = ref.near_tie_blocks(np.random.default_rng(11), ref.SPECS[name], 2048,
                               None if gs is None else np.float32(gs))
  assert len(blocks) >= 40, len(blocks)
  x = jnp.asarray(blocks)
  g = None if gs is None else jnp.float32(gs)
  q = qk.quantize(x, fmt, scale_rule="mse", global_scale=g, interpret=INTERPRET)
  _assert_same(q, _reference(x, fmt, -1, "mse", g))


@pytest.mark.parametrize("rule", ["nearest", "mse"])
def test_nvfp4_given_global_scale_is_one_pass_and_exact(rule):
  rng = np.random.default_rng(7)
  x = _data(rng, (4, 64), jnp.bfloat16, specials=False)
  gs = jnp.float32(0.0123)
  q = qk.quantize(x, fj.NVFP4, scale_rule=rule, global_scale=gs, interpret=INTERPRET)
  _assert_same(q, _reference(x, fj.NVFP4, -1, rule, gs))
  assert float(q.global_scale) == float(gs)


def test_tensor_amax_skips_nonfinite_and_flushes_subnormals():
  x = np.full((4, 32), 0.5, np.float32)
  x[0, 3] = np.nan
  x[1, 5] = -7.0  # in the same block as an Inf: still counts
  x[1, 6] = np.inf
  got = qk.tensor_amax(jnp.asarray(x), fj.NVFP4, interpret=INTERPRET)
  assert float(got) == 7.0
  tiny = jnp.full((2, 16), 1e-39, jnp.float32)  # only subnormals: amax 0
  assert float(qk.tensor_amax(tiny, fj.NVFP4, interpret=INTERPRET)) == 0.0


def test_every_output_byte_is_written():
  # Elements within a factor 4 of their block max never round to code 0, and
  # the scales are far from byte 0: any byte the kernel leaves unwritten
  # (interpret mode fills outputs with 0) would show up as a zero.
  rng = np.random.default_rng(3)
  shape = (5, 96)
  mag = rng.uniform(1.0, 3.9, shape) * rng.choice([-1, 1], shape)
  x = jnp.asarray(mag.astype(np.float32))
  for axis, cfg in ((-1, qk.Config(2, 64)), (0, qk.Config(2, 32))):
    xx = x if axis == -1 else x.T
    codes, scales, _ = qk.quantize_packed(xx, fj.MXFP4, axis=axis, config=cfg, interpret=INTERPRET)
    assert np.all((_bytes(codes) & 0x0F) != 0) and np.all((_bytes(codes) & 0xF0) != 0)
    assert np.all(_bytes(scales) != 0)


# ---- the public dispatch ---------------------------------------------------------------------
def test_backend_pallas_in_interpret_mode_matches_xla():
  rng = np.random.default_rng(11)
  x = _data(rng, (4, 64), jnp.bfloat16)
  with kernels.interpret_mode():
    for fmt in (fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3):
      p = fj.quantize(x, fmt, backend="pallas")
      r = fj.quantize(x, fmt, backend="xla")
      np.testing.assert_array_equal(_bytes(p.values), _bytes(r.values))
      np.testing.assert_array_equal(_bytes(p.scales), _bytes(r.scales))
      assert p.axis == r.axis and p.fmt == r.fmt


def test_backend_pallas_without_gpu_or_interpret_raises():
  x = jnp.ones((2, 32), jnp.float32)
  if kernels.on_gpu():
    pytest.skip("this machine has a GPU: backend='pallas' runs the kernel")
  with pytest.raises(ValueError, match="GPU"):
    fj.quantize(x, fj.MXFP4, backend="pallas")


def test_auto_uses_xla_off_gpu_and_for_unsupported_cases(monkeypatch):
  calls = []
  monkeypatch.setattr(qk, "quantize", lambda *a, **k: calls.append(1))
  x = jnp.ones((2, 32), jnp.float32)
  fj.quantize(x, fj.MXFP4, backend="auto")
  if not kernels.on_gpu():
    assert not calls
  h = fj.block_hessians(jnp.ones((3, 32)), 32)
  q = fj.quantize(x.T, fj.MXFP4, axis=0, scale_rule="mse", hessian=h, backend="auto")
  assert q.scales.shape == (1, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scale_rule="mse", hessian="h"), "hessian"),
    (dict(pad=True, shape=(2, 40)), "pad"),
    (dict(axis=0, shape=(32, 3)), "odd last dimension"),
])
def test_backend_pallas_rejects_unsupported_cases(kwargs, match):
  shape = kwargs.pop("shape", (2, 32))
  x = jnp.ones(shape, jnp.float32)
  if kwargs.get("hessian") == "h":
    kwargs["hessian"] = fj.block_hessians(jnp.ones((3, 32)), 32)
  with kernels.interpret_mode(), pytest.raises(ValueError, match=match):
    fj.quantize(x, fj.MXFP4, backend="pallas", **kwargs)


def test_bad_inputs_raise_value_errors_naming_the_problem():
  with pytest.raises(ValueError, match="int32"):
    qk.quantize_packed(jnp.ones((2, 32), jnp.int32), fj.MXFP4, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"\(2, 40\).*axis"):
    qk.quantize_packed(jnp.ones((2, 40)), fj.MXFP4, interpret=INTERPRET)
  with pytest.raises(ValueError, match="power of 2"):
    qk.quantize_packed(jnp.ones((2, 64)), fj.MXFP4, config=qk.Config(3, 64), interpret=INTERPRET)
  with pytest.raises(ValueError, match="block size"):
    qk.quantize_packed(jnp.ones((2, 64)), fj.NVFP4, config=qk.Config(2, 8), interpret=INTERPRET)
  with pytest.raises(ValueError, match="nearest"):
    qk.quantize_packed(jnp.ones((2, 64)), fj.MXFP4, scale_rule="nearest", interpret=INTERPRET)


def _check_gpu_unverified_table():
  """Every entry of GPU_UNVERIFIED names a real case ("*": any) and says why."""
  ops, rules = {"quantize", "dequantize", "fake_quant"}, set(fj.SCALE_RULES)
  dtypes = {"float32", "bfloat16", "float16"}
  for (op, fmt, rule, dtype), why in backend.GPU_UNVERIFIED.items():
    assert op in ops and (fmt == "*" or fmt in fj.FORMATS), (op, fmt)
    assert (rule == "*" or rule in rules) and (dtype == "*" or dtype in dtypes), (rule, dtype)
    assert isinstance(why, str) and len(why) > 20


def test_auto_takes_only_gpu_verified_cases(monkeypatch):
  # Since the H200 runs recorded in benchmarks/results/gpu_tests.md every quantize, dequantize, matmul
  # and QAT fake-quantization case is verified (the last at ccc8a9b).
  assert backend.GPU_UNVERIFIED == {}
  assert backend.gpu_verified("quantize", fj.NVFP4, "mse", jnp.float32) and backend.gpu_verified("dequantize", fj.MXFP4)
  assert backend.gpu_verified("fake_quant", fj.MXFP4, "ceil", jnp.bfloat16)
  _check_gpu_unverified_table()
  # An entry ("*" matches anything) keeps its cases, and only those, off the kernels.
  monkeypatch.setitem(backend.GPU_UNVERIFIED, ("quantize", "nvfp4", "mse", "*"), "a case that a GPU run found inexact")
  monkeypatch.setitem(backend.GPU_UNVERIFIED, ("dequantize", "*", "*", "*"), "the dequantize kernel, not yet run on a GPU")
  _check_gpu_unverified_table()
  assert not backend.gpu_verified("quantize", fj.NVFP4, "mse", jnp.bfloat16)
  assert backend.gpu_verified("quantize", fj.NVFP4, "nearest", jnp.bfloat16)
  assert backend.gpu_verified("quantize", fj.MXFP4, "mse", jnp.float32)
  assert not backend.gpu_verified("dequantize", fj.MXFP8_E4M3)
  assert "not yet run" in backend.gpu_unverified_reason("dequantize", fj.MXFP4, None, jnp.float32)
  assert backend.gpu_unverified_reason("quantize", fj.MXFP4, "floor", jnp.float32) is None
  monkeypatch.setitem(backend.GPU_UNVERIFIED, ("quantize", "mxfp9", "*", "*"), "no such format, a typo to catch")
  with pytest.raises(AssertionError):
    _check_gpu_unverified_table()
