"""Every Pallas kernel lowers for an NVIDIA Hopper GPU, on a machine without one.

Interpret mode runs a kernel's jaxpr through XLA, so it never meets the Triton
lowering rules: the dequantize kernel passed all its interpret-mode tests and
failed on every GPU call (a bitcast of a numpy constant, which the Triton
lowering cannot take). Lowering with ``lowering_platforms=("cuda",)`` builds
each kernel's Triton IR here, so such crashes show up in CI. It does not run
ptxas or the kernel: bits are checked by the kernel tests and
``tests/test_cross_platform.py`` on a GPU.

Public JAX only. jax 0.10 lowers for "cuda" as is; jax 0.11 reads the GPU
model from the device it lowers for, which a CPU-only machine names through an
abstract mesh whose device is an H200 (``jax.sharding.AbstractDevice``).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax as fj
from fp4jax.kernels import dequantize as dqk
from fp4jax.kernels import fake_quant as fqk
from fp4jax.kernels import int8_rebase as ik
from fp4jax.kernels import mx_matmul as mxk
from fp4jax.kernels import quantize_pack as qk
from fp4jax.kernels import w4a16_matmul as wk

import bench_scripts

RULES = {"mxfp4": ("floor", "ceil", "mse"), "nvfp4": ("nearest", "floor", "ceil", "mse"),
         "mxfp8_e4m3": ("floor", "ceil", "mse"), "mxfp8_e5m2": ("floor", "ceil", "mse")}
FORMATS = [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2]
QUANT_CASES = [(f, r) for f in FORMATS for r in RULES[f.name]]


def _on_gpu_machine():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def _gpu_target():
  """A context in which lowering targets an H200, or a null context where none is needed
  (a machine with a GPU lowers for its own; jax 0.10 needs no device to lower for)."""
  if _on_gpu_machine() or not all(hasattr(jax.sharding, n)
                                  for n in ("AbstractDevice", "AbstractMesh", "use_abstract_mesh")):
    return contextlib.nullcontext()
  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=dev)
  return jax.sharding.use_abstract_mesh(mesh)


def _lower(f, *args):
  """The StableHLO text of ``f(*args)`` lowered for CUDA, with the Triton kernels inside."""
  try:
    with _gpu_target():
      lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  except RuntimeError as e:  # a jax that can neither lower for CUDA here nor be told the device
    if "No supported GPU devices found" in str(e):
      pytest.skip(f"jax {jax.__version__} cannot lower for CUDA without a GPU: {e}")
    raise
  text = lowered.as_text()
  assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text, "no Triton kernel in the lowering"
  return text


def _x(shape, dtype):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


# ---- quantize + pack, NVFP4's tensor amax ---------------------------------------------------
_LAYOUTS = [((6, 4), -1), ((2, 6), 0), ((3, 2, 4), 1)]  # in blocks along the block axis


def _shape(fmt, layout):
  shape, axis = layout
  shape = list(shape)
  shape[axis] *= fmt.block_size
  return tuple(shape), axis


@pytest.mark.parametrize("fmt,rule", QUANT_CASES, ids=[f"{f.name}-{r}" for f, r in QUANT_CASES])
@pytest.mark.parametrize("layout", _LAYOUTS, ids=["rows", "columns", "3d"])
def test_quantize_kernels_lower(fmt, rule, layout):
  shape, axis = _shape(fmt, layout)
  # One input dtype per layout keeps the test short; the loads differ only in the cast.
  dtype = {-1: jnp.bfloat16, 0: jnp.float32, 1: jnp.float16}[axis]
  x = _x(shape, dtype)
  _lower(lambda x: qk.quantize(x, fmt, axis=axis, scale_rule=rule), x)
  _lower(lambda x: qk.quantize_packed(x, fmt, axis=axis, scale_rule=rule), x)
  # Partial tiles on both axes (masked loads and stores), and the tiny tiles the kernel and fuzz
  # tests use (a tile one block deep, one row wide, or two columns wide).
  for cfg in (qk.Config(block_m=4, block_k=2 * fmt.block_size), qk.Config(block_m=2, block_k=fmt.block_size),
              qk.Config(block_m=1 if axis == -1 else 2, block_k=4 * fmt.block_size)):
    _lower(lambda x: qk.quantize_packed(x, fmt, axis=axis, scale_rule=rule, config=cfg), x)
    _lower(lambda x: qk.quantize(x, fmt, axis=axis, scale_rule=rule, config=cfg), x)
  if fmt.has_global_scale:
    _lower(lambda x, g: qk.quantize(x, fmt, axis=axis, scale_rule=rule, global_scale=g), x, jnp.float32(0.01))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: np.dtype(d).name)
def test_quantize_every_input_dtype_lowers(dtype):
  for fmt in (fj.MXFP4, fj.NVFP4):
    x = _x((8, 4 * fmt.block_size), dtype)
    _lower(lambda x: qk.quantize(x, fmt), x)


def test_tensor_amax_lowers():
  x = _x((5, 96), jnp.bfloat16)
  _lower(lambda x: qk.tensor_amax(x, fj.NVFP4, config=qk.Config(2, 32)), x)


# ---- dequantize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: np.dtype(d).name)
def test_dequantize_kernels_lower(fmt, dtype):
  for layout in _LAYOUTS:
    shape, axis = _shape(fmt, layout)
    q = fj.quantize(_x(shape, jnp.float32), fmt, axis=axis, backend="xla")
    # QArray input: 4-bit codes packed along the last axis (the 2-byte output
    # of a column layout takes the uint32-word path).
    _lower(lambda q: dqk.dequantize(q, dtype), q)
    codes, scales, gs = qk.quantize_packed_reference(_x(shape, jnp.float32), fmt, axis=axis)
    cfg = dqk.Config(block_m=4, block_k=2 * fmt.block_size)  # partial tiles
    _lower(lambda c, s, g: dqk.dequantize_packed(c, s, g, fmt=fmt, axis=axis, dtype=dtype, config=cfg),
           codes, scales, gs)


# ---- QAT fake quantization ---------------------------------------------------------------------
_FAKE = [(fj.MXFP4, "ceil"), (fj.MXFP4, "floor"), (fj.NVFP4, "nearest"), (fj.NVFP4, "ceil"), (fj.MXFP8_E4M3, "ceil"),
         (fj.MXFP8_E5M2, "floor")]


@pytest.mark.parametrize("fmt,rule", _FAKE, ids=[f"{f.name}-{r}" for f, r in _FAKE])
def test_fake_quant_kernel_lowers(fmt, rule):
  # Both block axes, stochastic (the in-kernel threefry) and nearest, bf16 and float32 inputs.
  for axis, dtype in ((1, jnp.bfloat16), (0, jnp.float32)):
    x = _x((256, 256), dtype)
    _lower(lambda x, k: fqk.fake_quantize_2d(x, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16),
           x, jax.random.key(0))
    _lower(lambda x: fqk.fake_quantize_2d(x, None, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16), x)
    if fmt.has_global_scale:  # the block factors computed in the kernel, not in XLA before it
      _lower(lambda x, k: fqk.fake_quantize_2d(x, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16,
                                               block_pass=False), x, jax.random.key(0))
    # The Hadamard transform in the kernel (reshapes into pairs and sums over them in Triton).
    _lower(lambda x, k: fqk.fake_quantize_2d(x, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, hadamard=16),
           x, jax.random.key(0))


@pytest.mark.parametrize("n", [2, 16, 32])
def test_transformed_amax_lowers(n):
  # NVFP4's tensor amax after the transform: along the lanes from the transformed lane planes (fewer, as many and
  # more lanes than the 16 of a partial maximum's cell), along the rows from row planes (2, 16), by pair splits (32).
  from fp4jax.hadamard import hadamard_signs
  from fp4jax.kernels.hadamard import transformed_amax

  signs = jnp.asarray(hadamard_signs(n, 1))
  for axis in (1, 0):
    _lower(lambda x: transformed_amax(x, axis, n, signs, tiles=((16, 256), (64, 128))), _x((256, 256), jnp.bfloat16))


# ---- matmuls -------------------------------------------------------------------------------------
def _bytes(fmt, rows, k):
  rng = np.random.default_rng(1)
  data = jnp.asarray(rng.integers(0, 256, (rows, k * fmt.elem_bits // 8), dtype=np.uint8))
  lo = 120 if fmt.power_of_two_scales else 0x30
  scales = jnp.asarray(rng.integers(lo, lo + 8, (rows, k // fmt.block_size), dtype=np.uint8))
  g = jnp.float32(0.5) if fmt.has_global_scale else None
  return data, scales, g


_W4A16 = [
    (wk.Config(), 1),
    (wk.Config(block_m=16, block_n=32, block_k=64, split_k=2), 5),
    (wk.Config(block_m=16, block_n=64, block_k=64, swap_ab=True), 20),
    (None, 200),  # the prefill default
    (None, 3),  # the decode default (the inline-PTX decode for 4-bit weights)
    (None, 50),  # the 64-row default (swap_ab, the bit decode, split K)
    (wk.Config(block_m=16, block_n=16, block_k=32, swap_ab=True, decode="bits"), 20),
]


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2], ids=lambda f: f.name)
def test_w4a16_matmul_lowers(fmt):
  k, n = 256, 96  # n: a partial tile for every block_n
  w_data, w_scales, g = _bytes(fmt, n, k)
  for cfg, m in _W4A16:
    x = _x((m, k), jnp.bfloat16)
    _lower(lambda x, d, s, g: wk.w4a16_matmul(x, d, s, g, fmt=fmt, config=cfg), x, w_data, w_scales, g)


_MX = [
    (fj.MXFP4, fj.MXFP4, "fp8"), (fj.MXFP8_E4M3, fj.MXFP8_E4M3, "fp8"), (fj.MXFP4, fj.MXFP8_E4M3, "fp8"),
    (fj.MXFP8_E5M2, fj.MXFP8_E5M2, "fp8"), (fj.MXFP4, fj.MXFP4, "bf16"), (fj.NVFP4, fj.NVFP4, "bf16"),
]


@pytest.mark.parametrize("a_fmt,b_fmt,mma", _MX, ids=[f"{a.name}x{b.name}-{m}" for a, b, m in _MX])
def test_mx_matmul_lowers(a_fmt, b_fmt, mma):
  k = 128
  for m, n, cfg in ((8, 48, mxk.Config(block_m=16, block_n=32, block_k=64, mma=mma, num_warps=4)),
                    (130, 256, mxk.Config(block_m=64, block_n=128, block_k=64, mma=mma))):
    a = _bytes(a_fmt, m, k)
    b = _bytes(b_fmt, n, k)
    _lower(lambda a, b: mxk.mx_matmul(*a, *b, a_fmt=a_fmt, b_fmt=b_fmt, config=cfg), a, b)


# ---- the int8 path's passes around XLA's int8 GEMM --------------------------------------------
@pytest.mark.parametrize("tiles", [ik.REBASE_TILES, ik.Tiles(1, 16), ik.Tiles(8, 64, 8)], ids=str)
def test_int8_passes_lower(tiles):
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.integers(0, 256, (16, 512), dtype=np.uint8))
  scales = jnp.asarray(rng.integers(118, 126, (16, 32), dtype=np.uint8))
  base = jnp.full((16,), 122, jnp.int32)
  text = _lower(lambda d, s, b: ik.rebase(d, s, b, tiles=tiles), data, scales, base)
  assert "prmt.b32" in text  # compiled, the pass takes PTX's byte permute, not its emulation
  sums = jnp.asarray(rng.integers(-2**20, 2**20, (16, 64), dtype=np.int32))
  e, clear = jnp.zeros((16,), jnp.int32), jnp.zeros((16,), bool)
  _lower(lambda s: ik.finish(s, e, e[:1].repeat(64), clear, clear[:1].repeat(64), out_dtype=jnp.bfloat16), sums)


@pytest.mark.parametrize("shape", [(64, 1024), (16, 14336)], ids=str)
def test_int8_quantize_lowers(shape):
  from fp4jax.kernels import int8_quantize as iq

  _lower(lambda x: iq.quantize_codes(x), jnp.zeros(shape, jnp.bfloat16))


# ---- the int8 GEMM with its finish as the epilogue (Mosaic GPU) ------------------------------
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_int8_gemm_lowers(out_dtype):
  from fp4jax.kernels import int8_gemm as gk

  a, b = jnp.zeros((256, 384), jnp.int8), jnp.zeros((512, 384), jnp.int8)
  ea, eb = jnp.zeros((256,), jnp.int32), jnp.zeros((512,), jnp.int32)
  with _gpu_target():
    text = jax.jit(lambda *x: gk.scaled_gemm(*x, out_dtype=out_dtype)).trace(
        a, b, ea, eb, ea == 1, eb == 1).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU kernel in the lowering"


@pytest.mark.parametrize("config", [dict(delay_release=1), dict(cluster="n"), dict(cluster="m", delay_release=1)],
                         ids=str)
def test_int8_gemm_lowers_with_the_tuning_options(config):
  # Kept for benchmarks/experiments/int8_gemm_mgpu.py; none was faster than the default on the H200.
  from fp4jax.kernels import int8_gemm as gk

  cfg = gk.Config(**config)
  a, b = jnp.zeros((512, 384), jnp.int8), jnp.zeros((1024, 384), jnp.int8)
  ea, eb = jnp.zeros((512,), jnp.int32), jnp.zeros((1024,), jnp.int32)
  with _gpu_target():
    text = jax.jit(lambda *x: gk.scaled_gemm(*x, out_dtype=jnp.bfloat16, config=cfg)).trace(
        a, b, ea, eb, ea == 1, eb == 1).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU kernel in the lowering"


def test_mxfp8_rescale_experiment_lowers_and_its_two_pass_baseline_is_exact():
  # benchmarks/experiments/mxfp8_rescale_mgpu.py (issue 15's MXFP8 x MXFP8 on the FP8 tensor cores) keeps lowering,
  # and the exact path it times against is the float64 product up to float32 summation.
  m8 = bench_scripts.load("experiments/mxfp8_rescale_mgpu")
  a, b, fa, fb = m8.make_inputs(256, 512, 512)
  for name in ("block_n64", "add_k128", "none_k128_sw128"):
    with _gpu_target():
      text = jax.jit(functools.partial(m8.mxfp8_gemm, config=m8.CONFIGS[name])).trace(a, b, fa, fb).lower(
          lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, name
  da = np.asarray(a, np.float64) * np.repeat(np.asarray(fa, np.float64).T, m8.BLOCK, axis=1)
  db = np.asarray(b, np.float64) * np.repeat(np.asarray(fb, np.float64).T, m8.BLOCK, axis=1)
  assert np.array_equal(np.asarray(m8.dequantized(a, fa), np.float64), da)  # bfloat16 holds E4M3 * 2**e
  got = np.asarray(m8.two_pass(a, b, fa, fb, jnp.float32), np.float64)
  bound = a.shape[1] * 2.0**-24 * (np.abs(da) @ np.abs(db).T)  # K terms summed in float32
  assert np.all(np.abs(got - da @ db.T) <= bound)


def test_int8_gemm_config_rejects_what_it_cannot_run():
  from fp4jax.kernels import int8_gemm as gk

  with pytest.raises(ValueError, match="cluster"):
    gk.Config(cluster="k")
  with pytest.raises(ValueError, match="delay_release"):
    gk.Config(delay_release=3, stages=3)
