"""fp4jax.hadamard: the random Hadamard transform in one fixed order of float32 operations.

The reference here is an independent numpy float32 butterfly (numpy keeps subnormals, so its flushes are
the explicit ones): equal bit for bit on whatever device jax runs (the CPU here, the GPU in the GPU suite),
which the dot it replaces was not (its sums ran in the back end's order).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fp4jax import hadamard, qat


def numpy_butterfly(x, n, seed, reverse=False):
  """``random_hadamard`` along the last axis, element by element in numpy float32 (``reverse``: the stages in
  the other order, h = n/2 first: the same transform, rounded differently)."""
  flush = lambda v: np.where(np.abs(v) < np.float32(2.0**-126), np.float32(0), v)  # noqa: E731
  v = flush(np.asarray(x, np.float32).reshape(-1, n) * hadamard.hadamard_signs(n, seed))
  stages = [2**k for k in range(n.bit_length() - 1)]
  for h in stages[::-1] if reverse else stages:
    out = v.copy()
    for i in range(n):
      if not i & h:
        out[:, i], out[:, i + h] = v[:, i] + v[:, i + h], v[:, i] - v[:, i + h]
    v = flush(out)
  return flush(v * np.float32(1 / np.sqrt(n))).reshape(np.shape(x))


def spread(shape, seed):
  """Normal values times 2**k, k uniform in [-30, 30) per element: sums whose rounding depends on their order;
  a block at 2**-125 (subnormal sums and results), an all-zero block and a block of negative zeros."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, shape))).astype(np.float32)
  x[0, :32] = rng.uniform(1, 2, 32) * 2.0**-125 * rng.choice([-1, 1], 32)
  x[1, :32], x[2, :32] = 0.0, -0.0
  return x


@pytest.mark.parametrize("n", [2, 16, 32, 128])
def test_random_hadamard_is_the_fixed_order_butterfly_bit_for_bit(n):
  x = spread((8, 256), seed=n)
  got = np.asarray(qat.random_hadamard(jnp.asarray(x), n, axis=1, seed=7))
  want = numpy_butterfly(x, n, 7)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # +0 for every zero too
  # Along axis 0, and from bfloat16: the same arithmetic on the transposed values.
  xb = jnp.asarray(x.T).astype(jnp.bfloat16)
  got0 = np.asarray(qat.random_hadamard(xb, n, axis=0, seed=7))
  want0 = numpy_butterfly(np.asarray(xb, np.float32).T, n, 7).T
  np.testing.assert_array_equal(got0.view(np.uint32), want0.view(np.uint32))
  if n > 2:  # control: the stages in the other order round some sums differently on these inputs
    assert not np.array_equal(numpy_butterfly(x, n, 7, reverse=True), want)


def test_butterfly_rounds_differently_from_a_dot():
  # Why the order is fixed: the float64-exact transform rounded once differs from the butterfly's
  # stage-by-stage rounding on spread inputs, so any two orders could disagree.
  x = spread((64, 256), seed=1)
  q = hadamard.hadamard_matrix(16, seed=7)
  exact = (x.astype(np.float64).reshape(64, 16, 16) @ q.T).reshape(64, 256).astype(np.float32)
  got = np.asarray(qat.random_hadamard(jnp.asarray(x), 16, axis=1, seed=7))
  assert np.sum(got != exact) > 0
  # Each of the 4 stages and the scaling rounds by at most 2**-24 of the group's sum of magnitudes; flushed
  # results are below 2**-126.
  group_sum = np.repeat(np.abs(x.astype(np.float64)).reshape(64, 16, 16).sum(-1), 16, axis=1)
  assert (np.abs(got - exact.astype(np.float64)) <= 5 * 2.0**-24 * group_sum / 4 + 2.0**-125).all()


def test_hadamard_matrix_is_sylvester_times_signs():
  q = hadamard.hadamard_matrix(32, seed=3)
  s = hadamard.hadamard_signs(32, seed=3)
  np.testing.assert_array_equal(q * np.sqrt(32), scipy.linalg.hadamard(32) * s[None, :])
  np.testing.assert_array_equal(hadamard.hadamard_signs(8, None), np.ones(8, np.float32))


@pytest.mark.parametrize("n", [0, 1, 12, 2.0])
def test_bad_sizes_are_named(n):
  with pytest.raises(ValueError, match="power of two"):
    qat.random_hadamard(jnp.ones((4, 48)), n, axis=1)


def test_nan_and_inf_spread_over_their_group_only():
  x = np.ones((2, 64), np.float32)
  x[0, 3], x[1, 40] = np.nan, np.inf
  got = np.asarray(qat.random_hadamard(jnp.asarray(x), 16, axis=1))
  assert np.isnan(got[0, :16]).all() and np.isfinite(got[0, 16:]).all()
  assert not np.isfinite(got[1, 32:48]).any() and np.isfinite(np.delete(got[1], np.s_[32:48])).all()
