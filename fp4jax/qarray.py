"""QArray: a block-scaled array as a JAX pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.formats import Format

__all__ = ["QArray", "validate_qarray", "normalize_axis", "as_array", "float_dtype", "check_global_scale_shape",
           "xla_only_reason",
           "set_dequantize"]


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

  ``fmt``, ``axis`` and ``block_shape`` are static (pytree aux data):
  changing them retraces.

  Kernels, ``scaled_matmul`` kernel paths and checkpoint layouts take the 1-D
  block layout with a scalar global scale and the formats of
  ``fp4jax.FORMATS``; ``fp4jax.dequantize`` takes every QArray.
  """

  __slots__ = ("values", "scales", "global_scale", "fmt", "axis", "block_shape")

  def __init__(self, values, scales, global_scale, fmt: Format, axis: int,
               block_shape: tuple[int, int] | None = None):
    self.values = values
    self.scales = scales
    self.global_scale = global_scale
    self.fmt = fmt
    self.axis = axis
    self.block_shape = None if block_shape is None else tuple(int(b) for b in block_shape)

  # ---- pytree -------------------------------------------------------------
  def tree_flatten(self):
    return (self.values, self.scales, self.global_scale), (self.fmt, self.axis, self.block_shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  # ---- array-like ---------------------------------------------------------
  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

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
    quantizing the transposed matrix gives.
    """
    if self.ndim != 2:
      raise ValueError(f"QArray.T needs a 2-D QArray, got shape {self.shape}")
    g = self.global_scale
    if g is not None and jnp.ndim(g) == 2:
      g = g.T
    axis = self.axis if self.block_shape is not None else -3 - self.axis
    return QArray(self.values.T, self.scales.T, g, self.fmt, axis, self.block_shape)

  def dequantize(self, dtype=jnp.float32):
    """Same as ``fp4jax.dequantize(self, dtype)``."""
    return _DEQUANTIZE[0](self, dtype=dtype)

  def __repr__(self) -> str:
    blocks = "" if self.block_shape is None else f", block_shape={self.block_shape}"
    return (
        f"QArray(fmt={self.fmt!r}, shape={self.shape}, axis={self.axis}{blocks}, "
        f"scales={getattr(self.scales, 'shape', None)})"
    )


# ``fp4jax.quantize`` installs its ``dequantize`` here when it is imported
# (``import fp4jax`` always imports it): QArray, a layer below the numerics,
# must not import them.
_DEQUANTIZE = [None]


def set_dequantize(fn) -> None:
  """Installs the function behind :meth:`QArray.dequantize` (called by ``fp4jax.quantize``)."""
  _DEQUANTIZE[0] = fn


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


def validate_qarray(q: QArray) -> QArray:
  """Checks the QArray invariants; raises ValueError naming what is wrong."""
  fmt = q.fmt
  if not isinstance(fmt, Format):
    raise ValueError(f"QArray.fmt must be a fp4jax.Format, got {fmt!r}")
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
  if fmt.has_global_scale:
    if q.global_scale is None or jnp.result_type(q.global_scale) != jnp.float32:
      raise ValueError(f"{fmt!r} needs a float32 scalar global_scale (or one per row / leading index), "
                       f"got {q.global_scale!r}")
    check_global_scale_shape(jnp.shape(q.global_scale), shape, q.block_axes, "QArray.global_scale")
  elif q.global_scale is not None:
    raise ValueError(f"{fmt!r} has no global scale, got {q.global_scale!r}")
  return q
