"""Block-scaled number formats as data.

A :class:`Format` names an element dtype, a scale dtype and a block size. Every
numeric constant used elsewhere in fp4jax (the element maximum, the exponent of
the largest element binade, the smallest subnormal, ...) is derived here from
``ml_dtypes.finfo``; no other module retypes 6.0 or 448.

The formats follow the OCP Microscaling (MX) Formats Specification v1.0 (MXFP4,
MXFP6, MXFP8, MXINT8) and NVIDIA's NVFP4 (E2M1 elements, an E4M3 scale per 16
elements and one float32 tensor-wide scale).

Elements are described by two types. ``elem_dtype`` is what ``QArray.values``
stores; ``elem_type`` is the number system whose grid the values lie on (its
``finfo``: ``max``, ``nmant``, ``minexp``, ...). They coincide for the formats
XLA has dtypes for (E2M1, E4M3, E5M2). XLA has no 6-bit floats, so MXFP6
stores each element's 6-bit code in the low bits of a ``uint8``; MXINT8 stores
``int8`` codes ``k`` meaning ``k * 2**-6``, whose grid a :class:`FixedPoint`
describes with the same ``finfo`` fields. :attr:`Format.elem_storage` names
the resulting encoding, and ``fp4jax.scales`` has one encoder and decoder per
encoding, so quantize and dequantize never test a format's name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "Format", "FixedPoint", "MXFP4", "NVFP4", "MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E2M3", "MXFP6_E3M2",
    "MXINT8", "FORMATS", "ALL_FORMATS", "get_format",
]


@dataclasses.dataclass(frozen=True)
class FixedPoint:
  """A two's complement integer element with an implicit scale ``2**-frac_bits``.

  It answers the ``ml_dtypes.finfo`` questions fp4jax asks of a float element
  by viewing its values ``k * 2**-frac_bits`` as a float grid: one binade
  ``[1, 2)`` with ``frac_bits`` mantissa bits, continued below by "subnormals"
  of the same step. So ``nmant = frac_bits``, ``minexp = 0``, ``maxexp = 1``
  (the largest binade is ``2**0``) and ``smallest_subnormal = 2**-frac_bits``.

  ``symmetric``: codes span ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1``, so
  ``max`` is ``(2**(bits-1) - 1) * 2**-frac_bits`` and the most negative code
  (``-2**(bits-1)``) is never produced by quantization, although it decodes
  (to ``-2**(bits-1-frac_bits)``) like any two's complement code.
  """

  bits: int
  frac_bits: int
  symmetric: bool = True

  @property
  def dtype(self):
    return np.dtype(f"int{self.bits}").type

  @property
  def max(self) -> float:
    return float((2 ** (self.bits - 1) - 1) * 2.0**-self.frac_bits)

  @property
  def nmant(self) -> int:
    return self.frac_bits

  @property
  def minexp(self) -> int:
    return 0

  @property
  def maxexp(self) -> int:
    return 1

  @property
  def smallest_subnormal(self) -> float:
    return 2.0**-self.frac_bits


@functools.cache
def _finfo(dtype):
  if isinstance(dtype, FixedPoint):
    return dtype
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
    elem_type: the element number system: an ``ml_dtypes`` float type or a
      :class:`FixedPoint`; ``None`` (the default) means ``elem_dtype`` itself.
      Every element constant below comes from its ``finfo``.
  """

  name: str
  elem_dtype: type
  scale_dtype: type
  block_size: int
  has_global_scale: bool = False
  default_scale_rule: str = "floor"
  elem_type: Any = None

  def __post_init__(self):
    # Normalise to the numpy scalar types so formats compare and hash equal no
    # matter whether they were built from jnp or ml_dtypes names.
    object.__setattr__(self, "elem_dtype", np.dtype(self.elem_dtype).type)
    object.__setattr__(self, "scale_dtype", np.dtype(self.scale_dtype).type)
    elem_type = self.elem_dtype if self.elem_type is None else self.elem_type
    if not isinstance(elem_type, FixedPoint):
      elem_type = np.dtype(elem_type).type
    object.__setattr__(self, "elem_type", elem_type)
    if self.block_size <= 0:
      raise ValueError(f"block_size must be positive, got {self.block_size}")
    if isinstance(elem_type, FixedPoint) and np.dtype(self.elem_dtype) != np.dtype(elem_type.dtype):
      raise ValueError(f"{self.name}: a {elem_type} element is stored as {np.dtype(elem_type.dtype)}, "
                       f"got elem_dtype {np.dtype(self.elem_dtype)}")

  def __repr__(self) -> str:
    return f"fp4jax.{self.name.upper()}"

  # ---- element constants, all from ml_dtypes.finfo -------------------------
  @property
  def elem_finfo(self):
    """``ml_dtypes.finfo(elem_type)``, or the :class:`FixedPoint` itself (same fields)."""
    return _finfo(self.elem_type)

  @property
  def elem_storage(self) -> str:
    """How ``QArray.values`` holds an element; ``fp4jax.scales`` encodes and decodes by it.

    ``"native"``: in ``elem_dtype``, an XLA float type (a cast rounds to it).
    ``"code"``: the element's bit pattern in the low bits of an unsigned
    ``elem_dtype`` (sign in bit ``elem_bits - 1``), for floats XLA lacks.
    ``"fixed_point"``: the integer ``k`` of a :class:`FixedPoint` element.
    """
    if isinstance(self.elem_type, FixedPoint):
      return "fixed_point"
    return "native" if self.elem_type == self.elem_dtype else "code"

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
# OCP MX v1.0 section 5.3: FP6 elements, E8M0 scales, blocks of 32. XLA has no
# 6-bit dtype: the codes live in uint8 (see ``elem_storage``).
MXFP6_E2M3 = Format("mxfp6_e2m3", jnp.uint8, jnp.float8_e8m0fnu, 32, elem_type=ml_dtypes.float6_e2m3fn)
MXFP6_E3M2 = Format("mxfp6_e3m2", jnp.uint8, jnp.float8_e8m0fnu, 32, elem_type=ml_dtypes.float6_e3m2fn)
# OCP MX v1.0 section 5.3.3: 8-bit two's complement elements with an implicit
# scale of 2**-6 (largest magnitude 1 63/64, element emax 0). Quantization
# clips symmetrically to +-127/64, as the spec's reference code
# (microsoft/microxcaling, mx/formats.py: int8 max_norm 1.984375) does.
MXINT8 = Format("mxint8", jnp.int8, jnp.float8_e8m0fnu, 32, elem_type=FixedPoint(8, 6))

#: The formats with Pallas kernels and checkpoint layouts (the original four).
FORMATS: dict[str, Format] = {f.name: f for f in (MXFP4, NVFP4, MXFP8_E4M3, MXFP8_E5M2)}
#: Every built-in format: :data:`FORMATS` plus MXFP6 and MXINT8 (XLA path only).
ALL_FORMATS: dict[str, Format] = {**FORMATS, **{f.name: f for f in (MXFP6_E2M3, MXFP6_E3M2, MXINT8)}}


def get_format(fmt: Format | str) -> Format:
  """Returns ``fmt`` itself, or the built-in format of that name (see :data:`ALL_FORMATS`)."""
  if isinstance(fmt, Format):
    return fmt
  if isinstance(fmt, str) and fmt.lower() in ALL_FORMATS:
    return ALL_FORMATS[fmt.lower()]
  raise ValueError(f"unknown format {fmt!r}; expected a fp4jax.Format or one of {sorted(ALL_FORMATS)}")
