"""The kernels' weight layout: a QArray's ``"rows"`` storage and its byte matrices.

A 2-D weight QArray can be stored as the matmul kernels read it (``layout=
"rows"``, see :class:`~fp4jax.QArray`): output channels as rows of bytes,
contiguous along the blocked, contracting axis ``K``. :func:`with_layout`
converts between that and the logical storage, exactly both ways, once (at
quantization or load time) rather than on every call.

:func:`byte_matrix` gives any QArray's ``(rows, K)`` byte matrices, which for a
``"rows"`` QArray are its leaves as they are. ``prepare_weight`` is the
deprecated name of ``with_layout(w, "rows")``; ``PreparedWeight`` is gone (a
``"rows"`` QArray is that weight).
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from jax import lax

from fp4jax import qarray
from fp4jax.packing import pack_fp4, unpack_fp4
from fp4jax.qarray import STORAGE_LAYOUTS, QArray, rows_obstacle, validate_qarray

__all__ = ["byte_matrix", "with_layout", "prepare_weight", "PREPARED_WEIGHT_GONE"]

PREPARED_WEIGHT_GONE = (
    "fp4jax.PreparedWeight is gone: a QArray stored as q.with_layout('rows') is the kernels' weight "
    "(its values / scales are the old data / scales; .with_layout(None) is the old .to_qarray())")


def byte_matrix(q: QArray):
  """A QArray as the kernels' byte matrices, block axis last.

  Args:
    q: a QArray of logical shape ``S`` blocked along ``q.axis`` (native 4- or
      8-bit elements).

  Returns:
    ``(data, scales)``: uint8 ``(R, K * elem_bits // 8)`` with
    ``K = S[q.axis]`` and ``R`` the product of the other axes (in order), 4-bit
    codes packed two a byte along ``K`` (low nibble = even ``k``); and uint8
    ``(R, K // block_size)`` scale bit patterns. For a ``"rows"`` QArray these
    are its ``values`` and ``scales`` themselves: no op runs.
  """
  if q.layout == "rows":
    return q.values, q.scales
  fmt = q.fmt
  values = jnp.moveaxis(q.values, q.axis, -1)
  scales = jnp.moveaxis(q.scales, q.axis, -1)
  k = values.shape[-1]
  values = values.reshape(-1, k)
  scales = lax.bitcast_convert_type(scales.reshape(-1, scales.shape[-1]), jnp.uint8)
  if fmt.elem_storage != "native" or fmt.elem_bits not in (4, 8):
    raise ValueError(f"no byte layout for {fmt!r} ({fmt.elem_bits}-bit elements stored as {fmt.elem_storage!r})")
  if fmt.elem_bits == 4:
    data = pack_fp4(values, axis=-1)
  else:
    data = lax.bitcast_convert_type(values, jnp.uint8)
  return data, scales


def _rows_to_plain(q: QArray) -> QArray:
  fmt = q.fmt
  if fmt.elem_bits == 4:
    values = unpack_fp4(q.values, axis=-1)
  else:
    values = lax.bitcast_convert_type(q.values, fmt.elem_dtype)
  scales = lax.bitcast_convert_type(q.scales, fmt.scale_dtype)
  if q.axis == -2:  # a (K, N) weight: the rows are its columns
    values, scales = values.T, scales.T
  return QArray(values, scales, q.global_scale, fmt, q.axis, None)


def with_layout(q: QArray, layout: str | None) -> QArray:
  """``q`` stored as ``layout``: ``None`` (the logical array) or ``"rows"`` (the kernels' byte rows).

  Exact and invertible: ``with_layout(with_layout(q, "rows"), None)`` equals
  ``q`` leaf for leaf, and both dequantize to the same numbers. Returns ``q``
  itself when it is already stored as ``layout``. Under ``jax.jit`` this is a
  transpose and (4-bit) a nibble pack or unpack: do it once, outside the
  per-call function.

  Raises:
    ValueError: ``layout`` is unknown, ``q`` is not a valid QArray, or
      ``"rows"`` cannot hold ``q`` (not 2-D, 2-D blocks, elements stored as
      codes, a per-group global scale; see :func:`fp4jax.qarray.rows_obstacle`).
  """
  if not isinstance(q, QArray):
    raise ValueError(f"with_layout expects a fp4jax.QArray, got {type(q).__name__}")
  if layout not in STORAGE_LAYOUTS:
    raise ValueError(f"unknown QArray layout {layout!r}; expected one of {STORAGE_LAYOUTS}")
  validate_qarray(q)
  if q.layout == layout:
    return q
  if layout is None:
    return _rows_to_plain(q)
  if why := rows_obstacle(q):
    raise ValueError(f"cannot store {q!r} as 'rows': {why}")
  data, scales = byte_matrix(q)
  return QArray(data, scales, q.global_scale, q.fmt, q.axis, None, "rows")


qarray.set_relayout(with_layout)


def prepare_weight(w: QArray) -> QArray:
  """Deprecated: ``w.with_layout("rows")``, the kernels' layout as a QArray.

  Lays a ``(K, N)`` weight blocked along axis 0, or an ``(N, K)`` one blocked
  along axis 1, out once for the matmul kernels. The result is a QArray that
  every fp4jax function takes; ``.with_layout(None)`` gives ``w`` back.
  """
  warnings.warn("fp4jax.prepare_weight(w) is deprecated: use w.with_layout('rows') (or "
                "quantize(..., layout='rows') / quantize_params, which store it so)", DeprecationWarning,
                stacklevel=2)
  if not isinstance(w, QArray):
    raise ValueError(f"prepare_weight expects a fp4jax.QArray, got {type(w).__name__}")
  return with_layout(w, "rows")
