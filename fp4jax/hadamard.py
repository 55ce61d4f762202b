"""The random Hadamard transform, in one fixed order of float32 operations.

``Q = H_n diag(s) / sqrt(n)``: Sylvester's Hadamard matrix times random signs ``s``. Applied as a
dot, the sums' order is the back end's, so the CPU and the GPU could round them differently; applied
as a butterfly (``log2 n`` stages of ``(a + b, a - b)``), every addition is the same one everywhere.
The QAT backward operands (``fp4jax.qat``) and the fused fake-quantization kernel
(``fp4jax.kernels.fake_quant``) both use this order, so they give the same bits.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["hadamard_matrix", "hadamard_signs", "butterfly", "check_size", "flush_below_normal", "grouped_shape",
           "MIN_NORMAL"]

#: float32's smallest normal number: every stage's results below it become +0 (the CPU flushes
#: subnormal float32 results, a GPU keeps them; flushing them all explicitly agrees with both).
MIN_NORMAL = np.float32(2.0**-126)


def check_size(n: int) -> None:
  if not isinstance(n, (int, np.integer)) or n < 2 or n & (n - 1):
    raise ValueError(f"hadamard size must be a power of two >= 2, got {n!r}")


@functools.cache
def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def hadamard_signs(n: int, seed: int | None = 0) -> np.ndarray:
  """The ``n`` float32 signs ``s`` of ``seed`` (``None``: all +1)."""
  check_size(n)
  if seed is None:
    return np.ones(n, np.float32)
  return np.random.default_rng(seed).choice([-1.0, 1.0], n).astype(np.float32)


def hadamard_matrix(n: int, seed: int | None = 0) -> np.ndarray:
  """The orthonormal ``(n, n)`` float64 matrix ``H_n diag(s) / sqrt(n)``; ``Q @ Q.T == I``."""
  return _sylvester(n) * hadamard_signs(n, seed).astype(np.float64)[None, :] / math.sqrt(n)


def flush_below_normal(v):
  """``v`` with every value below :data:`MIN_NORMAL` in magnitude (zeros of either sign included) as +0."""
  return jnp.where(jnp.abs(v) < MIN_NORMAL, np.float32(0), v)


def grouped_shape(shape, axis: int, *inner):
  """``shape`` with its ``axis`` split as ``(shape[axis] // prod(inner), *inner)``."""
  return shape[:axis] + (shape[axis] // math.prod(inner), *inner) + shape[axis + 1:]


def butterfly(v, axis: int, n: int, signs):
  """``Q`` applied to every run of ``n`` elements along ``axis`` of float32 ``v`` (a multiple of ``n``).

  The order, which the kernel repeats: ``v * s`` (exact); for ``h = 1, 2, ..., n / 2`` the elements
  ``i`` and ``i + h`` of each pair (bit ``h`` of ``i`` clear) become ``a + b`` and ``a - b``; then times
  float32 ``1 / sqrt(n)``. Each step's results are flushed below :data:`MIN_NORMAL` to +0, which also
  gives every zero the + sign. ``signs``: float32 ``(n,)``, :func:`hadamard_signs`.
  """
  shape, axis = v.shape, axis % v.ndim
  bcast = (1,) * (axis + 1) + (n,) + (1,) * (v.ndim - axis - 1)
  v = flush_below_normal(v.reshape(grouped_shape(shape, axis, n)) * signs.reshape(bcast)).reshape(shape)
  h = 1
  while h < n:
    t = v.reshape(grouped_shape(shape, axis, 2, h))  # (..., pairs, 2, h, ...): a at index 0, b at 1
    # Each element with its partner (the pair axis reversed), so that XLA fuses the stages into one
    # elementwise pass (slices and a concatenation it lays out one stage at a time).
    partner = lax.rev(t, (axis + 1,))
    first = lax.broadcasted_iota(jnp.int32, t.shape, axis + 1) == 0
    v = flush_below_normal(jnp.where(first, t + partner, partner - t)).reshape(shape)
    h *= 2
  return flush_below_normal(v * np.float32(1 / math.sqrt(n)))
