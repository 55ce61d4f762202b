"""Post-training quantization of parameter trees."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from fp4jax.formats import Format, get_format
from fp4jax.int8_matmul import int8_obstacle, int8_weight, is_stored_weight
from fp4jax.qarray import STORAGE_LAYOUTS, rows_obstacle
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
    layout: str | None = "auto",
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
    layout: how each QArray stores its leaves (see :class:`QArray`):
      ``"auto"`` (default) stores every one that the matmul kernels' byte-row
      layout can hold (a 2-D kernel in a format of ``fp4jax.FORMATS``) as
      ``"rows"`` and the others (3-D Einsum / expert kernels, MXFP6, MXINT8)
      in the logical layout; ``"rows"`` insists (ValueError naming a leaf it
      cannot hold); ``None`` keeps the logical layout everywhere;
      ``"int8"``: as ``"auto"``, and each 2-D MXFP4 kernel an
      :class:`~fp4jax.Int8Weight` (:func:`fp4jax.int8_weight`: its int8 codes
      made once, for W4A4 products on the int8 tensor cores; 1.53 bytes an
      element, see there for its fallback).

  Returns:
    The same tree with each selected leaf a QArray (logical shape unchanged),
    the rest untouched. ``QDense``/``QLinear``/``QEinsum`` run inference from
    these stored QArrays through :func:`fp4jax.scaled_dot_general` without
    re-quantizing them, and a ``"rows"`` kernel reaches the matmul kernel
    with no per-call op over it. ``fp4jax.dequantize``, ``fp4jax.stats``,
    checkpoints and orbax take either layout. For nnx,
    ``nnx.update(model, quantize_params(...))``.

  Why ``"auto"``: the point of a 4-bit weight is a fast matmul, and with the
  logical layout every jitted call transposes and re-packs the weight before
  the kernel (on a GPU that costs more than the kernel itself at decode
  sizes). The byte rows are chosen once, here, where the weight is made.
  """
  fmt = get_format(fmt)
  predicate = _is_kernel if predicate is None else predicate
  if layout not in ("auto", "int8") and layout not in STORAGE_LAYOUTS:
    raise ValueError(f"quantize_params: unknown layout {layout!r}; expected 'auto', 'int8' or one of "
                     f"{STORAGE_LAYOUTS}")

  def one(path, leaf):
    name = param_path(path)
    if is_stored_weight(leaf) or not predicate(name, leaf):
      return leaf
    ax = axis(name, leaf) if callable(axis) else axis
    try:
      q = quantize(leaf, fmt, axis=ax, scale_rule=scale_rule)
      if layout == "int8" and q.ndim == 2 and int8_obstacle(q.fmt, q.fmt, q.shape[q.axis]) is None:
        return int8_weight(q)
      if layout in ("auto", "int8"):
        return q.with_layout("rows") if rows_obstacle(q) is None else q
      return q.with_layout(layout)
    except ValueError as e:
      raise ValueError(f"quantize_params: parameter {name!r} (shape {np.shape(leaf)}, dtype "
                       f"{getattr(leaf, 'dtype', None)}): {e}") from None

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_stored_weight)
