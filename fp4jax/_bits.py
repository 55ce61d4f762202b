"""float32 bit-pattern helpers that keep power-of-two arithmetic exact.

XLA on the CPU flushes float32 subnormals to zero, so ``x * 2.0**-127`` is 0
and ``x / 2.0**-127`` is Inf. Every power-of-two scaling in fp4jax therefore
goes through :func:`scale_by_pow2`, which splits ``2**e`` into two normal
factors, and every exponent is read off the bit pattern, never off a rounded
``log2``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32_EXP_BIAS = 127
F32_MANT_BITS = 23
F32_MANT_MASK = (1 << F32_MANT_BITS) - 1
F32_ABS_MASK = 0x7FFFFFFF
F32_INF_BITS = 0x7F800000


def f32_bits(x):
  """float32 -> its uint32 bit pattern."""
  return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def from_f32_bits(bits):
  return lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def flush_subnormals(x):
  """Sets float32 subnormals to (signed) zero, identically on every backend.

  Backends disagree on float32 subnormals (XLA's CPU flushes them in
  arithmetic, a bit-level kernel would not); flushing them up front makes
  quantization bit-identical everywhere. Their magnitude is below 2**-126.
  """
  bits = f32_bits(x)
  is_sub = (bits & jnp.uint32(F32_INF_BITS)) == 0
  return from_f32_bits(jnp.where(is_sub, bits & jnp.uint32(0x80000000), bits))


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
