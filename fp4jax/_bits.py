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
