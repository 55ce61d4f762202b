"""Stochastic rounding onto the element grid, and the random Hadamard transform."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import _bits
from fp4jax.formats import Format
from fp4jax.hadamard import butterfly, check_size, hadamard_matrix, hadamard_signs
from fp4jax.qarray import QArray, normalize_axis
from fp4jax.quantize import as_input, quantize
from fp4jax.reference import from_blocks, pad_axis, to_blocks
from fp4jax.scales import element_units, encode_units, stochastic_magnitudes

__all__ = ["stochastic_quantize", "random_hadamard", "hadamard_matrix"]


def _stochastic_round(y, fmt: Format, key):
  """Rounds float32 ``y`` (``|y| <= elem_max``) to one of its two grid neighbours.

  With ``t = |y| / ulp(y)`` (exact: ulp is a power of two), the result is
  ``floor(t) * ulp`` or ``(floor(t) + 1) * ulp``, the upper one with probability
  ``frac(t)``, so ``E[result] = y``. ``frac(t)`` has at most ``23 - nmant``
  fractional bits in a normal binade, and a uniform float32 in [0, 1) is a
  multiple of ``2**-23``, so ``P(u < frac) == frac`` exactly there; in the
  subnormal binade it is ``frac`` rounded up to a multiple of ``2**-23``.
  """
  u = jax.random.uniform(key, y.shape, jnp.float32)
  return jnp.copysign(stochastic_magnitudes(jnp.abs(y), u, fmt), y)


def _check_key(key) -> None:
  shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  raw = not typed and dtype is not None and np.dtype(dtype) == np.uint32 and tuple(shape) == (2,)
  if not (typed and tuple(shape) == ()) and not raw:
    raise ValueError(f"stochastic_quantize: key must be one jax.random key (jax.random.key(seed), or a uint32 (2,) "
                     f"jax.random.PRNGKey), got {type(key).__name__} with shape {shape} and dtype {dtype}")


def stochastic_quantize(x, fmt: Format | str, key, *, axis: int = -1, scale_rule: str | None = None,
                        global_scale=None, pad: bool = False, axis_name=None) -> QArray:
  """:func:`fp4jax.quantize` with stochastic instead of nearest element rounding.

  Args:
    x: float32, bfloat16 or float16 array of shape ``S`` (float64: its
      float32 values, as :func:`fp4jax.quantize`).
    fmt: the format (or its name).
    key: a ``jax.random`` key (``jax.random.key(0)``, or a raw uint32 ``(2,)``
      ``PRNGKey``); each element draws one uniform number.
    axis, scale_rule, global_scale, pad, axis_name: as in :func:`fp4jax.quantize`;
      block scales (and NVFP4's global scale) are exactly the ones it picks.
      Under ``shard_map`` every shard draws from ``key`` as if it were the
      whole array; fold ``lax.axis_index`` into ``key`` for independent draws.

  Returns:
    A QArray like ``quantize``'s (``values`` shape ``S``, ``scales`` with
    ``S[axis] // block_size``), whose every element is one of the two grid
    neighbours of ``x / scale``: unbiased, ``E[dequantize(q)] == x``, wherever
    no element saturates at ``elem_max`` (always true for ``scale_rule="ceil"``).
  """
  x = as_input(x, "stochastic_quantize")
  _check_key(key)
  nearest = quantize(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale, pad=pad,
                     backend="xla", axis_name=axis_name)
  if math.prod(nearest.shape) == 0:
    return nearest  # no element to round
  fmt, ax = nearest.fmt, nearest.axis
  xf = _bits.flush_subnormals(x)
  if pad:
    xf = pad_axis(xf, ax % xf.ndim, fmt.block_size)
  blocks = to_blocks(xf, ax, fmt.block_size)
  scales = jnp.moveaxis(nearest.scales, ax, -1)
  y = jnp.clip(element_units(blocks, scales, fmt, nearest.global_scale), -fmt.elem_max, fmt.elem_max)
  sr = encode_units(_stochastic_round(y, fmt, key), fmt)  # on the grid: encoding is exact
  # Non-finite blocks carry the NaN scale; keep quantize's (zero) values there.
  bad = jax.lax.bitcast_convert_type(scales, jnp.uint8) == fmt.scale_nan_byte
  values = jnp.where(bad[..., None], to_blocks(nearest.values, ax, fmt.block_size), sr)
  return QArray(from_blocks(values, ax), nearest.scales, nearest.global_scale, fmt, ax)


def random_hadamard(x, n: int, *, axis: int = -1, seed: int | None = 0):
  """Applies ``hadamard_matrix(n, seed)`` to every run of ``n`` elements along ``axis``.

  Args:
    x: floating array; ``x.shape[axis]`` must be a multiple of ``n``.

  Returns:
    float32, shape of ``x``: block ``b`` along ``axis`` becomes ``Q @ x_b``, computed as
    :func:`fp4jax.hadamard.butterfly` (a fixed order of float32 additions, so the same bits on
    every back end and in the fused fake-quantization kernel; results below float32's normal
    range are flushed to zero). Applied to both operands along a contracting axis it leaves
    their product unchanged up to that rounding (``Q.T @ Q = I``).
  """
  check_size(n)
  ax = normalize_axis(axis, x.ndim, x.shape)
  if x.shape[ax] % n:
    raise ValueError(f"random_hadamard: shape {tuple(x.shape)} has length {x.shape[ax]} along axis "
                     f"{axis}, not a multiple of the transform size {n}")
  return butterfly(_bits.widen(x), ax, n, hadamard_signs(n, seed))
