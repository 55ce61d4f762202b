"""fp4jax._bits' backend-proof arithmetic against numpy, which computes IEEE float32 on the CPU.

``div_rn`` is checked on millions of operand pairs: random bit patterns over
every exponent, powers of two and their one-ulp neighbours, quotients that
overflow or underflow, and pairs built so that the exact quotient lies just
above or just below a rounding midpoint. ``exact_square`` and ``halving_sum``
are checked against the same expressions evaluated by numpy, op by op: a
compiler that fused a product into an add, or reordered a sum, would differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import _bits

TINY = np.float32(2.0**-126)
_div = jax.jit(_bits.div_rn)


def _expected_div(a, b):
  """numpy's IEEE quotient with XLA CPU's flushing: subnormal operands are zeros,
  and quotients that round (with an unbounded exponent) below 2**-126 are zeros."""
  a = np.where(np.abs(a) < TINY, np.copysign(np.float32(0), a), a).astype(np.float32)
  b = np.where(np.abs(b) < TINY, np.copysign(np.float32(0), b), b).astype(np.float32)
  with np.errstate(all="ignore"):
    q = a / b
    # A gradual-underflow result of exactly 2**-126 may come from a quotient that
    # rounds to just below 2**-126 in the next binade down: float64 sees which.
    # (Rounding a float64 quotient again to 24 bits is exact: 53 >= 2 * 24 + 2.)
    q64 = a.astype(np.float64) / b.astype(np.float64)
    m, e = np.frexp(np.abs(q64))
    unbounded = np.ldexp(np.rint(m * 2.0**24), e - 24)
  tiny = (np.abs(q) < TINY) | ((np.abs(q) == TINY) & (unbounded < 2.0**-126))
  return np.where(tiny & np.isfinite(q), np.copysign(np.float32(0), q), q).astype(np.float32)


def _assert_div(a, b):
  a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
  got = np.asarray(_div(a, b))
  want = _expected_div(a, b)
  nan = np.isnan(got) & np.isnan(want)
  bad = (got.view(np.uint32) != want.view(np.uint32)) & ~nan
  assert not bad.any(), (f"{bad.sum()} of {bad.size} differ, e.g. {a[bad][:3]} / {b[bad][:3]}: "
                         f"{got[bad][:3]} vs {want[bad][:3]}")
  return a.size


def _from_fields(sign, exp, mant):
  bits = (sign.astype(np.uint32) << 31) | (exp.astype(np.uint32) << 23) | mant.astype(np.uint32)
  return bits.view(np.float32)


def test_div_rn_random_bit_patterns():
  rng = np.random.default_rng(0)
  n = 0
  for _ in range(4):
    bits = rng.integers(0, 2**32, size=(2, 1 << 20), dtype=np.uint64).astype(np.uint32)
    a, b = bits.view(np.float32)  # every exponent: zeros, subnormals, Inf, NaN included
    n += _assert_div(a, b)
  # Exponents that keep the quotient in range, where most pairs round nontrivially.
  for _ in range(4):
    s, m = rng.integers(0, 2, (2, 1 << 20)), rng.integers(0, 1 << 23, (2, 1 << 20))
    e = rng.integers(64, 191, (2, 1 << 20))
    n += _assert_div(_from_fields(s[0], e[0], m[0]), _from_fields(s[1], e[1], m[1]))
  assert n == 8 << 20


def test_div_rn_powers_of_two_and_their_neighbours():
  # Every significand 1, 1 + ulp, 2 - ulp, 2 - 2 ulp, 1.5 ... against the same, over many exponents.
  mants = np.array([0, 1, 2, 3, (1 << 22), (1 << 22) + 1, (1 << 22) - 1, (1 << 23) - 1, (1 << 23) - 2,
                    0x2AAAAA, 0x555555], np.uint32)
  exps = np.arange(1, 255, 3, dtype=np.uint32)
  vals = _from_fields(np.zeros(len(exps) * len(mants), np.uint32), np.repeat(exps, len(mants)),
                      np.tile(mants, len(exps)))
  vals = np.concatenate([vals, -vals])
  a, b = np.meshgrid(vals, vals)
  assert _assert_div(a, b) > 500_000


def test_div_rn_quotients_at_the_ends_of_the_float32_range():
  rng = np.random.default_rng(1)
  n = 1 << 20
  ma, mb = rng.integers(0, 1 << 23, (2, n))
  sa, sb = rng.integers(0, 2, (2, n))
  eb = rng.integers(1, 255, n)
  for target in (254, 255, 256, 1, 0, -1):  # biased result exponent before normalisation
    ea = eb + target - 127
    ok = (ea >= 1) & (ea <= 254)
    _assert_div(_from_fields(sa[ok], ea[ok], ma[ok]), _from_fields(sb[ok], eb[ok], mb[ok]))


def _inverse_mod_2_24(m):
  """Inverse of odd ``m`` modulo 2**24 (Newton: each step doubles the correct bits)."""
  inv = m.copy()
  for _ in range(5):
    inv = (inv * (2 - m * inv)) % (1 << 24)
  return inv


@pytest.mark.parametrize("side", [+1, -1], ids=["above", "below"])
def test_div_rn_quotients_next_to_a_rounding_midpoint(side):
  """Significands with ``ma * 2**24 = Q * mb + side`` for an odd 25-bit ``Q``: the
  exact quotient is a midpoint between two float32 values plus (or minus) ``1 /
  (mb * 2**24)`` of a unit, the hardest case for the rounding."""
  rng = np.random.default_rng(2 + side)
  mb = rng.integers(1 << 22, 1 << 23, 4 << 20, dtype=np.int64) * 2 + 1  # odd, in [2**23, 2**24)
  q = ((-side * _inverse_mod_2_24(mb)) % (1 << 24)) + (1 << 24)  # Q * mb = -side (mod 2**24), Q odd
  ma = (q * mb + side) >> 24
  assert ((ma << 24) == q * mb + side).all()
  ok = (ma >= (1 << 23)) & (ma < (1 << 24))
  ma, mb = ma[ok], mb[ok]
  ea = rng.integers(100, 160, ma.size)
  eb = rng.integers(100, 160, ma.size)
  a = _from_fields(np.zeros(ma.size, np.uint32), ea, ma - (1 << 23))
  b = _from_fields(rng.integers(0, 2, ma.size), eb, mb - (1 << 23))
  assert _assert_div(a, b) > 1 << 20


def test_div_rn_special_operands():
  specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 2.0**-126, -(2.0**-126),
                       1.0, -1.0, 3.0, np.finfo(np.float32).max, -np.finfo(np.float32).max], np.float32)
  a, b = np.meshgrid(specials, specials)
  _assert_div(a, b)
  got = np.asarray(_bits.div_rn(jnp.float32([1.0, 0.0, 1e-40]), jnp.float32([0.0, 0.0, 1.0])))
  assert got[0] == np.inf and np.isnan(got[1]) and got[2] == 0.0


def test_div_rn_broadcasts_and_traces():
  a = jnp.float32(2688.0)
  b = jnp.asarray(np.linspace(0.5, 7.0, 24, dtype=np.float32).reshape(2, 3, 4))
  got = jax.jit(_bits.div_rn)(a, b)
  assert got.shape == (2, 3, 4)
  np.testing.assert_array_equal(np.asarray(got), np.float32(2688.0) / np.asarray(b))


# ---- exact_square, halving_sum -------------------------------------------------------------------
def _np_exact_square(r):
  h = (r.view(np.int32) & np.int32(-(1 << 12))).view(np.float32)
  lo = r - h
  sq = (h * h + (h + h) * lo) + lo * lo
  return np.where(np.abs(r) < np.float32(2.0**-32), np.float32(0), sq).astype(np.float32)


def test_exact_square_is_what_numpy_computes_op_by_op():
  rng = np.random.default_rng(4)
  r = (rng.standard_normal(1 << 20) * np.exp2(rng.integers(-70, 60, 1 << 20))).astype(np.float32)
  got = np.asarray(jax.jit(_bits.exact_square)(r))
  np.testing.assert_array_equal(got.view(np.uint32), _np_exact_square(r).view(np.uint32))
  # And it is r * r to within two float32 ulps (float64 holds r * r exactly).
  want = r.astype(np.float64) ** 2
  big = want >= 2.0**-64
  np.testing.assert_allclose(got[big], want[big], rtol=2.0**-22)
  assert (got[~big] == 0).all()


def test_exact_square_in_a_sum_is_immune_to_fma_contraction():
  # jax.jit(a * b + c) is an FMA on XLA's CPU; the squares here add the same
  # way whether fused or not, so a jitted sum equals numpy's, op by op.
  rng = np.random.default_rng(5)
  r = rng.standard_normal((1 << 16, 2)).astype(np.float32)
  got = np.asarray(jax.jit(lambda r: _bits.exact_square(r[:, 0]) + _bits.exact_square(r[:, 1]))(r))
  want = _np_exact_square(r[:, 0]) + _np_exact_square(r[:, 1])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [1, 2, 16, 32, 24, 7])
def test_halving_sum_adds_in_its_fixed_tree(n):
  rng = np.random.default_rng(n)
  v = (rng.standard_normal((4096, n)) * np.exp2(rng.integers(-20, 20, (4096, n)))).astype(np.float32)
  got = np.asarray(jax.jit(_bits.halving_sum)(v))
  width = 1 << (n - 1).bit_length()
  p = np.concatenate([v, np.zeros((v.shape[0], width - n), np.float32)], axis=1)
  while p.shape[1] > 1:
    p = p[:, : p.shape[1] // 2] + p[:, p.shape[1] // 2:]
  np.testing.assert_array_equal(got, p[:, 0])
  # Along another axis too (the kernels' column layout).
  got0 = np.asarray(jax.jit(lambda t: _bits.halving_sum(t, 0))(np.ascontiguousarray(v.T)))
  np.testing.assert_array_equal(got0, p[:, 0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_widen_is_the_cast_for_every_bit_pattern(dtype):
  # All 65536 patterns, NaN payloads and signed zeros included, against numpy's (ml_dtypes') cast.
  x = np.arange(1 << 16, dtype=np.uint16).view(dtype)
  got = np.asarray(jax.jit(_bits.widen)(jnp.asarray(x))).view(np.uint32)
  np.testing.assert_array_equal(got, x.astype(np.float32).view(np.uint32))


def test_widen_keeps_a_rounding_made_in_the_same_jit():
  # A SwiGLU activation rounded to bfloat16: inside one jit XLA may skip that rounding under a
  # `.astype(float32)` (excess precision; it does on the CPU for this expression). Under widen the
  # float32 values are those of the bfloat16 array the same program returns.
  k = jax.random.split(jax.random.key(0), 3)
  x, w1, w3 = (jax.random.normal(kk, s, jnp.bfloat16) for kk, s in zip(k, [(64, 256), (256, 256), (256, 256)]))

  @jax.jit
  def both(x, w1, w3):
    h = jax.nn.silu(x @ w1) * (x @ w3)
    return h, _bits.widen(h)

  h, wide = both(x, w1, w3)
  np.testing.assert_array_equal(np.asarray(wide), np.asarray(h).astype(np.float32))
