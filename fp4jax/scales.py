"""Scale rules: how each block's scale is chosen, and applying a scale.

Every rule is a pure function ``rule(blocks, ctx) -> scales`` in the table
:data:`SCALE_RULES`:

* ``blocks``: float32 ``(..., num_blocks, block_size)``, finite, float32
  subnormals already flushed (non-finite blocks are handled by the caller).
* ``ctx``: a :class:`BlockContext` with the format, the block absolute maxima
  and, for formats with a tensor-wide scale, its encode/decode factors.
* returns ``(..., num_blocks)`` scales in ``fmt.scale_dtype``.

The rules (``s`` is the block's decode scale, ``amax`` its absolute maximum,
``M`` the element maximum, ``emax = floor(log2(M))``; for NVFP4 ``amax`` is
first multiplied by the tensor encode factor ``g``):

``"floor"``
  E8M0 scales: OCP MX v1.0 section 6.3, ``s = 2**(floor(log2(amax)) - emax)``,
  clamped to ``[2**-127, 2**127]``; elements above ``M * s`` saturate. For MXFP4
  this is ``2**(floor(log2 amax) - 2)``. E4M3 scales: ``amax / M`` rounded down
  to an E4M3 value (possibly 0, which zeroes the block). For E4M3 scales
  ``amax / M`` means ``amax * (g * float32(1 / M))`` in float32.
``"ceil"``
  The smallest scale with ``amax / s <= M``: nothing clips. For E8M0 this is
  cuBLAS's / torchao's RCEIL. E4M3: ``amax / M`` rounded up (saturating at 448).
``"nearest"`` (E4M3 scales only)
  ``amax / M`` rounded to the nearest E4M3 value, NVIDIA's NVFP4 recipe (the
  default for NVFP4). As in the recipe, a block whose ``amax / M`` is below half
  the smallest E4M3 subnormal (``2**-10``) gets the zero scale and becomes 0.
``"mse"``
  The scale minimising the block's squared error ``sum((x - dq)**2)`` over
  every representable scale; ties go to the smaller scale. With ``hessian=H``
  the loss is ``r^T H_j r`` for the block's residual ``r = x - dq``.

Two more rules are in :data:`ALL_SCALE_RULES` (the XLA path only; the kernels
implement the rules of :data:`SCALE_RULES`):

``"even"`` (E8M0 scales only)
  torchao's ``ScaleCalculationMode.EVEN`` (``torchao/prototype/mx_formats``,
  ``X = 2**(floor(log2(rounding(amax))) - emax)``): ``amax`` is first rounded to
  the element's ``nmant`` mantissa bits, ties away from zero, by adding half a
  unit in that place to its float32 bit pattern (a carry moves it to the next
  power of two), then the "floor" rule applies. It picks the "floor" scale or
  twice it; it doubles only when ``amax``'s significand is at least
  ``2 - 2**-(nmant+1)`` (1.75 for E2M1), a subset of the blocks where "ceil"
  doubles (significand above ``elem_max / 2**emax``, 1.5 for E2M1), so it clips
  less than "floor" and keeps more small elements than "ceil".
``"4over6"`` (E4M3 scales only)
  "Four Over Six" (Cook et al., 2025, arXiv:2512.02010, mit-han-lab/fouroversix):
  per block, two "nearest" scales, one mapping ``amax`` to ``M`` (6 for E2M1)
  and one mapping it to ``2**emax`` (4), each rounded to the nearest E4M3; the
  block keeps the one with the lower squared error (ties keep the first).
  Since the second scale is ``M / 2**emax`` (1.5) times the first, the tensor
  encode factor becomes ``M * 256 / amax`` instead of ``M * 448 / amax`` (256
  is the largest power of two ``p`` with ``1.5 p <= 448``), as in the recipe,
  so no block scale saturates (see :func:`global_encode_numerator`).

2-D blocks (``quantize(..., block_shape=(b, b))``) reach the rules as blocks of
``b * b`` elements with ``BlockContext.tile = b``. Their losses are summed in
an order that is the same for a tile and its transpose (pairs ``(i, j)``,
``(j, i)`` first), so a matrix and its transpose get the same scales under
every rule; the "mse" window is then the wide one of the weighted search
below (a search, checked by the tests against a brute force, not a proof: the
bound of (2) grows with the number of elements in a block).

Exponents are read off float32 bit patterns, never off a rounded ``log2``, so
the floor and ceil rules are exact for every float32 ``amax``.

Why the unweighted "mse" search is exact. Let ``t = amax / M`` (the real scale
at which ``amax`` just fits) and ``s_c`` the "ceil" scale. Losses are in units of
``s_c**2``; ``h(v)`` is half the element spacing at ``v``.

(1) Nothing above the window wins. If ``s >= 2 t`` every element is at most
``M s / 2``, and the grid ``s * G`` below ``M s / 2`` lies inside ``(s / 2) * G``
(halving a floating-point grid keeps its points), so each element is at least
as close to the grid of ``s / 2``: ``loss(s / 2) <= loss(s)``. Halving from any
larger scale thus reaches a scale in ``[s_c, 2 t)`` that is no worse, as long as
every halved scale is representable: always for E8M0, and for E4M3 from
``2**-5`` down (below, codes are ``k * 2**-9`` and odd ``k`` do not halve, so the
window keeps every code below ``2**-5``).

(2) Nothing far below wins. For ``s`` small enough the block's largest element
clips to ``M s`` and loses more than all the other elements can gain: an element
gains at most ``err(s_c)**2 <= h(x)**2``, and only if it lies below ``M s + h(x)``
(above that its clipped error under ``s`` exceeds its error under ``s_c``).

* E8M0 scales, ``s <= s_c / 4``: ``amax > M/2``, so ``amax`` clips by more than
  ``M/4`` and its loss rises by more than ``(M/4)**2 - h(M/2)**2``; the other
  ``B - 1`` gain at most ``(B - 1) * h(M/4)**2``. E2M1: 2.0 > 31/16; E4M3:
  12480 > 496; E5M2: 2.0e8 > 3.3e7; E2M3: 3.5 > 0.122; E3M2: 48 > 7.75; MXINT8
  (its grid ``k / 64`` read as one binade with 6 mantissa bits and subnormals
  of the same step, for which (1) holds too): 0.246 > 0.0019. The window is
  ``{s_c / 2, s_c}``.
* E4M3 scales (NVFP4, B = 16), ``s <= s_c / 2``: a normal ``s_c`` is within 1/8
  of ``t`` (within 1/7 for codes 8..15), so ``amax > 5.25``; it clips to at
  most 3, a rise of at least ``2.25**2 - 0.75**2 = 4.5``; only elements below
  3.5 can gain, at most ``0.5**2`` each: ``15 * 0.25 = 3.75 < 4.5``. The window
  is the 16 codes ``c - 8 .. c + 7`` around ``c = max(code(s_c), 8)``, which for
  a subnormal ``s_c`` is every code up to ``15`` (including the zero scale).

Every bound is strict, so no scale outside the window even ties with the best
one inside it. The losses themselves are float32 sums: two scales whose losses
agree to float32 rounding (about 1e-6 relative) may be ordered either way.
``tests/test_scales.py`` checks the result against a float64 brute force over
all 255 finite E8M0 scales and all 127 non-negative finite E4M3 scales.

With a Hessian the per-element argument fails (residuals can cancel) and the
optimum moves further from ``s_c``, above it too: with correlated activations
the best E8M0 scale can sit two steps above the floor rule. The search then
spans E8M0 exponents from ``ceil - 8`` up to the first exponent at which the
whole block rounds to zero (all larger scales give that same loss), and E4M3
codes from four octaves below ``s_c`` to five above (where E2M1 rounds every
element to zero) plus the zero scale: 14 candidates for MXFP4, 28 and 42 for
MXFP8 E4M3 / E5M2, 74 for NVFP4. That window is a search, not a proof. The
tests find it equal to a brute force over every scale for AR(1) activations
up to rho = 0.99 plus a shared factor three times their size; with a nearly
rank-one Hessian (rho = 0.999 and that factor) the best NVFP4 scale can lie
further down, and a few blocks per thousand get a slightly worse one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format

__all__ = [
    "SCALE_RULES",
    "ALL_SCALE_RULES",
    "BlockContext",
    "check_rule",
    "global_encode_numerator",
    "scale_exponent",
    "element_units",
    "encode_elements",
    "encode_units",
    "decode_elements",
    "decode_blocks",
    "block_hessians",
    "search_window",
]


@dataclasses.dataclass(frozen=True)
class BlockContext:
  """What a scale rule may look at besides the block values.

  Attributes:
    fmt: the format.
    amax: ``(..., num_blocks)`` float32 block absolute maxima (finite).
    global_encode: float32 NVFP4 tensor encode factor ``g`` (the block scale
      targets ``amax * g / M``), a scalar or an array broadcastable against
      ``amax`` (one per row / leading index); None without a global scale.
    global_decode: the stored decode factor (about ``1 / g``), shaped alike.
    hessian: ``(num_blocks, B, B)`` float32 for the weighted "mse" rule, or None.
    tile: ``b`` when each block is a ``b x b`` tile flattened row-major (2-D
      blocks), else None.
  """

  fmt: Format
  amax: Any
  global_encode: Any = None
  global_decode: Any = None
  hessian: Any = None
  tile: int | None = None


# ---- scale <-> bits ---------------------------------------------------------
def scale_bytes(scales):
  return lax.bitcast_convert_type(scales, jnp.uint8)


def scales_from_bytes(byte_codes, fmt: Format):
  return lax.bitcast_convert_type(byte_codes.astype(jnp.uint8), fmt.scale_dtype)


def scale_exponent(scales, fmt: Format):
  """Integer exponent of E8M0 scales (byte - 127), int32."""
  return scale_bytes(scales).astype(jnp.int32) - fmt.scale_bias


def _pow2_scales(exponent, fmt: Format):
  e = jnp.clip(exponent, fmt.scale_exp_min, fmt.scale_exp_max)
  return scales_from_bytes(e + fmt.scale_bias, fmt)


# ---- element encodings (Format.elem_storage) -----------------------------------
def _encode_native(y, fmt: Format):
  # A barrier after the cast: fused with a dequantize, XLA's GPU compiler may
  # drop a float32 -> narrow -> float32 conversion pair, skipping the rounding.
  return lax.optimization_barrier(y.astype(fmt.elem_dtype))


def _decode_native(values, fmt: Format):
  del fmt
  return values.astype(jnp.float32)


def _encode_code(y, fmt: Format):
  code = _bits.encode_float_code(y, fmt.elem_nmant, fmt.elem_emin, fmt.elem_emax, fmt.elem_bits)
  return lax.optimization_barrier(code.astype(fmt.elem_dtype))


def _decode_code(values, fmt: Format):
  return _bits.decode_float_code(values, fmt.elem_nmant, fmt.elem_emin, fmt.elem_bits)


def _encode_fixed_point(y, fmt: Format):
  """Float32 ``y`` (``|y| <= elem_max``) -> integer codes ``round(y / 2**-f)``, nearest even."""
  unit_exp = fmt.elem_log2_smallest_subnormal  # the code unit 2**-f
  return lax.optimization_barrier(jnp.round(y * jnp.float32(2.0**-unit_exp)).astype(fmt.elem_dtype))


def _decode_fixed_point(values, fmt: Format):
  return values.astype(jnp.float32) * jnp.float32(2.0**fmt.elem_log2_smallest_subnormal)  # exact


#: ``Format.elem_storage`` -> (encode float32 grid-bound values, decode to float32).
ELEMENT_CODECS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "native": (_encode_native, _decode_native),
    "code": (_encode_code, _decode_code),
    "fixed_point": (_encode_fixed_point, _decode_fixed_point),
}


def encode_units(y, fmt: Format):
  """Float32 element units (``x`` already divided by its scales) -> ``QArray.values`` storage.

  Saturates to ``+-elem_max``, rounds to nearest even and encodes by
  ``fmt.elem_storage``. Values already on the grid (e.g. stochastically
  rounded ones) are encoded exactly.
  """
  y = jnp.clip(y, -fmt.elem_max, fmt.elem_max)
  return ELEMENT_CODECS[fmt.elem_storage][0](y, fmt)


def decode_elements(values, fmt: Format):
  """``QArray.values`` (any shape, ``fmt.elem_dtype``) -> their float32 element values."""
  return ELEMENT_CODECS[fmt.elem_storage][1](values, fmt)


def _per_element(g):
  """A global factor shaped like the block scales ``(..., nb)`` -> broadcastable over ``(..., nb, B)``."""
  return g if jnp.ndim(g) == 0 else jnp.asarray(g)[..., None]


# ---- applying scales --------------------------------------------------------
def _element_factor(scales, fmt: Format, global_decode):
  """E4M3 scales: the encode factor ``1 / (scale * global_decode)``, 0 for a zero scale.

  NVIDIA's recipe multiplies by this reciprocal rather than dividing. The
  product is flushed when it is a float32 subnormal so that every backend
  (XLA's CPU flushes, a GPU need not) zeroes the same blocks.
  """
  s = scales.astype(jnp.float32)
  if global_decode is not None:
    # The barrier pins the recipe's order of operations: XLA may otherwise
    # rewrite 1 / (s * g) (or fold g into other factors) and round differently.
    s = _bits.flush_subnormals(lax.optimization_barrier(s * global_decode))
  return jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)


def element_units(blocks, scales, fmt: Format, global_decode=None):
  """``blocks / (scale * global_decode)`` before clipping and rounding, float32.

  Args:
    blocks: float32 ``(..., nb, B)``.
    scales: ``(..., nb)`` in ``fmt.scale_dtype``.
    fmt: the format.
    global_decode: float32 for formats with a global scale (a scalar, or an
      array broadcastable against ``scales``), else None.

  Power-of-two scales apply by exponent arithmetic (exact); E4M3 scales as a
  multiplication by :func:`_element_factor`. Stochastic rounding and the STE
  mask use this so that they see exactly the value ``encode_elements`` rounds.
  """
  if fmt.power_of_two_scales:
    return _bits.scale_by_pow2(blocks, -scale_exponent(scales, fmt)[..., None])
  return blocks * _element_factor(scales, fmt, global_decode)[..., None]


def encode_elements(blocks, scales, fmt: Format, global_decode=None):
  """Rounds ``blocks / (scale * global_decode)`` to the element grid.

  Round-to-nearest-even with saturation to +-elem_max, as ml_dtypes' casts do
  after an explicit clip. Returns ``fmt.elem_dtype`` values shaped like blocks.
  """
  return encode_units(element_units(blocks, scales, fmt, global_decode), fmt)


def decode_blocks(values, scales, fmt: Format, global_decode=None):
  """float32 ``values * scale * global_decode`` for blocked values.

  Args:
    values: ``(..., nb, B)`` in the element dtype.
    scales: ``(..., nb)`` in the scale dtype.
    fmt: the format.
    global_decode: float32 (a scalar or broadcastable against ``scales``) or None.

  Returns:
    float32 ``(..., nb, B)``. A NaN scale (E8M0 0xFF, E4M3 0x7F) gives NaN
    over the whole block. Power-of-two scales apply by exponent arithmetic, so
    the whole E8M0 range is exact; results that are float32 subnormals
    (``< 2**-126``) become signed zeros on every backend. Products beyond
    float32's range are +-Inf here (``dequantize`` saturates them).
  """
  v = decode_elements(values, fmt)
  if fmt.power_of_two_scales:
    codes = scale_bytes(scales)
    out = _bits.scale_by_pow2(v, scale_exponent(scales, fmt)[..., None])
    out = jnp.where((codes == fmt.scale_nan_byte)[..., None], jnp.nan, out)
  else:
    out = v * scales.astype(jnp.float32)[..., None]  # exact: 2 x 4 significant bits
    if global_decode is not None:
      # (v * s) * g rounds once; the barrier keeps XLA from reassociating it
      # into v * (s * g), which rounds twice.
      out = lax.optimization_barrier(out) * _per_element(global_decode)
  return _bits.flush_subnormals(out)


# ---- fixed rules ------------------------------------------------------------
def _floor_exponent(ctx: BlockContext):
  return _bits.floor_log2(_bits.f32_bits(ctx.amax)) - ctx.fmt.elem_emax


def _ceil_exponent(ctx: BlockContext):
  bits = _bits.f32_bits(ctx.amax)
  over = _bits.mantissa_field(bits) > ctx.fmt.elem_max_significand_bits
  return _floor_exponent(ctx) + over.astype(jnp.int32)


def _even_exponent(ctx: BlockContext):
  # torchao's EVEN: add half a unit in the element's last mantissa place to
  # amax's bits (a carry lands in the exponent field), then floor. amax is
  # finite, so the sum stays below 2**32.
  half_ulp = jnp.uint32(1 << (_bits.F32_MANT_BITS - ctx.fmt.elem_nmant - 1))
  return _bits.floor_log2(_bits.f32_bits(ctx.amax) + half_ulp) - ctx.fmt.elem_emax


def _ideal_scale(ctx: BlockContext, target: float | None = None):
  """``amax / target`` in scale units (times the global encode factor): float32.

  ``target`` is the element value ``amax`` maps to, ``M`` by default.
  Computed as ``amax * (encode * float32(1 / target))``: one tensor-wide factor, so
  no intermediate can fall below float32's normal range (a tiny tensor with
  a capped encode factor would otherwise flush to zero), and the multiply by
  the float32 reciprocal of ``M`` is what NVIDIA's recipe does (XLA would
  rewrite a division by the constant into it anyway). The barrier keeps XLA
  from reassociating the product.
  """
  factor = jnp.float32(1.0 / (ctx.fmt.elem_max if target is None else target))
  if ctx.global_encode is not None:
    factor = lax.optimization_barrier(ctx.global_encode * factor)
  return ctx.amax * factor


def _round_scale(ctx: BlockContext, direction: int, target: float | None = None):
  """Rounds the ideal scale to a non-pow2 scale dtype: -1 down, 0 nearest, +1 up."""
  fmt = ctx.fmt
  ideal = _ideal_scale(ctx, target)
  # Saturate before the cast: ml_dtypes (and XLA) give NaN above E4M3's range.
  nearest = jnp.clip(ideal, 0.0, fmt.scale_max).astype(fmt.scale_dtype)
  if direction == 0:
    return nearest
  codes = scale_bytes(nearest).astype(jnp.int32)
  got = lax.optimization_barrier(nearest).astype(jnp.float32)  # no convert-pair folding
  if direction < 0:
    codes = jnp.where(got > ideal, codes - 1, codes)
  else:
    codes = jnp.where(got < ideal, codes + 1, codes)
  return scales_from_bytes(jnp.clip(codes, 0, fmt.scale_max_byte), fmt)


def floor_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    return _pow2_scales(_floor_exponent(ctx), ctx.fmt)
  return _round_scale(ctx, -1)


def ceil_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    return _pow2_scales(_ceil_exponent(ctx), ctx.fmt)
  return _round_scale(ctx, +1)


def nearest_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    raise ValueError(
        f"scale_rule 'nearest' rounds a block scale to E4M3; {ctx.fmt!r} has power-of-two "
        "scales: use 'floor', 'ceil' or 'mse'"
    )
  return _round_scale(ctx, 0)


def even_rule(blocks, ctx: BlockContext):
  del blocks
  check_rule(ctx.fmt, "even")
  return _pow2_scales(_even_exponent(ctx), ctx.fmt)


# ---- searched rules -----------------------------------------------------------
def search_window(fmt: Format, weighted: bool) -> tuple[range, bool]:
  """The "mse" candidates: byte offsets from the anchor code, and whether to add the zero scale.

  The anchor is the "ceil" scale's byte; for E4M3 scales it is raised to at
  least the smallest normal code (8), see the module docstring. ``weighted``
  asks for the wide window (Hessian-weighted losses, 2-D blocks).
  """
  if fmt.power_of_two_scales:
    if not weighted:
      return range(-1, 1), False
    # Up to the first exponent at which the whole block rounds to 0:
    # amax < 2**(A+1) and e >= A + 2 - log2(smallest subnormal) put every
    # element below half the smallest subnormal; ceil >= A - emax.
    first_zero = fmt.elem_emax + 2 - fmt.elem_log2_smallest_subnormal
    return range(-8, first_zero + 1), False
  octave = 1 << fmt.scale_finfo.nmant  # codes per factor of two in the normal range
  if not weighted:
    return range(-octave, octave), False
  return range(-4 * octave, 5 * octave + 1), True


def _tile_sum(sq, b: int):
  """Sum of ``(..., b * b)`` row-major tile entries, bit-identical for a tile and its transpose.

  Entry ``(i, j)`` and ``(j, i)`` are added first (float addition commutes),
  the pair sums sit in the upper triangle, and that same array is reduced.
  """
  s = sq.reshape(*sq.shape[:-1], b, b)
  pairs = s + jnp.swapaxes(s, -1, -2)
  upper = np.triu(np.ones((b, b), bool), 1)
  diag = np.eye(b, dtype=bool)
  return jnp.sum(jnp.where(upper, pairs, jnp.where(diag, s, 0.0)), axis=(-2, -1))


def _block_loss(residual, hessian, tile=None):
  if hessian is None:
    sq = residual * residual
    return jnp.sum(sq, axis=-1) if tile is None else _tile_sum(sq, tile)
  return jnp.einsum("...nb,nbd,...nd->...n", residual, hessian, residual,
                    precision=lax.Precision.HIGHEST)


def _pow2_factors(e):
  """2**e for integer ``e`` in [-252, 254] as two normal float32 factors (see scale_by_pow2)."""
  a = e >> 1
  return _bits.exp2i(a), _bits.exp2i(e - a)


def _loss_function(blocks, ctx: BlockContext):
  """``loss_of(code)``: each block's loss (``(..., nb)`` float32) under scale bytes ``code``."""
  fmt = ctx.fmt
  weighted = ctx.hessian is not None
  # Residuals are compared in units of 2**floor(log2(amax)) so that squares
  # stay in float32 range for any input magnitude.
  unit = _bits.floor_log2(_bits.f32_bits(ctx.amax))
  mag = jnp.abs(blocks)
  gdec = ctx.global_decode

  def per_block(f):
    # Per-block factors are computed once per block and broadcast: the barrier
    # keeps XLA from recomputing them (bitcasts, an E4M3 decode, a division)
    # for every element, which also splits the element loop into extra passes.
    return lax.optimization_barrier(f)

  def loss_of(code):
    # Magnitudes suffice without a Hessian: x and its rounding share a sign.
    if fmt.power_of_two_scales:
      e = code - fmt.scale_bias
      (e1, e2), (d1, d2), (u1, u2) = per_block((_pow2_factors(-e), _pow2_factors(e - unit), _pow2_factors(-unit)))
      y = mag * e1[..., None] * e2[..., None]
      dq_unit = lambda q: q * d1[..., None] * d2[..., None]
    else:
      s = scales_from_bytes(code, fmt)
      enc, dec, (u1, u2) = per_block(
          (_element_factor(s, fmt, gdec), _bits.flush_subnormals(_bits.scale_by_pow2(s.astype(jnp.float32), -unit)),
           _pow2_factors(-unit)))
      y = mag * enc[..., None]
      dq_unit = lambda q: q * dec[..., None] if gdec is None else q * dec[..., None] * _per_element(gdec)
    q = _bits.round_to_grid(jnp.minimum(y, fmt.elem_max), fmt.elem_nmant, fmt.elem_emin, fmt.elem_emax)
    r = mag * u1[..., None] * u2[..., None] - dq_unit(q)
    if weighted:
      r = jnp.where(blocks < 0, -r, r)
    return _block_loss(r, ctx.hessian, ctx.tile)

  return loss_of


def mse_rule(blocks, ctx: BlockContext):
  fmt = ctx.fmt
  offsets, with_zero = search_window(fmt, ctx.hessian is not None or ctx.tile is not None)
  anchor = scale_bytes(ceil_rule(blocks, ctx)).astype(jnp.int32)
  if not fmt.power_of_two_scales:
    anchor = jnp.maximum(anchor, fmt.scale_min_normal_byte)
  loss_of = _loss_function(blocks, ctx)

  def better(carry, code):
    best_loss, best_code = carry
    loss = loss_of(code)
    take = loss < best_loss  # candidates ascend, so ties keep the smaller scale
    return jnp.where(take, loss, best_loss), jnp.where(take, code, best_code)

  n_zero = int(with_zero)  # the zero scale, when searched, is candidate 0

  def candidate(i):
    code = jnp.clip(anchor + (offsets.start + i - n_zero), 0, fmt.scale_max_byte)
    return jnp.where(i < n_zero, 0, code) if with_zero else code

  # Every candidate's loss is computed by the same code (all inside the loop,
  # or all unrolled): XLA may sum a block's squares in a different order
  # inside a loop body than outside it, which would break exact ties unevenly.
  carry = (jnp.full(anchor.shape, jnp.inf, jnp.float32), candidate(0))
  n = len(offsets) + n_zero
  if n <= 3:
    for i in range(n):
      carry = better(carry, candidate(i))
  else:
    # A loop, not an unrolled chain: compile time stays flat in the window size.
    carry = lax.fori_loop(0, n, lambda i, c: better(c, candidate(i)), carry)
  return scales_from_bytes(carry[1], fmt)


def four_over_six_rule(blocks, ctx: BlockContext):
  check_rule(ctx.fmt, "4over6")
  fmt = ctx.fmt
  six = _round_scale(ctx, 0)
  four = _round_scale(ctx, 0, target=2.0**fmt.elem_emax)
  loss_of = _loss_function(blocks, ctx)
  take_four = loss_of(scale_bytes(four).astype(jnp.int32)) < loss_of(scale_bytes(six).astype(jnp.int32))
  return jnp.where(take_four, four, six)


#: The rules the kernels implement too (``fp4jax.kernels`` refuses any other).
SCALE_RULES: dict[str, Callable[..., Any]] = {
    "floor": floor_rule,
    "ceil": ceil_rule,
    "nearest": nearest_rule,
    "mse": mse_rule,
}

#: Every rule ``fp4jax.quantize`` takes: :data:`SCALE_RULES` plus ``"even"``
#: and ``"4over6"`` (XLA path only).
ALL_SCALE_RULES: dict[str, Callable[..., Any]] = {
    **SCALE_RULES,
    "even": even_rule,
    "4over6": four_over_six_rule,
}

# Rules that only make sense for one kind of block scale: True = power-of-two
# (E8M0) scales, False = E4M3 scales.
_RULE_NEEDS_POW2 = {
    "nearest": (False, "rounds E4M3 block scales"),
    "4over6": (False, "chooses between two E4M3 block scales"),
    "even": (True, "rounds a power-of-two (E8M0) block scale"),
}


def check_rule(fmt: Format, rule: str) -> None:
  """Raises ValueError unless ``rule`` is a known rule that applies to ``fmt``'s scales."""
  if rule not in ALL_SCALE_RULES:
    raise ValueError(f"unknown scale_rule {rule!r}; expected one of {sorted(ALL_SCALE_RULES)}")
  if rule in _RULE_NEEDS_POW2:
    pow2, what = _RULE_NEEDS_POW2[rule]
    if fmt.power_of_two_scales != pow2:
      kind = "power-of-two" if fmt.power_of_two_scales else "E4M3"
      ok = [r for r in ALL_SCALE_RULES
            if r not in _RULE_NEEDS_POW2 or _RULE_NEEDS_POW2[r][0] == fmt.power_of_two_scales]
      raise ValueError(f"scale_rule {rule!r} {what}; {fmt!r} has {kind} scales: use one of {ok}")


def global_encode_numerator(fmt: Format, rule: str) -> float:
  """NVFP4's tensor encode factor is this over the tensor amax.

  ``elem_max * scale_max`` (6 * 448) by default. For ``"4over6"`` the block
  scale may be ``M / 2**emax`` (1.5) times the usual one, so the numerator is
  ``elem_max * p`` with ``p`` the largest power of two such that ``p * M /
  2**emax <= scale_max``: 6 * 256, as the Four Over Six recipe does.
  """
  if rule != "4over6":
    return fmt.global_encode_numerator
  headroom = fmt.elem_max / 2.0**fmt.elem_emax
  return fmt.elem_max * 2.0 ** math.floor(math.log2(fmt.scale_max / headroom))


def block_hessians(x, block_size: int):
  """Per-block Hessians ``X_j^T X_j`` of activations for Hessian-weighted MSE.

  Args:
    x: activations ``(..., K)``; all leading axes are samples.
    block_size: the format's block size ``B``; ``K`` must be a multiple.

  Returns:
    float32 ``(K // B, B, B)``: for a weight ``w`` of shape ``(K, N)`` used as
    ``x @ w`` and quantized along ``K`` (axis 0), block ``j`` of every column
    has loss ``r^T H[j] r``, its contribution to ``||x @ (w - dq)||^2``.
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"block_hessians needs activations of shape (..., K), got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"block_hessians needs floating activations, got dtype {x.dtype}")
  if block_size <= 0:
    raise ValueError(f"block_hessians: block_size must be positive, got {block_size}")
  k = x.shape[-1]
  if k % block_size:
    raise ValueError(f"block_hessians: K={k} (shape {x.shape}) is not a multiple of block size {block_size}")
  xb = x.reshape(-1, k // block_size, block_size).astype(jnp.float32)
  return jnp.einsum("snb,snd->nbd", xb, xb, precision=lax.Precision.HIGHEST)
