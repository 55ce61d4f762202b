"""Scale rules: how each block's scale is chosen, and applying a scale.

Every rule is a pure function ``rule(blocks, ctx) -> scales`` in the table
:data:`SCALE_RULES`:

* ``blocks``: float32 ``(..., num_blocks, block_size)``, finite, float32
  subnormals already flushed (non-finite blocks are handled by the caller).
* ``ctx``: a :class:`BlockContext` with the format, the block absolute maxima
  and, for formats with a tensor-wide scale, its encode/decode factors.
* returns ``(..., num_blocks)`` scales in ``fmt.scale_dtype``.

The rules (``s`` is the block's decode scale, ``amax`` its absolute maximum,
``M`` the element maximum, ``emax = floor(log2(M))``; for NVFP4 ``amax`` is
first multiplied by the tensor encode factor ``g``):

``"floor"``
  E8M0 scales: OCP MX v1.0 section 6.3, ``s = 2**(floor(log2(amax)) - emax)``,
  clamped to ``[2**-127, 2**127]``; elements above ``M * s`` saturate. For MXFP4
  this is ``2**(floor(log2 amax) - 2)``. E4M3 scales: ``amax / M`` rounded down
  to an E4M3 value (possibly 0, which zeroes the block). For E4M3 scales
  ``amax / M`` means ``amax * (g * float32(1 / M))`` in float32.
``"ceil"``
  The smallest scale with ``amax / s <= M``: nothing clips. For E8M0 this is
  cuBLAS's / torchao's RCEIL. E4M3: ``amax / M`` rounded up (saturating at 448).
``"nearest"`` (E4M3 scales only)
  ``amax / M`` rounded to the nearest E4M3 value, NVIDIA's NVFP4 recipe (the
  default for NVFP4). As in the recipe, a block whose ``amax / M`` is below half
  the smallest E4M3 subnormal (``2**-10``) gets the zero scale and becomes 0.
``"mse"``
  The scale minimising the block's squared error ``sum((x - dq)**2)`` over
  every representable scale; ties go to the smaller scale. With ``hessian=H``
  the loss is ``r^T H_j r`` for the block's residual ``r = x - dq``.

Two more rules are in :data:`ALL_SCALE_RULES` (the XLA path only; the kernels
implement the rules of :data:`SCALE_RULES`):

``"even"`` (E8M0 scales only)
  torchao's ``ScaleCalculationMode.EVEN`` (``torchao/prototype/mx_formats``,
  ``X = 2**(floor(log2(rounding(amax))) - emax)``): ``amax`` is first rounded to
  the element's ``nmant`` mantissa bits, ties away from zero, by adding half a
  unit in that place to its float32 bit pattern (a carry moves it to the next
  power of two), then the "floor" rule applies. It picks the "floor" scale or
  twice it; it doubles only when ``amax``'s significand is at least
  ``2 - 2**-(nmant+1)`` (1.75 for E2M1), a subset of the blocks where "ceil"
  doubles (significand above ``elem_max / 2**emax``, 1.5 for E2M1), so it clips
  less than "floor" and keeps more small elements than "ceil".
``"4over6"`` (E4M3 scales only)
  "Four Over Six" (Cook et al., 2025, arXiv:2512.02010, mit-han-lab/fouroversix):
  per block, two "nearest" scales, one mapping ``amax`` to ``M`` (6 for E2M1)
  and one mapping it to ``2**emax`` (4), each rounded to the nearest E4M3; the
  block keeps the one with the lower squared error (ties keep the first).
  Since the second scale is ``M / 2**emax`` (1.5) times the first, the tensor
  encode factor becomes ``M * 256 / amax`` instead of ``M * 448 / amax`` (256
  is the largest power of two ``p`` with ``1.5 p <= 448``), as in the recipe,
  so no block scale saturates (see :func:`global_encode_numerator`).

2-D blocks (``quantize(..., block_shape=(b, b))``) reach the rules as blocks of
``b * b`` elements with ``BlockContext.tile = b``. Their losses are summed in
an order that is the same for a tile and its transpose (pairs ``(i, j)``,
``(j, i)`` first), so a matrix and its transpose get the same scales under
every rule; the "mse" window is then the wide one of the weighted search
(:mod:`~fp4jax.scales.search`; a search, checked by the tests against a brute force, not a proof: the
bound of (2) grows with the number of elements in a block).

Exponents are read off float32 bit patterns, never off a rounded ``log2``, so
the floor and ceil rules are exact for every float32 ``amax``.

Modules: :mod:`~fp4jax.scales.elements` (element codecs, applying scales),
:mod:`~fp4jax.scales.fixed` (the fixed rules), :mod:`~fp4jax.scales.search`
("mse" and "4over6", with why the "mse" search is exact).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from fp4jax.formats import Format
from fp4jax.scales.elements import (decode_blocks, decode_elements, element_units, encode_elements,
                                    encode_units, scale_exponent, stochastic_magnitudes)
from fp4jax.scales.fixed import (RULE_NEEDS_POW2, BlockContext, ceil_rule, even_rule, floor_rule,
                                 nearest_rule)
from fp4jax.scales.search import (block_hessians, dequant_unit_factor, four_over_six_rule, loss_unit_target,
                                  mse_rule, search_window)

__all__ = [
    "SCALE_RULES",
    "ALL_SCALE_RULES",
    "BlockContext",
    "check_rule",
    "global_encode_numerator",
    "scale_exponent",
    "element_units",
    "encode_elements",
    "encode_units",
    "stochastic_magnitudes",
    "decode_elements",
    "decode_blocks",
    "block_hessians",
    "search_window",
    "dequant_unit_factor",
    "loss_unit_target",
]

#: The rules the kernels implement too (``fp4jax.kernels`` refuses any other).
SCALE_RULES: dict[str, Callable[..., Any]] = {
    "floor": floor_rule,
    "ceil": ceil_rule,
    "nearest": nearest_rule,
    "mse": mse_rule,
}

#: Every rule ``fp4jax.quantize`` takes: :data:`SCALE_RULES` plus ``"even"``
#: and ``"4over6"`` (XLA path only).
ALL_SCALE_RULES: dict[str, Callable[..., Any]] = {
    **SCALE_RULES,
    "even": even_rule,
    "4over6": four_over_six_rule,
}


def check_rule(fmt: Format, rule: str) -> None:
  """Raises ValueError unless ``rule`` is a known rule that applies to ``fmt``'s scales."""
  if rule not in ALL_SCALE_RULES:
    raise ValueError(f"unknown scale_rule {rule!r}; expected one of {sorted(ALL_SCALE_RULES)}")
  if rule in RULE_NEEDS_POW2:
    pow2, what = RULE_NEEDS_POW2[rule]
    if fmt.power_of_two_scales != pow2:
      kind = "power-of-two" if fmt.power_of_two_scales else "E4M3"
      ok = [r for r in ALL_SCALE_RULES
            if r not in RULE_NEEDS_POW2 or RULE_NEEDS_POW2[r][0] == fmt.power_of_two_scales]
      raise ValueError(f"scale_rule {rule!r} {what}; {fmt!r} has {kind} scales: use one of {ok}")


def global_encode_numerator(fmt: Format, rule: str) -> float:
  """NVFP4's tensor encode factor is this over the tensor amax.

  ``elem_max * scale_max`` (6 * 448) by default. For ``"4over6"`` the block
  scale may be ``M / 2**emax`` (1.5) times the usual one, so the numerator is
  ``elem_max * p`` with ``p`` the largest power of two such that ``p * M /
  2**emax <= scale_max``: 6 * 256, as the Four Over Six recipe does.
  """
  if rule != "4over6":
    return fmt.global_encode_numerator
  headroom = fmt.elem_max / 2.0**fmt.elem_emax
  return fmt.elem_max * 2.0 ** math.floor(math.log2(fmt.scale_max / headroom))

