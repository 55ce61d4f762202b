"""QArray: a block-scaled array as a JAX pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.formats import Format

__all__ = ["QArray", "validate_qarray", "normalize_axis"]


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


@jax.tree_util.register_pytree_node_class
class QArray:
  """A block-scaled quantized array.

  Invariants (checked by :func:`validate_qarray`):

  * ``values`` has the logical shape ``S`` and dtype ``fmt.elem_dtype``.
  * ``scales`` has shape ``S`` with ``S[axis]`` divided by ``fmt.block_size``
    and dtype ``fmt.scale_dtype``; element ``i`` along ``axis`` uses scale
    ``i // block_size``.
  * ``global_scale`` is a float32 scalar (the decode factor) when
    ``fmt.has_global_scale`` and ``None`` otherwise.
  * ``axis`` is stored negative, so it stays right under ``vmap``.

  The represented value is ``values * scales * global_scale`` (broadcasting
  each scale over its block), computed by :meth:`dequantize`.

  ``fmt`` and ``axis`` are static (pytree aux data): changing them retraces.
  """

  __slots__ = ("values", "scales", "global_scale", "fmt", "axis")

  def __init__(self, values, scales, global_scale, fmt: Format, axis: int):
    self.values = values
    self.scales = scales
    self.global_scale = global_scale
    self.fmt = fmt
    self.axis = axis

  # ---- pytree -------------------------------------------------------------
  def tree_flatten(self):
    return (self.values, self.scales, self.global_scale), (self.fmt, self.axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    values, scales, global_scale = children
    fmt, axis = aux
    return cls(values, scales, global_scale, fmt, axis)

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
    """Storage bytes with elements packed at their bit width, plus scales."""
    n_elem = int(np.prod(self.shape))
    n_scale = int(np.prod(self.scales.shape))
    extra = 4 if self.global_scale is not None else 0
    return (n_elem * self.fmt.elem_bits + 7) // 8 + n_scale * (self.fmt.scale_finfo.bits // 8) + extra

  def dequantize(self, dtype=jnp.float32):
    """Same as ``fp4jax.dequantize(self, dtype)``."""
    from fp4jax.quantize import dequantize  # quantize imports this module.

    return dequantize(self, dtype=dtype)

  def __repr__(self) -> str:
    return (
        f"QArray(fmt={self.fmt!r}, shape={self.shape}, axis={self.axis}, "
        f"scales={getattr(self.scales, 'shape', None)})"
    )


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
  n = shape[q.axis]
  if n % fmt.block_size:
    raise ValueError(
        f"QArray values shape {shape} has length {n} along axis {q.axis}, "
        f"not a multiple of block size {fmt.block_size}"
    )
  want = list(shape)
  want[q.axis] = n // fmt.block_size
  if tuple(q.scales.shape) != tuple(want):
    raise ValueError(f"QArray scales shape {tuple(q.scales.shape)} does not match values shape {shape}: expected {tuple(want)}")
  if fmt.has_global_scale:
    if q.global_scale is None or tuple(jnp.shape(q.global_scale)) != () or jnp.result_type(q.global_scale) != jnp.float32:
      raise ValueError(f"{fmt!r} needs a float32 scalar global_scale, got {q.global_scale!r}")
  elif q.global_scale is not None:
    raise ValueError(f"{fmt!r} has no global scale, got {q.global_scale!r}")
  return q
