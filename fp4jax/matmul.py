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
* int8 (XLA's int8 GEMM with Pallas passes around it): MXFP4 x MXFP4, rows
  re-based to int8 values with one power-of-two scale each, exact int32 sums
  (:mod:`fp4jax.int8_matmul`); the two-pass path below when a row spans more
  binades than int8 holds.
* two-pass (XLA): each block-scaled operand dequantized to bfloat16 (exact,
  global scales held back), then a bfloat16 GEMM with float32 accumulation.
  For many rows this is what measured fastest on an H100: the GEMM library
  outruns a fused Pallas kernel and the extra pass costs little beside it.

``backend="auto"`` on a GPU picks the kernel for up to ``backend.KERNEL_MAX_ROWS``
rows of ``lhs`` and above it the int8 path (MXFP4 x MXFP4) or the two-pass path; ``backend="pallas"`` always
runs the kernel (interpret mode without a GPU).

The kernels read a weight as byte rows (:func:`byte_matrix`): one row of bytes
per output channel, contiguous along ``K``. A QArray stored that way
(``layout="rows"``: ``q.with_layout("rows")``, ``quantize(..., layout="rows")``,
``quantize_params``) goes into the kernel as it is; a plain one is transposed
and packed on every call, inside the jitted function. Which path runs is
decided once per call by :mod:`fp4jax.backend`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import backend as backends
from fp4jax import int8_matmul
from fp4jax.backend import KERNEL_MAX_ROWS
from fp4jax.formats import MXFP4
from fp4jax.kernels import matmul_common as common
from fp4jax.prepared import PREPARED_WEIGHT_GONE, byte_matrix, prepare_weight
from fp4jax.qarray import QArray, as_array, float_dtype, validate_qarray
from fp4jax.quantize import quantize
from fp4jax.reference import scaled_dot_general_reference

__all__ = [
    "scaled_dot_general",
    "scaled_matmul",
    "scaled_dot_general_reference",
    "prepare_weight",
    "byte_matrix",
    "run_two_pass",
    "run_int8",
    "run_kernel",
    "quantized_lhs_dot",
    "int8_path_plan",
    "FUSED_ACTIVATION_QUANTIZE",
    "KERNEL_MAX_ROWS",
]


# ---- validation --------------------------------------------------------------
def __getattr__(name):
  if name == "PreparedWeight":
    raise AttributeError(PREPARED_WEIGHT_GONE)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_operand(x, name: str):
  """``(operand, shape)``: a QArray as it is, a list as an array; ValueError unless floating.

  Floating arrays of any dtype (float64 included) are accepted: the product is
  computed from their float32 values.
  """
  if isinstance(x, QArray):
    validate_qarray(x)
    return x, tuple(x.shape)
  if isinstance(x, int8_matmul.Int8Weight):
    x.check()
    return x, tuple(x.shape)
  x = as_array(x, f"scaled_dot_general ({name})")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"scaled_dot_general: {name} must be a floating array or a QArray, "
                     f"got dtype {x.dtype} with shape {tuple(x.shape)}")
  return x, tuple(x.shape)


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

def _lhs_rows(lhs, dims) -> int:
  (lc, _), _ = dims
  return int(np.prod([s for i, s in enumerate(lhs.shape) if i != lc[0]], dtype=np.int64))


def _rows_bf16(x):
  """A QArray as exact bfloat16 rows ``(R, K)`` and its global scale."""
  data, scales = byte_matrix(x)
  if x.fmt.elem_bits == 4:
    return common.dequantize_bf16_pairs(data, scales, x.fmt), x.global_scale
  return common.dequantize_tile(data, scales, x.fmt, jnp.bfloat16), x.global_scale


def run_two_pass(kind, lhs, rhs, dims, out_dtype):
  """The two-pass path: each block-scaled operand as exact bfloat16 rows, then XLA's GEMM."""
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
  rows_by_rows = (((1,), (1,)), ((), ()))
  if ga is None and gb is None:
    # The GEMM sums in float32 and rounds once to out_dtype in its epilogue: the bits of a float32
    # output converted after, without writing and reading the float32 product (about 15% of a
    # 4096 x 4096 x 14336 bf16 product).
    return lax.dot_general(a, b, rows_by_rows, preferred_element_type=out_dtype).reshape(*lead, b.shape[0])
  out = lax.dot_general(a, b, rows_by_rows, preferred_element_type=jnp.float32)
  for g in (ga, gb):
    if g is not None:
      out = out * g
  return out.astype(out_dtype).reshape(*lead, b.shape[0])


def run_int8(lhs, rhs, dims, out_dtype, kernels=False, interpret=False, stored=(None, None), fallback="cond"):
  """MXFP4 x MXFP4 through the int8 tensor cores (:mod:`fp4jax.int8_matmul`): exact int32 sums;
  the two-pass path when a row spans more binades than the int8 values hold (``fallback="cond"``), or
  those rows' output tiles recomputed on the device (``"tiles"``). ``stored``: each operand's
  :meth:`~fp4jax.int8_matmul.Int8Weight.rebased` codes where it carries them, else None."""
  (lc, _), _ = dims
  lead = tuple(s for i, s in enumerate(lhs.shape) if i != lc[0])
  opts = {"kernels": kernels, "interpret": interpret}
  a_bytes, b_bytes = byte_matrix(lhs), byte_matrix(rhs)
  a, b = (r if r is not None else int8_matmul.rebased(*ops, **opts) for r, ops in zip(stored, (a_bytes, b_bytes)))
  n = b_bytes[0].shape[0]
  two_pass = lambda: run_two_pass("mx", lhs, rhs, dims, out_dtype).reshape(-1, n)
  tiles = (a_bytes, b_bytes) if fallback == "tiles" else None
  out = int8_matmul.rebased_product(a, b, out_dtype, two_pass, tiles=tiles, **opts)
  return out.reshape(*lead, n)


def run_kernel(kind, lhs, rhs, dims, out_dtype, interpret):
  """The ``"w4a16"`` or ``"mx"`` Pallas kernel on the operands' byte matrices.

  A ``"rows"`` QArray's leaves are those matrices: they reach the kernel as
  they are, with no op over the weight outside it.
  """
  (lc, _), _ = dims
  w_data, w_scales = byte_matrix(rhs)
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


def _with_reference_vjp(kind, strategy, dims, out_dtype, interpret, fallback="cond"):
  """The chosen forward, the reference's VJP backward (kernels have no autodiff). ``stored``: the
  operands' int8 codes where they are :class:`~fp4jax.int8_matmul.Int8Weight` s (no cotangent)."""

  @jax.custom_vjp
  def f(lhs, rhs, stored):
    if strategy == "two_pass":
      return run_two_pass(kind, lhs, rhs, dims, out_dtype)
    if strategy == "int8":
      return run_int8(lhs, rhs, dims, out_dtype, kernels=True, interpret=interpret, stored=stored,
                      fallback=fallback)
    return run_kernel(kind, lhs, rhs, dims, out_dtype, interpret)

  def fwd(lhs, rhs, stored):
    return f(lhs, rhs, stored), (lhs, rhs)

  def bwd(res, g):
    lhs, rhs = res
    _, vjp = jax.vjp(lambda a, b: scaled_dot_general_reference(a, b, dims, out_dtype), lhs, rhs)
    return (*vjp(g), None)

  f.defvjp(fwd, bwd)
  return f


def scaled_dot_general(lhs, rhs, dimension_numbers, *, preferred_element_type=jnp.float32,
                       backend: str = "auto"):
  """``lax.dot_general`` where either operand may be block-scaled.

  Args:
    lhs, rhs: floating arrays or :class:`~fp4jax.QArray`\\ s (either storage
      layout). A QArray is normally blocked along a contracting axis; the XLA
      path accepts any block axis. An :class:`~fp4jax.Int8Weight`
      (:func:`~fp4jax.int8_weight`) is taken as its QArray, its int8 codes
      used where the product runs on the int8 path.
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
  a bfloat16 ``lhs`` with a 2-D QArray ``rhs`` (any format; stored as
  ``layout="rows"`` it reaches the kernel without a per-call relayout), or
  a QArray ``lhs`` with such an ``rhs`` of the same block size, one contracting
  axis, no batch axes, QArrays blocked along the contracting axis.
  """
  backends.check_backend(backend)
  out_dtype = float_dtype(preferred_element_type, "scaled_dot_general: preferred_element_type")
  (lhs, lhs_shape), (rhs, rhs_shape) = _check_operand(lhs, "lhs"), _check_operand(rhs, "rhs")
  dims = _normalize_dims(dimension_numbers, lhs_shape, rhs_shape)
  return _dot(lhs, rhs, dims, out_dtype, backend, dimension_numbers)


def _out_shape(lhs_shape, rhs_shape, dims) -> tuple[int, ...]:
  (lc, rc), (lb, rb) = dims
  return (tuple(lhs_shape[i] for i in lb) + tuple(s for i, s in enumerate(lhs_shape) if i not in lc + lb)
          + tuple(s for i, s in enumerate(rhs_shape) if i not in rc + rb))


def _unwrap(x):
  """``(operand, stored codes)``: an :class:`~fp4jax.int8_matmul.Int8Weight` as its QArray and codes."""
  if isinstance(x, int8_matmul.Int8Weight):
    return x.qarray, x.rebased
  return x, None


def _int8_fallback(*operands) -> str:
  """``"tiles"`` when an operand is an Int8Weight that asks for it, else ``"cond"``."""
  tiles = any(isinstance(x, int8_matmul.Int8Weight) and x.fallback == "tiles" for x in operands)
  return "tiles" if tiles else "cond"


def _dot(lhs, rhs, dims, out_dtype, backend: str, dimension_numbers):
  """scaled_dot_general of validated operands: plan once, run the planned path."""
  fallback = _int8_fallback(lhs, rhs)
  (lhs, stored_lhs), (rhs, stored_rhs) = _unwrap(lhs), _unwrap(rhs)
  if math.prod(lhs.shape) == 0 or math.prod(rhs.shape) == 0:
    # No elements: a sum over an empty axis (zeros), or an empty output. The
    # reference dequantizes, which has no blocks to work on.
    return jnp.zeros(_out_shape(lhs.shape, rhs.shape, dims), out_dtype)
  kind, strategy, plan = _plan(lhs, rhs, dims, out_dtype, backend, dimension_numbers)
  if strategy == "xla":
    return scaled_dot_general_reference(lhs, rhs, dims, out_dtype)
  return _with_reference_vjp(kind, strategy, dims, out_dtype, plan.interpret, fallback)(
      lhs, rhs, (stored_lhs, stored_rhs))


def _plan(lhs, rhs, dims, out_dtype, backend: str, dimension_numbers):
  """``(kernel kind, strategy, plan)``: strategy ``"xla"``, ``"kernel"``, ``"two_pass"`` or ``"int8"``.
  Reads only shapes, dtypes and formats (works on abstract operands)."""
  kind, why = (None, "backend='xla'") if backend == "xla" else backends.dot_kernel(lhs, rhs, dims, out_dtype)
  if kind is None and backend == "pallas":
    raise ValueError(
        f"scaled_dot_general: no Pallas kernel for lhs {_describe(lhs)} and rhs {_describe(rhs)} "
        f"with dimension_numbers {dimension_numbers!r}: {why}")
  plan = backends.choose(kind or "matmul", backend, None if kind else why, interpret_without_gpu=True)
  if plan.impl == "xla":
    return kind, "xla", plan
  strategy = "kernel"
  if backend == "auto" and _lhs_rows(lhs, dims) > KERNEL_MAX_ROWS[kind]:
    strategy = "two_pass"
    if kind == "mx" and int8_matmul.int8_obstacle(lhs.fmt, rhs.fmt, lhs.shape[dims[0][0][0]]) is None:
      strategy = "int8"
  return kind, strategy, plan


def int8_path_plan(lhs, rhs, dims, out_dtype):
  """Where ``scaled_dot_general(lhs, rhs, dims)`` (``backend="auto"``) takes the int8 path here, how its
  kernels run (a plan with ``interpret``: in interpret mode off the GPU); else None.

  ``dims``: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))`` with axes >= 0. Reads only
  shapes, dtypes and formats: abstract operands (``jax.eval_shape``) will do."""
  _, strategy, plan = _plan(lhs, rhs, dims, np.dtype(out_dtype), "auto", dims)
  return plan if strategy == "int8" else None


#: Whether :func:`quantized_lhs_dot` quantizes activations straight into the int8 path's codes (one Pallas
#: pass, :mod:`fp4jax.kernels.int8_quantize`) where it takes that path; False quantizes to byte rows first.
#: Off: on the H200 that kernel is slower than the two passes it replaces (benchmarks/results/w4a4.md).
FUSED_ACTIVATION_QUANTIZE = False


def quantized_lhs_dot(x, fmt, scale_rule, rhs, rhs_contract: int, out_dtype, *, axis_name=None):
  """``scaled_dot_general(quantize(x, fmt, axis=-1, layout="rows"), rhs)`` of a 2-D floating ``x``
  contracting its last axis with ``rhs``'s axis ``rhs_contract`` (a W4A4 layer's product).

  Where that product takes the int8 path on a GPU with an MXFP4 ``x`` under the "floor" rule (and
  :data:`FUSED_ACTIVATION_QUANTIZE`), ``x`` is quantized straight into the int8 codes: the same bits,
  one pass over ``x`` fewer; the exact fallback quantizes it to byte rows as before.
  """
  dims = (((1,), (rhs_contract,)), ((), ()))
  rule = fmt.default_scale_rule if scale_rule is None else scale_rule

  def quant(x):
    return quantize(x, fmt, axis=-1, scale_rule=rule, axis_name=axis_name, layout="rows")

  if FUSED_ACTIVATION_QUANTIZE and fmt == MXFP4 and rule == "floor" and isinstance(rhs, QArray):
    _, strategy, plan = _plan(jax.eval_shape(quant, x), rhs, dims, out_dtype, "auto", dims)
    if strategy == "int8":
      return _int8_from_activations(x, quant, rhs, dims, out_dtype, plan.interpret)
  return scaled_dot_general(quant(x), rhs, dims, preferred_element_type=out_dtype)


def _int8_from_activations(x, quant, rhs, dims, out_dtype, interpret):
  opts = {"kernels": True, "interpret": interpret}
  two_pass = lambda: run_two_pass("mx", quant(x), rhs, dims, out_dtype)
  return int8_matmul.rebased_product(int8_matmul.activation_rows(x, **opts),
                                     int8_matmul.rebased(*byte_matrix(rhs), **opts), out_dtype, two_pass, **opts)


def _describe(x) -> str:
  if isinstance(x, QArray):
    return repr(x)
  return f"{jnp.dtype(x.dtype)}{list(x.shape)}"


def scaled_matmul(a, b, *, preferred_element_type=jnp.bfloat16, backend: str = "auto"):
  """``a @ b`` for ``a (..., M, K)`` and ``b (K, N)``; either may be block-scaled along ``K``.

  Args:
    a: ``(..., M, K)`` floating array or QArray (blocked along the last axis
      for the kernels).
    b: ``(K, N)`` floating array or QArray blocked along axis 0 (either
      storage layout; ``"rows"`` is the kernels' own), or an Int8Weight of one.
    preferred_element_type: output dtype.
    backend: see :func:`scaled_dot_general`.

  Returns:
    ``(..., M, N)`` in ``preferred_element_type``, equal to the float32 product
    of the dequantized operands to float32 rounding.
  """
  backends.check_backend(backend)
  out_dtype = float_dtype(preferred_element_type, "scaled_matmul: preferred_element_type")
  (a, a_shape), (b, b_shape) = _check_operand(a, "a"), _check_operand(b, "b")
  if len(a_shape) < 1 or len(b_shape) != 2:
    raise ValueError(f"scaled_matmul expects a (..., M, K) and b (K, N), got shapes {a_shape} and {b_shape}")
  if a_shape[-1] != b_shape[0]:
    raise ValueError(f"scaled_matmul: contracting sizes differ: a shape {a_shape} has K={a_shape[-1]}, "
                     f"b shape {b_shape} has K={b_shape[0]}")
  dimension_numbers = (((len(a_shape) - 1,), (0,)), ((), ()))
  return _dot(a, b, _normalize_dims(dimension_numbers, a_shape, b_shape), out_dtype, backend, dimension_numbers)
