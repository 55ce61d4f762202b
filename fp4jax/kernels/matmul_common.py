"""Pieces shared by the block-scaled matmul kernels.

Everything here is plain ``jnp`` on small tiles, so the same code runs inside a
Pallas kernel (Triton back end or interpret mode) and in XLA.

Operands reach the kernels as *byte matrices*: a ``(R, K)`` block-scaled
matrix whose blocks run along ``K`` is stored as

* ``data``: uint8 ``(R, K * elem_bits // 8)``; for 4-bit elements two E2M1
  codes a byte, low nibble = even ``k`` (``fp4jax.pack_fp4`` along ``K``),
* ``scales``: uint8 ``(R, K // block_size)``, the bit patterns of the E8M0 or
  E4M3 block scales,

so a ``(rows, chunk)`` tile is ``rows`` runs of contiguous bytes.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format

_E2M1 = ml_dtypes.finfo(ml_dtypes.float4_e2m1fn)
_E4M3 = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn)

#: An E2M1 code moved into an E4M3 byte (sign to bit 7, exponent and mantissa
#: to the bottom of E4M3's fields) is the same value times 2**E2M1_IN_E4M3_LOG2:
#: both formats put their subnormals at exponent field 0, so only the biases
#: differ (E2M1's smallest normal is 2**0, E4M3's 2**-6).
E2M1_IN_E4M3_LOG2 = int(_E4M3.minexp) - int(_E2M1.minexp)
_MANT_SHIFT = int(_E4M3.nmant) - int(_E2M1.nmant)
_MAG_MASK = (1 << (int(_E2M1.bits) - 1)) - 1  # exponent and mantissa bits of a nibble
_SIGN = 1 << (int(_E2M1.bits) - 1)
_SIGN_SHIFT = int(_E4M3.bits) - int(_E2M1.bits)


def nibbles_to_e4m3(b):
  """Packed E2M1 bytes -> two E4M3 arrays (low nibbles, high nibbles).

  ``b``: uint8 array. Returns two ``float8_e4m3fn`` arrays of ``b``'s shape
  holding ``E2M1(code) * 2**E2M1_IN_E4M3_LOG2`` exactly: a few shifts and masks
  per byte, no table lookup.
  """
  hi_nib = b >> 4
  lo = ((b & _MAG_MASK) << _MANT_SHIFT) | ((b & _SIGN) << _SIGN_SHIFT)
  hi = ((hi_nib & _MAG_MASK) << _MANT_SHIFT) | ((hi_nib & _SIGN) << _SIGN_SHIFT)
  return (lax.bitcast_convert_type(lo, jnp.float8_e4m3fn),
          lax.bitcast_convert_type(hi, jnp.float8_e4m3fn))


def interleave_last(lo, hi):
  """``(..., n)`` and ``(..., n)`` -> ``(..., 2n)`` with ``lo`` at even positions."""
  return jnp.stack([lo, hi], axis=-1).reshape(*lo.shape[:-1], 2 * lo.shape[-1])


def decode_elements(data, fmt: Format):
  """A tile of element bytes -> element values, ``(rows, n_bytes)`` -> ``(rows, K)``.

  4-bit formats give E4M3 values equal to the elements times
  ``2**E2M1_IN_E4M3_LOG2`` (see :func:`element_log2_offset`); 8-bit formats
  give the elements themselves in ``fmt.elem_dtype``.
  """
  if fmt.elem_bits == 4:
    lo, hi = nibbles_to_e4m3(data)
    return interleave_last(lo, hi)
  return lax.bitcast_convert_type(data, fmt.elem_dtype)


def e2m1_to_f32(nibble):
  """4-bit E2M1 codes (int32, 0..15) -> their float32 values, exactly, from bits alone.

  No constant multiply (``E4M3 value * 2**6`` would be one): XLA moves a constant
  factor of a product onto its smaller operand, so ``v * 64 * scale`` may run as
  ``v * (64 * scale)``, which overflows float32 for E8M0 scales of ``2**122`` and
  up (seen on the CPU inside a Pallas interpret kernel). Normal codes: ``2**(E -
  1) * (1 + M / 2)``; the subnormal ``M * 0.5``.
  """
  n = nibble.astype(jnp.int32)
  e, m = (n >> 1) & 3, n & 1
  sign = (n & _SIGN) << (32 - int(_E2M1.bits))
  normal = ((e - 1 + _bits.F32_EXP_BIAS) << _bits.F32_MANT_BITS) | (m << (_bits.F32_MANT_BITS - 1))
  half = jnp.where(m == 1, (_bits.F32_EXP_BIAS - 1) << _bits.F32_MANT_BITS, 0)  # 0.5 or 0
  bits = sign | jnp.where(e > 0, normal, half)
  return lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def twice_e2m1(nibble):
  """4-bit E2M1 codes (int32) -> twice their values as int32: magnitudes 0, 1, 2, 3, 4, 6, 8, 12.

  Integer ops only (the int8 path's values, :mod:`fp4jax.int8_matmul`).
  """
  mag = nibble & _MAG_MASK
  wide = (2 + (mag & 1)) << jnp.maximum((mag >> 1) - 1, 0)  # mag >= 2: (2 or 3) * 2**(E - 1)
  v = jnp.where(mag < 2, mag, wide)
  return jnp.where((nibble & _SIGN) != 0, -v, v)


# ---- the int8 path's per-block and per-output arithmetic: one copy for XLA and the Pallas passes
E8M0_NAN = 0xFF
_E8M0_TOP = 0xFE  # 2**127: E2M1 values >= 2 overflow float32 there, so such blocks are never int8
#: Binades of block exponents below a row's top that the int8 values hold (shifts 0..3).
SPAN = 4


def int8_base(top):
  """A row's base exponent byte from its top finite block's scale byte (-1 when it has none)."""
  return jnp.maximum(top - (SPAN - 1), 0)


def int8_blocks(s, base):
  """E8M0 scale bytes ``s`` (int32) of blocks whose row has base byte ``base`` (broadcast) ->
  ``(shift, main, other)``: the block's shift ``d = s - base`` where the int8 values hold it
  (``main``: ``d >= 0`` and below 2**127; ``d <= 3`` as the base is the top's minus 3), and
  ``other``: a finite block they do not hold (its nonzero codes are the residual)."""
  d = s - base
  main = (d >= 0) & (s < _E8M0_TOP)
  return jnp.where(main, d, 0), main, ~main & (s != E8M0_NAN)


def int8_values(byte, shift, main):
  """Packed E2M1 bytes (int32) -> the int8 values ``2 * E2M1 << shift`` of their low and high nibbles (0 off ``main``)."""
  lo = jnp.where(main, twice_e2m1(byte & 0xF) << shift, 0)
  hi = jnp.where(main, twice_e2m1(byte >> 4) << shift, 0)
  return lo, hi


def int8_finish(sums, ea, eb, nan):
  """float32 ``sums * 2**(ea + eb)`` (``ea``, ``eb`` broadcast), NaN where ``nan``: one rounding of the int32 sums."""
  # Below 2**-200 the result is 0 whatever the exponent: |sums| < 2**31.
  e = jnp.maximum(ea + eb, -200)
  return jnp.where(nan, jnp.nan, _bits.scale_by_pow2(sums.astype(jnp.float32), e))


def element_log2_offset(fmt: Format) -> int:
  """log2 of (what :func:`decode_elements` returns) / (the element value)."""
  return E2M1_IN_E4M3_LOG2 if fmt.elem_bits == 4 else 0


def scale_to_f32(s, fmt: Format, extra_log2: int = 0):
  """Scale bytes -> float32 ``scale * 2**extra_log2``, any shape.

  E8M0: built from the exponent bits (``2**(b - 127 + extra_log2)``); byte
  0xFF gives NaN, results below float32's normal range give 0 (as XLA's CPU
  flushes them) and above it Inf. E4M3: an exact cast times ``2**extra_log2``.
  """
  if fmt.power_of_two_scales:
    b = s.astype(jnp.int32)
    e = b + extra_log2  # biased float32 exponent: E8M0 and float32 share bias 127
    bits = jnp.where(e > 0, jnp.minimum(e, 255) << _bits.F32_MANT_BITS, 0)
    out = lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)
    return jnp.where(b == fmt.scale_nan_byte, jnp.float32(jnp.nan), out)
  out = lax.bitcast_convert_type(s, fmt.scale_dtype).astype(jnp.float32)
  return out * np.float32(2.0**extra_log2) if extra_log2 else out


def expand_blocks(s, block_size: int):
  """``(rows, nb)`` per-block values -> ``(rows, nb * block_size)``."""
  rows, nb = s.shape
  return jnp.broadcast_to(s[:, :, None], (rows, nb, block_size)).reshape(rows, nb * block_size)


def block_factors(scales, fmt: Format):
  """Per-block float32 factors ``(element_factor, scale)`` whose product times what
  :func:`decode_elements` returns is the element times its scale, or ``(None, scale)``.

  4-bit elements decode to E4M3 values ``E2M1 * 2**-6``; the ``2**6`` goes to the scale, except
  that an E8M0 scale of ``2**122`` or more would overflow float32 with it (finite elements would
  read Inf, zeros NaN): from ``2**1`` up it goes to the elements instead, and below that the scale
  keeps it (``2**-127`` alone would flush). Each factor is a power of two in float32's normal
  range, so both products are exact.
  """
  off = -element_log2_offset(fmt)
  if not (fmt.power_of_two_scales and off):
    return None, scale_to_f32(scales, fmt, off)
  high = scales.astype(jnp.int32) >= 128  # E8M0 bias 127: the scale is 2**1 or more
  return jnp.where(high, np.float32(2.0**off), np.float32(1.0)), scale_to_f32(scales, fmt, jnp.where(high, 0, off))


def dequantize_tile(data, scales, fmt: Format, dtype):
  """A tile of bytes and its scale bytes -> dequantized ``dtype`` values.

  ``data``: ``(rows, K * elem_bits // 8)`` uint8; ``scales``: ``(rows, K //
  block_size)`` uint8. Exact in bfloat16 for every format here (an element has
  at most 4 significant bits and an E4M3 scale 4, bfloat16 holds 8), as long
  as the product stays in float32's normal range. The global scale is not
  applied.
  """
  v = decode_elements(data, fmt).astype(jnp.float32)
  factor, s = block_factors(scales, fmt)
  if factor is not None:
    v = v * expand_blocks(factor, fmt.block_size)
  return (v * expand_blocks(s, fmt.block_size)).astype(dtype)


def dequantize_bf16_pairs(data, scales, fmt: Format):
  """:func:`dequantize_tile` to bfloat16 for 4-bit elements, in the form XLA runs fast.

  Each byte's two values are decoded to bfloat16 separately and joined by a
  bitcast (one uint32 per byte, the low nibble's value in its low half: the
  first of the pair), where :func:`dequantize_tile`'s interleave is a stack
  along a new axis, which XLA emits as a concatenate: about 1 TB/s on an H200
  against 3 TB/s here, for a 4096 x 14336 weight
  (``benchmarks/experiments/two_pass_dequant.py``). The same bits: the same
  float32 products, rounded once.
  """
  if fmt.elem_bits != 4:
    raise ValueError(f"dequantize_bf16_pairs takes 4-bit elements, got {fmt!r}")
  lo, hi = nibbles_to_e4m3(data)
  factor, s = block_factors(scales, fmt)
  per_byte = functools.partial(expand_blocks, block_size=fmt.block_size // 2)
  s = per_byte(s)
  factor = None if factor is None else per_byte(factor)

  def bits(v):
    v = v.astype(jnp.float32)
    if factor is not None:
      v = v * factor
    b = (v * s).astype(jnp.bfloat16)
    return lax.bitcast_convert_type(b, jnp.uint16).astype(jnp.uint32)

  pairs = lax.bitcast_convert_type(bits(lo) | (bits(hi) << 16), jnp.bfloat16)  # (rows, n_bytes, 2)
  return pairs.reshape(data.shape[0], 2 * data.shape[1])


def row_mask(program_axis: int, block: int, size: int):
  """``(block,)`` bool: which rows of this program's block lie inside ``size``,
  or None when ``block`` divides ``size`` (no mask needed).

  Pallas-Triton does not mask a block that runs past the array edge (interpret
  mode pads it, the GPU reads and writes out of bounds), so kernels mask
  their loads and stores with this.
  """
  if size % block == 0:
    return None
  from jax.experimental import pallas as pl

  return pl.program_id(program_axis) * block + lax.broadcasted_iota(jnp.int32, (block,), 0) < size


def load_rows(view, rows):
  """``view[...]`` with the rows outside the array (``rows`` False) read as 0."""
  if rows is None:
    return view[...]
  from jax.experimental.pallas import triton as plt

  mask = jnp.broadcast_to(rows.reshape(-1, *([1] * (len(view.shape) - 1))), view.shape)
  return plt.load(view, mask=mask, other=0)


def store_tile(ref, value, rows, cols):
  """``ref[...] = value`` for the in-bounds ``(rows, cols)`` of a 2-D tile."""
  if rows is None and cols is None:
    ref[...] = value
    return
  from jax.experimental.pallas import triton as plt

  shape = value.shape
  mask = jnp.ones(shape, jnp.bool_)
  if rows is not None:
    mask = mask & rows[:, None]
  if cols is not None:
    mask = mask & cols[None, :]
  plt.store(ref, value, mask=mask)


def pick_block(n: int, cap: int, minimum: int) -> int | None:
  """Largest power of two in ``[minimum, cap]`` dividing ``n``, or None."""
  b = cap
  while b >= minimum:
    if n % b == 0:
      return b
    b //= 2
  return None
