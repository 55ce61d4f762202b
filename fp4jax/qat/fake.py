"""Fake quantization: ``dequantize(quantize(x))`` with a straight-through gradient."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fp4jax import _bits
from fp4jax import backend as _backend
from fp4jax.formats import Format, get_format
from fp4jax.qarray import as_array, normalize_axis
from fp4jax.qat.config import STES, OperandConfig
from fp4jax.qat.rounding import stochastic_quantize
from fp4jax.quantize import as_input, dequantize, quantize
from fp4jax.reference import from_blocks, to_blocks
from fp4jax.scales import SCALE_RULES, element_units

__all__ = ["fake_quant", "fake_quantize_operand", "fused_fake_quantize", "quantize_input", "AUTO_FORMATS"]

#: The formats ``QatConfig(backend="auto")`` sends through the fused kernel on a GPU: those measured
#: faster than XLA's fusion. H200 (benchmarks/results/qat_fused_sr.json): per operand MXFP4 1.4-2.7x,
#: NVFP4 (block scales from one XLA pass) 1.4-2.1x; the SwiGLU QAT step MXFP4 16.3 -> 12.4 ms, NVFP4
#: 18.6 -> 14.4 ms. MXFP8 not timed yet.
AUTO_FORMATS = ("mxfp4", "nvfp4")


def quantize_input(x):
  """``x`` as the fake quantization quantizes it: float32, bfloat16 and float16 as they are, any other
  floating dtype (float64, float8) through its float32 values."""
  return x if x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)


def fake_quantize_operand(x, op: OperandConfig, axis: int, dtype, key=None, axis_name=None, backend="xla"):
  """dequantize(quantize(x)) along ``axis`` (zero-padded to whole blocks), as ``dtype``.

  ``key`` draws the stochastic rounding where ``op`` asks for it. ``axis_name``: as in
  :func:`fp4jax.quantize` (NVFP4's amax across ``shard_map`` shards). ``backend``: as
  ``QatConfig.backend``.
  """
  if op.fmt is None:
    return x.astype(dtype)
  if (out := fused_fake_quantize(x, op, axis, dtype, key, axis_name, backend)) is not None:
    return out
  xin = quantize_input(x)
  # The XLA path: XLA fuses quantize and dequantize into one pass over x.
  if key is not None and op.stochastic:
    q = stochastic_quantize(xin, op.fmt, key, axis=axis, scale_rule=op.rule, pad=True, axis_name=axis_name)
  else:
    q = quantize(xin, op.fmt, axis=axis, scale_rule=op.rule, pad=True, backend="xla", axis_name=axis_name)
  out = dequantize(q, jnp.float32, backend="xla")
  n = x.shape[axis]
  if out.shape[axis] != n:
    out = lax.slice_in_dim(out, 0, n, axis=axis)
  return out.astype(dtype)


def fused_fake_quantize(x, op: OperandConfig, axis: int, dtype, key, axis_name, backend, hadamard: int = 0,
                        seed: int | None = 0):
  """:func:`fake_quantize_operand` through the fused kernel when ``backend`` picks it, else None.

  ``key`` draws the stochastic rounding where ``op`` asks for it. ``backend="pallas"``
  raises a ValueError naming why the kernel cannot take the operand. An operand of
  more than two axes blocked along its first or last one goes through as the 2-D view
  ``(n, rest)`` or ``(rest, n)``: the flat index of each element in the blocked view,
  and with it every draw, is the same. ``hadamard``, ``seed``: the operand is
  ``random_hadamard(x, hadamard, axis=axis, seed=seed)``, transformed in the kernel (0: none).
  """
  if backend == "xla":
    return None
  if backend == "auto" and op.fmt.name not in AUTO_FORMATS:
    return None
  draw = key if key is not None and op.stochastic else None
  ax = axis % x.ndim
  view, obstacle = x.shape, None
  if x.ndim > 2:
    if ax == 0:
      view, ax = (x.shape[0], math.prod(x.shape[1:])), 0
    elif ax == x.ndim - 1:
      view, ax = (math.prod(x.shape[:-1]), x.shape[-1]), 1
    else:
      obstacle = (f"a {x.ndim}-D operand blocked along its axis {ax}: the fused kernel takes operands blocked "
                  "along their first or last axis")
  obstacle = obstacle or _backend.fake_quant_obstacle(x, op.fmt, ax, op.rule, draw, axis_name, view_shape=view,
                                                      hadamard=hadamard)
  if hadamard and obstacle is not None:
    return None  # the caller transforms in XLA, then tries the kernel on the transformed operand
  plan = _backend.choose("fake_quant", backend, obstacle,
                         verified=_backend.gpu_verified("fake_quant", op.fmt, op.rule, x.dtype))
  if plan.impl != "kernel":
    return None
  from fp4jax.kernels import fake_quant  # lazy: Pallas loads only when a kernel runs

  out = fake_quant.fake_quantize_2d(x.reshape(view), draw, fmt=op.fmt, rule=op.rule, axis=ax, dtype=dtype,
                                    interpret=plan.interpret, hadamard=hadamard, seed=seed)
  return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _fake_quant(x, fmt, axis, scale_rule, ste, axis_name):
  return _fake_quant_fwd(x, fmt, axis, scale_rule, ste, axis_name)[0]


def _fake_quant_fwd(x, fmt, axis, scale_rule, ste, axis_name):
  q = quantize(x, fmt, axis=axis, scale_rule=scale_rule, backend="xla", axis_name=axis_name)
  out = dequantize(q, x.dtype, backend="xla")
  if ste == "identity":
    return out, None
  blocks = to_blocks(_bits.flush_subnormals(x), q.axis, fmt.block_size)
  y = element_units(blocks, jnp.moveaxis(q.scales, q.axis, -1), fmt, q.global_scale)
  return out, from_blocks(jnp.abs(y) <= fmt.elem_max, q.axis)


def _fake_quant_bwd(fmt, axis, scale_rule, ste, axis_name, inside, g):
  # Straight-through estimator: d fake_quant(x) / dx := I. The clipped variant
  # is I where |x| <= elem_max * scale and 0 where the element saturated.
  del fmt, axis, scale_rule, axis_name
  if ste == "identity":
    return (g,)
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, fmt: Format | str, *, axis: int = -1, scale_rule: str | None = None,
               ste: str = "identity", axis_name=None):
  """``dequantize(quantize(x, fmt, axis=axis), x.dtype)`` with a straight-through gradient.

  Always the XLA reference path (bit-identical to the kernels), which XLA fuses
  into a single pass over ``x``.

  Args:
    x: float32, bfloat16 or float16 array of shape ``S``; ``S[axis]`` a
      multiple of ``fmt.block_size``. A numpy float64 array becomes float32
      as ``jnp.asarray`` makes it (float64 with ``jax_enable_x64``: then the
      result is float64, quantized from the float32 values).
    fmt: a :class:`fp4jax.Format` or its name.
    axis: the blocked axis.
    scale_rule: as in :func:`fp4jax.quantize` (default ``fmt.default_scale_rule``).
    ste: ``"identity"``: the gradient passes through unchanged;
      ``"clipped"``: zero where the element saturated (``|x| > elem_max * s``).
    axis_name: inside ``jax.shard_map``: the mesh axes whose shards form the
      tensor, for NVFP4's global amax (see :func:`fp4jax.quantize`).

  Returns:
    Array of shape ``S`` and dtype ``x.dtype``. Works under ``jit``, ``vmap``,
    ``grad``, ``remat`` and ``scan``; ``fmt``/``axis``/``scale_rule``/``ste``
    are static.
  """
  fmt = get_format(fmt)
  if ste not in STES:
    raise ValueError(f"unknown ste {ste!r}; expected one of {STES}")
  if scale_rule is not None and scale_rule not in SCALE_RULES:
    raise ValueError(f"unknown scale_rule {scale_rule!r}; expected one of {sorted(SCALE_RULES)}")
  x = jnp.asarray(as_array(x, "fake_quant"))  # numpy float64: float32 unless x64, as JAX converts
  as_input(x, "fake_quant")  # the dtype check
  axis = normalize_axis(axis, x.ndim, x.shape)
  if x.shape[axis] % fmt.block_size:
    raise ValueError(f"fake_quant: shape {tuple(x.shape)} has length {x.shape[axis]} along axis {axis}, "
                     f"not a multiple of {fmt!r}'s block size {fmt.block_size}")
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)  # a static argument must hash
  if x.size == 0:
    return x  # nothing to quantize; the gradient passes through as the STE's would
  return _fake_quant(x, fmt, axis, scale_rule or fmt.default_scale_rule, ste, axis_name)
