"""Packing E2M1 codes two to a byte, and MXFP4 bytes straight to floats.

Convention (OCP MX, GPT-OSS, DeepSeek, cuBLAS): along the packed axis, element
``2i`` is the low nibble and element ``2i + 1`` the high nibble of byte ``i``;
a nibble is the E2M1 code ``sign << 3 | exponent << 1 | mantissa``.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from fp4jax import _bits
from fp4jax.formats import MXFP4
from fp4jax.qarray import as_array, float_dtype, normalize_axis

__all__ = ["pack_fp4", "unpack_fp4", "dequantize_packed", "E2M1_VALUES"]

#: The 16 E2M1 values by code, from ml_dtypes (codes 8..15 are the negatives).
E2M1_VALUES = np.arange(16, dtype=np.uint8).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def _codes(values):
  """float4_e2m1fn -> uint8 codes 0..15."""
  return lax.bitcast_convert_type(values, jnp.uint4).astype(jnp.uint8)


def _from_codes(codes):
  return lax.bitcast_convert_type(codes.astype(jnp.uint4), jnp.float4_e2m1fn)


def _pairs_last(x, axis):
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)


def pack_fp4(values, axis: int = -1):
  """Packs ``float4_e2m1fn`` values two to a byte along ``axis``.

  Args:
    values: ``float4_e2m1fn`` array whose ``axis`` has even length.
    axis: the axis to pack along.

  Returns:
    uint8 array, ``values.shape`` with ``axis`` halved; byte ``i`` holds element
    ``2i`` in its low nibble and ``2i + 1`` in its high nibble.
  """
  values = jnp.asarray(as_array(values, "pack_fp4"))
  if values.dtype != jnp.float4_e2m1fn:
    raise ValueError(f"pack_fp4 expects float4_e2m1fn values, got dtype {values.dtype}")
  axis = normalize_axis(axis, values.ndim, values.shape)
  if values.shape[axis] % 2:
    raise ValueError(f"pack_fp4: shape {values.shape} has odd length {values.shape[axis]} along axis {axis}")
  pairs = _pairs_last(_codes(values), axis)
  packed = pairs[..., 0] | (pairs[..., 1] << 4)
  return jnp.moveaxis(packed, -1, axis)


def unpack_fp4(packed, axis: int = -1):
  """Inverse of :func:`pack_fp4`: uint8 ``(..., n, ...)`` -> ``float4_e2m1fn`` with ``2n``."""
  packed = jnp.asarray(as_array(packed, "unpack_fp4"))
  if packed.dtype not in (jnp.uint8, jnp.int8):
    raise ValueError(f"unpack_fp4 expects uint8 (or int8) bytes, got dtype {packed.dtype}")
  axis = normalize_axis(axis, packed.ndim, packed.shape)
  b = jnp.moveaxis(packed.astype(jnp.uint8), axis, -1)
  codes = jnp.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
  return jnp.moveaxis(_from_codes(codes), -1, axis)


def dequantize_packed(blocks, scales, *, block_size: int = 32, dtype=jnp.bfloat16):
  """MXFP4 bytes straight to ``dtype`` (the DeepSeek-V4 fused convention).

  Args:
    blocks: uint8 or int8 ``(..., K // 2)``, two E2M1 codes a byte (low nibble
      = even element).
    scales: uint8 or ``float8_e8m0fnu`` ``(..., K // block_size)``; byte ``e``
      means ``2**(e - 127)``.
    block_size: elements per scale (32 for MXFP4).
    dtype: a floating output dtype.

  Returns:
    ``(..., K)`` array of ``dtype``: ``E2M1(code) * 2**(e - 127)``, computed in
    float32 by exponent arithmetic and cast once, bit for bit what
    ``fp4jax.dequantize`` gives for the same codes and scales as an MXFP4
    QArray (tests check every code with every scale byte). Scale byte 0xFF is
    E8M0's NaN (OCP MX v1.0): the whole block is NaN, as for a QArray, where
    fp4jax stores it for a block that held NaN or Inf (an ``ldexp`` decoder
    would turn such a block into zeros and infinities). Results below float32's
    normal range (``< 2**-126``) are flushed to zero on every backend, and
    results beyond ``dtype``'s range (byte 254 with codes above 0.5 in
    float32) saturate to its largest finite value, as a QArray's do.
  """
  blocks = jnp.asarray(as_array(blocks, "dequantize_packed"))
  scales = jnp.asarray(as_array(scales, "dequantize_packed"))
  dtype = float_dtype(dtype, "dequantize_packed: dtype")
  if blocks.dtype not in (jnp.uint8, jnp.int8):
    raise ValueError(f"dequantize_packed: blocks must be uint8 or int8, got dtype {blocks.dtype}")
  if scales.dtype == jnp.float8_e8m0fnu:
    scales = lax.bitcast_convert_type(scales, jnp.uint8)
  elif scales.dtype != jnp.uint8:
    raise ValueError(f"dequantize_packed: scales must be uint8 or float8_e8m0fnu, got dtype {scales.dtype}")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0 or block_size % 2:
    raise ValueError(f"dequantize_packed: block_size must be a positive even int, got {block_size!r}")
  if (blocks.ndim == 0 or scales.ndim != blocks.ndim or blocks.shape[:-1] != scales.shape[:-1]
      or 2 * blocks.shape[-1] != scales.shape[-1] * block_size):
    raise ValueError(
        f"dequantize_packed: blocks shape {blocks.shape} and scales shape {scales.shape} do not "
        f"agree: expected blocks (..., K//2) and scales (..., K//{block_size}) with the same leading axes"
    )
  values = unpack_fp4(blocks, axis=-1).astype(jnp.float32)
  values = values.reshape(*scales.shape, block_size)
  # The operations of fp4jax.scales.decode_blocks and dequantize_reference, in
  # their order, so that both decoders give the same bits on every backend.
  out = _bits.scale_by_pow2(values, scales.astype(jnp.int32)[..., None] - MXFP4.scale_bias)
  out = jnp.where((scales == MXFP4.scale_nan_byte)[..., None], jnp.nan, out)
  out = _bits.saturate(_bits.flush_subnormals(out), dtype)
  return out.reshape(*blocks.shape[:-1], 2 * blocks.shape[-1]).astype(dtype)
