"""The fixed scale rules: "floor", "ceil", "nearest" (E4M3) and "even" (E8M0).

See :mod:`fp4jax.scales` for each rule's formula. Exponents are read off
float32 bit patterns, never off a rounded ``log2``, so the floor and ceil rules
are exact for every float32 ``amax``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format
from fp4jax.scales.elements import pow2_scales, scale_bytes, scales_from_bytes

__all__ = ["BlockContext", "floor_rule", "ceil_rule", "nearest_rule", "even_rule", "round_scale",
           "RULE_NEEDS_POW2", "require_scale_kind"]

# Rules that only make sense for one kind of block scale: True = power-of-two
# (E8M0) scales, False = E4M3 scales.
RULE_NEEDS_POW2 = {
    "nearest": (False, "rounds E4M3 block scales"),
    "4over6": (False, "chooses between two E4M3 block scales"),
    "even": (True, "rounds a power-of-two (E8M0) block scale"),
}


def require_scale_kind(fmt: Format, rule: str) -> None:
  """Raises ValueError when ``rule`` needs the other kind of block scale than ``fmt`` has."""
  if rule in RULE_NEEDS_POW2:
    pow2, what = RULE_NEEDS_POW2[rule]
    if fmt.power_of_two_scales != pow2:
      kind = "power-of-two" if fmt.power_of_two_scales else "E4M3"
      raise ValueError(f"scale_rule {rule!r} {what}; {fmt!r} has {kind} scales")


@dataclasses.dataclass(frozen=True)
class BlockContext:
  """What a scale rule may look at besides the block values.

  Attributes:
    fmt: the format.
    amax: ``(..., num_blocks)`` float32 block absolute maxima (finite).
    global_encode: float32 NVFP4 tensor encode factor ``g`` (the block scale
      targets ``amax * g / M``), a scalar or an array broadcastable against
      ``amax`` (one per row / leading index); None without a global scale.
    global_decode: the stored decode factor (about ``1 / g``), shaped alike.
    hessian: ``(num_blocks, B, B)`` float32 for the weighted "mse" rule, or None.
    tile: ``b`` when each block is a ``b x b`` tile flattened row-major (2-D
      blocks), else None.
  """

  fmt: Format
  amax: Any
  global_encode: Any = None
  global_decode: Any = None
  hessian: Any = None
  tile: int | None = None


# ---- fixed rules ------------------------------------------------------------
def _floor_exponent(ctx: BlockContext):
  return _bits.floor_log2(_bits.f32_bits(ctx.amax)) - ctx.fmt.elem_emax


def _ceil_exponent(ctx: BlockContext):
  bits = _bits.f32_bits(ctx.amax)
  over = _bits.mantissa_field(bits) > ctx.fmt.elem_max_significand_bits
  return _floor_exponent(ctx) + over.astype(jnp.int32)


def _even_exponent(ctx: BlockContext):
  # torchao's EVEN: add half a unit in the element's last mantissa place to
  # amax's bits (a carry lands in the exponent field), then floor. amax is
  # finite, so the sum stays below 2**32.
  half_ulp = jnp.uint32(1 << (_bits.F32_MANT_BITS - ctx.fmt.elem_nmant - 1))
  return _bits.floor_log2(_bits.f32_bits(ctx.amax) + half_ulp) - ctx.fmt.elem_emax


def _ideal_scale(ctx: BlockContext, target: float | None = None):
  """``amax / target`` in scale units (times the global encode factor): float32.

  ``target`` is the element value ``amax`` maps to, ``M`` by default.
  Computed as ``amax * (encode * float32(1 / target))``: one tensor-wide factor, so
  no intermediate can fall below float32's normal range (a tiny tensor with
  a capped encode factor would otherwise flush to zero), and the multiply by
  the float32 reciprocal of ``M`` is what NVIDIA's recipe does (XLA would
  rewrite a division by the constant into it anyway). The barrier keeps XLA
  from reassociating the product. Both products are flushed when subnormal:
  XLA's CPU flushes them and a GPU does not, and "ceil" would round a
  subnormal ideal up to E4M3's smallest scale.
  """
  factor = jnp.float32(1.0 / (ctx.fmt.elem_max if target is None else target))
  if ctx.global_encode is not None:
    factor = _bits.flush_subnormals(lax.optimization_barrier(ctx.global_encode * factor))
  return _bits.flush_subnormals(ctx.amax * factor)


def _scale_value(codes, fmt: Format):
  """float32 value of non-negative E4M3 scale codes, decoded from the bits (exact).

  Not ``scales.astype(float32)``: XLA's GPU compiler may delete a float32 ->
  E4M3 -> float32 conversion pair, which would skip the rounding.
  """
  fi = fmt.scale_finfo
  return _bits.decode_float_code(codes, int(fi.nmant), int(fi.minexp), int(fi.bits))


def round_scale(ctx: BlockContext, direction: int, target: float | None = None):
  """Rounds the ideal scale to a non-pow2 scale dtype: -1 down, 0 nearest, +1 up."""
  fmt = ctx.fmt
  ideal = _ideal_scale(ctx, target)
  # Saturate before the cast: ml_dtypes (and XLA) give NaN above E4M3's range.
  # The barrier keeps the rounding: where a consumer widens the scale again
  # (the "4over6" loss does), XLA's GPU compiler deletes the float32 -> E4M3 ->
  # float32 pair and computes with the unrounded scale (measured on an H200).
  nearest = lax.optimization_barrier(jnp.clip(ideal, 0.0, fmt.scale_max).astype(fmt.scale_dtype))
  if direction == 0:
    return nearest
  codes = scale_bytes(nearest).astype(jnp.int32)
  got = _scale_value(codes, fmt)
  if direction < 0:
    codes = jnp.where(got > ideal, codes - 1, codes)
  else:
    codes = jnp.where(got < ideal, codes + 1, codes)
  return scales_from_bytes(jnp.clip(codes, 0, fmt.scale_max_byte), fmt)


def floor_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    return pow2_scales(_floor_exponent(ctx), ctx.fmt)
  return round_scale(ctx, -1)


def ceil_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    return pow2_scales(_ceil_exponent(ctx), ctx.fmt)
  return round_scale(ctx, +1)


def nearest_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    raise ValueError(
        f"scale_rule 'nearest' rounds a block scale to E4M3; {ctx.fmt!r} has power-of-two "
        "scales: use 'floor', 'ceil' or 'mse'"
    )
  return round_scale(ctx, 0)


def even_rule(blocks, ctx: BlockContext):
  del blocks
  require_scale_kind(ctx.fmt, "even")
  return pow2_scales(_even_exponent(ctx), ctx.fmt)

