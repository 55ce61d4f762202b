"""Element encodings and applying block scales: the codecs every scale rule and decoder shares.

``encode_units`` / ``decode_elements`` turn float32 element units into
``QArray.values`` storage and back (``Format.elem_storage`` picks the codec);
``element_units`` / ``encode_elements`` divide blocks by their scales and
round; ``decode_blocks`` multiplies back. Power-of-two scales apply by
exponent arithmetic, so the whole E8M0 range is exact on every backend.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format

__all__ = [
    "scale_bytes",
    "scales_from_bytes",
    "scale_exponent",
    "pow2_scales",
    "encode_units",
    "stochastic_magnitudes",
    "decode_elements",
    "element_factor",
    "element_units",
    "encode_elements",
    "decode_blocks",
    "per_element",
]


# ---- scale <-> bits ---------------------------------------------------------
def scale_bytes(scales):
  return lax.bitcast_convert_type(scales, jnp.uint8)


def scales_from_bytes(byte_codes, fmt: Format):
  return lax.bitcast_convert_type(byte_codes.astype(jnp.uint8), fmt.scale_dtype)


def scale_exponent(scales, fmt: Format):
  """Integer exponent of E8M0 scales (byte - 127), int32."""
  return scale_bytes(scales).astype(jnp.int32) - fmt.scale_bias


def pow2_scales(exponent, fmt: Format):
  e = jnp.clip(exponent, fmt.scale_exp_min, fmt.scale_exp_max)
  return scales_from_bytes(e + fmt.scale_bias, fmt)


# ---- element encodings (Format.elem_storage) -----------------------------------
def _encode_native(y, fmt: Format):
  # A barrier after the cast: fused with a dequantize, XLA's GPU compiler may
  # drop a float32 -> narrow -> float32 conversion pair, skipping the rounding.
  return lax.optimization_barrier(y.astype(fmt.elem_dtype))


def _decode_native(values, fmt: Format):
  del fmt
  return values.astype(jnp.float32)


def _encode_code(y, fmt: Format):
  code = _bits.encode_float_code(y, fmt.elem_nmant, fmt.elem_emin, fmt.elem_emax, fmt.elem_bits)
  return lax.optimization_barrier(code.astype(fmt.elem_dtype))


def _decode_code(values, fmt: Format):
  return _bits.decode_float_code(values, fmt.elem_nmant, fmt.elem_emin, fmt.elem_bits)


def _encode_fixed_point(y, fmt: Format):
  """Float32 ``y`` (``|y| <= elem_max``) -> integer codes ``round(y / 2**-f)``, nearest even."""
  unit_exp = fmt.elem_log2_smallest_subnormal  # the code unit 2**-f
  return lax.optimization_barrier(jnp.round(y * jnp.float32(2.0**-unit_exp)).astype(fmt.elem_dtype))


def _decode_fixed_point(values, fmt: Format):
  return values.astype(jnp.float32) * jnp.float32(2.0**fmt.elem_log2_smallest_subnormal)  # exact


#: ``Format.elem_storage`` -> (encode float32 grid-bound values, decode to float32).
ELEMENT_CODECS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "native": (_encode_native, _decode_native),
    "code": (_encode_code, _decode_code),
    "fixed_point": (_encode_fixed_point, _decode_fixed_point),
}


def encode_units(y, fmt: Format):
  """Float32 element units (``x`` already divided by its scales) -> ``QArray.values`` storage.

  Saturates to ``+-elem_max``, rounds to nearest even and encodes by
  ``fmt.elem_storage``. Values already on the grid (e.g. stochastically
  rounded ones) are encoded exactly.
  """
  y = jnp.clip(y, -fmt.elem_max, fmt.elem_max)
  return ELEMENT_CODECS[fmt.elem_storage][0](y, fmt)


def stochastic_magnitudes(a, u, fmt: Format):
  """Float32 magnitudes ``a`` (element units, ``0 <= a <= elem_max``: callers clip) rounded to a grid neighbour by
  the uniforms ``u``.

  With ``t = a / ulp(a)`` (exact: ulp is a power of two), the result is
  ``floor(t) * ulp``, or ``(floor(t) + 1) * ulp`` where ``u < frac(t)``: for
  ``u`` uniform in [0, 1) the upper one with probability ``frac(t)``. Apart
  from the draw, so a kernel that draws ``u`` itself rounds exactly as the
  XLA path (``fp4jax.qat.stochastic_quantize``, ``fp4jax.kernels.fake_quant``).

  Each power of two is one normal float32 factor: in this domain the ulp's exponent lies within 16 binades
  of 0 for every element format (E2M1: -1..1). Scaling up is exact; scaling down (an ulp above 1) only
  meets values of at least twice that ulp, normal before and after. (Two factors each way, as
  ``_bits.scale_by_pow2`` takes for wide exponents, give the same bits: tests/test_kernels_fake_quant.py;
  one multiply is fewer integer operations an element in the fake-quantization kernel, which the
  threefry hash beside it keeps at the GPU's integer rate.)
  """
  emin = int(fmt.elem_finfo.minexp)  # smallest normal exponent of the elements
  ulp_exp = jnp.maximum(_bits.floor_log2(_bits.f32_bits(a)), emin) - fmt.elem_nmant
  t = a * _bits.exp2i(-ulp_exp)
  lo = jnp.floor(t)
  return (lo + (u < t - lo).astype(jnp.float32)) * _bits.exp2i(ulp_exp)


def decode_elements(values, fmt: Format):
  """``QArray.values`` (any shape, ``fmt.elem_dtype``) -> their float32 element values."""
  return ELEMENT_CODECS[fmt.elem_storage][1](values, fmt)


def per_element(g):
  """A global factor shaped like the block scales ``(..., nb)`` -> broadcastable over ``(..., nb, B)``."""
  return g if jnp.ndim(g) == 0 else jnp.asarray(g)[..., None]


# ---- applying scales --------------------------------------------------------
def element_factor(scales, fmt: Format, global_decode):
  """E4M3 scales: the encode factor ``1 / (scale * global_decode)``, 0 for a zero scale.

  NVIDIA's recipe multiplies by this reciprocal rather than dividing. The
  product is flushed when it is a float32 subnormal, and the reciprocal is
  correctly rounded (:func:`fp4jax._bits.div_rn`, 0 where it would be
  subnormal), so that every backend zeroes the same blocks and gets the same
  factor (XLA's CPU flushes and divides exactly, its GPU neither).
  """
  s = scales.astype(jnp.float32)
  if global_decode is not None:
    # The barrier pins the recipe's order of operations: XLA may otherwise
    # rewrite 1 / (s * g) (or fold g into other factors) and round differently.
    s = _bits.flush_subnormals(lax.optimization_barrier(s * global_decode))
  # One division per block, not per element (see fp4jax._bits.compute_once).
  return _bits.compute_once(jnp.where(s > 0, _bits.div_rn(1.0, s), 0.0))


def element_units(blocks, scales, fmt: Format, global_decode=None):
  """``blocks / (scale * global_decode)`` before clipping and rounding, float32.

  Args:
    blocks: float32 ``(..., nb, B)``.
    scales: ``(..., nb)`` in ``fmt.scale_dtype``.
    fmt: the format.
    global_decode: float32 for formats with a global scale (a scalar, or an
      array broadcastable against ``scales``), else None.

  Power-of-two scales apply by exponent arithmetic (exact); E4M3 scales as a
  multiplication by :func:`element_factor`. Stochastic rounding and the STE
  mask use this so that they see exactly the value ``encode_elements`` rounds.
  """
  if fmt.power_of_two_scales:
    return _bits.scale_by_pow2(blocks, -scale_exponent(scales, fmt)[..., None])
  return blocks * element_factor(scales, fmt, global_decode)[..., None]


def encode_elements(blocks, scales, fmt: Format, global_decode=None):
  """Rounds ``blocks / (scale * global_decode)`` to the element grid.

  Round-to-nearest-even with saturation to +-elem_max, as ml_dtypes' casts do
  after an explicit clip. Returns ``fmt.elem_dtype`` values shaped like blocks.
  """
  return encode_units(element_units(blocks, scales, fmt, global_decode), fmt)


def decode_blocks(values, scales, fmt: Format, global_decode=None):
  """float32 ``values * scale * global_decode`` for blocked values.

  Args:
    values: ``(..., nb, B)`` in the element dtype.
    scales: ``(..., nb)`` in the scale dtype.
    fmt: the format.
    global_decode: float32 (a scalar or broadcastable against ``scales``) or None.

  Returns:
    float32 ``(..., nb, B)``. A NaN scale (E8M0 0xFF, E4M3 0x7F) gives NaN
    over the whole block. Power-of-two scales apply by exponent arithmetic, so
    the whole E8M0 range is exact; results that are float32 subnormals
    (``< 2**-126``) become signed zeros on every backend. Products beyond
    float32's range are +-Inf here (``dequantize`` saturates them).
  """
  v = decode_elements(values, fmt)
  if fmt.power_of_two_scales:
    codes = scale_bytes(scales)
    out = _bits.scale_by_pow2(v, scale_exponent(scales, fmt)[..., None])
    out = jnp.where((codes == fmt.scale_nan_byte)[..., None], jnp.nan, out)
  else:
    out = v * scales.astype(jnp.float32)[..., None]  # exact: 2 x 4 significant bits
    if global_decode is not None:
      # (v * s) * g rounds once; the barrier keeps XLA from reassociating it
      # into v * (s * g), which rounds twice.
      out = lax.optimization_barrier(out) * per_element(global_decode)
  return _bits.flush_subnormals(out)
