"""Flax linen layers with quantization-aware training: ``QDense``, ``QEinsum``.

Drop-in for ``flax.linen.Dense`` / ``Einsum``: the same parameter names, shapes,
initialisers and defaults (subclasses, so checkpoints load unchanged) plus one
``config`` (:class:`fp4jax.qat.QatConfig`). With ``config=None`` they compute
exactly what flax's layers do. A ``kernel`` stored as a :class:`QArray`
(see :func:`fp4jax.params.quantize_params`) runs inference through the
block-scaled matmul without re-quantizing it; stored as ``layout="rows"``
(``quantize_params``' default for 2-D kernels) it goes into the matmul kernel
under ``jax.jit`` with no per-call op over it.

Stochastic rounding in the backward pass draws from the ``"quant"`` rng
collection: ``model.apply(params, x, rngs={"quant": key})``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fp4jax.int8_matmul import is_stored_weight
from fp4jax.qat import QatConfig, einsum_dimension_numbers, quantized_dot_general

__all__ = ["QDense", "QEinsum"]


def _kernel(mdl: nn.Module, shape, init, dtype):
  """The stored QArray kernel, or the (possibly newly initialised) float one."""
  if mdl.has_variable("params", "kernel"):
    k = mdl.get_variable("params", "kernel")
    if is_stored_weight(k):
      if tuple(k.shape) != tuple(shape):
        raise ValueError(f"{type(mdl).__name__}: stored QArray kernel has shape {k.shape}, "
                         f"the layer expects {tuple(shape)}")
      return k
  return mdl.param("kernel", init, shape, dtype)


def _quant_dot_general(mdl: nn.Module, config: QatConfig | None, kernel):
  key = None
  if config is not None and config.needs_key and not is_stored_weight(kernel):
    if mdl.is_initializing():
      key = 0  # init runs no backward pass: any counter will do
    elif mdl.has_rng(mdl.rng_collection):
      key = mdl.make_rng(mdl.rng_collection)
    else:
      raise ValueError(f"{type(mdl).__name__}: config rounds gradients stochastically; pass "
                       f"rngs={{{mdl.rng_collection!r}: key}} to apply")
  return functools.partial(quantized_dot_general, config=config, key=key)


def _promote(mdl, inputs, kernel, bias):
  if is_stored_weight(kernel):
    inputs, _, bias = mdl.promote_dtype(inputs, None, bias, dtype=mdl.dtype)
    return inputs, kernel, bias
  return tuple(mdl.promote_dtype(inputs, kernel, bias, dtype=mdl.dtype))


class QDense(nn.Dense):
  """``flax.linen.Dense`` with block-scaled quantization in the loop.

  Attributes (besides ``nn.Dense``'s ``features``, ``use_bias``, ``dtype``,
  ``param_dtype``, ``precision``, ``kernel_init``, ``bias_init``,
  ``promote_dtype``, ``dot_general``, ``dot_general_cls``):
    config: a :class:`QatConfig`; ``None`` is a plain Dense. An injected
      ``dot_general``/``dot_general_cls`` takes precedence over it.
    preferred_element_type: output dtype of the product (default: the
      promoted input dtype).
    rng_collection: the rng stream for stochastic rounding.

  Shapes: ``inputs (..., in)`` -> ``(..., features)``; ``kernel (in, features)``.
  """

  config: QatConfig | None = None
  preferred_element_type: Any = None
  rng_collection: str = "quant"

  @nn.compact
  def __call__(self, inputs):
    kernel = _kernel(self, (jnp.shape(inputs)[-1], self.features), self.kernel_init, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = _promote(self, inputs, kernel, bias)
    if self.dot_general_cls is not None:
      dot_general = self.dot_general_cls()
    elif self.dot_general is not None:
      dot_general = self.dot_general
    else:
      dot_general = _quant_dot_general(self, self.config, kernel)
    kwargs = {}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                    **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class QEinsum(nn.Einsum):
  """``flax.linen.Einsum`` with block-scaled quantization in the loop.

  Attributes: ``nn.Einsum``'s (``shape``, ``einsum_str``, ``use_bias``, ...)
  plus ``config`` and ``rng_collection`` as in :class:`QDense`. The equation is
  explicit with two operands (input, kernel); see
  :func:`fp4jax.qat.einsum_dimension_numbers`. The bias has the kernel's
  output axes, as in flax.
  """

  config: QatConfig | None = None
  rng_collection: str = "quant"

  @nn.compact
  def __call__(self, inputs, einsum_str: str | None = None):
    einsum_str = nn.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
    dims, perm, out_terms, rhs_terms = einsum_dimension_numbers(einsum_str, inputs.ndim, len(self.shape))
    kernel = _kernel(self, self.shape, self.kernel_init, self.param_dtype)
    bias = None
    if self.use_bias:
      bias_shape = [self.shape[rhs_terms.index(c)] for c in out_terms if c in rhs_terms]
      bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
    inputs, kernel, bias = _promote(self, inputs, kernel, bias)
    dot_general = _quant_dot_general(self, self.config, kernel)
    y = jnp.transpose(dot_general(inputs, kernel, dims, precision=self.precision,
                                  preferred_element_type=self.preferred_element_type), perm)
    if bias is not None:
      y += jnp.reshape(bias, [self.shape[rhs_terms.index(c)] if c in rhs_terms else 1 for c in out_terms])
    return y

