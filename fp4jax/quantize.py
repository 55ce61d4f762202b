"""Reference quantize / dequantize in plain jnp (the XLA path).

These functions are the numerics contract: every kernel in
``fp4jax.kernels`` must reproduce them bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import _bits
from fp4jax.formats import Format, get_format
from fp4jax.qarray import QArray, normalize_axis, validate_qarray
from fp4jax.scales import SCALE_RULES, BlockContext, decode_blocks, encode_elements

__all__ = ["quantize", "dequantize", "global_scale_from_amax"]

_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_BACKENDS = ("auto", "xla", "pallas")

# NVFP4's encode factor elem_max*scale_max/amax is capped so that its
# reciprocal (the stored decode factor) stays a normal float32.
_MAX_GLOBAL_ENCODE = float(2.0**126)


def _check_input(x, fmt: Format, axis: int, pad: bool):
  if not hasattr(x, "dtype") or x.dtype not in [np.dtype(d) for d in _INPUT_DTYPES]:
    raise ValueError(
        f"quantize expects float32, bfloat16 or float16 input, got dtype {getattr(x, 'dtype', type(x))}"
    )
  if x.ndim == 0:
    raise ValueError("quantize needs an array with at least one axis, got a scalar")
  given = axis
  axis = normalize_axis(axis, x.ndim, x.shape)
  n = x.shape[axis]
  if n % fmt.block_size and not pad:
    raise ValueError(
        f"quantize: shape {tuple(x.shape)} has length {n} along axis {given}, which is not a "
        f"multiple of {fmt!r}'s block size {fmt.block_size}; pass pad=True to zero-pad it"
    )
  return axis


def _to_blocks(x, axis: int, block_size: int):
  """(..., n, ...) with n along ``axis`` -> (rest..., n // B, B)."""
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def _from_blocks(blocks, axis: int):
  x = blocks.reshape(*blocks.shape[:-2], -1)
  return jnp.moveaxis(x, -1, axis)


def _global_factors(amax, fmt: Format):
  """(encode, decode) float32 tensor factors from the tensor's finite amax.

  The encode factor ``elem_max * scale_max / amax`` (6 * 448 / amax for NVFP4)
  is what block scales are computed with; the stored decode factor is its
  float32 reciprocal, as in FlashInfer and NVIDIA's recipe. A zero (or
  non-finite) amax gives 1 for both; the encode factor is capped at 2**126 so
  that its reciprocal stays a normal float32.
  """
  amax = jnp.asarray(amax, jnp.float32)
  ok = jnp.isfinite(amax) & (amax > 0)
  encode = fmt.global_encode_numerator / jnp.where(ok, amax, 1.0)
  encode = jnp.where(ok, jnp.minimum(encode, _MAX_GLOBAL_ENCODE), 1.0).astype(jnp.float32)
  # The barrier keeps XLA from simplifying 1 / (c / amax) into amax / c.
  return encode, (1.0 / jax.lax.optimization_barrier(encode)).astype(jnp.float32)


def global_scale_from_amax(amax, fmt: Format):
  """NVFP4's tensor decode factor, about ``amax / (elem_max * scale_max)``, float32.

  Computed as FlashInfer and NVIDIA's recipe do: the encode factor
  ``6 * 448 / amax`` first, then its float32 reciprocal. A zero (or
  non-finite) amax gives 1; an amax below ``2688 * 2**-126`` gives ``2**-126``.
  """
  return _global_factors(amax, get_format(fmt))[1]


def _check_global_scale(global_scale, fmt: Format):
  """float32 scalar decode factor; concrete values must be normal and at most 2**126."""
  if not fmt.has_global_scale:
    raise ValueError(f"{fmt!r} has no global scale; global_scale must be None")
  g = jnp.asarray(global_scale)
  if g.shape != () or not jnp.issubdtype(g.dtype, jnp.floating):
    raise ValueError(f"global_scale must be a float scalar, got shape {g.shape} dtype {g.dtype}")
  g = g.astype(jnp.float32)
  try:
    v = float(g)
  except jax.errors.ConcretizationTypeError:  # traced: its value is unknown here
    return g
  # Both the decode factor and its reciprocal (the encode factor) must be
  # normal float32 numbers, or whole tensors would flush to zero.
  if not 2.0**-126 <= v <= _MAX_GLOBAL_ENCODE:
    raise ValueError(f"global_scale (a decode factor) must lie in [2**-126, 2**126], got {v}")
  return g


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "scale_rule", "pad"))
def _quantize_xla(x, global_scale, hessian, *, fmt: Format, axis: int, scale_rule: str, pad: bool):
  x = x.astype(jnp.float32)
  n = x.shape[axis]
  if pad and n % fmt.block_size:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -n % fmt.block_size)
    x = jnp.pad(x, widths)
  blocks = _to_blocks(_bits.flush_subnormals(x), axis, fmt.block_size)

  abs_bits = _bits.f32_bits(blocks) & jnp.uint32(_bits.F32_ABS_MASK)
  # Non-negative floats order like their bit patterns; Inf and NaN sort last.
  amax_bits = jnp.max(abs_bits, axis=-1)
  nonfinite = amax_bits >= _bits.F32_INF_BITS
  finite_blocks = jnp.where(nonfinite[..., None], 0.0, blocks)
  amax = _bits.from_f32_bits(jnp.where(nonfinite, 0, amax_bits))

  global_encode = None
  if fmt.has_global_scale:
    if global_scale is None:
      # The tensor amax skips non-finite elements only: the finite elements of
      # a NaN block still count, so no other block depends on where NaNs are.
      finite_bits = jnp.where(abs_bits < _bits.F32_INF_BITS, abs_bits, 0)
      tensor_amax = _bits.from_f32_bits(jnp.max(jnp.max(finite_bits, axis=-1)))
      global_encode, global_scale = _global_factors(tensor_amax, fmt)
    else:
      global_scale = jnp.asarray(global_scale, jnp.float32)
      global_encode = 1.0 / global_scale

  ctx = BlockContext(fmt=fmt, amax=amax, global_encode=global_encode,
                     global_decode=global_scale, hessian=hessian)
  scales = SCALE_RULES[scale_rule](finite_blocks, ctx)
  nan_scale = jnp.full(scales.shape, fmt.scale_nan_byte, jnp.uint8)
  scales = jnp.where(nonfinite, jax.lax.bitcast_convert_type(nan_scale, fmt.scale_dtype), scales)
  values = encode_elements(finite_blocks, scales, fmt, global_scale)
  return QArray(_from_blocks(values, axis), jnp.moveaxis(scales, -1, axis), global_scale, fmt, axis)


def quantize(
    x,
    fmt: Format | str,
    *,
    axis: int = -1,
    scale_rule: str | None = None,
    global_scale=None,
    hessian=None,
    pad: bool = False,
    backend: str = "auto",
) -> QArray:
  """Quantizes ``x`` to a block-scaled format along ``axis``.

  Args:
    x: float32, bfloat16 or float16 array of shape ``S``, any rank.
    fmt: a :class:`fp4jax.Format` (``fp4jax.MXFP4``, ``NVFP4``, ``MXFP8_E4M3``,
      ``MXFP8_E5M2``) or its name.
    axis: the axis whose consecutive runs of ``fmt.block_size`` elements share
      a scale. ``S[axis]`` must be a multiple of the block size unless ``pad``.
    scale_rule: ``"floor"``, ``"ceil"``, ``"nearest"`` (E4M3 scales) or ``"mse"``;
      see :mod:`fp4jax.scales`. Default: ``fmt.default_scale_rule``.
    global_scale: NVFP4 only: a float32 scalar decode factor to use instead
      of the one computed from the tensor's amax (``1 / (6 * 448 / amax)``),
      e.g. from calibration; block scales then target ``amax / global_scale /
      6``. It must lie in ``[2**-126, 2**126]`` (checked when not traced).
      Blocks whose scale would exceed E4M3's 448 saturate.
    hessian: ``(S[axis] // block_size, B, B)`` block Hessians (see
      :func:`fp4jax.block_hessians`); with ``scale_rule="mse"`` each block's
      scale minimises ``r^T H_j r``.
    pad: zero-pad ``axis`` up to a multiple of the block size. The QArray then
      has the padded shape.
    backend: ``"xla"`` (this reference), ``"pallas"`` (GPU kernel) or ``"auto"``
      (the kernel on a GPU where one exists for the case, else XLA). Results
      are bit-identical.

  Returns:
    A :class:`QArray` with ``values`` of shape ``S`` in ``fmt.elem_dtype``,
    ``scales`` of shape ``S`` with ``S[axis] // block_size`` along ``axis`` in
    ``fmt.scale_dtype``, and ``global_scale`` (float32 scalar, NVFP4) or None.

  Raises:
    ValueError: naming the shape, dtype or axis at fault (unsupported dtype,
      axis out of range, axis length not a multiple of the block size without
      ``pad``, a hessian of the wrong shape, a rule the format lacks).

  Semantics: float32 subnormal inputs (``|x| < 2**-126``) count as zero on
  every backend. Elements round to nearest even on the element grid (ties to
  the even code, as ml_dtypes casts) and saturate at ``+-elem_max``. A block
  containing NaN or +-Inf gets the NaN scale, so it dequantizes to NaN over
  the whole block while other blocks are unaffected; an all-zero block
  dequantizes to exact zeros. With NVFP4 the tensor amax ignores non-finite
  elements (the finite elements of a NaN block still count).

  Mathematically (for the "floor" rule of MXFP4, along the last axis)::

    b = x.reshape(..., n // 32, 32)
    s = 2.0 ** (floor(log2(max(abs(b), -1))) - 2)
    values = round_to_e2m1(clip(b / s[..., None], -6, 6))
  """
  fmt = get_format(fmt)
  x = jnp.asarray(x) if not hasattr(x, "dtype") else x
  axis = _check_input(x, fmt, axis, pad)
  scale_rule = fmt.default_scale_rule if scale_rule is None else scale_rule
  if scale_rule not in SCALE_RULES:
    raise ValueError(f"unknown scale_rule {scale_rule!r}; expected one of {sorted(SCALE_RULES)}")
  if scale_rule == "nearest" and fmt.power_of_two_scales:
    raise ValueError(f"scale_rule 'nearest' rounds E4M3 block scales; {fmt!r} has power-of-two "
                     "scales: use 'floor', 'ceil' or 'mse'")
  if backend not in _BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
  if global_scale is not None:
    global_scale = _check_global_scale(global_scale, fmt)
  n_blocks = -(-x.shape[axis] // fmt.block_size)
  if hessian is not None:
    hessian = jnp.asarray(hessian)
    if scale_rule != "mse":
      raise ValueError(f"hessian= needs scale_rule='mse', got {scale_rule!r}")
    want = (n_blocks, fmt.block_size, fmt.block_size)
    if tuple(hessian.shape) != want:
      raise ValueError(
          f"hessian shape {tuple(hessian.shape)} does not match input shape {tuple(x.shape)} "
          f"along axis {axis}: expected {want}"
      )
    if not jnp.issubdtype(hessian.dtype, jnp.floating):
      raise ValueError(f"hessian must be floating, got dtype {hessian.dtype}")
    hessian = jnp.asarray(hessian, jnp.float32)

  if backend != "xla":
    from fp4jax import kernels  # lazy: the core does not depend on Pallas

    q = kernels.maybe_quantize(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale,
                               hessian=hessian, pad=pad, backend=backend)
    if q is not None:
      return q
  return _quantize_xla(x, global_scale, hessian, fmt=fmt, axis=axis, scale_rule=scale_rule, pad=pad)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize_xla(q: QArray, dtype):
  fmt = q.fmt
  axis = q.axis
  blocks = _to_blocks(q.values, axis, fmt.block_size)
  scales = jnp.moveaxis(q.scales, axis, -1)
  out = decode_blocks(blocks, scales, fmt, q.global_scale)
  # Saturate, then cast: a finite QArray never dequantizes to Inf, even where
  # rounding up at the top of the range (the "ceil" and "mse" rules near
  # float32's or float16's maximum) lands past the output dtype's largest value.
  # A select, not a clip: it keeps -0 and NaN as they are on every backend.
  big = jnp.float32(jnp.finfo(dtype).max)
  out = jnp.where(jnp.abs(out) > big, jnp.copysign(big, out), out)
  return _from_blocks(out, axis).astype(dtype)


def dequantize(q: QArray, dtype=jnp.float32, *, backend: str = "auto"):
  """Returns ``q.values * q.scales * q.global_scale`` as ``dtype``, shape ``q.shape``.

  Args:
    q: a :class:`QArray` (any format, any rank and block axis).
    dtype: a floating output dtype.
    backend: ``"xla"``, ``"pallas"`` or ``"auto"``, as for :func:`quantize`.

  Computed in float32 (power-of-two scales by exponent arithmetic, so the
  whole E8M0 range is exact) and cast to ``dtype`` once. A NaN scale gives NaN
  over its block; results below float32's normal range (``2**-126``) are
  signed zeros on every backend; finite results beyond ``dtype``'s range
  saturate to its largest finite value instead of becoming Inf.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"dequantize expects a fp4jax.QArray, got {type(q).__name__}")
  dtype = np.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dequantize: dtype must be floating, got {dtype}")
  if backend not in _BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
  validate_qarray(q)
  if backend != "xla":
    from fp4jax import kernels

    out = kernels.maybe_dequantize(q, dtype=dtype, backend=backend)
    if out is not None:
      return out
  return _dequantize_xla(q, dtype=dtype)
