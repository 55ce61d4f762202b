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
whose values of 2 and more lie beyond float32: the reference's dequantize
saturates them at float32's largest value, the bfloat16 fallbacks give inf, a
difference left as it is), are the *residual*: when any exists, a ``lax.cond`` runs an exact fallback (the
bfloat16 two-pass product) instead. XLA copies that predicate to the host and
waits for it; a weight stored with :func:`int8_weight` (``fallback="tiles"``)
avoids the round trip: on a GPU the output tiles that hold a residual row or
column are computed again by a kernel that dequantizes both operands to
bfloat16 (:func:`patch_residual_tiles`; a tile without one exits at once),
fast when residual rows are rare, 2.5-4x slower than the cond's fallback
when most rows have them (``benchmarks/results/w4a4.md``). Normal or Laplace data spans fewer than 4
binades per row (no residual); heavy tails (Student t with 3 degrees of freedom:
90% of rows) do not. NaN blocks (scale 0xFF) make their whole output row or
column NaN, as in the reference.

Operands are the kernels' byte matrices (:func:`fp4jax.prepared.byte_matrix`):
uint8 ``(R, K / 2)`` packed E2M1 codes and uint8 ``(R, K / 32)`` E8M0 scales.
A weight used many times can carry its int8 codes made once
(:class:`Int8Weight`, :func:`int8_weight`), so a product re-bases only its
activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fp4jax.formats import MXFP4, Format
from fp4jax.kernels import matmul_common as common
from fp4jax.prepared import byte_matrix, with_layout
from fp4jax.qarray import QArray, validate_qarray
from fp4jax.quantize import quantize

__all__ = ["MAX_K", "SPAN", "int8_obstacle", "row_bases", "block_order", "rebase_codes", "rows_residual",
           "rows_codes", "rows_may_be_residual", "row_exponent", "fused_gemm_runs", "finish_sums", "rebased",
           "activation_rows", "int8_product", "rebased_product", "residual_free_product", "patch_residual_tiles",
           "Int8Weight", "int8_weight", "FALLBACKS", "is_stored_weight"]

#: Binades of block exponents below a row's top that the int8 values hold (shifts 0..3).
SPAN = common.SPAN
#: The longest contraction whose int32 sums cannot overflow: ``K * (12 << 3)**2 < 2**31``.
MAX_K = 1 << 17
_BLOCK = 32
_E8M0_BIAS = 127
_DN = (((1,), (1,)), ((), ()))
#: How a product decides on residual rows: ``"cond"`` (a ``lax.cond`` picks the exact fallback for the
#: whole product) or ``"tiles"`` (on a GPU, :func:`patch_residual_tiles`; the cond elsewhere).
FALLBACKS = ("cond", "tiles")


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


def rows_may_be_residual(scales):
  """bool ``(R,)`` from the scale bytes alone: the row has a finite block outside the int8 span. A
  superset of the residual rows (:func:`rows_residual` also asks that the block's codes be nonzero), so
  where no row is flagged here the int8 product is exact with no fallback; ~1/16 of the codes' bytes."""
  base, _ = row_bases(scales)
  return jnp.any(common.int8_blocks(scales.astype(jnp.int32), base[:, None])[2], axis=1)


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
  has residual blocks, ``fallback()`` (an exact path of the same output, e.g.
  the bfloat16 two-pass product) runs instead, under ``lax.cond``.
  ``kernels``: the passes in Pallas (the same bits) where a tile fits, else
  XLA ops; on a Hopper GPU the GEMM and the finish as one Mosaic GPU kernel
  (:mod:`fp4jax.kernels.int8_gemm`) where its tiles fit.

  The re-basing pass also writes the residual flags, so each operand is read
  once; on the fallback its codes are wasted work.
  """
  opts = {"kernels": kernels, "interpret": interpret}
  return rebased_product(rebased(a_data, a_scales, **opts), rebased(b_data, b_scales, **opts), out_dtype, fallback,
                         **opts)


def rebased_product(a, b, out_dtype, fallback, *, kernels: bool = False, interpret: bool = False, tiles=None):
  """:func:`int8_product` of operands already re-based: ``a``, ``b`` as :func:`rebased` returns them.

  ``tiles``: None (the ``lax.cond``), or both operands' ``(data, scales)`` byte rows, with which a GPU
  product (``kernels``, not interpreted) recomputes its residual tiles instead
  (:func:`patch_residual_tiles`, the ``"tiles"`` fallback); elsewhere the cond."""
  residual_a, residual_b = a[3], b[3]

  def exact():
    return residual_free_product(a, b, out_dtype, kernels=kernels, interpret=interpret)

  if tiles is not None and kernels and not interpret:
    return patch_residual_tiles(exact(), *tiles, residual_a, residual_b)
  return lax.cond(jnp.any(residual_a) | jnp.any(residual_b), fallback, exact)


def residual_free_product(a, b, out_dtype, *, kernels: bool = False, interpret: bool = False):
  """The int8 GEMM and finish of re-based operands ``a``, ``b`` (as :func:`rebased` returns them),
  reading neither's residual flags: exact to float32 rounding only where no row has a residual block,
  which the caller has made sure of (e.g. :func:`rows_may_be_residual` of the scale bytes flags none);
  :func:`rebased_product` is the one that checks. On a Hopper GPU (``kernels``) the GEMM and finish as one
  Mosaic GPU kernel where its tiles fit."""
  (codes_a, base_a, nan_a, _), (codes_b, base_b, nan_b, _) = a, b
  m, n = codes_a.shape[0], codes_b.shape[0]
  ea, eb = row_exponent(base_a), row_exponent(base_b)
  if kernels and not interpret and fused_gemm_runs(m, n, codes_a.shape[1], out_dtype):
    return int8_gemm_kernel().scaled_gemm(codes_a, codes_b, ea, eb, nan_a, nan_b, out_dtype=out_dtype)
  sums = lax.dot_general(codes_a, codes_b, _DN, preferred_element_type=jnp.int32)
  if kernels and int8_rebase_kernels().finish_tiles(m, n):
    return int8_rebase_kernels().finish(sums, ea, eb, nan_a, nan_b, out_dtype=out_dtype, interpret=interpret)
  return finish_sums(sums, ea, eb, nan_a, nan_b, out_dtype)


def patch_residual_tiles(out, bytes_a, bytes_b, residual_a, residual_b, *, interpret: bool = False):
  """``out`` (the int8 product) with every output tile that holds a residual row of ``A`` or ``B``
  computed again, exactly to float32 rounding, from the byte rows ``bytes_a = (data, scales)`` and
  ``bytes_b``: both dequantized to bfloat16 in registers, float32 sums (:mod:`fp4jax.kernels.mx_matmul`,
  its ``row_flags``). A tile without one exits at once, so with no residual this costs one launch; the
  decision is the kernel's, on the device, for each tile."""
  from fp4jax.kernels import mx_matmul  # lazy: the core does not need Pallas

  return mx_matmul.mx_matmul(*bytes_a, None, *bytes_b, None, a_fmt=MXFP4, b_fmt=MXFP4, out_dtype=out.dtype,
                             interpret=interpret, out_buffer=out, row_flags=(residual_a, residual_b))


@jax.tree_util.register_pytree_node_class
class Int8Weight:
  """A 2-D MXFP4 weight with its int8 codes made once: what :func:`int8_weight` returns.

  ``scaled_matmul`` / ``scaled_dot_general`` take it wherever they take the
  QArray: where the product runs on the int8 path its stored codes go into
  the GEMM as they are (no per-call re-basing of the weight); everywhere else
  (other paths, the backward pass) its ``qarray`` is used. Fields:

  * ``qarray``: the weight, a ``"rows"`` QArray (the fallback and the other
    paths read it);
  * ``codes`` int8 ``(N, K)`` in :func:`block_order`, ``base`` int32 ``(N,)``,
    ``nan`` and ``residual`` bool ``(N,)``: :func:`rebased` of its byte rows;
  * ``fallback`` (static): how its products treat residual rows, one of
    :data:`FALLBACKS` (see :func:`int8_weight`).

  Memory: the codes are a byte an element, so with the QArray about 1.53
  bytes an element (2.9x MXFP4's, 0.77x bfloat16's).
  """

  def __init__(self, qarray: QArray, codes, base, nan, residual, fallback: str = "tiles"):
    self.qarray, self.codes, self.base, self.nan, self.residual = qarray, codes, base, nan, residual
    self.fallback = fallback

  def tree_flatten(self):
    return (self.qarray, self.codes, self.base, self.nan, self.residual), self.fallback

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, fallback=aux)

  @property
  def shape(self):
    return self.qarray.shape

  @property
  def fmt(self):
    return self.qarray.fmt

  @property
  def ndim(self):
    return self.qarray.ndim

  @property
  def axis(self):
    return self.qarray.axis

  def check(self):
    """ValueError unless the fields fit together (an Int8Weight made by hand, not by :func:`int8_weight`)."""
    validate_qarray(self.qarray)
    if self.qarray.layout != "rows" or self.qarray.fmt != MXFP4 or self.qarray.ndim != 2:
      raise ValueError(f"Int8Weight: qarray must be a 2-D MXFP4 QArray stored 'rows', got {self.qarray!r}")
    n, k = self.qarray.values.shape[0], 2 * self.qarray.values.shape[1]
    want = {"codes": ((n, k), jnp.int8), "base": ((n,), jnp.int32), "nan": ((n,), jnp.bool_),
            "residual": ((n,), jnp.bool_)}
    for name, (shape, dtype) in want.items():
      x = getattr(self, name)
      if tuple(x.shape) != shape or jnp.dtype(x.dtype) != jnp.dtype(dtype):
        raise ValueError(f"Int8Weight: {name} must be {jnp.dtype(dtype)} {shape} for {self.qarray!r}, got "
                         f"{jnp.dtype(x.dtype)} {tuple(x.shape)}; make it with fp4jax.int8_weight")
    if self.fallback not in FALLBACKS:
      raise ValueError(f"Int8Weight: fallback must be one of {FALLBACKS}, got {self.fallback!r}")

  @property
  def rebased(self):
    """``(codes, base, nan, residual)`` as :func:`rebased` returns them."""
    return self.codes, self.base, self.nan, self.residual

  def __repr__(self):
    return f"Int8Weight({self.qarray!r}, fallback={self.fallback!r})"


def int8_weight(w: QArray, fallback: str = "tiles") -> Int8Weight:
  """``w`` with its int8 codes made once, for the int8 path's products (an :class:`Int8Weight`).

  Args:
    w: a 2-D MXFP4 QArray blocked along one axis (the axis a product
      contracts), either storage layout: ``quantize(w, MXFP4, axis=0)`` for a
      ``(K, N)`` weight; or an Int8Weight (its fallback set anew).
    fallback: how a product with it treats rows the int8 values cannot hold
      (the residual, :mod:`fp4jax.int8_matmul`), both exact to float32
      rounding: ``"tiles"``, on a GPU the output tiles holding such a row
      are computed again on the device, with no host round trip (fastest
      when such rows are rare: activations of normal or Laplace data have
      none; 2.5-4x slower than ``"cond"`` when most rows have them, as for
      Student t(3) data); ``"cond"``, a ``lax.cond`` runs the two-pass
      bfloat16 product instead of the whole product when any row has one
      (what a plain QArray gets).

  Raises:
    ValueError: ``w`` is not such a QArray, ``K`` is beyond :data:`MAX_K`,
      or ``fallback`` is unknown.

  Under ``jax.jit`` this is a pass over the weight: do it once, outside the
  per-call function (as :func:`fp4jax.with_layout`).
  """
  if fallback not in FALLBACKS:
    raise ValueError(f"int8_weight: fallback must be one of {FALLBACKS}, got {fallback!r}")
  if isinstance(w, Int8Weight):
    return Int8Weight(w.qarray, *w.rebased, fallback=fallback)
  if not isinstance(w, QArray):
    raise ValueError(f"int8_weight expects a fp4jax.QArray, got {type(w).__name__}")
  validate_qarray(w)
  if w.ndim != 2:
    raise ValueError(f"int8_weight expects a 2-D weight, got shape {tuple(w.shape)}")
  if why := int8_obstacle(w.fmt, w.fmt, w.shape[w.axis]):
    raise ValueError(f"int8_weight: {why}")
  rows = with_layout(w, "rows")
  return Int8Weight(rows, *rebased(*byte_matrix(rows)), fallback=fallback)


def is_stored_weight(x) -> bool:
  """Whether ``x`` is a quantized operand as stored (a QArray or an :class:`Int8Weight`), not an array."""
  return isinstance(x, (QArray, Int8Weight))
