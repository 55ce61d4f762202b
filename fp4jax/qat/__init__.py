"""Quantization-aware training: custom VJPs with the quantization in the loop.

* :func:`fake_quant`: ``dequantize(quantize(x))`` with a straight-through
  (optionally clipped) gradient.
* :func:`quantized_dot_general`: a ``lax.dot_general`` whose forward GEMM sees
  block-quantized operands and whose two backward GEMMs (``dlhs = g . rhs``,
  ``drhs = lhs . g``) each quantize their operands along *their own*
  contracting axis, with optional stochastic rounding and a random Hadamard
  transform, as NVIDIA's NVFP4 training recipe does.
* :func:`stochastic_quantize`, :func:`random_hadamard`: the two pieces above,
  usable on their own.

Configs nest: ``QatConfig(lhs=OperandConfig(...), rhs=..., grad=...)``; every
format-dependent choice is answered by the :class:`~fp4jax.Format` itself.

Modules: :mod:`~fp4jax.qat.config`, :mod:`~fp4jax.qat.rounding`,
:mod:`~fp4jax.qat.fake`, :mod:`~fp4jax.qat.dot`.
"""

from fp4jax.qat.config import OperandConfig, QatConfig
from fp4jax.qat.dot import einsum_dimension_numbers, quantized_dot_general, quantized_einsum
from fp4jax.qat.fake import fake_quant
from fp4jax.qat.rounding import hadamard_matrix, random_hadamard, stochastic_quantize

__all__ = [
    "OperandConfig",
    "QatConfig",
    "fake_quant",
    "quantized_dot_general",
    "quantized_einsum",
    "einsum_dimension_numbers",
    "stochastic_quantize",
    "random_hadamard",
    "hadamard_matrix",
]
