"""The fused QAT fake-quantization kernel against the XLA path, bit for bit, draws included.

On a GPU the compiled kernel runs, else Pallas interpret mode. The reference is
``fp4jax.qat.fake.fake_quantize_operand`` on the XLA path (for a leading block
axis: the transposed route of ``fp4jax.qat.dot._backward_operand``), whose
stochastic draws are ``jax.random.uniform``'s; the kernel hashes the flat index itself.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4jax as fj
from fp4jax import backend, kernels, qat
from fp4jax.kernels import fake_quant as fk
from fp4jax.qat import OperandConfig, QatConfig
from fp4jax.qat.dot import _backward_operand
from fp4jax.qat.fake import fake_quantize_operand
from kernel_operands import eqns_outside_kernels

INTERPRET = not kernels.on_gpu()
CASES = [(fj.MXFP4, "ceil"), (fj.MXFP4, "floor"), (fj.NVFP4, "nearest"), (fj.NVFP4, "ceil"),
         (fj.MXFP8_E4M3, "ceil"), (fj.MXFP8_E5M2, "floor")]


def inputs(shape, dtype, seed, specials=False):
  """Normal values spread over 40 binades by row (column for a short first axis)."""
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32) * jnp.exp2(jax.random.randint(ks, shape[:1] + (1,), -20, 20))
  if specials:  # a NaN, an Inf, an all-zero block and a float32 subnormal
    x = x.at[0, 3].set(jnp.nan).at[1, 40].set(jnp.inf).at[2, :32].set(0.0).at[3, 5].set(1e-40)
  return x.astype(dtype)


def xla_route(x, key, fmt, rule, axis, dtype=jnp.bfloat16):
  """What fp4jax.qat does with ``backend="xla"``: along axis 1 directly, along axis 0 transposed."""
  op = OperandConfig(fmt, rule, "stochastic" if key is not None else "nearest")
  if axis == 0:
    return jnp.moveaxis(fake_quantize_operand(jnp.moveaxis(x, 0, 1), op, 1, dtype, key), 1, 0)
  return fake_quantize_operand(x, op, 1, dtype, key)


def same_bits(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype
  nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
  bits = np.uint16 if a.dtype.itemsize == 2 else np.uint32
  return int(np.sum((a.view(bits) != b.view(bits)) & ~nan))


def _two_factor_stochastic_magnitudes(a, u, fmt):
  """The stochastic rounding with each power of two split into two normal factors (``_bits.scale_by_pow2``):
  right for any exponent, the form the library's one-multiply version must equal in its domain."""
  from fp4jax import _bits

  ulp_exp = jnp.maximum(_bits.floor_log2(_bits.f32_bits(a)), int(fmt.elem_finfo.minexp)) - fmt.elem_nmant
  t = _bits.scale_by_pow2(a, -ulp_exp)
  lo = jnp.floor(t)
  return _bits.scale_by_pow2(lo + (u < t - lo).astype(jnp.float32), ulp_exp)


@pytest.mark.parametrize("fmt", [fj.get_format(n) for n in fk.FORMATS], ids=lambda f: f.name)
def test_stochastic_magnitudes_one_multiply_equals_two_factors(fmt):
  # fp4jax.scales.stochastic_magnitudes (the kernel's and the XLA path's rounding) multiplies by one power of two
  # each way; bit for bit the two-factor form on its domain: every bfloat16 magnitude up to elem_max, float32
  # ones between them and below the normal range (subnormals, zero), each against uniforms at the edges (0, the
  # smallest, 1/2, the largest below 1) and random.
  from fp4jax.scales import stochastic_magnitudes

  bf16 = np.arange(0, 0x7F80, dtype=np.uint16).view(jnp.bfloat16).astype(np.float32)
  rng = np.random.default_rng(len(fmt.name))
  f32 = rng.uniform(0, fmt.elem_max, 4096).astype(np.float32)
  tiny = np.array([0.0, 1e-45, 2.0**-149 * 3, 2.0**-127, 2.0**-126, 2.0**-126 * 1.5], np.float32)
  a = np.concatenate([bf16[bf16 <= fmt.elem_max], f32, tiny, np.nextafter(np.float32(fmt.elem_max), 0)[None]])
  edges = np.array([0.0, 2.0**-23, 0.5, 1 - 2.0**-23], np.float32)
  for u in [np.full_like(a, e) for e in edges] + [rng.uniform(0, 1, a.shape).astype(np.float32)]:
    got = jax.jit(stochastic_magnitudes, static_argnums=2)(a, u, fmt)
    want = jax.jit(_two_factor_stochastic_magnitudes, static_argnums=2)(a, u, fmt)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


def test_in_kernel_uniforms_are_jax_random_uniform():
  for seed in (0, 7, 123456):
    key = jax.random.fold_in(jax.random.key(seed), 3)
    kd = jax.random.key_data(key).astype(jnp.uint32)
    idx = jnp.arange(1 << 14, dtype=jnp.uint32)
    np.testing.assert_array_equal(np.asarray(fk.uniform_from_index(kd[0], kd[1], idx)),
                                  np.asarray(jax.random.uniform(key, (1 << 14,), jnp.float32)))


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("fmt,rule", CASES, ids=[f"{f.name}-{r}" for f, r in CASES])
def test_kernel_equals_xla_route(fmt, rule, dtype, axis, stochastic):
  x = inputs((64, 512) if axis else (512, 64), dtype, seed=1, specials=True)
  key = jax.random.key(5) if stochastic else None
  want = xla_route(x, key, fmt, rule, axis)
  # NVFP4: the block factors from XLA (the default) and from the kernel itself.
  for block_pass in (True, False) if fmt.has_global_scale else (None,):
    got = fk.fake_quantize_2d(x, key, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=INTERPRET,
                              block_pass=block_pass)
    assert same_bits(got, want) == 0, block_pass
  if stochastic:  # control: the draws matter, so the equality above is not luck
    assert same_bits(xla_route(x, jax.random.key(6), fmt, rule, axis), want) > x.size // 20


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("fmt,rule", [(fj.MXFP4, "ceil"), (fj.MXFP8_E5M2, "floor"), (fj.NVFP4, "nearest")],
                         ids=["mxfp4", "mxfp8_e5m2", "nvfp4"])
def test_stochastic_passes_take_their_own_tile(fmt, rule, axis):
  # The drawing passes start from STOCHASTIC_TILE (8 warps on a GPU); the same bits.
  shape = (64, 512)
  assert fk.pick_tile(shape, fmt, axis, stochastic=True) == fk.STOCHASTIC_TILE[axis]
  assert fk.pick_tile((512, 64), fmt, 0, stochastic=True) == fk.pick_tile((512, 64), fmt, 0)  # 32 x 256 does not fit
  x = inputs(shape, jnp.bfloat16, seed=3, specials=True)
  key = jax.random.key(11)
  got = fk.fake_quantize_2d(x, key, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=INTERPRET)
  assert same_bits(got, xla_route(x, key, fmt, rule, axis)) == 0


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
def test_passes_transformed_along_the_lanes_take_their_own_tile(stochastic):
  # LANES_TRANSFORM_TILE first (8 warps on a GPU), along axis 1 only; the bits are the next test's (its
  # (64, 512) operands along axis 1 take this tile).
  shape = (64, 512)
  assert fk.pick_tile(shape, fj.NVFP4, 1, stochastic, hadamard=16) == fk.LANES_TRANSFORM_TILE
  assert fk.num_warps(1, stochastic, hadamard=16) == fk.LANES_TRANSFORM_WARPS
  assert fk.pick_tile(shape, fj.NVFP4, 1, stochastic) == (fk.STOCHASTIC_TILE[1] if stochastic else fk.TILES[1][0])
  assert fk.num_warps(1, stochastic) == fk.NUM_WARPS[1, stochastic]
  assert fk.pick_tile(shape[::-1], fj.NVFP4, 0, stochastic, hadamard=16) == fk.pick_tile(shape[::-1], fj.NVFP4, 0,
                                                                                         stochastic)
  assert fk.pick_tile((64, 128), fj.NVFP4, 1, stochastic, hadamard=16) == fk.pick_tile((64, 128), fj.NVFP4, 1)


@pytest.mark.parametrize("hadamard", [16, 32])
@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("fmt,rule", CASES, ids=[f"{f.name}-{r}" for f, r in CASES])
def test_kernel_with_hadamard_equals_transform_then_xla_route(fmt, rule, axis, stochastic, hadamard):
  # The transform in the kernel (fp4jax.hadamard's order of operations, Triton's formulation) against
  # qat.random_hadamard in XLA followed by the XLA route; a NaN, an Inf, zero and subnormal inputs included.
  shape = (64, 512) if axis else (512, 64)
  # Exponents spread per element over 24 binades, so the transform's sums round and their order shows.
  x = inputs(shape, jnp.float32, seed=6, specials=True) * jnp.exp2(jax.random.randint(jax.random.key(6), shape, -12, 12))
  x = (x if axis else x.at[:32, 2].set(0.0).at[40, 3].set(1e-40)).astype(jnp.bfloat16)
  key = jax.random.key(13) if stochastic else None
  want = xla_route(qat.random_hadamard(x, hadamard, axis=axis, seed=9), key, fmt, rule, axis)
  for block_pass in (True, False) if fmt.has_global_scale else (None,):
    got = fk.fake_quantize_2d(x, key, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=INTERPRET,
                              block_pass=block_pass, hadamard=hadamard, seed=9)
    assert same_bits(got, want) == 0, block_pass
  # Controls: another seed's signs, and no transform, give other values.
  assert same_bits(xla_route(qat.random_hadamard(x, hadamard, axis=axis, seed=10), key, fmt, rule, axis), want) > 0
  assert same_bits(xla_route(x.astype(jnp.float32), key, fmt, rule, axis), want) > x.size // 2


@pytest.mark.parametrize("hadamard", [2, 16, 32, 256])
@pytest.mark.parametrize("axis,planes_max", [(1, None), (1, 0), (0, None)], ids=["lanes", "lanes-split", "rows"])
def test_in_kernel_transform_is_fp4jax_hadamard_bit_for_bit(axis, planes_max, hadamard, monkeypatch):
  # The kernel's own transform (kernels.hadamard.read_tile) written out by a pallas_call on the kernel's tiles: equal to
  # fp4jax.hadamard.butterfly's bits. The quantization after it rarely shows a rounding of the transform's sums,
  # so this checks them where they land: exponents spread per element, subnormal sums, zeros of both signs.
  # Along the lanes on planes up to LANE_PLANES_MAX, else by pair splits; "lanes-split": always by pair splits.
  from jax.experimental import pallas as pl

  from fp4jax.kernels import hadamard as kh

  if planes_max is not None:
    monkeypatch.setattr(kh, "LANE_PLANES_MAX", planes_max)

  from fp4jax.hadamard import hadamard_signs
  from fp4jax.kernels import common as C
  from fp4jax.kernels.hadamard import read_tile

  rng = np.random.default_rng(hadamard)
  shape = (32, 512) if axis else (512, 32)
  x = (rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, shape))).astype(np.float32)
  x[:4, :4] = rng.uniform(1, 2, (4, 4)) * 2.0**-125 * rng.choice([-1, 1], (4, 4))
  x[4:8, :4], x[8:12, :4] = 0.0, -0.0
  signs = jnp.asarray(hadamard_signs(hadamard, 3))
  tile = (16, 512) if axis else (256, 32)

  def kernel(x_ref, s_ref, o_ref):
    o_ref[...] = read_tile(x_ref, s_ref, axis, hadamard)

  got = pl.pallas_call(kernel, grid=(shape[0] // tile[0], shape[1] // tile[1]),
                       in_specs=[pl.BlockSpec(tile, lambda i, j: (i, j)), pl.BlockSpec((hadamard,), lambda i, j: (0,))],
                       out_specs=pl.BlockSpec(tile, lambda i, j: (i, j)),
                       out_shape=jax.ShapeDtypeStruct(shape, jnp.float32), interpret=INTERPRET,
                       compiler_params=C.compiler_params(4, 2))(jnp.asarray(x), signs)
  want = qat.random_hadamard(jnp.asarray(x), hadamard, axis=axis, seed=3)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


def extreme_inputs(shape, seed):
  """float32 rows (columns for a short first axis) at the ends of E8M0's and float32's ranges: near float32's
  largest value, at 2**127 and 2**100, at float32's smallest normals and below (blocks scaled by 2**-127),
  subnormal inputs, alongside ordinary ones."""
  rng = np.random.default_rng(seed)
  ends = np.array([np.finfo(np.float32).max, 2.0**127, 2.0**100, 1.0, 2.0**-120, 2.0**-126, 2.0**-128, 2.0**-140])
  long_axis = 1 if shape[1] >= shape[0] else 0
  scale = np.resize(ends, shape[1 - long_axis])
  scale = scale[:, None] if long_axis == 1 else scale[None, :]
  return jnp.asarray((rng.uniform(-1, 1, shape) * scale).astype(np.float32))


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["to-bf16", "to-f32"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("fmt,rule", CASES, ids=[f"{f.name}-{r}" for f, r in CASES])
def test_kernel_equals_xla_route_at_the_ends_of_the_ranges(fmt, rule, axis, dtype, stochastic):
  # Saturation at the output dtype's largest value, results flushed below float32's normal range, scales
  # at 2**-127 and 2**127: the kernel's clip, flush and saturation against the XLA path's, both output dtypes.
  x = extreme_inputs((64, 512) if axis else (512, 64), seed=2)
  key = jax.random.key(8) if stochastic else None
  want = xla_route(x, key, fmt, rule, axis, dtype)
  got = fk.fake_quantize_2d(x, key, fmt=fmt, rule=rule, axis=axis, dtype=dtype, interpret=INTERPRET)
  assert same_bits(got, want) == 0
  w = np.asarray(want, np.float32)
  assert np.isinf(w).any() or np.abs(w).max() >= float(jnp.finfo(dtype).max) / 2  # the top end reached
  assert ((w == 0) & (np.asarray(x) != 0)).any()  # and the bottom end (flushed results)


def tiny_scale_inputs(shape, seed):
  """float32 rows near 2**-110, and blocks (rows 1.., the first 16 elements) whose E4M3 scale times NVFP4's global
  decode factor lands just above float32's smallest normal, holding elements at 1-1.6 x 2**-126: their decoded
  values fall below the normal range and must be flushed (on the CPU, XLA's arithmetic flushes them by itself;
  on a GPU only the kernel's explicit flush does)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * 2.0**-110
  for r in range(1, shape[0]):
    x[r, :16] = rng.uniform(1, 1.6, 16) * 2.0**-126 * rng.choice([-1, 1], 16)
    x[r, 0] = 2.0**-126 * rng.uniform(2, 16)
  return jnp.asarray(x.astype(np.float32))


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["to-bf16", "to-f32"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("rule", ["nearest", "ceil"])
def test_nvfp4_kernel_flushes_results_below_the_normal_range(rule, axis, dtype, stochastic):
  x = tiny_scale_inputs((64, 512), seed=4)
  x = x if axis == 1 else x.T
  key = jax.random.key(12) if stochastic else None
  want = xla_route(x, key, fj.NVFP4, rule, axis, dtype)
  got = fk.fake_quantize_2d(x, key, fmt=fj.NVFP4, rule=rule, axis=axis, dtype=dtype, interpret=INTERPRET)
  assert same_bits(got, want) == 0
  assert ((np.asarray(want, np.float32) == 0) & (np.asarray(x) != 0)).sum() > 1000  # the flushed values exist


@settings(max_examples=8)
@given(case=st.sampled_from(CASES), axis=st.sampled_from([0, 1]), tile=st.integers(0, 6),
       grid=st.tuples(st.integers(1, 2), st.integers(1, 2)), seed=st.integers(0, 2**31 - 1),
       stochastic=st.booleans(), f32=st.booleans(), block_pass=st.booleans())
def test_fuzz_kernel_equals_xla_route(case, axis, tile, grid, seed, stochastic, f32, block_pass):
  # Every tile the kernel may pick, one or two programs a side, keys and scales spread over binades.
  fmt, rule = case
  t = fk.TILES[axis][tile]
  if t[axis] % fmt.block_size:
    t = fk.TILES[axis][0]
  shape = (t[0] * grid[0], t[1] * grid[1])
  x = inputs(shape, jnp.float32 if f32 else jnp.bfloat16, seed)
  key = jax.random.key(seed) if stochastic else None
  got = fk.fake_quantize_2d(x, key, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=INTERPRET,
                            block_pass=block_pass)
  assert same_bits(got, xla_route(x, key, fmt, rule, axis)) == 0


def _loss(x, w, cfg, key):
  y = qat.quantized_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), config=cfg, key=key)
  return jnp.sum(y.astype(jnp.float32) ** 2)


def _assert_pallas_gradients_equal_xla(x, w, fmt, hadamard=None):
  """The gradients of ``_loss`` with ``backend="pallas"`` and ``"xla"``: the same bits, and at least six
  kernel calls in the pallas program (2 forward operands, 2 x 2 backward ones)."""
  cfg = QatConfig.uniform(fmt, hadamard=hadamard)
  grad = jax.jit(jax.grad(_loss, (0, 1)), static_argnums=2)
  want = grad(x, w, cfg, jax.random.key(3))
  with kernels.interpret_mode(INTERPRET):
    pallas = dataclasses.replace(cfg, backend="pallas")
    text = grad.trace(x, w, pallas, jax.random.key(3)).jaxpr.pretty_print()
    got = grad(x, w, pallas, jax.random.key(3))
  assert text.count("pallas_call") >= 6
  for g, h in zip(got, want):
    assert same_bits(g, h) == 0


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_qat_backend_pallas_gradients_equal_xla(fmt):
  # Forward operands (nearest), the gradient (stochastic) along d and the weight gradient's
  # operands along the tokens (axis 0, read in place): all through the kernel, same bits.
  _assert_pallas_gradients_equal_xla(jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16),
                                     jax.random.normal(jax.random.key(2), (256, 128), jnp.bfloat16), fmt)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_qat_backend_pallas_on_3d_activations(fmt):
  # (batch, tokens, d) activations, as in a Flax model: the forward operand is blocked along its last
  # axis, the weight gradient's along the tokens (axes 0 and 1, moved last): 2-D views of the kernel.
  _assert_pallas_gradients_equal_xla(jax.random.normal(jax.random.key(1), (2, 32, 256), jnp.bfloat16),
                                     jax.random.normal(jax.random.key(2), (256, 128), jnp.bfloat16), fmt)


def test_qat_backend_xla_and_unverified_auto_stay_on_xla(monkeypatch):
  # "xla" never takes the kernel; "auto" not while GPU_UNVERIFIED holds an entry for it.
  monkeypatch.setitem(backend.GPU_UNVERIFIED, ("fake_quant", "*", "*", "*"), "a case a GPU run found inexact")
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  x = jnp.ones((64, 256), jnp.bfloat16)
  w = jnp.ones((256, 128), jnp.bfloat16)
  with kernels.interpret_mode():
    for name in ("xla", "auto"):
      cfg = QatConfig.uniform("mxfp4", backend=name)
      text = jax.jit(jax.grad(_loss, (0, 1)), static_argnums=2).trace(x, w, cfg, jax.random.key(3)).jaxpr.pretty_print()
      assert "pallas_call" not in text, name


def test_qat_backend_auto_takes_the_kernel_for_auto_formats(monkeypatch):
  # What "auto" does on a GPU once the GPU suite has verified the kernel (no GPU_UNVERIFIED entry):
  # the kernel for the formats measured faster (MXFP4, NVFP4), the XLA ops for the others.
  monkeypatch.delitem(backend.GPU_UNVERIFIED, ("fake_quant", "*", "*", "*"), raising=False)
  monkeypatch.setattr(kernels, "on_gpu", lambda: True)
  x = jnp.ones((64, 256), jnp.bfloat16)
  w = jnp.ones((256, 128), jnp.bfloat16)
  with kernels.interpret_mode():
    for fmt, taken in (("mxfp4", True), ("nvfp4", True), ("mxfp8_e4m3", False)):
      cfg = QatConfig.uniform(fmt, backend="auto")
      text = jax.jit(jax.grad(_loss, (0, 1)), static_argnums=2).trace(x, w, cfg, jax.random.key(3)).jaxpr.pretty_print()
      assert ("pallas_call" in text) == taken, fmt


def test_qat_backend_pallas_names_why_it_cannot_run():
  with kernels.interpret_mode():
    cfg = QatConfig.uniform("mxfp4", backend="pallas")
    with pytest.raises(ValueError, match="3-D operand blocked along its axis 1"):
      dims = (((1,), (0,)), ((), ()))
      qat.quantized_dot_general(jnp.ones((2, 256, 64), jnp.bfloat16), jnp.ones((256, 128), jnp.bfloat16), dims,
                                config=cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match="float16"):
      _loss(jnp.ones((64, 256), jnp.float16), jnp.ones((256, 128), jnp.float16), cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="does not tile"):
      _loss(jnp.ones((8, 256), jnp.bfloat16), jnp.ones((256, 128), jnp.bfloat16), cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="unknown backend"):
    QatConfig(backend="triton")


def test_supported_reasons():
  assert fk.supported((64, 256), jnp.bfloat16, fj.MXFP4, 1, "ceil", True) is None
  assert fk.supported((64, 256), jnp.bfloat16, fj.NVFP4, 0, "nearest", True, hadamard=64) is None
  assert "1024-point Hadamard" in fk.supported((64, 1024), jnp.bfloat16, fj.NVFP4, 1, "nearest", True, hadamard=1024)
  assert fk.supported((64, 256), jnp.bfloat16, fj.MXFP8_E4M3, 1, "ceil", True) is None
  assert "mxint8" in fk.supported((64, 256), jnp.bfloat16, fj.MXINT8, 1, "ceil", False)
  assert "'nearest'" in fk.supported((64, 256), jnp.bfloat16, fj.MXFP4, 1, "nearest", False)
  assert "mse" in fk.supported((64, 256), jnp.bfloat16, fj.NVFP4, 1, "mse", False)
  rbg = jax.random.key(0, impl="rbg")
  assert "rbg" in backend.fake_quant_obstacle(jnp.ones((64, 256)), fj.MXFP4, 1, "ceil", rbg)
  assert "axis_name" in backend.fake_quant_obstacle(jnp.ones((64, 256)), fj.MXFP4, 1, "ceil", None, axis_name="x")
  with jax.threefry_partitionable(False):
    assert "partitionable" in fk.supported((64, 256), jnp.bfloat16, fj.MXFP4, 1, "ceil", True)
    assert fk.supported((64, 256), jnp.bfloat16, fj.MXFP4, 1, "ceil", False) is None


def test_leading_axis_in_place_equals_the_transposed_route():
  # _backward_operand with backend="pallas" reads a leading block axis in place.
  op = OperandConfig(fj.MXFP4, "ceil", "stochastic")
  x = inputs((256, 128), jnp.bfloat16, seed=4)
  key = jax.random.key(9)
  want = _backward_operand(x, 0, op, QatConfig(grad=op), key, jnp.bfloat16, 32)
  with kernels.interpret_mode(INTERPRET):
    cfg = QatConfig(grad=op, backend="pallas")
    text = jax.jit(lambda v: _backward_operand(v, 0, op, cfg, key, jnp.bfloat16, 32)).trace(x).jaxpr.pretty_print()
    got = _backward_operand(x, 0, op, cfg, key, jnp.bfloat16, 32)
  assert "pallas_call" in text and "transpose" not in text
  assert same_bits(got, want) == 0


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4], ids=lambda f: f.name)
@pytest.mark.parametrize("axis", [0, 1])
def test_backward_operand_with_hadamard_takes_the_kernel_in_place(fmt, axis):
  # QatConfig(hadamard=16, backend="pallas"): the backward operand's transform and quantization in one kernel
  # call, with no transpose and no XLA transform, equal to the XLA route (transpose, transform, quantize).
  op = OperandConfig(fmt, "ceil" if fmt.power_of_two_scales else "nearest", "stochastic")
  x = inputs((256, 128), jnp.bfloat16, seed=5)
  key = jax.random.key(10)
  want = _backward_operand(x, axis, op, QatConfig(grad=op, hadamard=16, seed=4), key, jnp.bfloat16, 32)
  with kernels.interpret_mode(INTERPRET):
    cfg = QatConfig(grad=op, hadamard=16, seed=4, backend="pallas")
    run = jax.jit(lambda v: _backward_operand(v, axis, op, cfg, key, jnp.bfloat16, 32))
    outside = [eqn.primitive.name for eqn in eqns_outside_kernels(run.trace(x).jaxpr.jaxpr)]
    got = run(x)
  # NVFP4: one more pass, the tensor amax of the transformed values (kernels.hadamard.transformed_amax).
  assert outside.count("pallas_call") == (2 if fmt.has_global_scale else 1)
  assert "transpose" not in outside and "dot_general" not in outside  # (a kernel may transpose its tile)
  assert same_bits(got, want) == 0


def test_hadamard_larger_than_the_tile_transforms_in_xla_first():
  # A 1024-point transform fits none of the kernel's tiles: XLA transforms, the kernel quantizes the result.
  op = OperandConfig(fj.MXFP4, "ceil", "stochastic")
  x = inputs((64, 1024), jnp.bfloat16, seed=6)
  key = jax.random.key(11)
  want = _backward_operand(x, 1, op, QatConfig(grad=op, hadamard=1024), key, jnp.bfloat16, 1024)
  with kernels.interpret_mode(INTERPRET):
    cfg = QatConfig(grad=op, hadamard=1024, backend="pallas")
    run = jax.jit(lambda v: _backward_operand(v, 1, op, cfg, key, jnp.bfloat16, 1024))
    text = run.trace(x).jaxpr.pretty_print()
    got = run(x)
  assert text.count("pallas_call") == 1
  assert same_bits(got, want) == 0


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_qat_backend_pallas_gradients_with_hadamard_equal_xla(fmt):
  # The whole QAT product with a 16-point transform on the backward operands: same gradients, bit for bit.
  _assert_pallas_gradients_equal_xla(jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16),
                                     jax.random.normal(jax.random.key(2), (256, 128), jnp.bfloat16), fmt, hadamard=16)


@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("n", [2, 16, 32])  # along the lanes: fewer, as many, more lanes than a cell of 16
def test_transformed_amax_is_the_finite_amax_of_the_transform(axis, n):
  # NVFP4's tensor amax of a transformed operand, from its own Pallas pass: NaN and Inf groups left out, the
  # largest finite magnitude anywhere (here one planted in the last tile), subnormal results flushed.
  from fp4jax.hadamard import hadamard_signs
  from fp4jax.kernels.hadamard import transformed_amax
  from fp4jax.reference import finite_amax

  shape = (64, 512) if axis else (512, 64)
  x = inputs(shape, jnp.bfloat16, seed=7, specials=True)
  x = x.at[-1, -1].set(2.0**100) if axis else x.T.at[-1, -1].set(2.0**100).T
  signs = jnp.asarray(hadamard_signs(n, 3))
  got = transformed_amax(x, axis, n, signs, tiles=fk.TILES[axis], interpret=INTERPRET)
  want = finite_amax(qat.random_hadamard(x, n, axis=axis, seed=3))
  assert np.asarray(got).view(np.uint32) == np.asarray(want).view(np.uint32)
  assert float(want) >= 2.0**99 / np.sqrt(n)  # the planted value, spread over its group of n
  # One 2**-126 per group of n: every output is +-2**-126 / sqrt(n), below the normal range, so flushed: amax 0 (on a
  # GPU only the explicit flushes give that; the CPU's arithmetic flushes by itself).
  tiny = jnp.zeros(shape, jnp.float32)
  tiny = tiny.at[:, ::n].set(2.0**-126) if axis else tiny.at[::n, :].set(2.0**-126)
  assert float(finite_amax(qat.random_hadamard(tiny, n, axis=axis, seed=3))) == 0.0
  assert float(transformed_amax(tiny, axis, n, signs, tiles=fk.TILES[axis], interpret=INTERPRET)) == 0.0
  with pytest.raises(ValueError, match="whole 1024-point groups"):
    transformed_amax(x, axis, 1024, jnp.ones(1024), tiles=fk.TILES[axis], interpret=INTERPRET)


@pytest.mark.parametrize("axis", [1, 0])
def test_transformed_amax_fast_path_is_the_flushed_transforms_amax(axis):
  # float32 operands with no magnitude below 2**-102 take the amax kernel's fast path (the butterfly's sums alone,
  # the cells' maxima scaled and flushed); one tile with a 2**-120 takes the exact path. Magnitudes from 2**-102 up
  # with runs that cancel to the last bit: the sums' low bits are those the flushes would have cut if any were
  # subnormal. (The CPU flushes subnormals in its own arithmetic: the GPU run is the one that tells.)
  from fp4jax.hadamard import hadamard_signs
  from fp4jax.kernels.hadamard import transformed_amax
  from fp4jax.reference import finite_amax

  rng = np.random.default_rng(5)
  shape = (64, 512)
  mags = np.ldexp(rng.uniform(1, 2, shape), rng.integers(-102, -96, shape)).astype(np.float32)
  x = np.where(rng.random(shape) < 0.5, -mags, mags)
  x[:, 1::4] = -x[:, 0::4] + np.float32(2.0**-125) * rng.integers(-2, 3, (64, 128))  # near-cancelling neighbours
  x[::7, 2::16] = 0.0
  want_fast = None
  signs = jnp.asarray(hadamard_signs(16, 3))
  for tiny in (False, True):
    if tiny:
      x[0, 0] = np.float32(2.0**-120)
    assert np.any((x != 0) & (np.abs(x) < 2.0**-102)) == tiny
    v = jnp.asarray(x if axis else x.T)
    got = transformed_amax(v, axis, 16, signs, tiles=fk.TILES[axis], interpret=INTERPRET)
    want = finite_amax(qat.random_hadamard(v, 16, axis=axis, seed=3))
    assert np.asarray(got).view(np.uint32) == np.asarray(want).view(np.uint32)
    want_fast = want if want_fast is None else want_fast
  assert 2.0**-105 < float(want_fast) < 2.0**-90


def _np_butterfly_16(x, signs, flush: bool):
  """fp4jax.hadamard.butterfly of one run of 16 in numpy float32 (IEEE subnormals, no flush of its own), with or
  without the flushes; without them, no final scale either (the amax kernel's fast path)."""
  tiny = np.float32(2.0**-126)
  f = (lambda v: np.where(np.abs(v) < tiny, np.float32(0), v)) if flush else (lambda v: v)
  v = f(x * signs)
  h = 1
  while h < 16:
    w = v.copy()
    for i in range(16):
      if not i & h:
        w[i], w[i + h] = f(v[i] + v[i + h]), f(v[i] - v[i + h])
    v, h = w, 2 * h
  return f(v * np.float32(0.25)) if flush else v


@settings(max_examples=300, deadline=None)
@given(exps=st.lists(st.integers(-102, -90), min_size=16, max_size=16),
       mants=st.lists(st.integers(0, 2**23 - 1), min_size=16, max_size=16),
       kinds=st.lists(st.sampled_from(["value", "zero", "negated_neighbour"]), min_size=16, max_size=16),
       seed=st.integers(0, 2**16))
def test_amax_fast_path_condition_holds_in_ieee_float32(exps, mants, kinds, seed):
  # The fast path's argument, against numpy's float32: inputs all 0 or at least 2**-102 in magnitude give the
  # flushed butterfly's amax from the unflushed sums' maximum, scaled and flushed once.
  from fp4jax.hadamard import hadamard_signs

  x = np.array([np.ldexp(np.float32(1 + m / 2**23), e) for m, e in zip(mants, exps)], np.float32)
  for i, k in enumerate(kinds):
    x[i] = 0.0 if k == "zero" else -x[i - 1] if k == "negated_neighbour" and i else x[i]
  signs = np.asarray(hadamard_signs(16, seed % 7), np.float32)
  exact = np.max(np.abs(_np_butterfly_16(x, signs, flush=True)))
  top = np.float32(np.max(np.abs(_np_butterfly_16(x, signs, flush=False))) * np.float32(0.25))
  assert np.asarray(exact).view(np.uint32) == np.asarray(top if top >= 2.0**-126 else np.float32(0)).view(np.uint32)


def test_amax_fast_path_needs_its_condition():
  # Without the condition the shortcut is wrong: a subnormal input (2**-130, flushed by the butterfly's first
  # step) meets sums fine enough to keep it (2**-110, 2**-116, 2**-121), so the unflushed maximum is off in its
  # last bits.
  x = np.zeros(16, np.float32)
  x[[0, 1, 2, 12]] = -(2.0**-130), -(2.0**-116), 2.0**-110, 2.0**-121
  signs = np.ones(16, np.float32)
  exact = np.max(np.abs(_np_butterfly_16(x, signs, flush=True)))
  top = np.max(np.abs(_np_butterfly_16(x, signs, flush=False))) * np.float32(0.25)
  assert exact != top
