"""Byte layouts of other libraries: GPT-OSS MXFP4 checkpoints, cuBLAS/CUTLASS scale swizzles.

Every layout comes with its exact inverse:

* :func:`from_gpt_oss` / :func:`to_gpt_oss`: the ``*_blocks`` / ``*_scales``
  tensors of GPT-OSS checkpoints <-> an MXFP4 :class:`~fp4jax.QArray`.
* :func:`swizzle_scales` / :func:`unswizzle_scales`: a row-major block-scale
  matrix <-> the tiled byte order that Blackwell block-scaled GEMMs read
  (cuBLAS/CUTLASS "128x4", TensorRT-LLM/FlashInfer "8x4").
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax.formats import MXFP4
from fp4jax.packing import unpack_fp4
from fp4jax.prepared import byte_matrix
from fp4jax.qarray import QArray, validate_qarray

__all__ = [
    "from_gpt_oss",
    "to_gpt_oss",
    "swizzle_scales",
    "unswizzle_scales",
    "swizzled_shape",
    "SCALE_LAYOUTS",
]

# ---- GPT-OSS -----------------------------------------------------------------

# Bytes that hold one MXFP4 block's packed elements (16).
_GPT_OSS_BLOCK_BYTES = MXFP4.block_size * MXFP4.elem_bits // 8


def _scale_bytes_or_raise(scales, what: str):
  scales = jnp.asarray(scales)
  if scales.dtype == jnp.float8_e8m0fnu:
    return lax.bitcast_convert_type(scales, jnp.uint8)
  if scales.dtype != jnp.uint8:
    raise ValueError(f"{what}: scales must be uint8 E8M0 bytes or float8_e8m0fnu, got dtype {scales.dtype}")
  return scales


def from_gpt_oss(blocks, scales) -> QArray:
  """GPT-OSS MXFP4 checkpoint tensors -> an MXFP4 QArray along the last axis.

  GPT-OSS stores each MXFP4 weight as two tensors (``*_blocks``, ``*_scales``):

  Args:
    blocks: uint8 ``(..., G, 16)``: block ``g`` of a row packed two E2M1 codes
      a byte, element ``2i`` in the low nibble of byte ``i``.
    scales: uint8 ``(..., G)`` E8M0 bytes (byte ``e`` means ``2**(e - 127)``,
      0xFF is NaN), or the same as ``float8_e8m0fnu``.

  Returns:
    ``QArray`` with ``fmt=MXFP4``, ``axis=-1``, ``values`` ``float4_e2m1fn``
    ``(..., G * 32)`` and ``scales`` ``float8_e8m0fnu`` ``(..., G)``. The bytes
    are reinterpreted, not converted: :func:`to_gpt_oss` gives them back bit
    for bit (negative zero and NaN scales included).
  """
  blocks = jnp.asarray(blocks)
  if blocks.dtype != jnp.uint8:
    raise ValueError(f"from_gpt_oss: blocks must be uint8, got dtype {blocks.dtype}")
  if blocks.ndim < 2 or blocks.shape[-1] != _GPT_OSS_BLOCK_BYTES:
    raise ValueError(
        f"from_gpt_oss: blocks shape {blocks.shape} must be (..., G, {_GPT_OSS_BLOCK_BYTES}): "
        f"{_GPT_OSS_BLOCK_BYTES} bytes hold one block of {MXFP4.block_size} E2M1 codes"
    )
  scales = _scale_bytes_or_raise(scales, "from_gpt_oss")
  if tuple(scales.shape) != tuple(blocks.shape[:-1]):
    raise ValueError(
        f"from_gpt_oss: scales shape {scales.shape} does not match blocks shape {blocks.shape}: "
        f"expected {blocks.shape[:-1]}"
    )
  lead, n_blocks = blocks.shape[:-2], blocks.shape[-2]
  values = unpack_fp4(blocks.reshape(*lead, n_blocks * _GPT_OSS_BLOCK_BYTES), axis=-1)
  q = QArray(values, lax.bitcast_convert_type(scales, MXFP4.scale_dtype), None, MXFP4, -1)
  return validate_qarray(q)


def to_gpt_oss(q: QArray) -> tuple:
  """Inverse of :func:`from_gpt_oss`: an MXFP4 QArray along its last axis -> ``(blocks, scales)``.

  Args:
    q: ``QArray`` with ``fmt=MXFP4`` and ``axis=-1``, of shape ``(..., G * 32)``
      (either storage layout).

  Returns:
    ``blocks`` uint8 ``(..., G, 16)`` (low nibble = even element) and
    ``scales`` uint8 ``(..., G)`` (the E8M0 bytes).
  """
  if not isinstance(q, QArray):
    raise ValueError(f"to_gpt_oss expects a fp4jax.QArray, got {type(q).__name__}")
  if q.fmt != MXFP4:
    raise ValueError(f"to_gpt_oss: GPT-OSS stores MXFP4, got a QArray of {q.fmt!r}")
  validate_qarray(q)
  if q.axis != -1:
    raise ValueError(
        f"to_gpt_oss: GPT-OSS blocks run along the last axis; the QArray of shape {q.shape} "
        f"is blocked along axis {q.axis}"
    )
  data, scales = byte_matrix(q)  # packed along the last axis (a "rows" QArray's own leaves)
  lead = q.shape[:-1]
  blocks = data.reshape(*lead, q.shape[-1] // MXFP4.block_size, _GPT_OSS_BLOCK_BYTES)
  return blocks, scales.reshape(*lead, q.shape[-1] // MXFP4.block_size)


# ---- cuBLAS / CUTLASS block-scale swizzles -------------------------------------

# A layout is a tile of (row_groups * rows_per_group) rows by 4 scale columns,
# stored tile after tile (row tiles outer, column tiles inner). Inside a tile,
# byte (r, c) with r = g * rows_per_group + j sits at j * (4 * row_groups) + g * 4
# + c: for "128x4" the 128 rows are 4 groups of 32 interleaved so that one
# 16-byte load holds 4 rows x 4 scales; "8x4" is a plain row-major 8x4 tile.
SCALE_LAYOUTS: dict[str, tuple[int, int]] = {
    "128x4": (4, 32),  # (row_groups, rows_per_group)
    "8x4": (1, 8),
}
_TILE_COLS = 4
_SCALE_DTYPES = (jnp.uint8, jnp.float8_e8m0fnu, jnp.float8_e4m3fn)


def _layout(layout: str) -> tuple[int, int]:
  if layout not in SCALE_LAYOUTS:
    raise ValueError(f"unknown scale layout {layout!r}; expected one of {sorted(SCALE_LAYOUTS)}")
  return SCALE_LAYOUTS[layout]


def _check_scale_dtype(dtype, what: str):
  if dtype not in [np.dtype(d) for d in _SCALE_DTYPES]:
    raise ValueError(
        f"{what}: scales must be uint8, float8_e8m0fnu or float8_e4m3fn, got dtype {dtype}"
    )


def swizzled_shape(rows: int, cols: int, layout: str = "128x4") -> tuple[int, int]:
  """``(padded_rows, padded_cols)`` of a ``rows x cols`` scale matrix in ``layout``."""
  groups, per_group = _layout(layout)
  tile_rows = groups * per_group
  return -(-rows // tile_rows) * tile_rows, -(-cols // _TILE_COLS) * _TILE_COLS


def swizzle_scales(scales, layout: str = "128x4"):
  """Block scales ``(..., rows, cols)`` -> the tiled byte order of Blackwell GEMMs.

  ``rows`` is the non-contracting dimension (M or N) and ``cols`` the number of
  scale blocks along K. The matrix is zero-padded to ``padded_rows`` (a multiple
  of 128, or 8 for ``"8x4"``) by ``padded_cols`` (a multiple of 4) and laid out
  so that scale ``(r, c)`` lands at flat offset

  ``"128x4"`` (cuBLAS docs, "1D Block Scaling Factors Layout")::

    ((r // 128) * (padded_cols // 4) + c // 4) * 512
        + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4

  ``"8x4"`` (TensorRT-LLM's ``get_sf_out_offset_8x4``, also in FlashInfer
  ``csrc/nv_internal/tensorrt_llm/kernels/quantization_utils.cuh``, used for
  ``SfLayout.layout_8x4``; 8-row tiles for small-M activations)::

    ((r // 8) * (padded_cols // 4) + c // 4) * 32 + (r % 8) * 4 + c % 4

  Leading axes are independent matrices stored one after another, each of
  ``padded_rows * padded_cols`` bytes, as TensorRT-LLM's batched offset does.

  Args:
    scales: ``(..., rows, cols)`` uint8, ``float8_e8m0fnu`` or ``float8_e4m3fn``.
    layout: ``"128x4"`` or ``"8x4"``.

  Returns:
    ``(..., padded_rows * padded_cols)``, same dtype as ``scales``. Padding
    holds zero bytes: 0.0 for E4M3, ``2**-127`` for E8M0 (not 0xFF, which is
    NaN and would poison a GEMM reading padded rows; the padded elements are
    zero, so the product is zero either way).
  """
  scales = jnp.asarray(scales)
  _check_scale_dtype(scales.dtype, "swizzle_scales")
  if scales.ndim < 2:
    raise ValueError(f"swizzle_scales needs a (..., rows, cols) scale matrix, got shape {scales.shape}")
  groups, per_group = _layout(layout)
  *lead, rows, cols = scales.shape
  prows, pcols = swizzled_shape(rows, cols, layout)
  # Work on bytes: padding an E8M0 array with the value 0 would write 0xFF.
  b = lax.bitcast_convert_type(scales, jnp.uint8) if scales.dtype != jnp.uint8 else scales
  b = jnp.pad(b, [(0, 0)] * len(lead) + [(0, prows - rows), (0, pcols - cols)])
  n = len(lead)
  b = b.reshape(*lead, prows // (groups * per_group), groups, per_group, pcols // _TILE_COLS, _TILE_COLS)
  # (row_tile, group, j, col_tile, c) -> (row_tile, col_tile, j, group, c)
  b = b.transpose(*range(n), n, n + 3, n + 2, n + 1, n + 4)
  b = b.reshape(*lead, prows * pcols)
  return b if scales.dtype == jnp.uint8 else lax.bitcast_convert_type(b, scales.dtype)


def unswizzle_scales(swizzled, shape, layout: str = "128x4"):
  """Inverse of :func:`swizzle_scales`: drops the padding and restores ``(..., rows, cols)``.

  Args:
    swizzled: ``(..., padded_rows * padded_cols)`` uint8, ``float8_e8m0fnu`` or
      ``float8_e4m3fn``, as :func:`swizzle_scales` returns.
    shape: the unpadded ``(rows, cols)``, or the full ``(..., rows, cols)``
      whose leading axes must equal ``swizzled.shape[:-1]``.
    layout: ``"128x4"`` or ``"8x4"``.

  Returns:
    ``(..., rows, cols)`` array of ``swizzled``'s dtype.
  """
  swizzled = jnp.asarray(swizzled)
  _check_scale_dtype(swizzled.dtype, "unswizzle_scales")
  shape = tuple(int(d) for d in shape)
  if len(shape) < 2 or min(shape[-2:]) < 1:
    raise ValueError(f"unswizzle_scales: shape must be (..., rows, cols) with rows, cols >= 1, got {shape}")
  if swizzled.ndim < 1:
    raise ValueError(f"unswizzle_scales needs a (..., padded_rows * padded_cols) array, got shape {swizzled.shape}")
  groups, per_group = _layout(layout)
  rows, cols = shape[-2:]
  lead = tuple(swizzled.shape[:-1])
  prows, pcols = swizzled_shape(rows, cols, layout)
  if (len(shape) > 2 and shape[:-2] != lead) or swizzled.shape[-1] != prows * pcols:
    raise ValueError(
        f"unswizzle_scales: swizzled shape {swizzled.shape} does not fit shape {shape} in layout "
        f"{layout!r}: expected {lead if len(shape) == 2 else shape[:-2]} + ({prows * pcols},) "
        f"for {prows}x{pcols} padded scales"
    )
  b = lax.bitcast_convert_type(swizzled, jnp.uint8) if swizzled.dtype != jnp.uint8 else swizzled
  n = len(lead)
  b = b.reshape(*lead, prows // (groups * per_group), pcols // _TILE_COLS, per_group, groups, _TILE_COLS)
  # (row_tile, col_tile, j, group, c) -> (row_tile, group, j, col_tile, c)
  b = b.transpose(*range(n), n, n + 3, n + 2, n + 1, n + 4)
  b = b.reshape(*lead, prows, pcols)[..., :rows, :cols]
  return b if swizzled.dtype == jnp.uint8 else lax.bitcast_convert_type(b, swizzled.dtype)
