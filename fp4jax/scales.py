"""Scale rules: how each block's scale is chosen.

Every rule is a pure function ``rule(blocks, ctx) -> scales`` in the table
:data:`SCALE_RULES`:

* ``blocks``: float32 ``(..., num_blocks, block_size)``, finite, float32
  subnormals already flushed (non-finite blocks are handled by the caller).
* ``ctx``: a :class:`BlockContext` with the format, the block absolute maxima
  and, for formats with a tensor-wide scale, its encode/decode factors.
* returns ``(..., num_blocks)`` scales in ``fmt.scale_dtype``.

The rules (``s`` is the decode scale, ``amax`` the block's absolute maximum,
``M`` the element maximum, ``emax = floor(log2(M))``):

``"floor"``
  E8M0 scales: OCP MX v1.0 section 6.3, ``s = 2**(floor(log2(amax)) - emax)``,
  clamped to the E8M0 range; elements above ``M * s`` saturate. For MXFP4 this is
  ``2**(floor(log2 amax) - 2)``. E4M3 scales: ``amax / M`` (times the global
  encode factor) rounded down to an E4M3 value.
``"ceil"``
  The smallest scale with ``amax / s <= M``: nothing clips. For E8M0 this is
  cuBLAS's / torchao's RCEIL. E4M3: ``amax / M`` rounded up.
``"nearest"`` (E4M3 scales only)
  ``amax / M`` rounded to the nearest E4M3 value, NVIDIA's NVFP4 recipe (the
  default for NVFP4).
``"mse"``
  The scale minimising the block's squared error ``sum((x - dq)**2)``, found by
  trying every scale in a window that provably holds the optimum (below). With
  ``hessian=H`` the loss is ``r^T H_j r`` for the block's residual ``r``.

Why the "mse" window holds the optimum. Let ``s_c`` be the "ceil" scale.
(1) No scale above ``2 * s_c`` can win: doubling a floating-point grid maps it
into itself, so for ``s >= 2 s_c`` the grid of ``s`` below ``M * s/2`` lies in the
grid of ``s/2``, and no element exceeds ``M * s_c <= M * s/2``; every element is at
least as close to the finer grid. For power-of-two scales this already excludes
every scale above ``s_c``. (2) No scale at or below ``s_c / 8`` (E8M0) or
``s_c / 4`` (E4M3) can win: with E2M1 elements the largest element ``amax > M s_c / 2``
then clips to at most ``0.75 s_c``, which costs it at least ``(3 - 0.75)**2 - 0.6**2 =
4.7`` units of ``s_c**2`` over its error under ``s_c`` (relative rounding error of
E2M1 is at most 0.2), while all the other elements together gain at most
``31 * 0.25**2 = 1.94`` (only those below ``s_c`` can gain, each by at most half
a subnormal step). For E4M3 scales the same count with ``amax > 16/3 s_c`` and a
clip level of ``1.5 s_c`` gives 13.5 against 1.35. Wider element formats clip
worse and round better, so the bound holds for them too. The search thus tries
E8M0 exponents ``ceil-2 .. ceil`` (3 scales) and E4M3 codes from two octaves
below to one above ``s_c`` (25 scales); tests check it against a brute force over
every representable scale.

With a Hessian the per-element argument fails (residuals can cancel), and the
optimum can sit above the floor rule; the search then spans the E8M0 exponents
from ``ceil - 3`` up to the first exponent that rounds the whole block to zero
(all larger scales give the same loss), or the E4M3 codes three octaves either
side of ``s_c`` plus the zero scale. Below that window it is a search, not a
proof.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format

__all__ = [
    "SCALE_RULES",
    "BlockContext",
    "scale_exponent",
    "encode_elements",
    "decode_blocks",
    "block_hessians",
]


@dataclasses.dataclass(frozen=True)
class BlockContext:
  """What a scale rule may look at besides the block values."""

  fmt: Format
  amax: Any  # (..., num_blocks) float32, finite
  global_encode: Any = None  # float32 scalar, formats with a global scale
  global_decode: Any = None
  hessian: Any = None  # (num_blocks, B, B) float32, or None


# ---- scale <-> bits ---------------------------------------------------------
def scale_bytes(scales):
  return lax.bitcast_convert_type(scales, jnp.uint8)


def scales_from_bytes(byte_codes, fmt: Format):
  return lax.bitcast_convert_type(byte_codes.astype(jnp.uint8), fmt.scale_dtype)


def scale_exponent(scales, fmt: Format):
  """Integer exponent of E8M0 scales (byte - 127), int32."""
  return scale_bytes(scales).astype(jnp.int32) - fmt.scale_bias


def _max_scale_byte(fmt: Format) -> int:
  # Largest finite code: 0xFE for E8M0 (0xFF is NaN), 0x7E for E4M3.
  return fmt.scale_nan_byte - 1


def _pow2_scales(exponent, fmt: Format):
  e = jnp.clip(exponent, fmt.scale_exp_min, fmt.scale_exp_max)
  return scales_from_bytes(e + fmt.scale_bias, fmt)


# ---- applying scales --------------------------------------------------------
def encode_elements(blocks, scales, fmt: Format, global_decode=None):
  """Rounds ``blocks / (scale * global_decode)`` to the element grid.

  Round-to-nearest-even with saturation to +-elem_max, as ml_dtypes' casts do
  after an explicit clip. Returns ``fmt.elem_dtype`` values shaped like blocks.
  """
  if fmt.power_of_two_scales:
    y = _bits.scale_by_pow2(blocks, -scale_exponent(scales, fmt)[..., None])
  else:
    # NVIDIA's recipe: the element encode factor is 1 / (block scale * global
    # decode); a zero block scale zeroes the block.
    s = scales.astype(jnp.float32)[..., None] * global_decode
    y = blocks * jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  y = jnp.clip(y, -fmt.elem_max, fmt.elem_max)
  return y.astype(fmt.elem_dtype)


def decode_blocks(values, scales, fmt: Format, global_decode=None):
  """float32 ``values * scale * global_decode`` for blocked values.

  ``values``: (..., nb, B) element dtype; ``scales``: (..., nb). A NaN scale
  (E8M0 0xFF, E4M3 0x7F) gives NaN for the whole block.
  """
  v = values.astype(jnp.float32)
  if fmt.power_of_two_scales:
    codes = scale_bytes(scales)
    out = _bits.scale_by_pow2(v, scale_exponent(scales, fmt)[..., None])
    out = jnp.where((codes == fmt.scale_nan_byte)[..., None], jnp.nan, out)
  else:
    out = v * scales.astype(jnp.float32)[..., None]  # exact: 2 x 4 significant bits
  if global_decode is not None:
    out = out * global_decode
  return out


# ---- fixed rules ------------------------------------------------------------
def _floor_exponent(ctx: BlockContext):
  return _bits.floor_log2(_bits.f32_bits(ctx.amax)) - ctx.fmt.elem_emax


def _ceil_exponent(ctx: BlockContext):
  bits = _bits.f32_bits(ctx.amax)
  over = _bits.mantissa_field(bits) > ctx.fmt.elem_max_significand_bits
  return _floor_exponent(ctx) + over.astype(jnp.int32)


def _ideal_scale(ctx: BlockContext):
  """amax / M in scale units (times the global encode factor): float32."""
  s = ctx.amax / ctx.fmt.elem_max
  if ctx.global_encode is not None:
    s = s * ctx.global_encode
  return s


def _round_scale(ctx: BlockContext, direction: int):
  """Rounds the ideal scale to a non-pow2 scale dtype: -1 down, 0 nearest, +1 up."""
  fmt = ctx.fmt
  ideal = _ideal_scale(ctx)
  # Saturate before the cast: ml_dtypes (and XLA) give NaN above E4M3's range.
  nearest = jnp.clip(ideal, 0.0, fmt.scale_max).astype(fmt.scale_dtype)
  if direction == 0:
    return nearest
  codes = scale_bytes(nearest).astype(jnp.int32)
  got = nearest.astype(jnp.float32)
  if direction < 0:
    codes = jnp.where(got > ideal, codes - 1, codes)
  else:
    codes = jnp.where(got < ideal, codes + 1, codes)
  return scales_from_bytes(jnp.clip(codes, 0, _max_scale_byte(fmt)), fmt)


def floor_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    return _pow2_scales(_floor_exponent(ctx), ctx.fmt)
  return _round_scale(ctx, -1)


def ceil_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    return _pow2_scales(_ceil_exponent(ctx), ctx.fmt)
  return _round_scale(ctx, +1)


def nearest_rule(blocks, ctx: BlockContext):
  del blocks
  if ctx.fmt.power_of_two_scales:
    raise ValueError(
        f"scale_rule 'nearest' rounds a block scale to E4M3; {ctx.fmt!r} has power-of-two "
        "scales: use 'floor', 'ceil' or 'mse'"
    )
  return _round_scale(ctx, 0)


# ---- searched rules -----------------------------------------------------------
def _search_window(fmt: Format, weighted: bool) -> range:
  """Byte offsets from the "ceil" scale's code tried by the "mse" search."""
  if fmt.power_of_two_scales:
    if not weighted:
      return range(-2, 1)
    # From ceil-3 up to the first exponent at which the whole block rounds to
    # 0: amax < 2**(A+1) and e >= A + 2 - log2(smallest subnormal) make every
    # element at most a quarter of the smallest subnormal step; ceil >= A - emax.
    first_zero = fmt.elem_emax + 2 - fmt.elem_log2_smallest_subnormal
    return range(-3, first_zero + 1)
  octave = 2**fmt.scale_finfo.nmant  # codes per factor of two
  if not weighted:
    return range(-2 * octave, octave + 1)
  return range(-3 * octave, 3 * octave + 1)


def _block_loss(residual, hessian):
  if hessian is None:
    return jnp.sum(residual * residual, axis=-1)
  return jnp.einsum("...nb,nbd,...nd->...n", residual, hessian, residual,
                    precision=lax.Precision.HIGHEST)


def mse_rule(blocks, ctx: BlockContext):
  fmt = ctx.fmt
  weighted = ctx.hessian is not None
  anchor = scale_bytes(ceil_rule(blocks, ctx)).astype(jnp.int32)
  # Residuals are compared in units of 2**floor(log2(amax)) so that squares
  # stay in float32 range for any input magnitude.
  unit = _bits.floor_log2(_bits.f32_bits(ctx.amax))[..., None]
  target = _bits.scale_by_pow2(blocks, -unit)
  gdec = ctx.global_decode

  candidates = [jnp.clip(anchor + off, 0, _max_scale_byte(fmt)) for off in _search_window(fmt, weighted)]
  if weighted and not fmt.power_of_two_scales:
    candidates.append(jnp.zeros_like(anchor))  # the zero scale rounds the block to 0

  best_loss = best_code = None
  for code in candidates:  # a handful of static candidates; XLA fuses each
    scales = scales_from_bytes(code, fmt)
    q = encode_elements(blocks, scales, fmt, gdec)
    if fmt.power_of_two_scales:
      dq = _bits.scale_by_pow2(q.astype(jnp.float32), scale_exponent(scales, fmt)[..., None] - unit)
    else:
      dq = _bits.scale_by_pow2(q.astype(jnp.float32) * scales.astype(jnp.float32)[..., None], -unit)
      if gdec is not None:
        dq = dq * gdec
    loss = _block_loss(target - dq, ctx.hessian)
    if best_loss is None:
      best_loss, best_code = loss, code
    else:
      better = loss < best_loss  # ties keep the smaller scale
      best_loss = jnp.where(better, loss, best_loss)
      best_code = jnp.where(better, code, best_code)
  return scales_from_bytes(best_code, fmt)


SCALE_RULES: dict[str, Callable[..., Any]] = {
    "floor": floor_rule,
    "ceil": ceil_rule,
    "nearest": nearest_rule,
    "mse": mse_rule,
}


def block_hessians(x, block_size: int):
  """Per-block Hessians ``X_j^T X_j`` of activations for Hessian-weighted MSE.

  Args:
    x: activations ``(..., K)``; all leading axes are samples.
    block_size: the format's block size ``B``; ``K`` must be a multiple.

  Returns:
    float32 ``(K // B, B, B)``: for a weight ``w`` of shape ``(K, N)`` used as
    ``x @ w`` and quantized along ``K`` (axis 0), block ``j`` of every column
    has loss ``r^T H[j] r``, its contribution to ``||x @ (w - dq)||^2``.
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"block_hessians needs activations of shape (..., K), got shape {x.shape}")
  k = x.shape[-1]
  if k % block_size:
    raise ValueError(f"block_hessians: K={k} (shape {x.shape}) is not a multiple of block size {block_size}")
  xb = x.reshape(-1, k // block_size, block_size).astype(jnp.float32)
  return jnp.einsum("snb,snd->nbd", xb, xb, precision=lax.Precision.HIGHEST)
