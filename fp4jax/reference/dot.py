"""The reference block-scaled dot: dequantize to float32, then a float32 ``dot_general``.

The numerics contract of every matmul path (:mod:`fp4jax.kernels`' matmul
kernels, the two-pass path of ``fp4jax.scaled_dot_general``): they match it to
float32 rounding, reordering only the float32 accumulation.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fp4jax.prepared import with_layout
from fp4jax.qarray import QArray
from fp4jax.reference.quantize import dequantize_reference

__all__ = ["dequantize_operand", "scaled_dot_general_reference"]


def dequantize_operand(x, name: str):
  """A QArray (either layout) dequantized, or a floating array, as float32."""
  if isinstance(x, QArray):
    return dequantize_reference(with_layout(x, None), jnp.float32)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"scaled_dot_general: {name} must be floating or a QArray, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def scaled_dot_general_reference(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32):
  """Dequantize then a float32-accumulated ``lax.dot_general`` at HIGHEST precision."""
  out = lax.dot_general(
      dequantize_operand(lhs, "lhs"), dequantize_operand(rhs, "rhs"), dimension_numbers,
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )
  return out.astype(preferred_element_type)
