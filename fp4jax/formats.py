"""Block-scaled number formats as data.

A :class:`Format` names an element dtype, a scale dtype and a block size. Every
numeric constant used elsewhere in fp4jax (the element maximum, the exponent of
the largest element binade, the smallest subnormal, ...) is derived here from
``ml_dtypes.finfo``; no other module retypes 6.0 or 448.

The formats follow the OCP Microscaling (MX) Formats Specification v1.0 (MXFP4,
MXFP8) and NVIDIA's NVFP4 (E2M1 elements, an E4M3 scale per 16 elements and one
float32 tensor-wide scale).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["Format", "MXFP4", "NVFP4", "MXFP8_E4M3", "MXFP8_E5M2", "FORMATS", "get_format"]


@functools.cache
def _finfo(dtype) -> ml_dtypes.finfo:
  return ml_dtypes.finfo(dtype)


@dataclasses.dataclass(frozen=True)
class Format:
  """A block-scaled format.

  Attributes:
    name: short lower-case name (``"mxfp4"``).
    elem_dtype: element dtype, e.g. ``jnp.float4_e2m1fn``.
    scale_dtype: per-block scale dtype: ``jnp.float8_e8m0fnu`` (a power of two)
      or ``jnp.float8_e4m3fn`` (NVFP4).
    block_size: number of consecutive elements along the quantized axis that
      share one scale.
    has_global_scale: whether a float32 tensor-wide decode factor multiplies
      every block scale (NVFP4).
    default_scale_rule: the rule ``quantize`` uses when none is given: the OCP
      ``"floor"`` rule for MX formats, round-to-nearest (``"nearest"``) of the
      block scale for NVFP4, as NVIDIA's recipe does.
  """

  name: str
  elem_dtype: type
  scale_dtype: type
  block_size: int
  has_global_scale: bool = False
  default_scale_rule: str = "floor"

  def __post_init__(self):
    # Normalise to the numpy scalar types so formats compare and hash equal no
    # matter whether they were built from jnp or ml_dtypes names.
    object.__setattr__(self, "elem_dtype", np.dtype(self.elem_dtype).type)
    object.__setattr__(self, "scale_dtype", np.dtype(self.scale_dtype).type)
    if self.block_size <= 0:
      raise ValueError(f"block_size must be positive, got {self.block_size}")

  def __repr__(self) -> str:
    return f"fp4jax.{self.name.upper()}"

  # ---- element constants, all from ml_dtypes.finfo -------------------------
  @property
  def elem_finfo(self) -> ml_dtypes.finfo:
    return _finfo(self.elem_dtype)

  @property
  def elem_max(self) -> float:
    """Largest finite element magnitude (6.0 for E2M1, 448.0 for E4M3)."""
    return float(self.elem_finfo.max)

  @property
  def elem_emax(self) -> int:
    """Exponent of the largest element binade: ``floor(log2(elem_max))``."""
    return int(self.elem_finfo.maxexp) - 1

  @property
  def elem_emin(self) -> int:
    """Exponent of the smallest normal element binade (0 for E2M1, -6 for E4M3)."""
    return int(self.elem_finfo.minexp)

  @property
  def elem_nmant(self) -> int:
    """Explicit mantissa bits of the element format."""
    return int(self.elem_finfo.nmant)

  @property
  def elem_max_significand_bits(self) -> int:
    """The 23-bit float32 mantissa field of ``elem_max / 2**elem_emax``.

    ``amax`` fits under ``elem_max * 2**e`` without clipping iff the mantissa
    field of ``amax`` is at most this, when ``amax`` lies in ``[2**(emax+e),
    2**(emax+e+1))``; comparing fields keeps the "ceil" rule exact.
    """
    significand = self.elem_max / 2.0**self.elem_emax
    return int(np.float32(significand).view(np.uint32)) & 0x7FFFFF

  @property
  def elem_log2_smallest_subnormal(self) -> int:
    """log2 of the smallest positive element (-1 for E2M1: 0.5)."""
    return int(round(math.log2(float(self.elem_finfo.smallest_subnormal))))

  @property
  def elem_bits(self) -> int:
    return int(self.elem_finfo.bits)

  # ---- scale constants -----------------------------------------------------
  @property
  def scale_finfo(self) -> ml_dtypes.finfo:
    return _finfo(self.scale_dtype)

  @property
  def power_of_two_scales(self) -> bool:
    """True for E8M0 scales (no mantissa: every scale is a power of two)."""
    return self.scale_finfo.nmant == 0

  @property
  def scale_max(self) -> float:
    """Largest finite scale (2**127 for E8M0, 448 for E4M3)."""
    return float(self.scale_finfo.max)

  @property
  def scale_max_byte(self) -> int:
    """Byte of the largest finite scale: 0xFE for E8M0, 0x7E for E4M3."""
    return self.scale_nan_byte - 1

  @property
  def scale_min_normal_byte(self) -> int:
    """Byte of the smallest normal E4M3 scale (8): below it codes are linear."""
    return 1 << int(self.scale_finfo.nmant)

  @property
  def scale_exp_min(self) -> int:
    """Smallest exponent of an E8M0 scale (-127); only for power-of-two scales."""
    return int(self.scale_finfo.minexp)

  @property
  def scale_exp_max(self) -> int:
    """Largest exponent of a finite E8M0 scale (127); only for power-of-two scales."""
    return int(self.scale_finfo.maxexp) - 1

  @property
  def scale_bias(self) -> int:
    """E8M0 exponent bias (127): byte ``b`` means ``2**(b - bias)``."""
    return -self.scale_exp_min

  @property
  def scale_nan_byte(self) -> int:
    """The scale's NaN bit pattern (0xFF for E8M0, 0x7F for E4M3)."""
    return int(np.array(np.nan, dtype=self.scale_dtype).view(np.uint8))

  @property
  def bits_per_element(self) -> float:
    """Storage cost including the block scales (4.25 for MXFP4, 4.5 for NVFP4)."""
    return self.elem_bits + self.scale_finfo.bits / self.block_size

  @property
  def global_encode_numerator(self) -> float:
    """NVFP4's tensor encode scale is ``elem_max * scale_max / amax``."""
    return self.elem_max * self.scale_max


MXFP4 = Format("mxfp4", jnp.float4_e2m1fn, jnp.float8_e8m0fnu, 32)
NVFP4 = Format(
    "nvfp4", jnp.float4_e2m1fn, jnp.float8_e4m3fn, 16,
    has_global_scale=True, default_scale_rule="nearest",
)
MXFP8_E4M3 = Format("mxfp8_e4m3", jnp.float8_e4m3fn, jnp.float8_e8m0fnu, 32)
MXFP8_E5M2 = Format("mxfp8_e5m2", jnp.float8_e5m2, jnp.float8_e8m0fnu, 32)

FORMATS: dict[str, Format] = {f.name: f for f in (MXFP4, NVFP4, MXFP8_E4M3, MXFP8_E5M2)}


def get_format(fmt: Format | str) -> Format:
  """Returns ``fmt`` itself, or the registered format of that name."""
  if isinstance(fmt, Format):
    return fmt
  if isinstance(fmt, str) and fmt.lower() in FORMATS:
    return FORMATS[fmt.lower()]
  raise ValueError(f"unknown format {fmt!r}; expected a fp4jax.Format or one of {sorted(FORMATS)}")
