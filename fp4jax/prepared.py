"""The kernels' weight layout: a 2-D QArray as byte matrices, output channels as rows.

:func:`byte_matrix` lays any QArray out as ``(rows, K)`` bytes with the block
axis last; :class:`PreparedWeight` holds such a layout of a 2-D weight so that
it is done once, not on every call, and converts back exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fp4jax.formats import Format
from fp4jax.packing import pack_fp4, unpack_fp4
from fp4jax.qarray import QArray, validate_qarray, xla_only_reason

__all__ = ["byte_matrix", "PreparedWeight", "prepare_weight", "as_qarray"]


def byte_matrix(q: QArray):
  """A QArray as the kernels' byte matrices, block axis last.

  Args:
    q: a QArray of shape ``S`` blocked along ``q.axis``.

  Returns:
    ``(data, scales)``: uint8 ``(R, K * elem_bits // 8)`` with
    ``K = S[q.axis]`` and ``R`` the product of the other axes (in order), 4-bit
    codes packed two a byte along ``K`` (low nibble = even ``k``); and uint8
    ``(R, K // block_size)`` scale bit patterns.
  """
  fmt = q.fmt
  values = jnp.moveaxis(q.values, q.axis, -1)
  scales = jnp.moveaxis(q.scales, q.axis, -1)
  k = values.shape[-1]
  values = values.reshape(-1, k)
  scales = lax.bitcast_convert_type(scales.reshape(-1, scales.shape[-1]), jnp.uint8)
  if fmt.elem_bits == 4:
    data = pack_fp4(values, axis=-1)
  elif fmt.elem_bits == 8:
    data = lax.bitcast_convert_type(values, jnp.uint8)
  else:
    raise ValueError(f"no byte layout for {fmt!r} ({fmt.elem_bits}-bit elements)")
  return data, scales


@jax.tree_util.register_pytree_node_class
class PreparedWeight:
  """A 2-D block-scaled weight laid out once for the matmul kernels.

  Built by :func:`prepare_weight` from a QArray ``w`` of shape ``(K, N)``
  blocked along axis 0, or ``(N, K)`` blocked along axis 1 (``K`` is always
  the blocked, contracting axis). Leaves:

  * ``data``: uint8 ``(N, K * elem_bits // 8)``: row ``n`` is the ``n``-th
    output channel, its elements contiguous along ``K`` (4-bit codes two a
    byte, low nibble = even ``k``), so a kernel tile is a set of long runs.
  * ``scales``: uint8 ``(N, K // block_size)``: the block-scale bit patterns.
  * ``global_scale``: the float32 scalar of NVFP4, else None.

  Static: ``fmt`` and ``k_axis`` (0 or 1, where ``K`` sat in the QArray), so
  :meth:`to_qarray` gives back exactly the QArray it came from.
  """

  __slots__ = ("data", "scales", "global_scale", "fmt", "k_axis")

  def __init__(self, data, scales, global_scale, fmt: Format, k_axis: int):
    self.data = data
    self.scales = scales
    self.global_scale = global_scale
    self.fmt = fmt
    self.k_axis = k_axis

  def tree_flatten(self):
    return (self.data, self.scales, self.global_scale), (self.fmt, self.k_axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def n(self) -> int:
    return int(self.data.shape[0])

  @property
  def k(self) -> int:
    return int(self.scales.shape[1]) * self.fmt.block_size

  @property
  def shape(self) -> tuple[int, int]:
    """The logical shape of the weight it came from."""
    return (self.k, self.n) if self.k_axis == 0 else (self.n, self.k)

  @property
  def ndim(self) -> int:
    return 2

  def to_qarray(self) -> QArray:
    """The inverse of :func:`prepare_weight`."""
    fmt = self.fmt
    if fmt.elem_bits == 4:
      values = unpack_fp4(self.data, axis=-1)
    else:
      values = lax.bitcast_convert_type(self.data, fmt.elem_dtype)
    scales = lax.bitcast_convert_type(self.scales, fmt.scale_dtype)
    if self.k_axis == 0:
      values, scales = values.T, scales.T
    return QArray(values, scales, self.global_scale, fmt, self.k_axis - 2)

  def __repr__(self) -> str:
    return f"PreparedWeight(fmt={self.fmt!r}, shape={self.shape}, k_axis={self.k_axis})"


def prepare_weight(w: QArray) -> PreparedWeight:
  """Lays a 2-D QArray weight out once for the matmul kernels (reversible).

  Args:
    w: a QArray of shape ``(K, N)`` with ``axis=0`` (``-2``) or ``(N, K)`` with
      ``axis=1`` (``-1``); the block axis is the contracting axis ``K``.

  Returns:
    A :class:`PreparedWeight`; ``prepare_weight(w).to_qarray()`` equals ``w``
    leaf for leaf. Use it in place of ``w`` in :func:`scaled_matmul` /
    :func:`scaled_dot_general` to skip the per-call transpose and packing.
  """
  if not isinstance(w, QArray):
    raise ValueError(f"prepare_weight expects a fp4jax.QArray, got {type(w).__name__}")
  validate_qarray(w)
  if why := xla_only_reason(w):
    raise ValueError(f"prepare_weight: {why}; use the QArray itself with scaled_matmul")
  if w.ndim != 2:
    raise ValueError(f"prepare_weight expects a 2-D weight (K, N) or (N, K), got shape {w.shape}")
  data, scales = byte_matrix(w)
  return PreparedWeight(data, scales, w.global_scale, w.fmt, w.axis + 2)


def as_qarray(x):
  """A PreparedWeight as the QArray it came from; anything else as it is."""
  return x.to_qarray() if isinstance(x, PreparedWeight) else x
