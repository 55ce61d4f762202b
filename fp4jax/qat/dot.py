"""``quantized_dot_general`` and ``quantized_einsum``: quantized forward and backward GEMMs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax.formats import MXFP4
from fp4jax.int8_matmul import is_stored_weight, rebased, residual_free_product, rows_may_be_residual
from fp4jax.matmul import int8_path_plan, quantized_lhs_dot, scaled_dot_general
from fp4jax.prepared import byte_matrix
from fp4jax.qarray import normalize_axis
from fp4jax.qat.config import OperandConfig, QatConfig
from fp4jax.qat.fake import fake_quantize_operand, fused_fake_quantize, quantize_input
from fp4jax.qat.rounding import random_hadamard
from fp4jax.quantize import quantize
from fp4jax.reference import pad_axis

__all__ = ["quantized_dot_general", "quantized_einsum", "einsum_dimension_numbers", "INT8_FORWARD",
           "INT8_BACKWARD"]

#: Whether a QAT forward product of two MXFP4 operands runs on the int8 path where ``scaled_dot_general``
#: would take it (a GPU, enough rows; :func:`_int8_forward`). On: the MXFP4 SwiGLU step of
#: ``benchmarks/qat_step.py`` on the H200 takes 1.11-1.12x the bf16 step with neither switch, 1.06-1.07x with
#: this one, 1.04-1.05x with both (``benchmarks/experiments/qat_int8_forward.py``, two runs, eleventh session;
#: outputs, loss and gradients bit-identical there); 0.99-1.02x with both after the twelfth session's fewer
#: passes (``benchmarks/results/qat_step_h200.md``). Set False for the fake-quantized bf16 GEMM everywhere.
INT8_FORWARD = True

#: Whether a QAT backward product for the lhs (``dlhs = fq(g) . fq(rhs)^T``, e.g. an MLP's dx and dh) of two
#: MXFP4 operands runs on the int8 path where it would run (:func:`_int8_backward_lhs`). On: measured with
#: :data:`INT8_FORWARD` above (1.091x the bf16 step alone).
INT8_BACKWARD = True
#: The compute dtypes (``QatConfig.compute_dtype`` or the operands') whose products the int8 switches take.
_INT8_COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _canonical_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int, lshape, rshape):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(f"dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
                     f"got {dimension_numbers!r}") from None
  lc, lb = (tuple(normalize_axis(d, lhs_ndim, lshape) % lhs_ndim for d in t) for t in (lc, lb))
  rc, rb = (tuple(normalize_axis(d, rhs_ndim, rshape) % rhs_ndim for d in t) for t in (rc, rb))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers {dimension_numbers!r}: lhs and rhs need as many contracting "
                     "and batch dimensions")
  for a, b in zip(lc + lb, rc + rb):
    if lshape[a] != rshape[b]:
      raise ValueError(f"quantized_dot_general: lhs shape {tuple(lshape)} axis {a} and rhs shape "
                       f"{tuple(rshape)} axis {b} are paired but have different sizes")
  return (lc, rc), (lb, rb)


def _free(ndim: int, *used) -> tuple[int, ...]:
  taken = set().union(*used)
  return tuple(d for d in range(ndim) if d not in taken)


def _as_key(key, seed: int):
  """A typed key, a raw uint32[2] key or an integer counter -> a typed key."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single jax.random key, got shape {key.shape}")
    return key
  if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
    # Counter-based: the same (seed, counter) always draws the same numbers.
    return jax.random.fold_in(jax.random.key(seed), key)
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be a jax.random key, a uint32[2] raw key or an integer counter, "
                   f"got dtype {key.dtype} shape {key.shape}")


def _stream(key, i: int):
  return None if key is None else jax.random.fold_in(key, i)


def _backward_operand(x, axis: int, op: OperandConfig, cfg: QatConfig, key, dtype, multiple: int):
  """Pads ``axis`` to ``multiple``, applies the Hadamard transform, fake-quantizes along it.

  A leading ``axis`` (the tokens of a weight gradient's operands) is first moved last by one
  materialized transpose: left to itself, XLA on the GPU may lay the blocked codes out transposed
  and write them from transpose fusions with the threefry hash inside (H200, the SwiGLU step of
  benchmarks/qat_step.py at 4096 tokens: 23.9 ms, 11.4 ms with the transpose). The values are
  the same: blocks, scales and random draws depend only on the blocked view.
  """
  last, ax = x.ndim - 1, axis % x.ndim
  if ax in (0, last) and op.fmt is not None and x.shape[ax] % multiple == 0:
    # The fused kernel reads a first block axis in place, drawing as the transposed route, and applies the
    # Hadamard transform itself (the order of fp4jax.hadamard.butterfly, so the same values).
    out = fused_fake_quantize(x, op, ax, dtype, key, cfg.axis_name, cfg.backend, cfg.hadamard or 0, cfg.seed)
    if out is not None:
      return out
  if ax != last:
    # moveaxis, not swapaxes: the other axes keep their order, so the blocked view (and with it
    # every stochastic draw) is the one the direct route would make.
    xt = lax.optimization_barrier(jnp.moveaxis(x, axis, last))
    return jnp.moveaxis(_backward_operand(xt, last, op, cfg, key, dtype, multiple), last, axis)
  x = _padded_transformed(x, axis, cfg, multiple)
  return fake_quantize_operand(x, op, axis, dtype, key, axis_name=cfg.axis_name, backend=cfg.backend)


def _padded_transformed(x, axis: int, cfg: QatConfig, multiple: int):
  """``x`` zero-padded along ``axis`` to ``multiple``, then Hadamard-transformed along it where ``cfg`` asks:
  what a backward operand's quantization reads."""
  x = pad_axis(x, axis, multiple)
  return random_hadamard(x, cfg.hadamard, axis=axis, seed=cfg.seed) if cfg.hadamard else x


def _block_multiple(cfg: QatConfig, *ops: OperandConfig) -> int:
  sizes = [op.fmt.block_size for op in ops if op.fmt is not None]
  if cfg.hadamard:
    sizes.append(cfg.hadamard)
  return math.lcm(*sizes) if sizes else 1


def _backward_gemm(g, other, g_axes, other_axes, op_other, cfg, keys, dtype, transpose, int8=False):
  """Quantizes ``g`` and ``other`` along one of their paired contracting axes, then transposes.

  ``transpose(g_q, other_q)`` is the linear transpose of the forward product in
  the missing operand. The blocks run along the axis this GEMM sums over; the
  forward blocks ran along another axis and cannot be reused (the scales
  would vary inside the sum). ``int8``: the lhs's product, which may run on the int8 path
  (:func:`_int8_backward_lhs`).
  """
  if not g_axes:  # an outer product: no contraction, nothing to block
    return transpose(g.astype(dtype), other.astype(dtype))
  ga, oa = g_axes[-1], other_axes[-1]
  m = _block_multiple(cfg, cfg.grad, op_other)
  gq = _backward_operand(g, ga, cfg.grad, cfg, keys[0], dtype, m)
  oq = lambda: _backward_operand(other, oa, op_other, cfg, keys[1], dtype, m)
  if int8 and (out := _int8_backward_lhs(gq, other, oq, g_axes, oa, op_other, cfg, dtype, transpose, m)) is not None:
    return out
  return transpose(gq, oq())


def _int8_backward_lhs(gq, other, oq, g_axes, oa: int, op_other: OperandConfig, cfg: QatConfig, dtype, transpose,
                       multiple: int):
  """``dlhs = gq . fq'(other)`` summed over ``g``'s last axis and ``other``'s axis ``oa`` on the int8 path, or
  None where it would not run. ``oq()``: ``fq'(other)``, the fake-quantized operand.

  ``gq`` and ``oq()`` are the fake-quantized MXFP4 operands (their draws, Hadamard transform and padding
  done): every block of each holds E2M1 values times a power of two, which :func:`quantize` under the
  "floor" rule holds again exactly (its scale is at most the block's own and the values stay E2M1:
  ``tests/test_qat.py``), so this is the product of the very same values, exact before one rounding,
  where the bfloat16 GEMM rounds as it adds. Taken for a 2-D ``rhs`` whose free axis ``g``'s last is;
  ``transpose(gq, oq())`` (the bfloat16 GEMM) runs instead where a row may not fit the int8 values.

  Where ``other`` is rounded to nearest under the "floor" rule along its last axis (the default for a
  weight), quantizing it (padded, Hadamard-transformed) gives the codes and scales that quantizing
  ``oq()`` again would: the int8 branch takes those and ``oq()`` runs in the fallback branch alone (one
  pass over the weight a step fewer: 113 us for the SwiGLU down weight on the H200). Its values then
  are the quantized ones as they are, where the fake quantization flushes results below float32's
  normal range (blocks scaled by 2**-127 or 2**-126), as in the int8 forward."""
  if (not INT8_BACKWARD or cfg.grad.fmt != MXFP4 or op_other.fmt != MXFP4 or other.ndim != 2
      or tuple(g_axes) != (gq.ndim - 1,)
      or jnp.dtype(dtype) not in _INT8_COMPUTE_DTYPES):
    return None
  n = gq.shape[-1]
  direct = oa == other.ndim - 1 and not op_other.stochastic and op_other.rule == "floor"
  y = quantize_input(_padded_transformed(other, oa, cfg, multiple)) if direct else oq()

  def operands(gq, y):  # "floor" both ways: y's own rule where direct, the lossless re-quantization otherwise
    return (quantize(gq.reshape(-1, n), MXFP4, axis=-1, scale_rule="floor", layout="rows"),
            quantize(y, MXFP4, axis=oa, scale_rule="floor", layout="rows"))

  def fallback(*_):
    return transpose(gq, y if not direct else oq()).reshape(-1, other.shape[1 - oa])

  out = _int8_rows_product(operands, gq, y, oa, dtype, fallback)
  return None if out is None else out.reshape(*gq.shape[:-1], out.shape[-1])


def _int8_rows_product(operands, x, y, y_contract: int, out_dtype, fallback):
  """The int8 product of ``operands(x, y)`` (2-D "rows" QArrays: rows contracting their axis 1 with the
  other's axis ``y_contract``) where ``scaled_dot_general`` would take its int8 path, else None; the plan
  reads abstract shapes.

  Where a row of either operand may span more binades than the int8 values hold (read from the scale
  bytes alone, before any re-basing), ``fallback(a, interpret)`` (``a``: the first operand's QArray,
  ``interpret``: the kernels' interpret mode) runs instead under ``lax.cond``: the GEMM of the
  fake-quantized operands this product replaces, so such a product (the SwiGLU down product's
  activations, ``benchmarks/results/qat_int8_residual.json``) costs that GEMM and the operands' quantize
  passes, not also the re-basing. Where none may, no row has a residual block, so the int8 branch re-bases
  and multiplies with no second check (``scaled_dot_general`` would cond on the re-basing's residual flags
  again: one more conditional, each costing the H200 about 26 us of idle in this step's profile)."""
  dims = (((1,), (y_contract,)), ((), ()))
  plan = int8_path_plan(*jax.eval_shape(operands, x, y), dims, out_dtype)
  if plan is None:
    return None
  a, b = operands(x, y)
  wide = jnp.any(rows_may_be_residual(byte_matrix(a)[1])) | jnp.any(rows_may_be_residual(byte_matrix(b)[1]))
  opts = {"kernels": True, "interpret": plan.interpret}

  def int8():
    return residual_free_product(rebased(*byte_matrix(a), **opts), rebased(*byte_matrix(b), **opts), out_dtype,
                                 **opts)

  return lax.cond(wide, lambda: fallback(a, plan.interpret), int8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _qdot(lhs, rhs, key, dims, cfg, precision, out_dtype):
  return _qdot_fwd(lhs, rhs, key, dims, cfg, precision, out_dtype)[0]


def _forward_operands(lhs, rhs, dims, cfg, dtype):
  (lc, rc), _ = dims
  if not lc:
    return lhs.astype(dtype), rhs.astype(dtype)
  return (fake_quantize_operand(lhs, cfg.lhs, lc[-1], dtype, axis_name=cfg.axis_name, backend=cfg.backend),
          fake_quantize_operand(rhs, cfg.rhs, rc[-1], dtype, axis_name=cfg.axis_name, backend=cfg.backend))


def _fake_quantized_gemm(lhs, rhs, dims, cfg, dtype, precision, out_dtype):
  """``(out, lq, rq)``: the forward as the GEMM of the fake-quantized operands ``lq``, ``rq``."""
  lq, rq = _forward_operands(lhs, rhs, dims, cfg, dtype)
  return lax.dot_general(lq, rq, dims, precision=precision, preferred_element_type=out_dtype), lq, rq


def _rows_dequantized(q, dtype, interpret: bool):
  """``dequantize(q, float32).astype(dtype)`` (fake quantization's values, inf where they pass ``dtype``'s
  range) of a 2-D "rows" QArray blocked along its last axis, from its byte rows in one Pallas pass."""
  from fp4jax.kernels import dequantize as dequantize_kernel  # lazy: the int8 path runs the kernels

  return dequantize_kernel.dequantize_packed(q.values, q.scales, q.global_scale, fmt=q.fmt, axis=-1, dtype=dtype,
                                             interpret=interpret, overflow="cast")


def _int8_forward(lhs, rhs, dims, cfg, dtype, precision, out_dtype):
  """The forward product as ``scaled_dot_general(quantize(lhs), quantize(rhs))`` on the int8 path, or
  None where that path would not run (then the fake-quantized operands' GEMM runs).

  The same quantized values as :func:`_forward_operands` (its quantize, without the dequantize), so
  the product differs from that GEMM's only by float32 rounding: the int8 path's sums are exact, rounded
  once. Taken for ``(..., K) x (K, N)``-like products of two MXFP4 operands with ``K`` a whole number of
  blocks, bfloat16 or float32 compute, and quantized backward GEMMs (whose residuals are the unquantized
  operands; the straight-through backward needs the fake-quantized ones, so it keeps the GEMM)."""
  (lc, rc), _ = dims
  if (not INT8_FORWARD or cfg.grad.fmt is None or cfg.lhs.fmt != MXFP4
      or cfg.rhs.fmt != MXFP4 or rhs.ndim != 2 or not _rows_activations(lhs, dims, MXFP4)
      or jnp.dtype(dtype) not in _INT8_COMPUTE_DTYPES):
    return None
  k = lhs.shape[-1]

  def operands(lhs, rhs):
    a = quantize(quantize_input(lhs.reshape(-1, k)), MXFP4, axis=-1, scale_rule=cfg.lhs.rule,
                 axis_name=cfg.axis_name, layout="rows")
    b = quantize(quantize_input(rhs), MXFP4, axis=rc[0], scale_rule=cfg.rhs.rule, axis_name=cfg.axis_name,
                 layout="rows")
    return a, b

  def gemm(a, interpret):
    # The GEMM of the fake-quantized operands, lhs's from the quantized rows ``a`` already made: the
    # same values (fake quantization is quantize, then dequantize), one read of its bytes where the fused
    # fake quantization would read lhs again (on the H200 about 100 us of the SwiGLU down product's h).
    lq = _rows_dequantized(a, dtype, interpret).reshape(lhs.shape)
    rq = fake_quantize_operand(rhs, cfg.rhs, rc[-1], dtype, axis_name=cfg.axis_name, backend=cfg.backend)
    out = lax.dot_general(lq, rq, dims, precision=precision, preferred_element_type=out_dtype)
    return out.reshape(-1, out.shape[-1])

  out = _int8_rows_product(operands, lhs, rhs, rc[0], out_dtype, gemm)
  return None if out is None else out.reshape(*lhs.shape[:-1], out.shape[-1])


def _qdot_fwd(lhs, rhs, key, dims, cfg, precision, out_dtype):
  dtype = cfg.compute_dtype or jnp.result_type(lhs, rhs)
  # Quantized backward GEMMs need the high-precision operands, to re-block them along another axis;
  # the plain STE needs the forward-quantized ones.
  res = (lhs, rhs)
  out = _int8_forward(lhs, rhs, dims, cfg, dtype, precision, out_dtype)
  if out is None:
    out, lq, rq = _fake_quantized_gemm(lhs, rhs, dims, cfg, dtype, precision, out_dtype)
    if cfg.grad.fmt is None:
      res = (lq, rq)
  # Empty arrays carry the primal dtypes, which the cotangents must match.
  return out, (*res, key, jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))


def _qdot_bwd(dims, cfg, precision, out_dtype, res, g):
  a, b, key, lhs_tag, rhs_tag = res
  (lc, rc), (lb, rb) = dims
  dtype = cfg.compute_dtype or jnp.result_type(a, b)

  def dot(x, y):
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=dtype)

  # The primal's abstract value, not a bare ShapeDtypeStruct: under shard_map it carries the
  # mesh axes the operand varies along, which the cotangent's type must match.
  def t_lhs(gq, rq):
    return jax.linear_transpose(lambda x: dot(x, rq), jax.typeof(a).update(dtype=dtype))(gq)[0]

  def t_rhs(gq, lq):
    return jax.linear_transpose(lambda y: dot(lq, y), jax.typeof(b).update(dtype=dtype))(gq)[0]

  g = g.astype(dtype)
  if cfg.grad.fmt is None:
    # Straight-through: the gradient of the unquantized op at the quantized inputs.
    return t_lhs(g, b.astype(dtype)).astype(lhs_tag.dtype), t_rhs(g, a.astype(dtype)).astype(rhs_tag.dtype), None

  lfree, rfree = _free(a.ndim, lc, lb), _free(b.ndim, rc, rb)
  nb = len(lb)
  # dlhs = g . rhs sums over rhs's free axes; drhs = lhs . g over lhs's.
  g_rfree = tuple(nb + len(lfree) + j for j in range(len(rfree)))
  g_lfree = tuple(nb + i for i in range(len(lfree)))
  keys = [_stream(key, i) for i in range(4)]
  # On the int8 path (where it runs) when lhs contracts its last axis alone: dlhs is then g . rhs^T with
  # lhs's own axis order.
  int8 = not lb and tuple(lc) == (a.ndim - 1,)
  dlhs = _backward_gemm(g, b, g_rfree, rfree, cfg.rhs, cfg, keys[0:2], dtype, t_lhs, int8=int8)
  drhs = _backward_gemm(g, a, g_lfree, lfree, cfg.lhs, cfg, keys[2:4], dtype, t_rhs)
  return dlhs.astype(lhs_tag.dtype), drhs.astype(rhs_tag.dtype), None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def _check_float(x, name: str):
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantized_dot_general: {name} must be a floating array, got dtype "
                     f"{getattr(x, 'dtype', type(x))}")


def _inference_dot(lhs, rhs, dims, cfg: QatConfig | None, out_dtype):
  """PTQ inference: stored QArray (or Int8Weight) operand(s), the other quantized per ``cfg``,
  block-scaled matmul."""
  (lc, rc), _ = dims
  for x, c, name in ((lhs, lc, "lhs"), (rhs, rc, "rhs")):
    if is_stored_weight(x) and x.axis % x.ndim not in c:
      raise ValueError(f"quantized_dot_general: {name} QArray of shape {x.shape} is blocked along axis "
                       f"{x.axis}, not along a contracting axis {c}")
  if not is_stored_weight(rhs) and cfg is not None and cfg.rhs.fmt is not None:
    rhs = quantize(rhs, cfg.rhs.fmt, axis=rc[-1], scale_rule=cfg.rhs.rule, axis_name=cfg.axis_name)
  if not is_stored_weight(lhs) and cfg is not None and cfg.lhs.fmt is not None:
    if _rows_activations(lhs, dims, cfg.lhs.fmt):
      # Activations (..., K) times a weight: quantized as the 2-D byte rows the matmul paths read, so the
      # quantize kernel's packed bytes go to the GEMM as they are (no float4 view, no re-packing per call).
      # Blocks run along K either way: the same codes and scales, the same product.
      lead, k = lhs.shape[:-1], lhs.shape[-1]
      out = quantized_lhs_dot(lhs.reshape(-1, k), cfg.lhs.fmt, cfg.lhs.rule, rhs, rc[0], out_dtype,
                              axis_name=cfg.axis_name)
      return out.reshape(*lead, *out.shape[1:])
    lhs = quantize(lhs, cfg.lhs.fmt, axis=lc[-1], scale_rule=cfg.lhs.rule, axis_name=cfg.axis_name)
  return scaled_dot_general(lhs, rhs, dims, preferred_element_type=out_dtype)


def _rows_activations(lhs, dims, fmt) -> bool:
  """Whether ``lhs`` contracts its last axis alone, with no batch axes, in a format the byte rows hold."""
  (lc, _), (lb, _) = dims
  return (lhs.ndim >= 2 and tuple(lc) == (lhs.ndim - 1,) and not lb and fmt.elem_storage == "native"
          and fmt.elem_bits in (4, 8) and lhs.shape[-1] % fmt.block_size == 0)


def quantized_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                          *, config: QatConfig | None = None, key=None, out_sharding=None):
  """``lax.dot_general`` with block-scaled quantization in the forward and backward GEMMs.

  Args:
    lhs, rhs: floating arrays (or, for inference, :class:`QArray` or
      :class:`~fp4jax.Int8Weight` operands
      blocked along a contracting axis).
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``
      as in ``lax.dot_general``.
    precision, preferred_element_type: as in ``lax.dot_general``; the output
      dtype is ``preferred_element_type`` or the promoted input dtype.
    config: a :class:`QatConfig`; ``None`` is a plain ``lax.dot_general``.
    key: for stochastic rounding: a ``jax.random`` key, or an integer counter
      (e.g. the step) combined with ``config.seed``.
    out_sharding: accepted for ``flax`` compatibility; must be None.

  Returns:
    ``lax.dot_general``'s output shape: batch, lhs free, then rhs free axes.

  Forward: ``dot_general(fq(lhs), fq(rhs))`` where ``fq`` quantizes along the
  last contracting axis (zero-padded to whole blocks) and dequantizes.
  Backward, for ``g`` the output cotangent: ``dlhs`` is the transpose product
  of ``fq'(g)`` and ``fq'(rhs)``, both blocked along one of the axes that
  product sums over (an rhs free axis), ``drhs`` likewise over an lhs free
  axis; ``fq'`` uses ``config.grad`` for ``g`` and the operand's own config for
  ``lhs``/``rhs``, with their ``rounding`` and the optional Hadamard transform.
  With ``config.grad.fmt=None`` the backward pass is the straight-through
  gradient ``vjp(dot_general)(fq(lhs), fq(rhs))``.
  """
  if out_sharding is not None:
    raise ValueError("quantized_dot_general does not support out_sharding")
  if config is not None and not isinstance(config, QatConfig):
    raise ValueError(f"config must be a fp4jax.qat.QatConfig or None, got {type(config).__name__}")
  for x, name in ((lhs, "lhs"), (rhs, "rhs")):
    if not is_stored_weight(x):
      _check_float(x, name)
  dims = _canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim, lhs.shape, rhs.shape)
  precision = lax.Precision(precision) if isinstance(precision, str) else precision
  if is_stored_weight(lhs) or is_stored_weight(rhs):
    out_dtype = np.dtype(preferred_element_type or jnp.float32)
    return _inference_dot(lhs, rhs, dims, config, out_dtype)
  out_dtype = np.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if config is None:
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=out_dtype)
  if config.needs_key and key is None:
    raise ValueError("this QatConfig rounds stochastically in the backward pass: pass key= "
                     "(a jax.random key or an integer step counter)")
  key = _as_key(key, config.seed) if config.needs_key else None
  return _qdot(lhs, rhs, key, dims, config, precision, out_dtype)


def einsum_dimension_numbers(equation: str, lhs_ndim: int, rhs_ndim: int):
  """Parses a two-operand einsum into ``dot_general`` dimension numbers.

  Args:
    equation: explicit ``"lhs,rhs->out"``; ``...`` may appear in ``lhs`` and
      ``out`` (leading lhs axes), not in ``rhs``. Every index appears in at least
      two of the three terms (no traces, no summing within one operand).

  Returns:
    ``(dimension_numbers, perm, out_terms, rhs_terms)``:
    ``jnp.transpose(dot_general(lhs, rhs, dimension_numbers), perm)`` is the
    einsum; ``out_terms`` is the output term with ``...`` expanded and
    ``rhs_terms`` the kernel's (for bias shapes).
  """
  eq = equation.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"einsum equation {equation!r} must be explicit with two operands: 'ab,bc->ac'")
  ins, out = eq.split("->")
  lt, rt = ins.split(",")
  if "..." in rt:
    raise ValueError(f"einsum equation {equation!r}: '...' is only supported in the input and output")
  if "..." in lt:
    n_ell = lhs_ndim - (len(lt) - 3)
    used = set(eq)
    fill = "".join([c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used][:n_ell])
    lt, out = lt.replace("...", fill), out.replace("...", fill)
  if len(lt) != lhs_ndim or len(rt) != rhs_ndim:
    raise ValueError(f"einsum equation {equation!r} does not match operand ranks {lhs_ndim} and {rhs_ndim}")
  for c in set(lt + rt + out):
    if (c in lt) + (c in rt) + (c in out) < 2 or lt.count(c) > 1 or rt.count(c) > 1:
      raise ValueError(f"einsum equation {equation!r}: index {c!r} must appear once in two of the terms")
  contract = [c for c in lt if c in rt and c not in out]
  batch = [c for c in lt if c in rt and c in out]
  dims = ((tuple(lt.index(c) for c in contract), tuple(rt.index(c) for c in contract)),
          (tuple(lt.index(c) for c in batch), tuple(rt.index(c) for c in batch)))
  produced = batch + [c for c in lt if c not in rt] + [c for c in rt if c not in lt]
  return dims, tuple(produced.index(c) for c in out), out, rt


def quantized_einsum(equation: str, lhs, rhs, *, config: QatConfig | None = None, key=None,
                     precision=None, preferred_element_type=None):
  """A two-operand einsum through :func:`quantized_dot_general` (``rhs`` may be a QArray)."""
  dims, perm, _, _ = einsum_dimension_numbers(equation, lhs.ndim, rhs.ndim)
  y = quantized_dot_general(lhs, rhs, dims, precision, preferred_element_type, config=config, key=key)
  return jnp.transpose(y, perm)
