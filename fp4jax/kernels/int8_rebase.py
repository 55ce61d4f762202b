"""Pallas-Triton kernels around the int8 GEMM of :mod:`fp4jax.int8_matmul`.

* :func:`rebase` — packed MXFP4 byte rows to the int8 values the GEMM takes
  (``2 * E2M1 << d``) and each row's residual flag (a nonzero block outside
  the int8 span), one pass: reads the codes and scale bytes once.
* :func:`finish` — the int32 sums to ``out_dtype``: ``S * 2**(ea + eb)``, NaN
  rows and columns, one pass.

Both give :mod:`fp4jax.int8_matmul`'s XLA ops' bits: the arithmetic is the
same as :mod:`fp4jax.kernels.matmul_common`'s (``int8_blocks``, ``int8_values``,
``int8_finish``), and tests compare them in interpret mode and on the GPU.
Shapes no tile divides go to the XLA ops (:func:`rebase_tiles`,
:func:`finish_tiles`).

The re-basing pass works on four bytes (eight codes) a uint32
(:func:`_word_values`): each half-word's four nibbles are the selectors of
PTX's byte permute (``prmt``), which looks their magnitudes up in a table of
twice the E2M1 values and their signs in a mask table, about 7 operations a
byte (the earlier byte pass took ~34 and was bound by them,
``benchmarks/results/w4a4.md``). Interpreted (on the CPU), a jnp emulation of
``prmt`` stands in; a lowering test checks the instruction is in the kernel and
the GPU tests check its bits. Each word's two output words go to the two
contiguous halves of its block (:func:`fp4jax.int8_matmul.block_order`), not
interleaved: the interleaved stores cost ~15 us of ~50 on an 8192^2 weight.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4jax.kernels import common as C
from fp4jax.kernels.matmul_common import int8_blocks, int8_finish, pick_block

__all__ = ["Tiles", "REBASE_TILES", "FINISH_TILES", "rebase", "finish", "rebase_tiles", "finish_tiles"]

_BLOCK_BYTES = 16  # an MXFP4 block of 32 codes


class Tiles(NamedTuple):
  """Largest tile (rows, columns: bytes for :func:`rebase`, outputs for :func:`finish`) and warps."""

  rows: int
  cols: int
  warps: int = 4


#: Defaults, from the sweep in ``benchmarks/w4a4.py --sweep`` (H200; e79edd1 for the re-basing pass:
#: 35 us an 8192^2 weight at 8 x 512 bytes and 8 warps, 62 at the 4 x 512 it had before).
REBASE_TILES = Tiles(8, 512, 8)
FINISH_TILES = Tiles(4, 1024)


def rebase_tiles(rows: int, nbytes: int, tiles: Tiles | None = None) -> tuple[int, int] | None:
  """(row tile, byte tile) dividing a ``(rows, nbytes)`` byte matrix, or None."""
  t = tiles or REBASE_TILES
  br, bk = pick_block(rows, t.rows, 1), pick_block(nbytes, t.cols, _BLOCK_BYTES)
  return None if br is None or bk is None else (br, bk)


def finish_tiles(m: int, n: int, tiles: Tiles | None = None) -> tuple[int, int] | None:
  t = tiles or FINISH_TILES
  bm, bn = pick_block(m, t.rows, 1), pick_block(n, t.cols, 16)
  return None if bm is None or bn is None else (bm, bn)


def _block_fields(scales_ref, base_ref):
  """:func:`~fp4jax.kernels.matmul_common.int8_blocks` per block of the tile: ``(rows, blocks, 1)``.

  The tile is 3-D, ``(rows, blocks, 4 words)``, so each block's fields broadcast along the last axis
  of the codes as they are, with no in-register reshape."""
  return int8_blocks(scales_ref[...].astype(jnp.int32), base_ref[...][:, None, None])


# Twice the E2M1 magnitudes 0..7 (0, 1, 2, 3, 4, 6, 8, 12) as the eight bytes of a prmt table.
_TABLE_LO, _TABLE_HI = 0x03020100, 0x0C080604
_SIGN_TABLE = 0x00008000  # byte 0 = 0x00, byte 1 = 0x80: a selector 9 replicates byte 1's sign bit (0xFF)
_MSB = 0x80808080


def _u32(v):
  return jnp.uint32(v)


def _prmt_emulated(a, b, sel):
  """PTX ``prmt.b32`` (default mode) in jnp ops: output byte ``i`` is byte ``s & 7`` of the pair
  ``(b:a)`` (a's bytes 0..3, b's 4..7), ``s`` the selector's nibble ``i``; with ``s & 8`` that byte's
  sign bit replicated over all eight bits."""
  a, b = _u32(a), _u32(b)
  out = _u32(0)
  for i in range(4):
    s = (sel >> _u32(4 * i)) & _u32(0xF)
    idx = s & _u32(7)
    byte = (jnp.where(idx < 4, a, b) >> ((idx & _u32(3)) * _u32(8))) & _u32(0xFF)
    byte = jnp.where((s & _u32(8)) != 0, jnp.where((byte & _u32(0x80)) != 0, _u32(0xFF), _u32(0)), byte)
    out = out | (byte << _u32(8 * i))
  return out


def _prmt_ptx(a, b, sel):
  """PTX ``prmt.b32``: one instruction a word (compiled kernels only; see :func:`_prmt_emulated`)."""
  # As int32: the Triton lowering types the asm's results as declared, and uint32 there would not
  # meet the signless integers of the surrounding ops.
  i32 = lambda v: jax.lax.bitcast_convert_type(v, jnp.int32)
  a, b = (jnp.full(sel.shape, _u32(v)) for v in (a, b))
  [out] = plgpu.elementwise_inline_asm("prmt.b32 $0, $1, $2, $3;", args=[i32(a), i32(b), i32(sel)],
                                       constraints="=r,r,r,r", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(sel.shape, jnp.int32)])
  return jax.lax.bitcast_convert_type(out, jnp.uint32)


def _word_values(w, shift, main, prmt):
  """:func:`~fp4jax.kernels.matmul_common.int8_values` of a word's four packed bytes (eight nibbles).

  ``w`` uint32 words of packed E2M1 bytes (byte ``b0`` lowest); ``shift`` (int32, 0..3) and ``main``
  per block, broadcast; ``prmt`` the byte permute (the PTX instruction, or its emulation where the
  kernel is interpreted). Returns two uint32 words of int8 values in output order: the values of
  ``lo(b0), hi(b0), lo(b1), hi(b1)``, then those of ``b2, b3``. A half-word's four nibbles are, in
  order, the selectors of one prmt: their low three bits look up the magnitude in a table of twice the
  E2M1 values, their sign bits (as selector 9) pick 0xFF masks. A magnitude shifted by ``d <= 3`` is
  at most 96 a byte, so ``x << d`` keeps to its byte and ``(0x80 - x) ^ 0x80`` negates each byte
  without a borrow (and keeps a zero zero: -0 has no int8 form but 0).
  """
  d = shift.astype(jnp.uint32)
  keep = main.astype(jnp.uint32) * _u32(0xFFFFFFFF)

  def half(h):
    x = prmt(_TABLE_LO, _TABLE_HI, h & _u32(0x7777)) << d
    sign = h & _u32(0x8888)
    neg = prmt(_SIGN_TABLE, 0, sign | (sign >> _u32(3)))
    negated = (_u32(_MSB) - x) ^ _u32(_MSB)
    return (x ^ ((x ^ negated) & neg)) & keep

  return half(w & _u32(0xFFFF)), half(w >> _u32(16))


def _rebase_kernel(data_ref, scales_ref, base_ref, out_ref, residual_ref, *, prmt):
  shift, main, other = _block_fields(scales_ref, base_ref)
  w = data_ref[...]
  first, second = _word_values(w, shift, main, prmt)
  out_ref[:, :, 0:4] = first  # the block's codes in block order: the first four of each eight,
  out_ref[:, :, 4:8] = second  # then the last four
  outside = (other & ((w & _u32(0x77777777)) != 0)).astype(jnp.int32)
  residual_ref[...] = jnp.max(jnp.max(outside, axis=2), axis=1)[:, None]


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def rebase(data, scales, base, *, tiles: Tiles | None = None, interpret: bool = False):
  """int8 ``(R, K)`` codes of packed MXFP4 rows ``data`` given each row's base exponent byte, in block
  order (:func:`fp4jax.int8_matmul.block_order`), and the residual (bool ``(R,)``: the row has a nonzero
  block outside the int8 span), in one pass.

  Tiles ``(rows, blocks, 4 words)`` of the byte rows (free reshapes and a bitcast of ``data``), so each
  block's fields broadcast along the last axis. Compiled, the magnitudes and signs come from PTX's byte
  permute; interpreted, from its jnp emulation.
  """
  r, nbytes = data.shape
  br, bk = rebase_tiles(r, nbytes, tiles)
  nb, nbk = nbytes // _BLOCK_BYTES, bk // _BLOCK_BYTES
  words = jax.lax.bitcast_convert_type(data.reshape(r, nb, 4, 4), jnp.uint32)  # little-endian: byte 4w lowest
  out, flags = pl.pallas_call(
      functools.partial(_rebase_kernel, prmt=_prmt_emulated if interpret else _prmt_ptx),
      grid=(r // br, nb // nbk),
      in_specs=[pl.BlockSpec((br, nbk, 4), lambda i, j: (i, j, 0)),
                pl.BlockSpec((br, nbk, 1), lambda i, j: (i, j, 0)),
                pl.BlockSpec((br,), lambda i, j: (i,))],
      out_specs=[pl.BlockSpec((br, nbk, 8), lambda i, j: (i, j, 0)), pl.BlockSpec((br, 1), lambda i, j: (i, j))],
      out_shape=[jax.ShapeDtypeStruct((r, nb, 8), jnp.uint32), jax.ShapeDtypeStruct((r, nbytes // bk), jnp.int32)],
      compiler_params=C.compiler_params((tiles or REBASE_TILES).warps, 1),
      interpret=interpret,
      name="int8_rebase",
  )(words, scales.reshape(r, nb, 1), base.astype(jnp.int32))
  return jax.lax.bitcast_convert_type(out, jnp.int8).reshape(r, 2 * nbytes), jnp.any(flags != 0, axis=1)


def _finish_kernel(sums_ref, ea_ref, eb_ref, nan_a_ref, nan_b_ref, out_ref):
  nan = (nan_a_ref[...][:, None] | nan_b_ref[...][None, :]) != 0
  out = int8_finish(sums_ref[...], ea_ref[...][:, None], eb_ref[...][None, :], nan)
  out_ref[...] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret"))
def finish(sums, ea, eb, nan_a, nan_b, *, out_dtype, tiles: Tiles | None = None, interpret: bool = False):
  """``where(nan_a | nan_b, NaN, sums * 2**max(ea + eb, -200))`` as ``out_dtype``, one pass."""
  m, n = sums.shape
  bm, bn = finish_tiles(m, n, tiles)
  return pl.pallas_call(
      _finish_kernel,
      grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, bn), lambda i, j: (i, j)), pl.BlockSpec((bm,), lambda i, j: (i,)),
                pl.BlockSpec((bn,), lambda i, j: (j,)), pl.BlockSpec((bm,), lambda i, j: (i,)),
                pl.BlockSpec((bn,), lambda i, j: (j,))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=C.compiler_params((tiles or FINISH_TILES).warps, 1),
      interpret=interpret,
      name="int8_finish",
  )(sums, ea.astype(jnp.int32), eb.astype(jnp.int32), nan_a.astype(jnp.int32), nan_b.astype(jnp.int32))
