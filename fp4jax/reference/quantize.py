"""The reference quantize and dequantize in plain jnp: the numerics contract.

Every kernel in :mod:`fp4jax.kernels` reproduces :func:`quantize_reference`
and :func:`dequantize_reference` bit for bit; ``fp4jax.quantize`` /
``fp4jax.dequantize`` validate their arguments and call these for
``backend="xla"``. Nothing here validates: callers pass checked, normalized
arguments (a negative ``axis``, a known rule, a checked global scale).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fp4jax import _bits
from fp4jax.formats import Format
from fp4jax.prepared import with_layout
from fp4jax.qarray import QArray
from fp4jax.reference.blocks import blocked_global, from_blocks, from_tiles, pad_axis, to_blocks, to_tiles
from fp4jax.scales import ALL_SCALE_RULES, BlockContext, decode_blocks, encode_elements, global_encode_numerator

__all__ = ["MAX_GLOBAL_ENCODE", "global_factors", "given_global_encode", "group_amax_bits", "finite_amax",
           "quantize_reference", "dequantize_reference"]

# NVFP4's encode factor elem_max*scale_max/amax is capped so that its
# reciprocal (the stored decode factor) stays a normal float32.
MAX_GLOBAL_ENCODE = float(2.0**126)


def global_factors(amax, fmt: Format, numerator: float | None = None):
  """(encode, decode) float32 tensor factors from the tensor's finite amax.

  The encode factor ``elem_max * scale_max / amax`` (6 * 448 / amax for NVFP4;
  ``numerator / amax`` when given, see :func:`fp4jax.scales.global_encode_numerator`)
  is what block scales are computed with; the stored decode factor is its
  float32 reciprocal, as in FlashInfer and NVIDIA's recipe. Both divisions are
  correctly rounded (:func:`fp4jax._bits.div_rn`), so every backend stores the
  same bits (XLA's GPU division is not correctly rounded). A zero, subnormal
  or non-finite amax gives 1 for both; the encode factor is capped at 2**126
  so that its reciprocal stays a normal float32. Elementwise for an array amax.
  """
  # Flushed first: a subnormal amax counts as zero on every backend (XLA's CPU
  # would compare it as zero, a GPU as positive).
  amax = _bits.flush_subnormals(jnp.asarray(amax, jnp.float32))
  ok = jnp.isfinite(amax) & (amax > 0)
  numerator = fmt.global_encode_numerator if numerator is None else numerator
  encode = _bits.div_rn(float(numerator), jnp.where(ok, amax, 1.0))  # may overflow to Inf: capped
  encode = _bits.compute_once(jnp.where(ok, jnp.minimum(encode, MAX_GLOBAL_ENCODE), 1.0).astype(jnp.float32))
  return encode, _bits.compute_once(_bits.div_rn(1.0, encode))


def given_global_encode(global_scale):
  """The encode factor of a caller's decode factor ``global_scale``: its correctly rounded reciprocal."""
  return _bits.compute_once(_bits.div_rn(1.0, jnp.asarray(global_scale, jnp.float32)))


def group_amax_bits(abs_bits, keep: tuple[int, ...]):
  """Max of finite ``|x|`` bits over every axis not in ``keep`` (kept with length 1)."""
  finite_bits = jnp.where(abs_bits < _bits.F32_INF_BITS, abs_bits, 0)
  reduce = tuple(a for a in range(abs_bits.ndim) if a not in keep)
  return jnp.max(finite_bits, axis=reduce, keepdims=True)


def finite_amax(x, keep: tuple[int, ...] = ()):
  """float32 max of the finite ``|x|`` (float32 subnormals as 0) over every axis not in ``keep``,
  kept with length 1; a scalar for ``keep=()``. NVFP4's global amax."""
  abs_bits = _bits.f32_bits(_bits.flush_subnormals(x)) & jnp.uint32(_bits.F32_ABS_MASK)
  out = _bits.from_f32_bits(group_amax_bits(abs_bits, keep))
  return out if keep else out.reshape(())


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "scale_rule", "pad", "tile", "keep", "axis_name"))
def quantize_reference(x, global_scale, hessian, *, fmt: Format, axis: int, scale_rule: str, pad: bool,
                       tile: int | None = None, keep: tuple[int, ...] = (), axis_name=None) -> QArray:
  """``fp4jax.quantize`` of checked arguments: ``axis`` negative, ``tile`` the 2-D block side or None,
  ``keep`` the axes a per-group global scale varies along (``()``: one per tensor), ``axis_name``
  the ``shard_map`` mesh axes the global amax is ``lax.pmax``-ed over (None: this array alone)."""
  x = _bits.widen(x)
  if pad:
    x = pad_axis(x, axis, fmt.block_size)
  x = _bits.flush_subnormals(x)
  blocks = to_blocks(x, axis, fmt.block_size) if tile is None else to_tiles(x, tile)

  abs_bits = _bits.f32_bits(blocks) & jnp.uint32(_bits.F32_ABS_MASK)
  # Non-negative floats order like their bit patterns; Inf and NaN sort last.
  amax_bits = jnp.max(abs_bits, axis=-1)
  nonfinite = amax_bits >= _bits.F32_INF_BITS
  finite_blocks = jnp.where(nonfinite[..., None], 0.0, blocks)
  amax = _bits.from_f32_bits(jnp.where(nonfinite, 0, amax_bits))

  global_encode = None
  if fmt.has_global_scale:
    numerator = global_encode_numerator(fmt, scale_rule)
    if global_scale is None and not keep:
      # The tensor amax skips non-finite elements only: the finite elements of
      # a NaN block still count, so no other block depends on where NaNs are.
      finite_bits = jnp.where(abs_bits < _bits.F32_INF_BITS, abs_bits, 0)
      tensor_amax = _bits.from_f32_bits(jnp.max(jnp.max(finite_bits, axis=-1)))
      if axis_name is not None:  # inside shard_map: the amax of the whole array, one scalar per shard
        tensor_amax = jax.lax.pmax(tensor_amax, axis_name)
      global_encode, global_scale = global_factors(tensor_amax, fmt, numerator)
    elif global_scale is None:
      x_bits = _bits.f32_bits(x) & jnp.uint32(_bits.F32_ABS_MASK)
      group_amax = _bits.from_f32_bits(group_amax_bits(x_bits, keep))
      if axis_name is not None:
        group_amax = jax.lax.pmax(group_amax, axis_name)
      global_encode, global_scale = global_factors(group_amax, fmt, numerator)
    else:
      global_scale = jnp.asarray(global_scale, jnp.float32)
      global_encode = given_global_encode(global_scale)

  g_dec = blocked_global(global_scale, axis, tile)
  ctx = BlockContext(fmt=fmt, amax=amax, global_encode=blocked_global(global_encode, axis, tile),
                     global_decode=g_dec, hessian=hessian, tile=tile)
  scales = ALL_SCALE_RULES[scale_rule](finite_blocks, ctx)
  nan_scale = jnp.full(scales.shape, fmt.scale_nan_byte, jnp.uint8)
  scales = jnp.where(nonfinite, jax.lax.bitcast_convert_type(nan_scale, fmt.scale_dtype), scales)
  values = encode_elements(finite_blocks, scales, fmt, g_dec)
  if tile is not None:
    return QArray(from_tiles(values, tile), scales, global_scale, fmt, -1, (tile, tile))
  return QArray(from_blocks(values, axis), jnp.moveaxis(scales, -1, axis), global_scale, fmt, axis)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_reference(q: QArray, dtype):
  """``fp4jax.dequantize`` of a valid QArray (either layout) to a floating ``dtype``."""
  q = with_layout(q, None)
  fmt = q.fmt
  axis = q.axis
  tile = None if q.block_shape is None else q.block_shape[0]
  if tile is None:
    blocks = to_blocks(q.values, axis, fmt.block_size)
    scales = jnp.moveaxis(q.scales, axis, -1)
  else:
    blocks, scales = to_tiles(q.values, tile), q.scales
  out = decode_blocks(blocks, scales, fmt, blocked_global(q.global_scale, axis, tile))
  # Saturate, then cast: a finite QArray never dequantizes to Inf, even where
  # rounding up at the top of the range (the "ceil" and "mse" rules near
  # float32's or float16's maximum) lands past the output dtype's largest value.
  out = _bits.saturate(out, dtype)
  out = from_blocks(out, axis) if tile is None else from_tiles(out, tile)
  return out.astype(dtype)
