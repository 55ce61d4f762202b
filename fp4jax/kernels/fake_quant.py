"""QAT fake quantization of a 2-D operand in one pass: block scale, rounding, dequantize.

For the kernels' formats (``fp4jax.FORMATS``: MXFP4, NVFP4, MXFP8 E4M3 / E5M2).

``fp4jax.qat`` fake-quantizes every GEMM operand: quantize (block scales, nearest
or stochastic element rounding) then dequantize back to the compute dtype. On
the XLA path that is several passes and, with stochastic rounding, a threefry
hash per element that XLA fuses badly (H200: 240 us against XLA's 353 for an
8192 x 4096 MXFP4 operand, benchmarks/results/qat_fused_sr.json). This kernel
reads each tile once and writes the dequantized values:

* the block scales of ``kernels/quantize_pack.py`` (its rules, its arithmetic);
* nearest-even rounding, or ``fp4jax.scales.stochastic_magnitudes`` with a
  uniform it draws itself: jax's partitionable threefry2x32 of the element's
  flat index in the array blocked along its last axis, so the draws are the
  ones ``jax.random.uniform(key, blocked_shape)`` makes on the XLA path;
* the scaling of ``kernels/dequantize.py``.

With ``hadamard=n`` it quantizes ``fp4jax.qat.random_hadamard(x, n)`` instead, each tile transformed
in the kernel (``kernels/hadamard.py``), so a QAT backward operand with the transform is still one
pass over the operand (NVFP4: two, the first for the transformed tensor amax).

It equals ``fp4jax.qat.fake.fake_quantize_operand`` on the XLA path bit for bit,
draws included (tests/test_kernels_fake_quant.py). A block axis 0 is read in
place and drawn with the transposed index: the XLA path's
``fp4jax.qat.dot._backward_operand`` moves that axis last first. Under ``jit``
with sharded operands each device runs the kernel on its shard
(``custom_partitioning``), drawing with the whole array's index
(tests/test_kernels_fake_quant_sharded.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from fp4jax import _bits
from fp4jax.formats import FORMATS, Format
from fp4jax.hadamard import butterfly, check_size, hadamard_signs
from fp4jax.kernels import common as C
from fp4jax.kernels.hadamard import read_tile, transformed_amax
from fp4jax.kernels.quantize_pack import (block_amax_bits, e4m3_encode_factor, e4m3_scale_code, flush_amax_bits,
                                         pow2_rule_exponent)
from fp4jax.reference import finite_amax, global_factors
from fp4jax.scales import global_encode_numerator, stochastic_magnitudes

__all__ = ["supported", "fake_quantize_2d", "pick_tile", "uniform_from_index"]

#: (rows, columns) a program reads, by block axis, in order of preference: the first that
#: tiles the array runs. The first ones are the fastest measured on the H200
#: (benchmarks/results/qat_fused_sr.json: 64 x 128 along axis 0 is 2x faster than 256 x 32).
TILES = {1: ((32, 256), (16, 512), (64, 128), (16, 256), (16, 128), (16, 64), (16, 32)),
         0: ((64, 128), (128, 64), (256, 32), (64, 64), (32, 64), (32, 32), (16, 32))}
#: Where NVFP4's block scales and encode factors come from when ``fake_quantize_2d`` is not told,
#: by block axis: True, one XLA pass before the kernel; False, the kernel itself (the factors through
#: a table of the 127 E4M3 codes). H200 (benchmarks/experiments/README.md): the table is 40 us
#: faster an 8192 x 4096 operand along axis 1, 54 us slower with stochastic rounding along axis 0;
#: the NVFP4 QAT step of benchmarks/qat_step.py with both axes in the kernel 0.85 ms slower, with axis 1
#: alone 0.44 ms faster (14.16 against 14.60 ms, benchmarks/results/qat_fused_sr_step_axis1.json); with the
#: 8-warp stochastic tiles, both axes 14.26 ms against 13.95-14.10 (results/qat_fused_sr_step_inkernel.json).
E4M3_BLOCK_PASS = {0: True, 1: False}
#: Triton warps a program by (block axis, whether the pass draws), and the drawing passes' first-choice tile by
#: block axis (then :data:`TILES`). The threefry hash makes them compute-bound; H200, an 8192 x 14336 operand
#: (benchmarks/experiments/fake_quant_lean.py, results/fake_quant_lean.json): MXFP4 along axis 0 524 us at
#: 32 x 256 with 8 warps, 668 us at 64 x 128 with 4 (the best of 7 tiles x 4, 8 warps), along axis 1 491 us with
#: 8 warps, 645 with 4; NVFP4 along axis 0 791 us against 965, along axis 1 668 against 800. Passes rounding to
#: nearest keep 4 warps.
NUM_WARPS = {(0, False): 4, (1, False): 4, (0, True): 8, (1, True): 8}
STOCHASTIC_TILE = {0: (32, 256), 1: (32, 256)}
#: Passes that transform along the lanes (axis 1) take this tile first, with 8 warps, drawing or not: the
#: butterfly's pair splits along the lanes favour smaller tiles and more warps. H200, the NVFP4 + RHT16 step's
#: two such operands (benchmarks/results/rht_tiles.json): the output gradient (8192, 4096), stochastic, 329 us
#: against 360 at 32 x 256; W2 (14336, 4096), nearest, 378 against 452 at 32 x 256 with 4 warps (measured with
#: the transform by pair splits along the lanes, before ``kernels.hadamard.lane_planes``).
LANES_TRANSFORM_TILE, LANES_TRANSFORM_WARPS = (16, 256), 8
_RULES = ("floor", "ceil", "nearest")
_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Python ints: a bitcast of a numpy constant inside the kernel does not lower for Triton.
_F32_MIN_NORMAL_BITS, _F32_MAX_BITS, _F32_NAN_BITS = 0x00800000, 0x7F7FFFFF, 0x7FC00000


def _rotl(v, r: int):
  return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def _threefry2x32(k1, k2, x0, x1):
  """The Threefry-2x32 block (20 rounds) of jax.random's default PRNG, on uint32 arrays."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def uniform_from_index(k1, k2, idx):
  """``jax.random.uniform(key, shape).ravel()[idx]`` for uint32 flat indices ``idx < 2**32``.

  ``k1, k2``: the key's two uint32 words. Partitionable threefry (jax's default):
  element ``i`` hashes the counter ``(0, i)``; its two output words, xor-ed, give
  the 23 mantissa bits of a float in [1, 2), less 1.
  """
  b0, b1 = _threefry2x32(k1, k2, jnp.zeros_like(idx), idx)
  bits = (b0 ^ b1) >> np.uint32(9) | np.uint32(0x3F800000)
  return lax.bitcast_convert_type(bits, jnp.float32) - np.float32(1.0)


def _fits(tile, shape, fmt: Format, axis: int, hadamard: int = 0) -> bool:
  """Whether ``tile`` divides ``shape`` and holds whole blocks (and whole ``hadamard`` groups) along ``axis``."""
  return C.tile_fits(tile, shape, axis, math.lcm(fmt.block_size, hadamard or 1))


def _tiles(axis: int, stochastic: bool, hadamard: int) -> tuple:
  """A pass's tiles in order of preference: :data:`TILES`, after :data:`LANES_TRANSFORM_TILE` for a transform
  along axis 1, else after :data:`STOCHASTIC_TILE`'s for a ``stochastic`` pass."""
  first = (LANES_TRANSFORM_TILE,) if hadamard and axis == 1 else (STOCHASTIC_TILE[axis],) if stochastic else ()
  return first + TILES[axis]


def pick_tile(shape, fmt: Format, axis: int, stochastic: bool = False, hadamard: int = 0):
  """The first of :func:`_tiles` that divides ``shape`` (whole blocks and ``hadamard`` groups along ``axis``),
  or None."""
  return next((tile for tile in _tiles(axis, stochastic, hadamard) if _fits(tile, shape, fmt, axis, hadamard)), None)


def num_warps(axis: int, stochastic: bool, hadamard: int = 0) -> int:
  """Triton warps a program of the pass: :data:`LANES_TRANSFORM_WARPS` with a transform along axis 1, else
  :data:`NUM_WARPS`'s."""
  return LANES_TRANSFORM_WARPS if hadamard and axis == 1 else NUM_WARPS[axis, stochastic]


def supported(shape, dtype, fmt: Format, axis: int, rule: str, stochastic: bool, hadamard: int = 0) -> str | None:
  """None if the kernel takes the case (``hadamard``: the size of the transform applied first, 0 for none),
  else why not."""
  if fmt.name not in FORMATS:
    return f"the fused fake-quantization kernel takes {tuple(FORMATS)}, not {fmt.name}"
  if np.dtype(dtype) not in _DTYPES:
    return f"input dtype {np.dtype(dtype)} (the fused fake-quantization kernel takes float32 or bfloat16)"
  if rule not in _RULES or (rule == "nearest" and fmt.power_of_two_scales):
    return f"scale_rule {rule!r} with {fmt.name}"
  if len(shape) != 2:
    return f"a {len(shape)}-D operand (the fused fake-quantization kernel takes 2-D ones)"
  if pick_tile(shape, fmt, axis, hadamard=hadamard) is None:
    whole = f"blocks and whole {hadamard}-point Hadamard groups" if hadamard else "blocks"
    return f"shape {tuple(shape)} does not tile by any of {TILES[axis]} with whole {whole} along axis {axis}"
  if np.prod(shape, dtype=np.int64) >= 2**32:
    return f"shape {tuple(shape)} has 2**32 elements or more (the draws' index is 32-bit)"
  if stochastic and not jax.config.jax_threefry_partitionable:
    return "jax_threefry_partitionable is off: the kernel draws as the partitionable threefry does"
  return None


def _uniforms(key_ref, off_ref, *, axis: int, shape, tile, bs: int):
  """The tile's draws: the element's flat index in the array blocked along its last axis ((R, C)
  itself for axis 1, its transpose (C, R) for axis 0) through the threefry hash, split like x."""
  row = (off_ref[0] + pl.program_id(0) * tile[0] + lax.broadcasted_iota(jnp.int32, tile, 0)).astype(jnp.uint32)
  col = (off_ref[1] + pl.program_id(1) * tile[1] + lax.broadcasted_iota(jnp.int32, tile, 1)).astype(jnp.uint32)
  idx = row * np.uint32(shape[1]) + col if axis == 1 else col * np.uint32(shape[0]) + row
  return C.split_axis(uniform_from_index(key_ref[0], key_ref[1], idx), axis, bs)


def _round_magnitudes(a, draw, fmt: Format, stochastic: bool):
  """Element-unit magnitudes ``0 <= a <= elem_max`` rounded to the grid: stochastically by ``draw()``'s
  uniforms, or to nearest even."""
  if stochastic:
    return stochastic_magnitudes(a, draw(), fmt)
  return C.round_to_grid(a, C.ElemCodec.of(fmt.elem_dtype))[1]


def _pow2_kernel(x_ref, key_ref, g_ref, off_ref, sign_ref, o_ref, *, fmt, rule, stochastic: bool, axis: int, shape,
                 tile, hadamard: int):
  """One tile of a power-of-two-scaled format (MXFP4, MXFP8), on magnitude bits throughout.

  The reference's steps (flush, scale by 2**-e, clip, round, scale by 2**e, saturate, sign) on
  ``|x|`` with ``x``'s sign bit put back at the end: the scalings and the clip are symmetric, so the
  magnitudes are the reference's bit for bit. Fewer integer operations an element than a signed route
  (``fp4jax.kernels.dequantize.scale_magnitudes`` after the rounding): the threefry hash beside them keeps
  this kernel at the GPU's integer rate.
  """
  del g_ref
  bs, rax = fmt.block_size, axis + 1
  bits = C.f32_to_i32(C.split_axis(read_tile(x_ref, sign_ref, axis, hadamard), axis, bs))  # (tr, nb, bs) | (nb, bs, tc)
  mag_bits = bits & 0x7FFFFFFF
  amax_bits, nonfinite = flush_amax_bits(jnp.max(mag_bits, axis=rax, keepdims=True))
  e = pow2_rule_exponent(amax_bits, fmt, rule)
  mag = C.i32_to_f32(jnp.where(mag_bits < _F32_MIN_NORMAL_BITS, 0, mag_bits))  # flushed
  a = jnp.minimum(_bits.scale_by_pow2(mag, -e), np.float32(fmt.elem_max))  # as element_units, then the clip
  r = _round_magnitudes(a, lambda: _uniforms(key_ref, off_ref, axis=axis, shape=shape, tile=tile, bs=bs),
                        fmt, stochastic)
  # decode_blocks' two factors, then the saturation. Its flush has nothing to do here: a non-zero
  # flushed |x| is at least 2**-126, and 2**-126 in element units (a power of two <= 2) is either a
  # grid point, which the roundings (monotone, to a grid neighbour) do not go below, or below the
  # grid's smallest step: r * 2**e is 0 or at least 2**-126.
  out = jnp.minimum(C.f32_to_i32(_bits.scale_by_pow2(r, e)), _F32_MAX_BITS)
  # Non-finite blocks: NaN (their scale byte is the NaN code), as dequantize gives.
  out = jnp.where(nonfinite, _F32_NAN_BITS, out | (bits & jnp.int32(-(2**31))))
  o_ref[...] = C.i32_to_f32(out).reshape(tile).astype(o_ref.dtype)


def _e4m3_kernel(x_ref, key_ref, g_ref, off_ref, sign_ref, *refs, fmt, rule, stochastic: bool, axis: int, shape,
                 tile, hadamard: int, block_pass: bool):
  """One tile of NVFP4 (E4M3 block scales, a global scale), on magnitude bits as :func:`_pow2_kernel`.

  ``off_ref``: the row and column of ``x``'s first element in the whole array of ``shape`` (not 0 for
  a shard). ``refs``: [per-block encode factors, scale bytes (``block_pass``) | the encode factor of
  each E4M3 scale code], the output. The reference's steps on ``|x|``: flush, times the block's
  encode factor, clip, round, times the decoded scale (exact: 2 x 4 significant bits) then the
  global decode factor (one rounding), flush, saturate; the sign bits (``x``'s, the global factor's)
  put back at the end.
  """
  bs, rax = fmt.block_size, axis + 1  # rax: the within-block axis of the blocked tile
  bits = C.f32_to_i32(C.split_axis(read_tile(x_ref, sign_ref, axis, hadamard), axis, bs))  # (tr, nb, bs) | (nb, bs, tc)
  mag_bits = bits & 0x7FFFFFFF
  gdec = g_ref[0]
  if block_pass:  # the block scales and factors came from XLA (_block_factors)
    enc_ref, sb_ref, o_ref = refs
    scale_code = jnp.expand_dims(sb_ref[...], rax)
    nonfinite = scale_code == fmt.scale_nan_byte
    enc = jnp.expand_dims(enc_ref[...], rax)
  else:
    enc_table_ref, o_ref = refs
    amax_bits, nonfinite = flush_amax_bits(jnp.max(mag_bits, axis=rax, keepdims=True))
    scale_code = e4m3_scale_code(amax_bits, g_ref[1], fmt, rule)
    # A gather from the 127 factors the wrapper computed: the correctly rounded reciprocal
    # (a 24-step integer division) once per code, not once per thread holding a block's piece.
    enc = enc_table_ref[scale_code]
  mag = C.i32_to_f32(jnp.where(mag_bits < _F32_MIN_NORMAL_BITS, 0, mag_bits))  # flushed
  a = jnp.minimum(mag * enc, np.float32(fmt.elem_max))  # as element_units, then the clip
  r = _round_magnitudes(a, lambda: _uniforms(key_ref, off_ref, axis=axis, shape=shape, tile=tile, bs=bs),
                        fmt, stochastic)
  # Codes 0..0x7E of finite blocks (non-finite ones are overwritten below, whatever their code).
  scale = C.decode_magnitude(jnp.minimum(scale_code, fmt.scale_nan_byte - 1), C.ElemCodec.of(fmt.scale_dtype))
  out = C.f32_to_i32((r * scale) * jnp.abs(gdec))  # decode_blocks' order: v * s exact, then * g
  out = jnp.where(out < _F32_MIN_NORMAL_BITS, 0, jnp.minimum(out, _F32_MAX_BITS))  # flush, saturate
  # The sign stays an integer: Triton may drop the sign of a zero in float arithmetic
  # (kernels/dequantize.py).
  sign = (bits ^ C.f32_to_i32(gdec)) & jnp.int32(-(2**31))
  # Non-finite blocks: NaN (their scale byte is the NaN code), as dequantize gives.
  out = jnp.where(nonfinite, _F32_NAN_BITS, out | sign)
  o_ref[...] = C.i32_to_f32(out).reshape(tile).astype(o_ref.dtype)


def _transformed(x, axis: int, hadamard: int, signs):
  """What the block scales are of: ``x``, or its transform where the kernel applies one."""
  return butterfly(_bits.widen(x), axis, hadamard, signs) if hadamard else x


def _global_amax(x, axis: int, hadamard: int, signs, interpret: bool):
  """NVFP4's tensor amax of what the kernel quantizes: in XLA (fused into x's producer where it can be), or
  with a transform in a Pallas pass of its own."""
  if not hadamard:
    return finite_amax(x)
  # The tiles and warps of the passes that quantize it, without a stochastic one's.
  return transformed_amax(x, axis, hadamard, signs, tiles=_tiles(axis, False, hadamard),
                          num_warps=num_warps(axis, False, hadamard), interpret=interpret)


def _block_factors(x, fmt: Format, rule: str, axis: int, genc, gdec):
  """NVFP4's per-block encode factors and scale bytes (the NaN byte for non-finite blocks), in XLA:
  ``(R, C / B)`` for ``axis`` 1, ``(R / B, C)`` for 0. The kernel's own per-block arithmetic, run
  once per block here rather than by every thread that holds a piece of the block there."""
  xb = C.split_axis(_bits.widen(x), axis, fmt.block_size)
  amax_bits, nonfinite = block_amax_bits(xb, axis + 1)
  code = e4m3_scale_code(amax_bits, genc, fmt, rule)
  enc = e4m3_encode_factor(code, gdec, fmt)
  sbytes = jnp.where(nonfinite, fmt.scale_nan_byte, code)
  return jnp.squeeze(enc, axis + 1), jnp.squeeze(sbytes, axis + 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("fmt", "rule", "axis", "dtype", "interpret", "tile", "block_pass",
                                             "hadamard", "seed"))
def fake_quantize_2d(x, key, *, fmt: Format, rule: str, axis: int, dtype, interpret: bool = False, tile=None,
                     block_pass=None, hadamard: int = 0, seed: int | None = 0):
  """``dequantize(quantize(x))`` of 2-D ``x`` along ``axis`` as ``dtype``, one pass.

  ``key``: a jax.random key (stochastic rounding, the draws of the XLA path) or None
  (nearest even). The case must pass :func:`supported`. ``tile``: the (rows, columns)
  a program reads, default :func:`pick_tile`'s (benchmarks time others). ``block_pass``:
  NVFP4's block scales and encode factors from a pass of XLA before the kernel instead of in
  the kernel (default :data:`E4M3_BLOCK_PASS`); power-of-two scales always in the kernel.
  ``hadamard``, ``seed``: quantize ``fp4jax.qat.random_hadamard(x, hadamard, axis=axis, seed=seed)``
  instead of ``x``, the transform done in the kernel (0: none).
  """
  if hadamard:
    check_size(hadamard)
  if why := supported(x.shape, x.dtype, fmt, axis, rule, key is not None, hadamard):
    raise ValueError(f"fake_quantize_2d: {why}")
  tile = tuple(tile) if tile is not None else None  # None: pick_tile's, per shard under sharded jit
  if not _fits(tile or pick_tile(x.shape, fmt, axis, hadamard=hadamard), x.shape, fmt, axis, hadamard):
    raise ValueError(f"fake_quantize_2d: tile {tile} must divide shape {x.shape} with whole blocks along axis {axis}")
  # With a transform the block factors come from the kernel unless asked: XLA's pass would write the
  # transform out stage by stage (kernels/hadamard.py).
  block_pass = (E4M3_BLOCK_PASS[axis] and not hadamard if block_pass is None else block_pass
                ) and not fmt.power_of_two_scales
  kd = jnp.zeros((2,), jnp.uint32) if key is None else jax.random.key_data(key).astype(jnp.uint32).reshape(2)
  signs = jnp.asarray(hadamard_signs(hadamard, seed) if hadamard else np.ones(1, np.float32))
  genc = gdec = None
  if fmt.has_global_scale:
    # The reference's tensor amax and factors: one read, in XLA.
    genc, gdec = global_factors(_global_amax(x, axis, hadamard, signs, interpret), fmt,
                                global_encode_numerator(fmt, rule))
    g = jnp.stack([gdec, genc]).astype(jnp.float32)
  else:
    g = jnp.zeros((2,), jnp.float32)
  if block_pass:
    extra = _block_factors(_transformed(x, axis, hadamard, signs), fmt, rule, axis, genc, gdec)
  elif not fmt.power_of_two_scales:
    extra = (e4m3_encode_factor(jnp.arange(fmt.scale_nan_byte, dtype=jnp.int32), gdec, fmt),)  # codes 0..0x7E
  else:
    extra = ()
  call = _Call(fmt, rule, key is not None, axis, np.dtype(dtype).name, interpret, tile, block_pass, x.shape,
               hadamard)
  return _partitioned(call, x, kd, g, signs, *extra)


class _Call(NamedTuple):
  """The static part of one kernel call; ``shape``: the whole array's (the draws' index)."""
  fmt: Format
  rule: str
  stochastic: bool
  axis: int
  dtype: str
  interpret: bool
  tile: tuple | None
  block_pass: bool
  shape: tuple
  hadamard: int


def _pallas(call: _Call, x, kd, g, signs, off, *extra):
  """The kernel over ``x``, the whole array or one shard of it starting at ``off`` (row, column)."""
  fmt, axis = call.fmt, call.axis
  tile = call.tile or pick_tile(x.shape, fmt, axis, call.stochastic, call.hadamard)
  in_specs = [pl.BlockSpec(tile, lambda i, j: (i, j))] + [pl.BlockSpec((2,), lambda i, j: (0,))] * 3
  in_specs.append(pl.BlockSpec(signs.shape, lambda i, j: (0,)))
  if call.block_pass:
    btile = (tile[0], tile[1] // fmt.block_size) if axis == 1 else (tile[0] // fmt.block_size, tile[1])
    in_specs += [pl.BlockSpec(btile, lambda i, j: (i, j))] * 2
  elif extra:
    in_specs.append(pl.BlockSpec(extra[0].shape, lambda i, j: (0,)))
  static = dict(fmt=fmt, rule=call.rule, stochastic=call.stochastic, axis=axis, shape=call.shape, tile=tile,
                hadamard=call.hadamard)
  if fmt.power_of_two_scales:
    kernel = functools.partial(_pow2_kernel, **static)
  else:
    kernel = functools.partial(_e4m3_kernel, block_pass=call.block_pass, **static)
  return pl.pallas_call(
      kernel,
      grid=(x.shape[0] // tile[0], x.shape[1] // tile[1]),
      in_specs=in_specs,
      out_specs=pl.BlockSpec(tile, lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct(x.shape, np.dtype(call.dtype)),
      compiler_params=C.compiler_params(num_warps(axis, call.stochastic, call.hadamard), 2),
      interpret=call.interpret,
      name=f"fake_quant_{'sr' if call.stochastic else 'rn'}_{fmt.name}_{call.rule}_axis{axis}",
  )(x, kd, g, off, signs, *extra)


# ---- under jit with sharded operands ------------------------------------------------------
# XLA cannot split a pallas_call: left alone it gathers the operand onto every device. The tiles
# are independent (NVFP4's global factors come in from XLA, which reduces them across shards), so
# each device runs the kernel on its shard, told where the shard starts for the draws' index.
@functools.partial(custom_partitioning, static_argnums=(0,))
def _partitioned(call: _Call, x, kd, g, signs, *extra):
  return _pallas(call, x, kd, g, signs, jnp.zeros((2,), jnp.int32), *extra)


def _shard_spec(call: _Call, mesh, sharding):
  """x's PartitionSpec if each shard tiles (whole blocks along the block axis), else unsharded."""
  spec, _, local = C.shard_of_2d(sharding, mesh, call.shape)
  tile = call.tile or pick_tile(local, call.fmt, call.axis, call.stochastic, call.hadamard)
  if tile is None or not _fits(tile, local, call.fmt, call.axis, call.hadamard):
    return PartitionSpec(None, None)
  return PartitionSpec(*spec)


def _infer(call, mesh, arg_shapes, result_shape):
  return NamedSharding(mesh, _shard_spec(call, mesh, arg_shapes[0].sharding))


def _partition(call, mesh, arg_shapes, result_shape):
  spec = _shard_spec(call, mesh, arg_shapes[0].sharding)
  x_sharding, whole = NamedSharding(mesh, spec), NamedSharding(mesh, PartitionSpec())
  # Block factors are laid out like x (one per block); the code table is one small array.
  extra_shardings = [x_sharding if call.block_pass else whole for _ in arg_shapes[4:]]

  def lower(x, kd, g, signs, *extra):
    off = [jnp.int32(0) if p is None else lax.axis_index(C.spec_axes(p)).astype(jnp.int32) * n
           for p, n in zip(spec, x.shape)]
    return _pallas(call, x, kd, g, signs, jnp.stack(off), *extra)

  return mesh, lower, x_sharding, (x_sharding, whole, whole, whole, *extra_shardings)


def _rule(call, mesh, operand_types, result_types):
  """Shardy's rule: out like x; block factors share x's other axis ((R, C/B) or (R/B, C))."""
  if call.block_pass:
    extra = ["i m", "i m"] if call.axis == 1 else ["m j", "m j"]
  else:
    extra = ["n"] * (len(operand_types) - 4)
  return ", ".join(["i j", "k", "l", "s", *extra]) + " -> i j"


_partitioned.def_partition(infer_sharding_from_operands=_infer, partition=_partition, sharding_rule=_rule)
