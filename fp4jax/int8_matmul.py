"""MXFP4 x MXFP4 products on the int8 tensor cores, exactly.

Why int8: twice an E2M1 value is an integer in [-12, 12], so the blocks of an
MXFP4 row whose E8M0 exponents lie within 4 binades of the row's largest are,
shifted left by their distance ``d`` in [0, 3] from the row's base exponent,
int8 values (``12 << 3 = 96``) with one power-of-two scale for the whole row.
An int8 GEMM adds their products in int32 without any rounding (``|sum| <=
K * 96 * 96 < 2**31`` for ``K <= MAX_K``), so the product is the exact one,
rounded once to float32, where Hopper's FP8 MMA adds with fewer bits than
float32 (``benchmarks/results/fp8_rebase.md``); int8 and FP8 tensor cores
have the same rate.

Blocks further below their row's top, and blocks at the largest scale (2**127,
whose values overflow float32 as the reference dequantizes them), are the
*residual*: when any exists, a ``lax.cond`` runs an exact fallback (the
bfloat16 two-pass product) instead. Normal or Laplace data spans fewer than 4
binades per row (no residual); heavy tails (Student t with 3 degrees of freedom:
90% of rows) do not. NaN blocks (scale 0xFF) make their whole output row or
column NaN, as in the reference.

Operands are the kernels' byte matrices (:func:`fp4jax.prepared.byte_matrix`):
uint8 ``(R, K / 2)`` packed E2M1 codes and uint8 ``(R, K / 32)`` E8M0 scales.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fp4jax.formats import MXFP4, Format
from fp4jax.kernels import matmul_common as common
from fp4jax.prepared import byte_matrix
from fp4jax.quantize import quantize

__all__ = ["MAX_K", "SPAN", "int8_obstacle", "row_bases", "block_order", "rebase_codes", "rows_residual",
           "rows_codes", "row_exponent", "fused_gemm_runs", "finish_sums", "rebased", "activation_rows",
           "int8_product", "rebased_product"]

#: Binades of block exponents below a row's top that the int8 values hold (shifts 0..3).
SPAN = common.SPAN
#: The longest contraction whose int32 sums cannot overflow: ``K * (12 << 3)**2 < 2**31``.
MAX_K = 1 << 17
_BLOCK = 32
_E8M0_BIAS = 127
_DN = (((1,), (1,)), ((), ()))


def int8_obstacle(a_fmt: Format, b_fmt: Format, k: int) -> str | None:
  """Why the int8 product does not take operands of these formats and contraction length, or None."""
  for f in (a_fmt, b_fmt):
    if f.elem_dtype != jnp.float4_e2m1fn or f.scale_dtype != jnp.float8_e8m0fnu or f.block_size != _BLOCK:
      return f"the int8 product takes MXFP4 operands (E2M1, E8M0 scale per 32), got {f!r}"
  if k > MAX_K:
    return f"K={k} > {MAX_K}: the int32 sums of the int8 product could overflow"
  return None


def row_bases(scales):
  """Each row's base exponent byte (its top finite block's minus ``SPAN - 1``) and whether it has a NaN block."""
  s = scales.astype(jnp.int32)
  nan = s == common.E8M0_NAN
  top = jnp.max(jnp.where(nan, -1, s), axis=1)
  return common.int8_base(top), jnp.any(nan, axis=1)


def block_order(codes):
  """Codes ``(R, K)`` in k order -> block order: inside each block of 32, the first four of every eight
  (k = 0..3, 8..11, 16..19, 24..27), then the last four (4..7, ..., 28..31).

  The re-basing kernel writes its codes so (each 32-bit word of packed codes gives two output words,
  stored to the two contiguous halves of the block). Both operands of a product take the same order,
  and integer addition does not depend on it: every int32 sum, hence every output bit, is the same.
  """
  r, k = codes.shape
  return codes.reshape(r, k // _BLOCK, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(r, k)


def rebase_codes(data, scales, base):
  """XLA ops: ``(codes int8 (R, K), residual bool (R,))`` of packed MXFP4 rows at base bytes ``base``;
  the codes in :func:`block_order`, as the kernel writes them."""
  r, nbytes = data.shape
  nb = scales.shape[1]
  shift, main, other = common.int8_blocks(scales.astype(jnp.int32), base[:, None])
  b = data.astype(jnp.int32).reshape(r, nb, nbytes // nb)
  nonzero = jnp.any((b & 0x77) != 0, axis=-1)
  lo, hi = common.int8_values(b, shift[:, :, None], main[:, :, None])
  codes = common.interleave_last(lo, hi).reshape(r, 2 * nbytes).astype(jnp.int8)
  return block_order(codes), jnp.any(nonzero & other, axis=1)


def rows_residual(data, scales, base, *, kernel: bool = False, interpret: bool = False):
  """bool ``(R,)``: the row has a nonzero block outside the int8 span (Pallas where a tile fits)."""
  return rows_codes(data, scales, base, kernel=kernel, interpret=interpret)[1]


def rows_codes(data, scales, base, *, kernel: bool = False, interpret: bool = False):
  """``(codes int8 (R, K), residual bool (R,))`` of packed MXFP4 rows at base bytes ``base``, one pass
  (Pallas where a tile fits, else :func:`rebase_codes`)."""
  if kernel and int8_rebase_kernels().rebase_tiles(*data.shape):
    ik = int8_rebase_kernels()
    return ik.rebase(data, scales, base, interpret=interpret)
  return rebase_codes(data, scales, base)


def row_exponent(base):
  """A row's values are ``codes * 2**row_exponent``: ``2 * E2M1 * 2**d * 2**(s - d - 1 - bias)``, ``s - d = base``."""
  return base - 1 - _E8M0_BIAS


def int8_rebase_kernels():
  from fp4jax.kernels import int8_rebase  # lazy: the core does not need Pallas

  return int8_rebase


def int8_gemm_kernel():
  from fp4jax.kernels import int8_gemm  # lazy: the core does not need Pallas

  return int8_gemm


def fused_gemm_runs(m: int, n: int, k: int, out_dtype) -> bool:
  """Whether the GEMM and finish run as one Mosaic GPU kernel here (a Hopper GPU, shapes it tiles)."""
  ig = int8_gemm_kernel()
  return ig.on_hopper() and ig.gemm_obstacle(m, n, k, out_dtype) is None


def finish_sums(sums, ea, eb, nan_a, nan_b, out_dtype):
  """XLA ops: ``where(nan_a | nan_b, NaN, sums * 2**(ea + eb))`` as ``out_dtype`` (rounded once to float32 first)."""
  return common.int8_finish(sums, ea[:, None], eb[None, :], nan_a[:, None] | nan_b[None, :]).astype(out_dtype)


def rebased(data, scales, *, kernels: bool = False, interpret: bool = False):
  """``(codes, base, nan, residual)`` of MXFP4 byte rows: the int8 codes (block order), each row's base
  exponent byte, NaN rows and residual rows (one pass where a Pallas tile fits)."""
  base, nan = row_bases(scales)
  codes, residual = rows_codes(data, scales, base, kernel=kernels, interpret=interpret)
  return codes, base, nan, residual


def activation_rows(x, *, kernels: bool = False, interpret: bool = False):
  """:func:`rebased` of ``quantize(x, MXFP4, axis=-1)`` for a 2-D floating ``x``, the OCP "floor" rule.

  With ``kernels`` and a tile that fits, one Pallas pass from ``x`` (:mod:`fp4jax.kernels.int8_quantize`);
  else the quantize, then :func:`rebased`. The same bits either way."""
  if kernels:
    iq = int8_quantize_kernel()
    if jnp.dtype(x.dtype) in [jnp.dtype(d) for d in iq.INPUT_DTYPES] and iq.codes_tiles(*x.shape):
      return iq.quantize_codes(x, interpret=interpret)
  return rebased(*byte_matrix(quantize(x, MXFP4, axis=-1, scale_rule="floor", layout="rows")), kernels=kernels,
                 interpret=interpret)


def int8_quantize_kernel():
  from fp4jax.kernels import int8_quantize  # lazy: the core does not need Pallas

  return int8_quantize


def int8_product(a_data, a_scales, b_data, b_scales, out_dtype, fallback, *, kernels: bool = False,
                 interpret: bool = False):
  """``A @ B.T`` of MXFP4 byte rows ``A (M, K)`` and ``B (N, K)``, float32-exact, as ``out_dtype``.

  The int8 GEMM's int32 sums are exact; each output is rounded once to
  float32 (``S * 2**(ea + eb)``), then to ``out_dtype``. When either operand
  has residual blocks, ``fallback()`` (an exact path of the same output,
  e.g. the bfloat16 two-pass product) runs instead, under ``lax.cond``.
  ``kernels``: the passes in Pallas (the same bits) where a tile fits, else
  XLA ops; on a Hopper GPU the GEMM and the finish as one Mosaic GPU kernel
  (:mod:`fp4jax.kernels.int8_gemm`) where its tiles fit.

  The re-basing pass also writes the residual flags, so each operand is read
  once; on the fallback its codes are wasted work.
  """
  opts = {"kernels": kernels, "interpret": interpret}
  return rebased_product(rebased(a_data, a_scales, **opts), rebased(b_data, b_scales, **opts), out_dtype, fallback,
                         **opts)


def rebased_product(a, b, out_dtype, fallback, *, kernels: bool = False, interpret: bool = False):
  """:func:`int8_product` of operands already re-based: ``a``, ``b`` as :func:`rebased` returns them."""
  (codes_a, base_a, nan_a, residual_a), (codes_b, base_b, nan_b, residual_b) = a, b
  m, n = codes_a.shape[0], codes_b.shape[0]

  def exact():
    ea, eb = row_exponent(base_a), row_exponent(base_b)
    if kernels and not interpret and fused_gemm_runs(m, n, codes_a.shape[1], out_dtype):
      return int8_gemm_kernel().scaled_gemm(codes_a, codes_b, ea, eb, nan_a, nan_b, out_dtype=out_dtype)
    sums = lax.dot_general(codes_a, codes_b, _DN, preferred_element_type=jnp.int32)
    if kernels and int8_rebase_kernels().finish_tiles(m, n):
      return int8_rebase_kernels().finish(sums, ea, eb, nan_a, nan_b, out_dtype=out_dtype, interpret=interpret)
    return finish_sums(sums, ea, eb, nan_a, nan_b, out_dtype)

  return lax.cond(jnp.any(residual_a) | jnp.any(residual_b), fallback, exact)
