"""MXFP4 quantization of activation rows straight into the int8 path's codes: one Pallas-Triton kernel.

The W4A4 product (:mod:`fp4jax.int8_matmul`) quantizes bfloat16 activations
``(M, K)`` along ``K`` (``quantize(x, MXFP4, axis=-1, layout="rows")``: packed
codes and scale bytes), then a second pass re-bases the packed codes into int8
values for the int8 GEMM. :func:`quantize_codes` does both from ``x``: per row
of tiles, a first loop over ``K`` finds each block's E8M0 scale and the row's
top scale (its base is the top minus 3), a second loop (reading ``x`` again,
from L2 while the rows are small) encodes the E2M1 codes and writes their int8
values ``2 * E2M1 << d`` in :func:`~fp4jax.int8_matmul.block_order`, with each
row's residual flag (a nonzero block outside the span), base and NaN flag.

The arithmetic is the quantize kernel's (:mod:`fp4jax.kernels.quantize_pack`:
``flush_amax_bits``, ``pow2_rule_exponent``, ``encode_pow2``, the OCP "floor"
rule) and the int8 path's (``int8_base``, ``int8_blocks``, ``twice_e2m1``), so the outputs are
those of quantizing, then :func:`~fp4jax.int8_matmul.row_bases` and
:func:`~fp4jax.int8_matmul.rebase_codes` (tests compare them bit for bit).
Blocks are read as two strided halves (elements ``8w + 4h + i`` for half ``h``),
so each half's 16 codes are contiguous in block order with no in-register
shuffle.

Measured on the H200 (``benchmarks/w4a4.py --layer``): bit-equal to the two
passes, but slower than them (at 8192 x 8192, 157-201 us across tilings against
115 for quantize + re-base; the floor, reading bfloat16 once and writing int8,
is ~58): :data:`fp4jax.matmul.FUSED_ACTIVATION_QUANTIZE` stays off. Likely
causes, not profiled: the 8-byte strided loads of the halves and the second
read of each row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fp4jax.formats import MXFP4
from fp4jax.kernels import common as C
from fp4jax.kernels.matmul_common import E8M0_NAN, int8_base, int8_blocks, pick_block, twice_e2m1
from fp4jax.kernels.quantize_pack import encode_pow2, flush_amax_bits, pow2_rule_exponent

__all__ = ["Tiles", "TILES", "INPUT_DTYPES", "quantize_codes", "codes_tiles"]

_BLOCK = 32
INPUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class Tiles(NamedTuple):
  """Rows a program, blocks of 32 a step of its loops along K, warps."""

  rows: int
  blocks: int
  warps: int = 4


#: From a sweep on the H200 (9d0a9f7): 167 us at 8192 x 8192 bfloat16 (157-201 across 10 tilings), 30 at
#: 1024 x 8192 (30-68). Slower than quantizing to byte rows then re-basing (115 and 45 us): see
#: ``benchmarks/results/w4a4.md``; the W4A4 layer does not take it by default.
TILES = Tiles(1, 128, 4)


def codes_tiles(m: int, k: int, tiles: Tiles | None = None) -> tuple[int, int] | None:
  """(row tile, blocks a step) dividing an ``(m, k)`` activation, or None (K not whole blocks)."""
  t = tiles or TILES
  if k % _BLOCK:
    return None
  br, cb = pick_block(m, t.rows, 1), pick_block(k // _BLOCK, t.blocks, 1)
  return None if br is None or cb is None else (br, cb)


def _block_scales(x_ref, step: int, cb: int):
  """A step's two halves of each block (float32 ``(rows, cb, 4, 4)``: elements ``8w + 4h + i``), and per
  block ``(rows, cb, 1, 1)``: the E8M0 exponent, the scale byte and whether the block is non-finite."""
  halves = [x_ref[:, pl.ds(step * cb, cb), pl.ds(h, 4, stride=2), :].astype(jnp.float32) for h in (0, 1)]
  raw = [jnp.max(jnp.max(C.f32_to_i32(v) & 0x7FFFFFFF, axis=3, keepdims=True), axis=2, keepdims=True)
         for v in halves]
  amax_bits, nonfinite = flush_amax_bits(jnp.maximum(*raw))  # the block's two halves together
  e = pow2_rule_exponent(amax_bits, MXFP4, "floor")
  byte = jnp.where(nonfinite, E8M0_NAN, e + MXFP4.scale_bias)
  return halves, e, byte, nonfinite


def _kernel(x_ref, codes_ref, base_ref, nan_ref, residual_ref, *, cb: int, steps: int):
  rows = x_ref.shape[0]
  codec = C.ElemCodec.of(MXFP4.elem_dtype)

  def top(step, carry):
    best, nan = carry
    _, _, byte, _ = _block_scales(x_ref, step, cb)
    best = jnp.maximum(best, jnp.max(jnp.where(byte == E8M0_NAN, -1, byte), axis=1)[:, 0, 0])
    return best, nan | jnp.max((byte == E8M0_NAN).astype(jnp.int32), axis=1)[:, 0, 0]

  best, nan = lax.fori_loop(0, steps, top, (jnp.full((rows,), -1, jnp.int32), jnp.zeros((rows,), jnp.int32)))
  base = int8_base(best)

  def encode(step, residual):
    halves, e, byte, nonfinite = _block_scales(x_ref, step, cb)
    shift, main, other = int8_blocks(byte, base[:, None, None, None])
    for h, v in enumerate(halves):
      codes, _ = encode_pow2(v, e, codec, MXFP4)
      codes = jnp.where(nonfinite, 0, codes)  # the quantizer zeroes non-finite blocks
      codes_ref[:, pl.ds(step * cb, cb), h] = jnp.where(main, twice_e2m1(codes) << shift, 0).astype(jnp.int8)
      outside = (other & ((codes & 0x7) != 0)).astype(jnp.int32)
      residual = residual | jnp.max(jnp.max(jnp.max(outside, axis=3), axis=2), axis=1)
    return residual

  residual_ref[...] = lax.fori_loop(0, steps, encode, jnp.zeros((rows,), jnp.int32))
  base_ref[...] = base
  nan_ref[...] = nan


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def quantize_codes(x, *, tiles: Tiles | None = None, interpret: bool = False):
  """MXFP4 (floor rule) quantization of ``x (M, K)`` along ``K``, as the int8 path's operand.

  Returns ``(codes, base, nan, residual)``: int8 ``(M, K)`` codes in block order, int32 ``(M,)`` base
  exponent bytes, and bool ``(M,)`` NaN rows and residual rows; the same as
  ``quantize(x, MXFP4, axis=-1, layout="rows")`` followed by ``row_bases`` and ``rebase_codes``.
  """
  if x.ndim != 2 or jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in INPUT_DTYPES]:
    raise ValueError(f"quantize_codes takes a 2-D float32, bfloat16 or float16 array, got {x.dtype} {x.shape}")
  m, k = x.shape
  if (fit := codes_tiles(m, k, tiles)) is None:
    raise ValueError(f"quantize_codes: shape {x.shape} does not tile (K a multiple of {_BLOCK} is needed)")
  br, cb = fit
  nb = k // _BLOCK
  codes, base, nan, residual = pl.pallas_call(
      functools.partial(_kernel, cb=cb, steps=nb // cb),
      grid=(m // br,),
      in_specs=[pl.BlockSpec((br, nb, 8, 4), lambda i: (i, 0, 0, 0))],
      out_specs=[pl.BlockSpec((br, nb, 2, 4, 4), lambda i: (i, 0, 0, 0, 0)), pl.BlockSpec((br,), lambda i: (i,)),
                 pl.BlockSpec((br,), lambda i: (i,)), pl.BlockSpec((br,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((m, nb, 2, 4, 4), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.int32),
                 jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m,), jnp.int32)],
      compiler_params=C.compiler_params((tiles or TILES).warps, 1),
      interpret=interpret,
      name="int8_quantize",
  )(x.reshape(m, nb, 8, 4))
  return codes.reshape(m, k), base, nan != 0, residual != 0
