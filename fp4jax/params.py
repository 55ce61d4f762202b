"""Post-training quantization of parameter trees."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from fp4jax.formats import Format, get_format
from fp4jax.qarray import QArray
from fp4jax.quantize import quantize

__all__ = ["quantize_params", "param_path"]


def param_path(path) -> str:
  """A ``jax.tree_util`` key path as ``"layers/0/kernel"``.

  nnx's trailing ``.value`` attribute is dropped, so linen dicts and nnx
  ``State`` trees name the same kernel alike.
  """
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names.pop()
  return "/".join(names)


def _is_kernel(path: str, leaf) -> bool:
  return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) >= 2


def quantize_params(
    params,
    fmt: Format | str,
    *,
    scale_rule: str | None = None,
    axis: int | Callable[[str, Any], int] = 0,
    predicate: Callable[[str, Any], bool] | None = None,
):
  """Replaces the kernels of a trained parameter tree by :class:`QArray` s.

  Args:
    params: any pytree of arrays: a linen ``params`` dict, an nnx ``State``
      (``nnx.state(model, nnx.Param)``), or a plain dict.
    fmt: the weight format (``fp4jax.MXFP4`` ...) or its name.
    scale_rule: as in :func:`fp4jax.quantize`.
    axis: the blocked axis, which must be the axis the layer contracts over:
      0 for ``Dense``/``Linear`` kernels ``(in, out)``. Either an int or
      ``axis(path, leaf) -> int`` (e.g. for ``Einsum`` kernels).
    predicate: ``predicate(path, leaf) -> bool`` selects the leaves to quantize;
      ``path`` is ``"layer/kernel"`` (see :func:`param_path`). Default: leaves
      named ``kernel`` with at least two axes.

  Returns:
    The same tree with each selected leaf a QArray (shape unchanged), the rest
    untouched. ``QDense``/``QLinear``/``QEinsum`` run inference from these
    stored QArrays through :func:`fp4jax.scaled_dot_general` without
    re-quantizing them. For nnx, ``nnx.update(model, quantize_params(...))``.
  """
  fmt = get_format(fmt)
  predicate = _is_kernel if predicate is None else predicate

  def one(path, leaf):
    name = param_path(path)
    if isinstance(leaf, QArray) or not predicate(name, leaf):
      return leaf
    ax = axis(name, leaf) if callable(axis) else axis
    try:
      return quantize(leaf, fmt, axis=ax, scale_rule=scale_rule)
    except ValueError as e:
      raise ValueError(f"quantize_params: parameter {name!r} (shape {np.shape(leaf)}, dtype "
                       f"{getattr(leaf, 'dtype', None)}): {e}") from None

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QArray))
