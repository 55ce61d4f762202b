"""float32 bit-pattern helpers: the arithmetic whose bits must not depend on the backend.

XLA on the CPU flushes float32 subnormals to zero, so ``x * 2.0**-127`` is 0
and ``x / 2.0**-127`` is Inf. Every power-of-two scaling in fp4jax therefore
goes through :func:`scale_by_pow2`, which splits ``2**e`` into two normal
factors, and every exponent is read off the bit pattern, never off a rounded
``log2``.

Three more facts make a float32 expression come out differently on XLA's CPU,
XLA's GPU and a Triton kernel, and each has its helper here:

* Division and reciprocal are not correctly rounded on the GPU (XLA's GPU
  ``a / b`` is ``div.full.f32``, its ``1 / x`` ``rcp.approx``-like; measured
  on an H200). :func:`div_rn` divides with integer arithmetic instead.
* Compilers contract a multiply feeding an add into one FMA (XLA does it on
  the CPU too: ``jax.jit(lambda a, b, c: a * b + c)`` is an FMA), each
  backend where it sees fit, and an FMA rounds once instead of twice. A
  product whose exact value is a float32 rounds the same either way, so sums
  of products here only add exact products: :func:`exact_square`.
* A reduction's order is the backend's. :func:`halving_sum` adds in a fixed
  tree of elementwise adds, which no compiler may reorder.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

F32_EXP_BIAS = 127
F32_MANT_BITS = 23
F32_MANT_MASK = (1 << F32_MANT_BITS) - 1
F32_ABS_MASK = 0x7FFFFFFF
F32_INF_BITS = 0x7F800000


def f32_bits(x):
  """The uint32 bit pattern of float32 ``x`` (of the float32 values of a bfloat16 or float16 ``x``)."""
  return lax.bitcast_convert_type(widen(x), jnp.uint32)


def from_f32_bits(bits):
  return lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def widen(x):
  """The float32 values of a float32, bfloat16 or float16 ``x``, whatever the compiler elides.

  XLA removes float32 -> bfloat16 -> float32 convert pairs inside one jit
  (``xla_allow_excess_precision``, on by default, on the CPU and the GPU):
  ``x.astype(float32)`` of a bfloat16 ``x`` computed from float32 in the same
  program may then be the unrounded float32, and what gets quantized is not the
  array the program holds (a SwiGLU activation on the CPU; QAT's cotangent on an
  H200: ``benchmarks/experiments/qat_grad_backends.py``). A ``reduce_precision``
  to bfloat16 is an arithmetic rounding no pass removes: the identity on a
  rounded value, the rounding on an unrounded one. float16 goes through its bit
  pattern instead (``reduce_precision`` flushes float16's subnormals).
  """
  if x.dtype == jnp.bfloat16:
    return lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7)
  if x.dtype != jnp.float16:
    return x.astype(jnp.float32)
  h = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  sign, e, m = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
  normal = ((e + (F32_EXP_BIAS - 15)) << F32_MANT_BITS) | (m << 13)
  special = jnp.uint32(F32_INF_BITS) | (m << 13)  # Inf and NaN, the payload kept
  subnormal = f32_bits(m.astype(jnp.float32) * jnp.float32(2.0**-24))  # exact: a normal float32
  return from_f32_bits(sign | jnp.where(e == 0, subnormal, jnp.where(e == 0x1F, special, normal)))


def flush_subnormals(x):
  """Sets float32 subnormals to (signed) zero, identically on every backend.

  Backends disagree on float32 subnormals (XLA's CPU flushes them in
  arithmetic, a bit-level kernel would not); flushing them up front makes
  quantization bit-identical everywhere. Their magnitude is below 2**-126.
  A bfloat16 or float16 ``x`` is read through :func:`widen` (in :func:`f32_bits`):
  the result is float32 of the values the array holds.
  """
  bits = f32_bits(x)
  is_sub = (bits & jnp.uint32(F32_INF_BITS)) == 0
  return from_f32_bits(jnp.where(is_sub, bits & jnp.uint32(0x80000000), bits))


def saturate(x, dtype):
  """float32 ``x`` with every non-NaN value beyond ``dtype``'s largest finite one set to it, signed.

  The rule both MXFP4 decoders (``fp4jax.dequantize`` of a QArray and
  ``fp4jax.dequantize_packed`` of bytes) apply before their one cast, so a
  finite code and a finite scale never decode to Inf, in float32 as in float16.
  A select, not a clip: it keeps -0 and NaN as they are on every backend.
  """
  big = jnp.float32(jnp.finfo(dtype).max)
  return jnp.where(jnp.abs(x) > big, jnp.copysign(big, x), x)


def floor_log2(abs_bits):
  """floor(log2(a)) for a normal float32 ``a`` given as ``|a|``'s bits (int32).

  Zero (and flushed subnormals) map to -127, below every normal exponent.
  """
  return (abs_bits >> F32_MANT_BITS).astype(jnp.int32) - F32_EXP_BIAS


def mantissa_field(abs_bits):
  return (abs_bits & jnp.uint32(F32_MANT_MASK)).astype(jnp.int32)


def exp2i(e):
  """2.0**e as float32 for integer ``e`` in [-126, 127] (always normal).

  Outside that range the bit pattern is wrong (``e = -127`` gives 0.0): use
  :func:`scale_by_pow2` for wider exponents.
  """
  return from_f32_bits(((e.astype(jnp.int32) + F32_EXP_BIAS) << F32_MANT_BITS).astype(jnp.uint32))


def scale_by_pow2(x, e):
  """x * 2**e, exact for integer ``e`` in [-252, 254] unless the result is subnormal.

  Two normal factors 2**a * 2**b with a = floor(e/2) keep both in range; the
  intermediate lies between ``x`` and the result, so it underflows only when
  the result does.
  """
  e = jnp.asarray(e, jnp.int32)
  a = e >> 1
  return x * exp2i(a) * exp2i(e - a)



def round_to_grid(a, nmant: int, emin: int, emax: int):
  """Rounds non-negative float32 ``a`` to a float grid, nearest even, as float32.

  The grid has ``nmant`` mantissa bits and normal binades ``2**emin`` to
  ``2**emax`` (its subnormals continue the step of the lowest binade). No
  saturation: the caller clips to the format's maximum first, which is on the
  grid. Equal to ``a.astype(fmt).astype(float32)`` after the clip (tests check
  it against ml_dtypes): ``jnp.round`` ties to even, and an even multiple of
  the step is a code with an even mantissa.

  Why not that cast pair: XLA's GPU compiler may delete a float32 -> narrow ->
  float32 conversion pair ("excess precision"), which would skip the rounding.
  The step comes from comparisons with exact powers of two (compares and
  selects only), so it fuses into the surrounding arithmetic.
  """
  step = jnp.full(a.shape, 2.0 ** (emin - nmant), jnp.float32)
  inv = jnp.full(a.shape, 2.0 ** (nmant - emin), jnp.float32)
  for k in range(emin + 1, emax + 1):
    up = a >= 2.0**k
    step = jnp.where(up, jnp.float32(2.0 ** (k - nmant)), step)
    inv = jnp.where(up, jnp.float32(2.0 ** (nmant - k)), inv)
  return jnp.round(a * inv) * step


def encode_float_code(y, nmant: int, emin: int, emax: int, bits: int):
  """Float32 ``y`` (``|y|`` at most the format's max) -> its ``bits``-bit float code, int32.

  For small float formats without Inf/NaN codes (FP6 E2M3 / E3M2), which XLA
  has no dtype for: round-to-nearest-even onto the grid first (exact
  float32), then read the code off the float32 bits. A normal ``a = 1.f *
  2**E`` has code ``(E - emin + 1) << nmant | f``, i.e. ``(bits(a) >> (23 -
  nmant)) - ((127 + emin - 1) << nmant)``; a subnormal ``a = k * 2**(emin -
  nmant)`` has code ``k``. The sign bit is ``y``'s, so ``-0.0`` and negatives
  that round to zero keep it, as ml_dtypes casts do.
  """
  a = round_to_grid(jnp.abs(y), nmant, emin, emax)
  normal = (f32_bits(a) >> (F32_MANT_BITS - nmant)).astype(jnp.int32) - ((F32_EXP_BIAS + emin - 1) << nmant)
  sub = (a * jnp.float32(2.0 ** (nmant - emin))).astype(jnp.int32)  # exact: an integer below 2**nmant
  mag = jnp.where(a >= jnp.float32(2.0**emin), normal, sub)
  return mag | ((f32_bits(y) >> 31).astype(jnp.int32) << (bits - 1))


def decode_float_code(codes, nmant: int, emin: int, bits: int):
  """Inverse of :func:`encode_float_code`: codes (any int dtype) -> float32, exactly.

  ``(2**nmant * [e > 0] + f) * 2**(max(e, 1) + emin - 1 - nmant)`` for exponent
  field ``e`` and mantissa field ``f``, negated when the sign bit is set.
  """
  c = codes.astype(jnp.int32)
  mag = c & ((1 << (bits - 1)) - 1)
  e = mag >> nmant
  sig = (mag & ((1 << nmant) - 1)) | jnp.where(e > 0, 1 << nmant, 0)
  out = sig.astype(jnp.float32) * exp2i(jnp.maximum(e, 1) + (emin - 1 - nmant))
  return jnp.where(((c >> (bits - 1)) & 1) == 1, -out, out)


# ---- computing per-block values once ------------------------------------------------------
# Above every float32 bit pattern but the negative NaNs with a payload past the quiet bit.
_FENCE_DIVISOR = 0xFFC00001


def compute_once(x):
  """float32 ``x`` unchanged, but computed once rather than once per use.

  XLA fuses cheap producers (integer and bit arithmetic, selects) into every
  consumer, even into a broadcast that reads each element many times: a
  per-block value used by all 16 or 32 elements of its block (a correctly
  rounded division is 150 integer operations) is then recomputed per
  element. It does not fuse an expensive op (an integer remainder) into such
  a consumer, so the value is materialized. ``bits % 0xFFC00001`` is ``bits``
  for every float32 but the negative NaNs with a payload past the quiet bit,
  which fp4jax's per-block factors never are. (An optimization barrier does
  not do this on XLA's CPU: it is removed before fusion.)
  """
  bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
  kept = lax.rem(bits, jnp.full(bits.shape, _FENCE_DIVISOR, jnp.uint32))
  return lax.bitcast_convert_type(kept, jnp.float32)


# ---- correctly rounded division -----------------------------------------------------
_SIGN = -(2**31)  # int32 with only the sign bit set
_QNAN_BITS = 0x7FC00000


def _i32(x):
  """float32 bits as int32. Python and numpy constants are converted by numpy: a
  bitcast of a constant inside a Pallas-Triton kernel does not lower."""
  if isinstance(x, (int, float, np.ndarray, np.generic)):
    return np.asarray(x, np.float32).view(np.int32)
  return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def div_rn(a, b):
  """float32 ``a / b`` rounded to nearest even, the same bits on every backend.

  IEEE 754 division, computed with int32 arithmetic only: the 24-bit
  significands are divided by restoring long division (one quotient bit a
  step, 24 steps), the quotient rounded to nearest even on its remainder, the
  exponents subtracted separately. XLA's GPU division is not correctly
  rounded, and this runs unchanged inside a Pallas kernel.

  float32 subnormals follow XLA's CPU (flush to zero): a subnormal operand
  counts as a signed zero, and a quotient that rounds (with an unbounded
  exponent) below ``2**-126`` is a signed zero. Quotients beyond float32's
  range are +-Inf; ``x / 0`` is +-Inf, ``0 / 0``, ``Inf / Inf`` and NaN
  operands give NaN (the quiet NaN ``0x7FC00000``). Broadcasts ``a`` and ``b``.
  """
  ab, bb = _i32(a), _i32(b)
  sign = (ab ^ bb) & _SIGN
  xa, xb = ab & F32_ABS_MASK, bb & F32_ABS_MASK
  ea, eb = xa >> F32_MANT_BITS, xb >> F32_MANT_BITS
  ma = (xa & F32_MANT_MASK) | (1 << F32_MANT_BITS)
  mb = (xb & F32_MANT_MASK) | (1 << F32_MANT_BITS)
  # Scale ma into [mb, 2 mb): the quotient's leading bit is then the first one.
  low = ma < mb
  ma = jnp.where(low, ma << 1, ma)
  e = ea - eb + F32_EXP_BIAS - low.astype(jnp.int32)  # biased exponent of the quotient
  q = jnp.zeros_like(ma)
  r = ma
  for _ in range(F32_MANT_BITS + 1):  # r < 2 mb < 2**25 throughout: int32 is plenty
    bit = r >= mb
    q = (q << 1) | bit.astype(jnp.int32)
    r = jnp.where(bit, r - mb, r) << 1
  # Now q = floor(ma * 2**23 / mb) in [2**23, 2**24) and r is twice the
  # remainder: round up past half, and at exactly half (which a quotient of
  # 24-bit significands never hits) to the even neighbour.
  up = (r > mb) | ((r == mb) & ((q & 1) == 1))
  q = q + up.astype(jnp.int32)
  carry = q >> (F32_MANT_BITS + 1)  # q reached 2**24: the next binade
  e = e + carry
  bits = (e << F32_MANT_BITS) | (q & F32_MANT_MASK)
  bits = jnp.where(e >= 255, F32_INF_BITS, jnp.where(e <= 0, 0, bits))
  a_zero, b_zero = ea == 0, eb == 0  # zeros and (flushed) subnormals
  a_inf, b_inf = xa == F32_INF_BITS, xb == F32_INF_BITS
  nan = (xa > F32_INF_BITS) | (xb > F32_INF_BITS) | (a_zero & b_zero) | (a_inf & b_inf)
  bits = jnp.where(a_zero | b_inf, 0, jnp.where(a_inf | b_zero, F32_INF_BITS, bits))
  bits = jnp.where(nan, _QNAN_BITS, bits | sign)
  return lax.bitcast_convert_type(bits, jnp.float32)


# ---- contraction- and order-proof sums ------------------------------------------------
def truncate_significand(x, keep: int):
  """float32 ``x`` with its significand cut to its ``keep`` leading bits (toward zero), by bit masking."""
  mask = -(1 << (F32_MANT_BITS + 1 - keep))
  return lax.bitcast_convert_type(_i32(x) & mask, jnp.float32)


#: ``exact_square`` counts residuals below this (in magnitude) as 0: above it every
#: partial product is a normal float32, so no backend's flushing can differ.
EXACT_SQUARE_MIN = 2.0**-32


def exact_square(r):
  """``r * r`` for float32 ``r``, rounded the same way by every compiler; 0 for ``|r| < 2**-32``.

  ``r = h + l`` with ``h`` the top 12 significant bits of ``r`` and ``l`` the
  rest (at most 12 bits, exactly ``r - h``), so ``h * h``, ``2h * l`` and
  ``l * l`` are exact float32 products and ``(h*h + 2h*l) + l*l`` rounds only in
  its two adds, whether or not a compiler fuses a product into an add (an FMA
  rounds an exact product like a plain add does). A plain ``r * r`` feeding a
  sum is fused on one backend and not on another. Within a few float32 ulps
  of ``r * r``. For ``|r| >= 2**-32`` every partial product is a normal float32
  (``l`` is 0 or at least ``2**-24 |r|``); smaller residuals square to 0, where
  XLA's CPU would flush subnormal partial products and a GPU would not.
  """
  h = truncate_significand(r, 12)
  lo = r - h
  sq = (h * h + (h + h) * lo) + lo * lo
  small = (_i32(r) & F32_ABS_MASK) < int(np.float32(EXACT_SQUARE_MIN).view(np.int32))
  return jnp.where(small, 0.0, sq)


def halving_sum(v, axis: int = -1):
  """Sum over ``axis`` in one fixed order: ``p[:n/2] + p[n/2:]``, repeatedly.

  Elementwise adds of explicit halves, which XLA and Triton must evaluate as
  written (float addition is not associative, so no compiler may regroup
  them), where a ``jnp.sum`` adds in whatever order the backend's reduction
  emitter likes (runs of 4 then a shuffle tree on XLA's GPU, another order on
  its CPU). A length that is not a power of two is zero-padded first (adding
  zeros changes no sum of non-negative terms). ``axis`` is removed.
  """
  axis = axis % v.ndim
  n = v.shape[axis]
  width = 1 << (n - 1).bit_length() if n > 1 else 1
  if width != n:
    pad = [(0, 0)] * v.ndim
    pad[axis] = (0, width - n)
    v = jnp.pad(v, pad)
  while width > 1:
    width //= 2
    lo, hi = lax.split(v, (width, width), axis) if hasattr(lax, "split") else (
        lax.slice_in_dim(v, 0, width, axis=axis), lax.slice_in_dim(v, width, 2 * width, axis=axis))
    v = lo + hi
  return jnp.squeeze(v, axis)
