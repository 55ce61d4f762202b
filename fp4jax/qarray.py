"""QArray: a block-scaled array as a JAX pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.formats import Format

__all__ = ["QArray", "validate_qarray", "normalize_axis", "as_array", "float_dtype", "check_global_scale_shape",
           "xla_only_reason", "rows_obstacle", "set_dequantize", "set_relayout", "STORAGE_LAYOUTS"]

#: How a QArray's leaves are stored (its static ``layout``): ``None``, the
#: logical array; ``"rows"``, the matmul kernels' byte rows (see QArray).
STORAGE_LAYOUTS = (None, "rows")


def normalize_axis(axis: int, ndim: int, shape: Any = None) -> int:
  """Returns ``axis`` as a negative index, or raises ValueError.

  Negative axes survive ``vmap`` (which prepends batch dimensions to every
  leaf), so QArray stores its block axis that way.
  """
  if not isinstance(axis, (int, np.integer)):
    raise ValueError(f"axis must be an int, got {axis!r}")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for an array of shape {shape} (ndim {ndim})")
  return int(axis) - ndim if axis >= 0 else int(axis)


def as_array(x, what: str):
  """``x`` when it is an array (numpy, jax, a tracer), else ``jnp.asarray(x)`` (a list, a Python float).

  Raises ValueError naming ``what`` (the calling function) for what JAX cannot
  make an array of (strings, ragged lists, None), instead of JAX's TypeError.
  """
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} expects an array; a {type(x).__name__} is not an array of numbers "
                     f"(no shape and dtype): {e}") from None


def float_dtype(dtype, what: str) -> np.dtype:
  """``dtype`` as a numpy dtype, or ValueError naming ``what`` unless it is a floating dtype."""
  try:
    d = np.dtype(dtype)
  except TypeError:
    raise ValueError(f"{what} must be a floating dtype, got {dtype!r}") from None
  if not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f"{what} must be floating, got dtype {d}")
  return d


@jax.tree_util.register_pytree_node_class
class QArray:
  """A block-scaled quantized array.

  Invariants (checked by :func:`validate_qarray`):

  * ``values`` has the logical shape ``S`` and dtype ``fmt.elem_dtype``.
  * ``scales`` has shape ``S`` with ``S[axis]`` divided by ``fmt.block_size``
    and dtype ``fmt.scale_dtype``; element ``i`` along ``axis`` uses scale
    ``i // block_size``.
  * ``global_scale`` is the float32 decode factor when ``fmt.has_global_scale``
    and ``None`` otherwise: a scalar (one per tensor), or an array of ``S``'s
    rank whose every axis has length 1 or ``S[a]``, and length 1 along the
    block axes: ``(M, 1)`` for one per row of an ``(M, N)`` array blocked along
    its last axis, ``(E, 1, 1)`` for one per expert of an ``(E, K, N)`` weight.
  * ``axis`` is stored negative, so it stays right under ``vmap``.
  * ``block_shape`` is ``None`` (1-D blocks along ``axis``, as above) or
    ``(B, B)`` with ``B = fmt.block_size``: 2-D blocks, one scale per ``B x B``
    tile of the last two axes. Then ``axis`` is -1, ``S[-2]`` and ``S[-1]``
    are multiples of ``B``, and ``scales`` has shape ``(*S[:-2], S[-2] // B,
    S[-1] // B)``: tile ``(i, j)`` covers rows ``i*B:(i+1)*B`` and columns
    ``j*B:(j+1)*B``. A matrix and its transpose have the same tiles, so
    ``q.T`` (values, scales and global scale transposed) is the quantization
    of the transposed matrix.

  The represented value is ``values * scales * global_scale`` (broadcasting
  each scale over its block), computed by :meth:`dequantize`.

  Storage layout (``layout``). The above is ``layout=None``, the logical
  array. ``layout="rows"`` stores a 2-D weight the way the matmul kernels read
  it, so that a jitted matmul passes its leaves straight to the kernel with no
  transpose, packing or bitcast per call. With logical shape ``S`` (``(K, N)``
  and ``axis=-2``, or ``(N, K)`` and ``axis=-1``; ``K`` is the block axis):

  * ``values``: uint8 ``(N, K * elem_bits // 8)``: row ``n`` holds output
    channel ``n``, contiguous along ``K``; 4-bit codes two a byte, the even
    ``k`` in the low nibble (``fp4jax.pack_fp4``'s rule), 8-bit elements as
    their bytes.
  * ``scales``: uint8 ``(N, K // block_size)``, the scale bit patterns.
  * ``global_scale``: as above, and a scalar.

  ``shape``, ``ndim``, ``axis``, ``block_axes`` and :meth:`dequantize` are the
  logical array's in both layouts, and every fp4jax function taking a QArray
  takes either with the same numbers. Only 2-D QArrays with 1-D blocks, native
  4- or 8-bit elements and a scalar (or no) global scale can be stored as
  ``"rows"`` (:func:`rows_obstacle` says why not). :meth:`with_layout`
  converts, exactly and invertibly.

  ``fmt``, ``axis``, ``block_shape`` and ``layout`` are static (pytree aux
  data): changing them retraces.

  Kernels, ``scaled_matmul`` kernel paths and checkpoint layouts take the 1-D
  block layout with a scalar global scale and the formats of
  ``fp4jax.FORMATS``; ``fp4jax.dequantize`` takes every QArray.
  """

  __slots__ = ("values", "scales", "global_scale", "fmt", "axis", "block_shape", "layout")

  def __init__(self, values, scales, global_scale, fmt: Format, axis: int,
               block_shape: tuple[int, int] | None = None, layout: str | None = None):
    self.values = values
    self.scales = scales
    self.global_scale = global_scale
    self.fmt = fmt
    self.axis = axis
    self.block_shape = None if block_shape is None else tuple(int(b) for b in block_shape)
    self.layout = layout

  # ---- pytree -------------------------------------------------------------
  def tree_flatten(self):
    return (self.values, self.scales, self.global_scale), (self.fmt, self.axis, self.block_shape, self.layout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  # ---- array-like ---------------------------------------------------------
  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape (for ``"rows"``, from the byte rows: ``(K, N)`` or ``(N, K)`` by ``axis``)."""
    if self.layout != "rows":
      return tuple(self.values.shape)
    # Leading axes appear only on stacked rows QArrays (tree_map / scan over
    # layers); they stay in front, as they would for a stack of plain ones.
    *lead, n, nbytes = self.values.shape
    k = nbytes * 8 // self.fmt.elem_bits
    return (*lead, k, n) if self.axis == -2 else (*lead, n, k)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def block_size(self) -> int:
    return self.fmt.block_size

  @property
  def nbytes(self) -> int:
    """Storage bytes with elements packed at their bit width, plus scales and global scales."""
    n_elem = int(np.prod(self.shape))
    n_scale = int(np.prod(self.scales.shape))
    extra = 4 * int(np.prod(jnp.shape(self.global_scale))) if self.global_scale is not None else 0
    return (n_elem * self.fmt.elem_bits + 7) // 8 + n_scale * (self.fmt.scale_finfo.bits // 8) + extra

  @property
  def block_axes(self) -> tuple[int, ...]:
    """The (negative) axes a block extends along: ``(axis,)``, or ``(-2, -1)`` for 2-D blocks."""
    return (self.axis,) if self.block_shape is None else (-2, -1)

  @property
  def T(self) -> "QArray":
    """The transpose of a 2-D QArray, as a QArray: exact, no re-quantization.

    With 1-D blocks the block axis moves with its axis (rows become columns);
    with 2-D blocks every tile is transposed in place, which is what
    quantizing the transposed matrix gives. A ``"rows"`` QArray stays
    ``"rows"`` with the same leaves: its byte rows do not depend on which way
    the logical matrix faces, so only ``axis`` changes (no data moves).
    """
    if self.ndim != 2:
      raise ValueError(f"QArray.T needs a 2-D QArray, got shape {self.shape}")
    if self.layout == "rows":
      return QArray(self.values, self.scales, self.global_scale, self.fmt, -3 - self.axis, None, "rows")
    g = self.global_scale
    if g is not None and jnp.ndim(g) == 2:
      g = g.T
    axis = self.axis if self.block_shape is not None else -3 - self.axis
    return QArray(self.values.T, self.scales.T, g, self.fmt, axis, self.block_shape)

  def dequantize(self, dtype=jnp.float32):
    """Same as ``fp4jax.dequantize(self, dtype)``."""
    return _DEQUANTIZE[0](self, dtype=dtype)

  def with_layout(self, layout: str | None) -> "QArray":
    """This QArray stored as ``layout`` (``None`` or ``"rows"``): exact and invertible.

    Same as ``fp4jax.prepared.with_layout(self, layout)``; returns ``self``
    when it is already stored that way. Raises ValueError for a QArray that
    ``"rows"`` cannot hold (see :func:`rows_obstacle`).
    """
    return _RELAYOUT[0](self, layout)

  def __repr__(self) -> str:
    blocks = "" if self.block_shape is None else f", block_shape={self.block_shape}"
    layout = "" if self.layout is None else f", layout={self.layout!r}"
    return (
        f"QArray(fmt={self.fmt!r}, shape={self.shape}, axis={self.axis}{blocks}{layout}, "
        f"scales={getattr(self.scales, 'shape', None)})"
    )


# ``fp4jax.quantize`` and ``fp4jax.prepared`` install their ``dequantize`` and
# ``with_layout`` here when imported (``import fp4jax`` always imports them):
# QArray, a layer below the numerics and packing, must not import them.
_DEQUANTIZE = [None]
_RELAYOUT = [None]


def set_dequantize(fn) -> None:
  """Installs the function behind :meth:`QArray.dequantize` (called by ``fp4jax.quantize``)."""
  _DEQUANTIZE[0] = fn


def set_relayout(fn) -> None:
  """Installs the function behind :meth:`QArray.with_layout` (called by ``fp4jax.prepared``)."""
  _RELAYOUT[0] = fn


def check_global_scale_shape(gshape, shape, block_axes, what: str = "global_scale") -> None:
  """Raises ValueError unless ``gshape`` is ``()`` or a per-group shape for ``shape``.

  A per-group shape has ``len(shape)`` axes, each of length 1 or ``shape[a]``,
  and length 1 along every axis in ``block_axes`` (a block must not straddle
  two global scales).
  """
  gshape, shape = tuple(gshape), tuple(shape)
  if gshape == ():
    return
  ok = len(gshape) == len(shape) and all(g in (1, n) for g, n in zip(gshape, shape))
  ok = ok and all(gshape[a] == 1 for a in block_axes)
  if not ok:
    blocked = sorted(a % len(shape) for a in block_axes)
    raise ValueError(
        f"{what} must be a float scalar, got shape {gshape}; a per-row / per-leading-axis {what} "
        f"for values of shape {shape} has {len(shape)} axes, each of length 1 or the values' length, "
        f"and length 1 along the block axes {blocked}")


def xla_only_reason(q: QArray) -> str | None:
  """Why only the XLA path can take ``q``, or None when a kernel may.

  The Pallas kernels (quantize, dequantize, matmul) read native element
  dtypes with 1-D blocks and at most one tensor-wide scale; 2-D blocks,
  per-group global scales and elements stored as codes (MXFP6, MXINT8) are
  features of the XLA path. Every kernel entry point asks this first, so a
  new QArray feature falls back instead of being misread.
  """
  if q.block_shape is not None:
    return f"2-D blocks {q.block_shape} run on the XLA path only"
  if q.fmt.elem_storage != "native":
    return f"{q.fmt!r} stores its elements as {q.fmt.elem_storage!r} (XLA path only)"
  if q.global_scale is not None and jnp.ndim(q.global_scale) > 0:
    return (f"a per-group global scale (one per row / leading index) of shape {jnp.shape(q.global_scale)} "
            "runs on the XLA path only")
  return None


def rows_obstacle(q: QArray) -> str | None:
  """Why ``q`` cannot be stored in the ``"rows"`` layout, or None when it can.

  The byte rows hold what the matmul kernels read: a 2-D matrix with 1-D
  blocks, native 4- or 8-bit elements and at most one tensor-wide scale.
  """
  if why := xla_only_reason(q):
    return why
  if q.ndim != 2:
    return f"the 'rows' layout holds 2-D weights (K, N) or (N, K), got shape {q.shape}"
  if q.fmt.elem_bits not in (4, 8):
    return f"the 'rows' layout holds 4- or 8-bit elements, {q.fmt!r} has {q.fmt.elem_bits}"
  return None


def _validate_rows(q: QArray) -> QArray:
  """The ``"rows"`` invariants (see the QArray docstring)."""
  fmt = q.fmt
  v, s = q.values, q.scales
  if q.block_shape is not None:
    raise ValueError(f"QArray layout 'rows' holds 1-D blocks, got block_shape {q.block_shape}")
  if fmt.elem_storage != "native" or fmt.elem_bits not in (4, 8):
    raise ValueError(f"QArray layout 'rows' holds native 4- or 8-bit elements, not {fmt!r} "
                     f"({fmt.elem_bits}-bit, stored as {fmt.elem_storage!r})")
  if q.axis not in (-2, -1):
    raise ValueError(f"QArray layout 'rows' needs axis -2 (a (K, N) weight) or -1 ((N, K)), got {q.axis}")
  if v.dtype != jnp.uint8 or s.dtype != jnp.uint8 or len(v.shape) != 2 or len(s.shape) != 2:
    raise ValueError(f"QArray layout 'rows' stores uint8 values (N, K*bits/8) and uint8 scales (N, K/block), "
                     f"got values {v.dtype} {tuple(v.shape)} and scales {s.dtype} {tuple(s.shape)}")
  n, k = v.shape[0], v.shape[1] * 8 // fmt.elem_bits
  if tuple(s.shape) != (n, k // fmt.block_size) or k % fmt.block_size:
    raise ValueError(f"QArray layout 'rows': values {tuple(v.shape)} hold {n} rows of K={k} {fmt!r} elements, "
                     f"so scales should be ({n}, {k // fmt.block_size}) with K a multiple of {fmt.block_size}, "
                     f"got {tuple(s.shape)}")
  if q.global_scale is not None and jnp.ndim(q.global_scale) != 0:
    raise ValueError(f"QArray layout 'rows' holds a scalar global scale, got shape {jnp.shape(q.global_scale)}")
  _validate_global_scale(q, q.shape)
  return q


def _validate_global_scale(q: QArray, shape) -> None:
  fmt = q.fmt
  if fmt.has_global_scale:
    if q.global_scale is None or jnp.result_type(q.global_scale) != jnp.float32:
      raise ValueError(f"{fmt!r} needs a float32 scalar global_scale (or one per row / leading index), "
                       f"got {q.global_scale!r}")
    check_global_scale_shape(jnp.shape(q.global_scale), shape, q.block_axes, "QArray.global_scale")
  elif q.global_scale is not None:
    raise ValueError(f"{fmt!r} has no global scale, got {q.global_scale!r}")


def validate_qarray(q: QArray) -> QArray:
  """Checks the QArray invariants (either layout); raises ValueError naming what is wrong."""
  fmt = q.fmt
  if not isinstance(fmt, Format):
    raise ValueError(f"QArray.fmt must be a fp4jax.Format, got {fmt!r}")
  if q.layout not in STORAGE_LAYOUTS:
    raise ValueError(f"QArray.layout must be one of {STORAGE_LAYOUTS}, got {q.layout!r}")
  if q.layout == "rows":
    return _validate_rows(q)
  shape = tuple(q.values.shape)
  if not -len(shape) <= q.axis < 0:
    raise ValueError(f"QArray.axis {q.axis} must be negative and within ndim {len(shape)}")
  if q.values.dtype != fmt.elem_dtype:
    raise ValueError(f"QArray.values dtype is {q.values.dtype}, {fmt!r} stores {np.dtype(fmt.elem_dtype)}")
  if q.scales.dtype != fmt.scale_dtype:
    raise ValueError(f"QArray.scales dtype is {q.scales.dtype}, {fmt!r} stores {np.dtype(fmt.scale_dtype)}")
  b = fmt.block_size
  want = list(shape)
  if q.block_shape is None:
    n = shape[q.axis]
    if n % b:
      raise ValueError(
          f"QArray values shape {shape} has length {n} along axis {q.axis}, "
          f"not a multiple of block size {b}"
      )
    want[q.axis] = n // b
  else:
    if q.block_shape != (b, b) or q.axis != -1 or len(shape) < 2:
      raise ValueError(f"QArray.block_shape {q.block_shape} with axis {q.axis} and values shape {shape}: "
                       f"{fmt!r} 2-D blocks are ({b}, {b}) tiles of the last two axes, with axis -1")
    if shape[-2] % b or shape[-1] % b:
      raise ValueError(f"QArray values shape {shape} is not a whole number of {b}x{b} tiles")
    want[-2:] = [shape[-2] // b, shape[-1] // b]
  if tuple(q.scales.shape) != tuple(want):
    raise ValueError(f"QArray scales shape {tuple(q.scales.shape)} does not match values shape {shape}: expected {tuple(want)}")
  _validate_global_scale(q, shape)
  return q
