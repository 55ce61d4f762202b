"""The reference layer: pure-jnp quantize, dequantize and dot that every kernel equals.

* :mod:`~fp4jax.reference.blocks`: block and tile views and their inverses.
* :mod:`~fp4jax.reference.quantize`: :func:`quantize_reference`,
  :func:`dequantize_reference`, NVFP4's global factors (bit for bit).
* :mod:`~fp4jax.reference.dot`: :func:`scaled_dot_general_reference` (to
  float32 rounding).

Nothing here validates arguments; the public API (``fp4jax.quantize``,
``fp4jax.scaled_dot_general``) does that once and calls these.
"""

from fp4jax.reference.blocks import blocked_global, from_blocks, from_tiles, pad_axis, to_blocks, to_tiles
from fp4jax.reference.dot import dequantize_operand, scaled_dot_general_reference
from fp4jax.reference.quantize import (MAX_GLOBAL_ENCODE, dequantize_reference, finite_amax, given_global_encode,
                                       global_factors, group_amax_bits, quantize_reference)

__all__ = [
    "to_blocks", "from_blocks", "to_tiles", "from_tiles", "pad_axis", "blocked_global",
    "quantize_reference", "dequantize_reference", "global_factors", "given_global_encode",
    "group_amax_bits", "finite_amax", "MAX_GLOBAL_ENCODE",
    "dequantize_operand", "scaled_dot_general_reference",
]
