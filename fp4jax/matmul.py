"""Block-scaled matrix products: ``scaled_matmul`` and ``scaled_dot_general``.

The XLA path here (dequantize each QArray operand to float32, then a float32
``dot_general`` at HIGHEST precision) is the reference every matmul kernel in
``fp4jax.kernels`` is compared with.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax.qarray import QArray
from fp4jax.quantize import dequantize

__all__ = ["scaled_dot_general", "scaled_matmul"]

_BACKENDS = ("auto", "xla", "pallas")


def _operand_f32(x, name: str):
  if isinstance(x, QArray):
    return dequantize(x, jnp.float32, backend="xla")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"scaled_dot_general: {name} must be floating or a QArray, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def scaled_dot_general_reference(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32):
  """Dequantize then a float32-accumulated ``lax.dot_general``: the numerics contract."""
  out = lax.dot_general(
      _operand_f32(lhs, "lhs"), _operand_f32(rhs, "rhs"), dimension_numbers,
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )
  return out.astype(preferred_element_type)


def scaled_dot_general(lhs, rhs, dimension_numbers, *, preferred_element_type=jnp.float32,
                       backend: str = "auto"):
  """``lax.dot_general`` where either operand may be a :class:`QArray`.

  Numerically equal (to float32 rounding) to dequantizing each QArray to
  float32 and running a float32-accumulated ``dot_general``.
  """
  if backend not in _BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
  preferred_element_type = np.dtype(preferred_element_type)
  return scaled_dot_general_reference(lhs, rhs, dimension_numbers, preferred_element_type)


def scaled_matmul(a, b, *, preferred_element_type=jnp.bfloat16, backend: str = "auto"):
  """``a @ b`` for ``a (..., M, K)`` and ``b (K, N)``; either may be a QArray blocked along K."""
  a_nd = len(a.shape)
  if a_nd < 1 or len(b.shape) != 2:
    raise ValueError(f"scaled_matmul expects a (..., M, K) and b (K, N), got shapes {a.shape} and {b.shape}")
  if a.shape[-1] != b.shape[0]:
    raise ValueError(f"scaled_matmul: contracting sizes differ: a {a.shape} vs b {b.shape}")
  dims = (((a_nd - 1,), (0,)), ((), ()))
  return scaled_dot_general(a, b, dims, preferred_element_type=preferred_element_type, backend=backend)
