"""Block-scaled matrix products: ``scaled_matmul`` and ``scaled_dot_general``.

The XLA path here (dequantize each QArray operand to float32, then a float32
``dot_general`` at HIGHEST precision) is the numerics contract: every matmul
kernel in ``fp4jax.kernels`` must match it to float32 rounding (the kernels
only reorder the float32 accumulation; every dequantized element is exact in
the bfloat16 or fp8 operands they feed the tensor cores).

Strategies for the cases the kernels take (a 2-D block-scaled ``rhs`` blocked
along the contracting axis, one contracting axis, no batch axes):

* ``w4a16`` kernel (Pallas): a bfloat16 ``lhs`` times a 4-bit (MXFP4 / NVFP4)
  or 8-bit (MXFP8) weight, dequantized in registers
  (:mod:`fp4jax.kernels.w4a16_matmul`).
* ``mx`` kernel (Pallas): a QArray ``lhs`` times a QArray weight of the same
  block size (:mod:`fp4jax.kernels.mx_matmul`).
* two-pass (XLA): each block-scaled operand dequantized to bfloat16 (exact,
  global scales held back), then a bfloat16 GEMM with float32 accumulation.
  For many rows this is what measured fastest on an H100: the GEMM library
  outruns a fused Pallas kernel and the extra pass costs little beside it.

``backend="auto"`` on a GPU picks the kernel for up to ``KERNEL_MAX_ROWS``
rows of ``lhs`` and the two-pass path above it; ``backend="pallas"`` always
runs the kernel (interpret mode without a GPU).

A weight that is used many times can be laid out once for the kernels with
:func:`prepare_weight`; the resulting :class:`PreparedWeight` is a pytree that
every function here accepts wherever a QArray weight is accepted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax.formats import Format
from fp4jax.packing import pack_fp4, unpack_fp4
from fp4jax.qarray import QArray, validate_qarray, xla_only_reason
from fp4jax.quantize import dequantize

__all__ = [
    "scaled_dot_general",
    "scaled_matmul",
    "scaled_dot_general_reference",
    "PreparedWeight",
    "prepare_weight",
    "byte_matrix",
]

_BACKENDS = ("auto", "xla", "pallas")

#: Under ``backend="auto"`` on a GPU, the most ``lhs`` rows (product of its free
#: axes) for which the Pallas kernel runs; above, the two-pass path. From the
#: crossover measured in benchmarks/results/matmul.md.
KERNEL_MAX_ROWS = {"w4a16": 256, "mx": 64}


# ---- byte-matrix layout (shared with the kernels) ---------------------------
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


def _as_qarray(x):
  return x.to_qarray() if isinstance(x, PreparedWeight) else x


# ---- reference ---------------------------------------------------------------
def _operand_f32(x, name: str):
  x = _as_qarray(x)
  if isinstance(x, QArray):
    return dequantize(x, jnp.float32, backend="xla")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"scaled_dot_general: {name} must be floating or a QArray, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def scaled_dot_general_reference(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32):
  """Dequantize then a float32-accumulated ``lax.dot_general``: the numerics contract."""
  out = lax.dot_general(
      _operand_f32(lhs, "lhs"), _operand_f32(rhs, "rhs"), dimension_numbers,
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )
  return out.astype(preferred_element_type)


# ---- validation --------------------------------------------------------------
def _check_operand(x, name: str):
  if isinstance(x, PreparedWeight):
    return x.shape
  if isinstance(x, QArray):
    validate_qarray(x)
    return x.shape
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"scaled_dot_general: {name} must be a floating array, a QArray or a "
                     f"PreparedWeight, got dtype {x.dtype} with shape {tuple(x.shape)}")
  return tuple(x.shape)


def _normalize_dims(dimension_numbers, lhs_shape, rhs_shape):
  """Checks ``((lc, rc), (lb, rb))`` against the shapes; returns it with axes >= 0."""
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in d) for d in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(
        f"dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
        f"got {dimension_numbers!r}") from None

  def norm(axes, shape, what):
    out = []
    for a in axes:
      if not -len(shape) <= a < len(shape):
        raise ValueError(f"scaled_dot_general: {what} axis {a} is out of range for shape {shape}")
      out.append(a % len(shape))
    if len(set(out)) != len(out):
      raise ValueError(f"scaled_dot_general: repeated {what} axes {axes} for shape {shape}")
    return tuple(out)

  lc, lb = norm(lc, lhs_shape, "lhs contracting"), norm(lb, lhs_shape, "lhs batch")
  rc, rb = norm(rc, rhs_shape, "rhs contracting"), norm(rb, rhs_shape, "rhs batch")
  if set(lc) & set(lb) or set(rc) & set(rb):
    raise ValueError(f"scaled_dot_general: an axis is both batch and contracting in {dimension_numbers!r}")
  for kind, a, b in (("contracting", lc, rc), ("batch", lb, rb)):
    if len(a) != len(b):
      raise ValueError(f"scaled_dot_general: {len(a)} lhs vs {len(b)} rhs {kind} axes in {dimension_numbers!r}")
    for i, j in zip(a, b):
      if lhs_shape[i] != rhs_shape[j]:
        raise ValueError(
            f"scaled_dot_general: {kind} sizes differ: lhs shape {lhs_shape} axis {i} has {lhs_shape[i]}, "
            f"rhs shape {rhs_shape} axis {j} has {rhs_shape[j]}")
  return (lc, rc), (lb, rb)


# ---- kernel dispatch -----------------------------------------------------------
def _block_axis(x):
  if isinstance(x, PreparedWeight):
    return x.k_axis
  return x.axis % x.ndim


def _kernel_plan(lhs, rhs, dims, out_dtype):
  """Which kernel takes this case: ("w4a16" | "mx", why_not) or (None, reason)."""
  (lc, rc), (lb, rb) = dims
  if lb or len(lc) != 1:
    return None, "the kernels take one contracting axis and no batch axes"
  if not isinstance(rhs, (QArray, PreparedWeight)) or len(rhs.shape) != 2:
    return None, "the kernels need a 2-D QArray or PreparedWeight rhs"
  for operand in (lhs, rhs):
    if isinstance(operand, QArray) and (why := xla_only_reason(operand)):
      return None, why
  if _block_axis(rhs) != rc[0]:
    return None, f"rhs is blocked along axis {_block_axis(rhs)}, not its contracting axis {rc[0]}"
  if isinstance(lhs, PreparedWeight):
    return None, "a PreparedWeight can only be the rhs"
  if not jnp.issubdtype(out_dtype, jnp.floating):
    return None, f"preferred_element_type {out_dtype} is not floating"
  if isinstance(lhs, QArray):
    if _block_axis(lhs) != lc[0]:
      return None, f"lhs is blocked along axis {_block_axis(lhs)}, not its contracting axis {lc[0]}"
    if lhs.fmt.block_size != rhs.fmt.block_size:
      return None, f"block sizes differ: {lhs.fmt!r} vs {rhs.fmt!r}"
    return "mx", ""
  if jnp.dtype(lhs.dtype) != jnp.bfloat16:
    return None, f"the w4a16 kernel takes bfloat16 activations, got {jnp.dtype(lhs.dtype)}"
  return "w4a16", ""


def _lhs_rows(lhs, dims) -> int:
  (lc, _), _ = dims
  return int(np.prod([s for i, s in enumerate(lhs.shape) if i != lc[0]], dtype=np.int64))


def _rows_bf16(x):
  """A QArray / PreparedWeight as exact bfloat16 rows ``(R, K)`` and its global scale."""
  from fp4jax.kernels import _matmul_common as common

  data, scales = (x.data, x.scales) if isinstance(x, PreparedWeight) else byte_matrix(x)
  return common.dequantize_tile(data, scales, x.fmt, jnp.bfloat16), x.global_scale


def _run_two_pass(kind, lhs, rhs, dims, out_dtype):
  (lc, _), _ = dims
  if kind == "w4a16":
    a = jnp.moveaxis(lhs, lc[0], -1)
    lead = a.shape[:-1]
    a, ga = a.reshape(-1, a.shape[-1]), None
  else:
    lead = tuple(s for i, s in enumerate(lhs.shape) if i != lc[0])
    a, ga = _rows_bf16(lhs)
  b, gb = _rows_bf16(rhs)
  # The barrier keeps XLA from fusing the dequantization into its own GEMM
  # emitter, which measured slower than the library GEMM on the bf16 copies.
  a, b = lax.optimization_barrier((a, b))
  out = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  for g in (ga, gb):
    if g is not None:
      out = out * g
  return out.astype(out_dtype).reshape(*lead, b.shape[0])


def _run_kernel(kind, lhs, rhs, dims, out_dtype, interpret):
  (lc, _), _ = dims
  w_data, w_scales = (rhs.data, rhs.scales) if isinstance(rhs, PreparedWeight) else byte_matrix(rhs)
  w_fmt, w_gs = rhs.fmt, rhs.global_scale
  n = w_data.shape[0]
  if kind == "w4a16":
    from fp4jax.kernels import w4a16_matmul  # lazy: the core does not need Pallas

    x = jnp.moveaxis(lhs, lc[0], -1)
    lead = x.shape[:-1]
    out = w4a16_matmul.w4a16_matmul(
        x.reshape(-1, x.shape[-1]), w_data, w_scales, w_gs, fmt=w_fmt, out_dtype=out_dtype,
        interpret=interpret)
    return out.reshape(*lead, n)
  from fp4jax.kernels import mx_matmul

  lead = tuple(s for i, s in enumerate(lhs.shape) if i != lc[0])
  a_data, a_scales = byte_matrix(lhs)
  out = mx_matmul.mx_matmul(
      a_data, a_scales, lhs.global_scale, w_data, w_scales, w_gs,
      a_fmt=lhs.fmt, b_fmt=w_fmt, out_dtype=out_dtype, interpret=interpret)
  return out.reshape(*lead, n)


def _with_reference_vjp(kind, strategy, dims, out_dtype, interpret):
  """The chosen forward, the reference's VJP backward (kernels have no autodiff)."""

  @jax.custom_vjp
  def f(lhs, rhs):
    if strategy == "two_pass":
      return _run_two_pass(kind, lhs, rhs, dims, out_dtype)
    return _run_kernel(kind, lhs, rhs, dims, out_dtype, interpret)

  def fwd(lhs, rhs):
    return f(lhs, rhs), (lhs, rhs)

  def bwd(res, g):
    lhs, rhs = res
    _, vjp = jax.vjp(lambda a, b: scaled_dot_general_reference(a, b, dims, out_dtype), lhs, rhs)
    return vjp(g)

  f.defvjp(fwd, bwd)
  return f


def scaled_dot_general(lhs, rhs, dimension_numbers, *, preferred_element_type=jnp.float32,
                       backend: str = "auto"):
  """``lax.dot_general`` where either operand may be block-scaled.

  Args:
    lhs, rhs: floating arrays, :class:`~fp4jax.QArray`\\ s, or (``rhs`` only) a
      :class:`PreparedWeight`. A QArray is normally blocked along a contracting
      axis; the XLA path accepts any block axis.
    dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch,
      rhs_batch))`` as for ``lax.dot_general``.
    preferred_element_type: output dtype (the accumulation is float32).
    backend: ``"xla"`` (the reference below), ``"pallas"`` (a kernel, in
      interpret mode when no GPU is present; ValueError if none takes the case)
      or ``"auto"`` (on a GPU, for the cases the kernels take, the kernel or
      the two-pass bfloat16 path by the number of rows, see the module doc;
      else the reference).

  Returns:
    ``lax.dot_general``'s output shape (batch, lhs free, rhs free axes) in
    ``preferred_element_type``.

  Mathematically equivalent to::

    lax.dot_general(dequantize(lhs, f32), dequantize(rhs, f32), dimension_numbers,
                    precision=HIGHEST, preferred_element_type=f32).astype(preferred_element_type)

  and equal to it to float32 rounding on every backend. The kernels take:
  a bfloat16 ``lhs`` with a 2-D QArray/PreparedWeight ``rhs`` (any format), or
  a QArray ``lhs`` with such an ``rhs`` of the same block size, one contracting
  axis, no batch axes, QArrays blocked along the contracting axis.
  """
  if backend not in _BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
  out_dtype = np.dtype(preferred_element_type)
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f"scaled_dot_general: preferred_element_type must be floating, got {out_dtype}")
  dims = _normalize_dims(dimension_numbers, _check_operand(lhs, "lhs"), _check_operand(rhs, "rhs"))
  if backend != "xla":
    from fp4jax.kernels import _matmul_common

    gpu = _matmul_common.on_gpu()
    if backend == "pallas" or gpu:
      kind, why = _kernel_plan(lhs, rhs, dims, out_dtype)
      if kind is None and backend == "pallas":
        raise ValueError(
            f"scaled_dot_general: no Pallas kernel for lhs {_describe(lhs)} and rhs {_describe(rhs)} "
            f"with dimension_numbers {dimension_numbers!r}: {why}")
      if kind is not None:
        strategy = "kernel"
        if backend == "auto" and _lhs_rows(lhs, dims) > KERNEL_MAX_ROWS[kind]:
          strategy = "two_pass"
        return _with_reference_vjp(kind, strategy, dims, out_dtype, not gpu)(lhs, rhs)
  return scaled_dot_general_reference(lhs, rhs, dims, out_dtype)


def _describe(x) -> str:
  if isinstance(x, (QArray, PreparedWeight)):
    return repr(x)
  return f"{jnp.dtype(x.dtype)}{list(x.shape)}"


def scaled_matmul(a, b, *, preferred_element_type=jnp.bfloat16, backend: str = "auto"):
  """``a @ b`` for ``a (..., M, K)`` and ``b (K, N)``; either may be block-scaled along ``K``.

  Args:
    a: ``(..., M, K)`` floating array or QArray (blocked along the last axis
      for the kernels).
    b: ``(K, N)`` floating array, QArray blocked along axis 0, or a
      :class:`PreparedWeight` of such a weight.
    preferred_element_type: output dtype.
    backend: see :func:`scaled_dot_general`.

  Returns:
    ``(..., M, N)`` in ``preferred_element_type``, equal to the float32 product
    of the dequantized operands to float32 rounding.
  """
  a_shape, b_shape = _check_operand(a, "a"), _check_operand(b, "b")
  if len(a_shape) < 1 or len(b_shape) != 2:
    raise ValueError(f"scaled_matmul expects a (..., M, K) and b (K, N), got shapes {a_shape} and {b_shape}")
  if a_shape[-1] != b_shape[0]:
    raise ValueError(f"scaled_matmul: contracting sizes differ: a {a_shape} has K={a_shape[-1]}, "
                     f"b {b_shape} has K={b_shape[0]}")
  dims = (((len(a_shape) - 1,), (0,)), ((), ()))
  return scaled_dot_general(a, b, dims, preferred_element_type=preferred_element_type, backend=backend)
