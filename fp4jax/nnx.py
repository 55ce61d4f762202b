"""Flax nnx layers with quantization-aware training: ``QLinear``, ``QEinsum``.

Subclasses of ``flax.nnx.Linear`` / ``Einsum``: the same constructor
arguments, parameter names, shapes and initialisers (checkpoints load
unchanged), plus ``config`` (:class:`fp4jax.qat.QatConfig`). With
``config=None`` they compute what flax's layers compute. After
``nnx.update(model, fp4jax.params.quantize_params(nnx.state(model, nnx.Param), fmt))``
the kernels are QArrays and the layers run inference through the block-scaled
matmul without re-quantizing them (2-D ones stored as the kernels' byte rows,
``layout="rows"``, so no per-call op runs over them).

Stochastic rounding draws from ``rngs["quant"]`` (``rngs["default"]`` when
absent), forked at construction like ``nnx.Dropout`` does.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from fp4jax.int8_matmul import is_stored_weight
from fp4jax.qat import QatConfig, einsum_dimension_numbers, quantized_dot_general

__all__ = ["QLinear", "QEinsum"]


def _init_quant(mdl, config, rngs):
  if config is not None and not isinstance(config, QatConfig):
    raise ValueError(f"config must be a fp4jax.qat.QatConfig or None, got {type(config).__name__}")
  mdl.config = config
  needs = config is not None and config.needs_key
  mdl.quant_rngs = rngs["quant"].fork() if needs else nnx.data(None)


def _values(mdl):
  kernel = mdl.kernel.get_value()
  bias = mdl.bias.get_value() if mdl.bias is not None else None
  return kernel, bias


def _promote(mdl, inputs, kernel, bias):
  if is_stored_weight(kernel):
    inputs, _, bias = mdl.promote_dtype((inputs, None, bias), dtype=mdl.dtype)
    return inputs, kernel, bias
  return tuple(mdl.promote_dtype((inputs, kernel, bias), dtype=mdl.dtype))


def _dot_general(mdl, kernel):
  key = None
  if mdl.config is not None and mdl.config.needs_key and not is_stored_weight(kernel):
    key = mdl.quant_rngs()
  return functools.partial(quantized_dot_general, config=mdl.config, key=key)


class QLinear(nnx.Linear):
  """``flax.nnx.Linear`` with block-scaled quantization in the loop.

  Args: those of ``nnx.Linear`` (``in_features``, ``out_features``,
  ``use_bias``, ``dtype``, ``param_dtype``, ``precision``, ``kernel_init``,
  ``bias_init``, ``dot_general``, ``promote_dtype``, ``preferred_element_type``,
  keyword-only ``rngs``, ...) plus ``config``: a :class:`QatConfig` or None. An
  explicitly given ``dot_general`` takes precedence over ``config``.

  Shapes: ``inputs (..., in_features)`` -> ``(..., out_features)``; kernel
  ``(in_features, out_features)``.
  """

  def __init__(self, in_features: int, out_features: int, *, config: QatConfig | None = None,
               dot_general=None, rngs: nnx.Rngs, **kwargs):
    if dot_general is not None:
      kwargs["dot_general"] = dot_general
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self.custom_dot_general = dot_general is not None
    _init_quant(self, config, rngs)

  def __call__(self, inputs, out_sharding=None):
    kernel, bias = _values(self)
    inputs, kernel, bias = _promote(self, inputs, kernel, bias)
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    dot_general = self.dot_general if self.custom_dot_general else _dot_general(self, kernel)
    y = dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                    **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class QEinsum(nnx.Einsum):
  """``flax.nnx.Einsum`` with block-scaled quantization in the loop.

  Args: those of ``nnx.Einsum`` (``einsum_str``, ``kernel_shape``,
  ``bias_shape``, ..., keyword-only ``rngs``) plus ``config``. The equation is
  explicit with two operands (input, kernel); see
  :func:`fp4jax.qat.einsum_dimension_numbers`. An explicitly given
  ``einsum_op`` takes precedence over ``config``.
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *, config: QatConfig | None = None,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
    self.custom_einsum_op = "einsum_op" in kwargs
    _init_quant(self, config, rngs)

  def __call__(self, inputs, einsum_str: str | None = None, out_sharding=None):
    eq = (einsum_str if einsum_str is not None else self.einsum_str).replace(" ", "")
    kernel, bias = _values(self)
    inputs, kernel, bias = _promote(self, inputs, kernel, bias)
    if self.custom_einsum_op:
      return super().__call__(inputs, einsum_str, out_sharding)
    if out_sharding is not None:
      raise ValueError("QEinsum does not support out_sharding")
    dims, perm, out_terms, rhs_terms = einsum_dimension_numbers(eq, inputs.ndim, kernel.ndim)
    y = _dot_general(self, kernel)(inputs, kernel, dims, precision=self.precision,
                                   preferred_element_type=self.preferred_element_type)
    y = jnp.transpose(y, perm)
    if bias is not None:
      y += jnp.reshape(bias, [kernel.shape[rhs_terms.index(c)] if c in rhs_terms else 1 for c in out_terms])
    return y
