"""Pallas-Triton kernels around the int8 GEMM of :mod:`fp4jax.int8_matmul`.

* :func:`residual` — whether each packed MXFP4 byte row has a nonzero block
  outside the int8 span (the residual): reads the codes, writes a flag a tile.
* :func:`rebase` — packed MXFP4 byte rows to the int8 values the GEMM takes
  (``2 * E2M1 << d``), one pass: reads the codes and scale bytes once, writes
  two int8 values a byte (as one uint16 word, so the kernel never interleaves
  even and odd elements).
* :func:`finish` — the int32 sums to ``out_dtype``: ``S * 2**(ea + eb)``, NaN
  rows and columns, one pass.

All three give :mod:`fp4jax.int8_matmul`'s XLA ops' bits: the arithmetic is
one copy in :mod:`fp4jax.kernels.matmul_common` (``int8_blocks``, ``int8_values``,
``int8_finish``), and tests compare them in interpret mode. Shapes no tile
divides go to the XLA ops (:func:`rebase_tiles`, :func:`finish_tiles`).

``words=True`` runs the re-basing and residual passes four bytes at a time
(:func:`_word_values`: the E2M1 magnitudes of eight nibbles as bit-plane
logic on one uint32, the block's shift and sign applied per byte lane), an
independent second implementation of the same values: the byte passes spend
~34 int32 operations a byte and are bound by them (``benchmarks/results/w4a4.md``).
On by default (:data:`WORDS`) since the H200 run of d765888: the same bits as the byte passes, and the
whole product 1-9% faster with them at the four shapes of ``benchmarks/w4a4.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fp4jax.kernels import common as C
from fp4jax.kernels.matmul_common import int8_blocks, int8_finish, int8_values, pick_block

__all__ = ["Tiles", "REBASE_TILES", "FINISH_TILES", "WORDS", "residual", "rebase", "finish", "rebase_tiles",
           "finish_tiles"]

_BLOCK_BYTES = 16  # an MXFP4 block of 32 codes


class Tiles(NamedTuple):
  """Largest tile (rows, columns: bytes for :func:`rebase`, outputs for :func:`finish`) and warps."""

  rows: int
  cols: int
  warps: int = 4


#: Defaults, from the sweep in ``benchmarks/w4a4.py --sweep`` (H200): every array of a tile is held
#: in registers as int32, so tiles stay small.
REBASE_TILES = Tiles(4, 512)
FINISH_TILES = Tiles(4, 1024)
#: Whether the int8 path (:func:`fp4jax.int8_matmul.rows_codes`, ``rows_residual``) takes the
#: four-bytes-a-word kernels (read when it traces); False gives the byte kernels, the same bits.
WORDS = True


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

  The tile is 3-D, ``(rows, blocks, 16 bytes)``, so each block's fields broadcast along the last axis
  of the codes as they are (a 2-D tile built per-byte fields with a broadcast and a reshape). Both
  forms measured the same on the H200, ~73 us for an 8192^2 weight: the passes are bound by their
  ~34 int32 operations a byte, not by moving data (``benchmarks/results/w4a4.md``)."""
  return int8_blocks(scales_ref[...].astype(jnp.int32), base_ref[...][:, None, None])


def _rebase_kernel(data_ref, scales_ref, base_ref, pairs_ref):
  b = data_ref[...].astype(jnp.int32)
  shift, main, _ = _block_fields(scales_ref, base_ref)
  lo, hi = int8_values(b, shift, main)
  pairs_ref[...] = ((lo & 0xFF) | ((hi & 0xFF) << 8)).astype(jnp.uint16)


def _residual_kernel(data_ref, scales_ref, base_ref, residual_ref):
  b = data_ref[...].astype(jnp.int32)
  _, _, other = _block_fields(scales_ref, base_ref)
  outside = (other & ((b & 0x77) != 0)).astype(jnp.int32)
  residual_ref[...] = jnp.max(jnp.max(outside, axis=2), axis=1)[:, None]


_NIBBLES = 0x11111111  # bit 0 of each of a word's eight nibbles
_BYTES = 0x01010101  # bit 0 of each of its four bytes


def _u32(v):
  return jnp.uint32(v)


def _words(data_ref):
  """``(rows, blocks, 4)`` uint32 of a ``(rows, blocks, 16)`` byte tile: word ``w`` holds bytes
  ``4w .. 4w + 3`` of its block, byte ``4w`` lowest (strided loads, so no in-register reshape)."""
  w = _u32(0)
  for j in range(4):
    w = w | (data_ref[:, :, pl.ds(j, 4, stride=4)].astype(jnp.uint32) << _u32(8 * j))
  return w


def _word_values(w, shift, main):
  """:func:`~fp4jax.kernels.matmul_common.int8_values` of four bytes at once.

  ``w`` uint32 words of packed E2M1 bytes; ``shift`` (int32, 0..3) and ``main`` per block, broadcast.
  Returns two uint32 words of int8 values in output order: ``lo(b0), hi(b0), lo(b1), hi(b1)`` and the
  same for ``b2, b3``. Twice an E2M1 magnitude ``m = m2 m1 m0`` is 0, 1, 2, 3, 4, 6, 8, 12: bit 0 is
  ``m0 & ~m2``, bit 1 ``(m1 & ~m2) | (m2 & ~m1 & m0)``, bit 2 ``m2 & (~m1 | m0)``, bit 3 ``m2 & m1``,
  computed for all eight nibbles at once. After the shift a byte holds at most 96, so adding 0x7F per
  byte flags the nonzero ones and negating ``x`` as ``(x ^ 0xFF) + 1`` never carries into the next
  byte (zeros stay zero: -0 has no int8 form but 0).
  """
  one = _u32(_NIBBLES)
  m0, m1, m2, sign = (w & one, (w >> _u32(1)) & one, (w >> _u32(2)) & one, (w >> _u32(3)) & one)
  not_m1, not_m2 = m1 ^ one, m2 ^ one
  mag = ((m0 & not_m2) | (((m1 & not_m2) | (m2 & not_m1 & m0)) << _u32(1))
         | ((m2 & (not_m1 | m0)) << _u32(2)) | ((m2 & m1) << _u32(3)))
  d = shift.astype(jnp.uint32)
  keep = main.astype(jnp.uint32) * _u32(0xFFFFFFFF)

  def signed(x, s):  # x: one magnitude a byte (0..12), s: the sign at bit 0 of each byte
    x = x << d
    neg = s & (((x + _u32(0x7F7F7F7F)) & _u32(0x80808080)) >> _u32(7))
    return ((x ^ (neg * _u32(0xFF))) + neg) & keep

  lo = signed(mag & _u32(0x0F0F0F0F), sign & _u32(_BYTES))
  hi = signed((mag >> _u32(4)) & _u32(0x0F0F0F0F), (sign >> _u32(4)) & _u32(_BYTES))
  first = (lo & _u32(0xFF)) | ((hi & _u32(0xFF)) << _u32(8)) | ((lo & _u32(0xFF00)) << _u32(8)) | (
      (hi & _u32(0xFF00)) << _u32(16))
  second = ((lo >> _u32(16)) & _u32(0xFF)) | ((hi >> _u32(8)) & _u32(0xFF00)) | (
      (lo >> _u32(8)) & _u32(0xFF0000)) | (hi & _u32(0xFF000000))
  return first, second


def _rebase_words_kernel(data_ref, scales_ref, base_ref, out_ref):
  shift, main, _ = _block_fields(scales_ref, base_ref)
  first, second = _word_values(_words(data_ref), shift, main)
  out_ref[:, :, pl.ds(0, 4, stride=2)] = first
  out_ref[:, :, pl.ds(1, 4, stride=2)] = second


def _residual_words_kernel(data_ref, scales_ref, base_ref, residual_ref):
  _, _, other = _block_fields(scales_ref, base_ref)
  outside = (other & ((_words(data_ref) & _u32(0x77777777)) != 0)).astype(jnp.int32)
  residual_ref[...] = jnp.max(jnp.max(outside, axis=2), axis=1)[:, None]


def _row_pass(kernel, data, scales, base, out_spec, out_shape, tiles, interpret, name):
  """``kernel`` over ``(rows, blocks, 16)`` tiles of the byte rows (free reshapes of ``data`` and
  ``scales``); ``out_spec(br, blocks a tile)`` and ``out_shape(r, tiles along a row)``."""
  r, nbytes = data.shape
  br, bk = rebase_tiles(r, nbytes, tiles)
  nb, nbk = nbytes // _BLOCK_BYTES, bk // _BLOCK_BYTES
  return pl.pallas_call(
      kernel,
      grid=(r // br, nb // nbk),
      in_specs=[pl.BlockSpec((br, nbk, _BLOCK_BYTES), lambda i, j: (i, j, 0)),
                pl.BlockSpec((br, nbk, 1), lambda i, j: (i, j, 0)),
                pl.BlockSpec((br,), lambda i, j: (i,))],
      out_specs=out_spec(br, nbk),
      out_shape=out_shape(r, nbytes // bk),
      compiler_params=C.compiler_params((tiles or REBASE_TILES).warps, 1),
      interpret=interpret,
      name=name,
  )(data.reshape(r, nb, _BLOCK_BYTES), scales.reshape(r, nb, 1), base.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "words"))
def rebase(data, scales, base, *, tiles: Tiles | None = None, interpret: bool = False, words: bool = False):
  """int8 ``(R, K)`` codes of packed MXFP4 rows ``data`` given each row's base exponent byte.

  ``words``: the four-bytes-a-word kernel (the int8 path passes :data:`WORDS`)."""
  r, nbytes = data.shape
  if words:
    out = _row_pass(_rebase_words_kernel, data, scales, base,
                    lambda br, nbk: pl.BlockSpec((br, nbk, 8), lambda i, j: (i, j, 0)),
                    lambda r, nk: jax.ShapeDtypeStruct((r, nbytes // _BLOCK_BYTES, 8), jnp.uint32),
                    tiles, interpret, "int8_rebase_words")
    return jax.lax.bitcast_convert_type(out, jnp.int8).reshape(r, 2 * nbytes)  # little-endian: output order
  pairs = _row_pass(_rebase_kernel, data, scales, base,
                    lambda br, nbk: pl.BlockSpec((br, nbk, _BLOCK_BYTES), lambda i, j: (i, j, 0)),
                    lambda r, nk: jax.ShapeDtypeStruct((r, nbytes // _BLOCK_BYTES, _BLOCK_BYTES), jnp.uint16),
                    tiles, interpret, "int8_rebase")
  return jax.lax.bitcast_convert_type(pairs, jnp.int8).reshape(r, 2 * nbytes)  # low byte: even k


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "words"))
def residual(data, scales, base, *, tiles: Tiles | None = None, interpret: bool = False, words: bool = False):
  """bool ``(R,)``: the row has a nonzero block outside the int8 span; reads the codes, writes a flag a tile.

  ``words``: the four-bytes-a-word kernel (the int8 path passes :data:`WORDS`)."""
  kernel = _residual_words_kernel if words else _residual_kernel
  flags = _row_pass(kernel, data, scales, base, lambda br, nbk: pl.BlockSpec((br, 1), lambda i, j: (i, j)),
                    lambda r, nk: jax.ShapeDtypeStruct((r, nk), jnp.int32), tiles, interpret, "int8_residual")
  return jnp.any(flags != 0, axis=1)


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
