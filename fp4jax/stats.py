"""Quantization diagnostics (:func:`stats`) and an amax history for delayed scaling.

``stats(x, q)`` says how well a QArray represents ``x``: signal-to-noise,
relative error, how many elements saturated and how many block scales sit at
the ends of their range. It runs on the host in numpy float64 (a diagnostic,
not a traced op), so its sums do not lose digits on large tensors.

:class:`AmaxHistory` keeps the last few amaxes of a tensor (per tensor, row or
leading index, as ``quantize``'s ``granularity``) for NVFP4's global scale in
delayed scaling: quantize step ``t`` with the scale from steps before ``t``,
then record step ``t``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.formats import Format, get_format
from fp4jax.prepared import with_layout
from fp4jax.qarray import QArray, validate_qarray
from fp4jax.quantize import dequantize, global_amax, global_scale_from_amax

__all__ = ["Stats", "stats", "AmaxHistory"]


@dataclasses.dataclass(frozen=True)
class Stats:
  """Quantization error and range use of a QArray ``q`` against the original ``x``.

  Every quantity is computed in float64 over the *counted* elements: those
  with a finite ``x`` in blocks whose scale is not NaN (a block with a NaN or
  Inf input gets the NaN scale and dequantizes to NaN; it is left out). Let
  ``dq = dequantize(q, float32)``, ``err = sum((x - dq)**2)`` and ``sig =
  sum(x**2)`` over them, and let ``s`` be an element's block scale value and
  ``g`` its global scale (1 without one).

  Attributes:
    sqnr_db: ``10 * log10(sig / err)``; ``inf`` when ``err == 0``, ``-inf``
      when ``sig == 0 < err``.
    rel_mse: ``err / sig``; 0 when ``err == 0``, ``inf`` when ``sig == 0 < err``.
    clipped_fraction: the fraction of counted elements that saturated:
      ``|x| > elem_max * s * g`` with ``s > 0`` (a zero E4M3 scale is an
      underflow of the whole block, counted by ``scale_at_min_fraction``).
    scale_at_max_fraction: the fraction of blocks with a non-NaN scale whose
      scale is the largest finite one (E8M0 ``2**127``, E4M3 448): their
      amax may have needed a larger one.
    scale_at_min_fraction: the fraction of blocks with a non-NaN scale whose
      scale magnitude is at most the smallest positive one (E8M0 ``2**-127``,
      which all-zero blocks get too; E4M3 ``2**-9`` or the zero scale).
    elements: the number of counted elements.
    blocks: the number of blocks with a non-NaN scale.
  """

  sqnr_db: float
  rel_mse: float
  clipped_fraction: float
  scale_at_max_fraction: float
  scale_at_min_fraction: float
  elements: int
  blocks: int


def _scale_values(q: QArray) -> np.ndarray:
  """Block scale values, float64, NaN where the scale is the NaN code."""
  raw = np.asarray(jax.device_get(q.scales))
  return raw.astype(np.float64)


def _smallest_positive_scale(fmt: Format) -> float:
  values = np.arange(256, dtype=np.uint8).view(fmt.scale_dtype).astype(np.float64)
  return float(np.min(values[np.isfinite(values) & (values > 0)]))


def _per_element(block_values: np.ndarray, q: QArray) -> np.ndarray:
  """Block quantities ``q.scales``-shaped -> one per element, ``q.shape``."""
  b = q.fmt.block_size
  if q.block_shape is not None:
    return np.repeat(np.repeat(block_values, b, axis=-2), b, axis=-1)
  return np.repeat(block_values, b, axis=q.axis)


def stats(x, q: QArray) -> Stats:
  """Quantization diagnostics of ``q`` as a stand-in for ``x`` (see :class:`Stats`).

  Args:
    x: the original array, any float dtype, shape ``q.shape`` (for a QArray
      quantized with ``pad=True``, the padded shape).
    q: a :class:`fp4jax.QArray` (any format, 1-D or 2-D blocks, any global
      scale granularity, either storage layout).

  Returns:
    A :class:`Stats` of Python floats and ints.

  Raises:
    ValueError: ``q`` is not a valid QArray, ``x`` is not floating, or the
      shapes differ.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"stats expects a fp4jax.QArray as q, got {type(q).__name__}")
  q = with_layout(validate_qarray(q), None)  # the per-block sums below read the logical array
  x = np.asarray(jax.device_get(x))
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"stats: x must be floating, got dtype {x.dtype}")
  if tuple(x.shape) != tuple(q.shape):
    raise ValueError(f"stats: x has shape {tuple(x.shape)}, the QArray has shape {tuple(q.shape)}")
  fmt = q.fmt
  x = x.astype(np.float64)
  dq = np.asarray(dequantize(q, jnp.float32, backend="xla")).astype(np.float64)
  s = _scale_values(q)
  s_elem = _per_element(s, q)
  g = 1.0 if q.global_scale is None else np.asarray(jax.device_get(q.global_scale), np.float64)

  counted = np.isfinite(x) & ~np.isnan(s_elem)
  xc, dqc = x[counted], dq[counted]
  err = float(np.sum((xc - dqc) ** 2))
  sig = float(np.sum(xc * xc))
  if err == 0:
    sqnr, rel = math.inf, 0.0
  elif sig == 0:
    sqnr, rel = -math.inf, math.inf
  else:
    rel = err / sig
    sqnr = 10.0 * math.log10(sig / err)

  limit = fmt.elem_max * np.abs(s_elem) * np.broadcast_to(g, x.shape)
  clipped = counted & (s_elem != 0) & (np.abs(x) > limit)
  n = int(np.sum(counted))

  finite_s = s[~np.isnan(s)]
  nb = int(finite_s.size)
  at_max = int(np.sum(np.abs(finite_s) >= fmt.scale_max))
  at_min = int(np.sum(np.abs(finite_s) <= _smallest_positive_scale(fmt)))
  frac = lambda k, total: k / total if total else 0.0
  return Stats(sqnr_db=sqnr, rel_mse=rel, clipped_fraction=frac(int(np.sum(clipped)), n),
               scale_at_max_fraction=frac(at_max, nb), scale_at_min_fraction=frac(at_min, nb),
               elements=n, blocks=nb)


# ---- delayed scaling ---------------------------------------------------------------
_ALGOS = ("max", "most_recent")


@dataclasses.dataclass(frozen=True)
class AmaxHistory:
  """The last ``length`` amaxes of a tensor, for NVFP4 global scales in delayed scaling.

  A pytree: ``history`` (float32 ``(length, *amax_shape)``, newest first) is
  its leaf; ``granularity``, ``axis``, ``block_shape`` and ``algo`` are static.
  ``amax_shape`` is ``()`` for ``granularity="tensor"``, else the shape
  :func:`fp4jax.global_amax` gives (the input's rank, 1 on reduced axes).

  Typical use, inside a jitted training step::

    g = hist.global_scale(fj.NVFP4)          # from earlier steps only
    q = fj.quantize(x, fj.NVFP4, global_scale=g)
    hist = hist.update(x)                    # then record this step

  A fresh history is all zeros, whose global scale is 1 (NVFP4's
  ``global_scale_from_amax(0)``), as TransformerEngine starts delayed
  scaling from a scale of 1.
  """

  history: Any
  granularity: Any = "tensor"
  axis: int = -1
  block_shape: tuple[int, int] | None = None
  algo: str = "max"

  @classmethod
  def create(cls, x, length: int = 16, *, granularity="tensor", axis: int = -1, block_shape=None,
             algo: str = "max") -> "AmaxHistory":
    """An all-zero history for tensors shaped like ``x`` (an array or ``jax.ShapeDtypeStruct``).

    ``granularity``, ``axis`` and ``block_shape`` mean what they mean for
    :func:`fp4jax.quantize` (and must match the calls it feeds); ``algo`` is
    ``"max"`` (the maximum over the window) or ``"most_recent"``.
    """
    if not isinstance(length, (int, np.integer)) or length < 1:
      raise ValueError(f"AmaxHistory: length must be a positive int, got {length!r}")
    if algo not in _ALGOS:
      raise ValueError(f"AmaxHistory: unknown algo {algo!r}; expected one of {_ALGOS}")
    if isinstance(granularity, list):
      granularity = tuple(granularity)
    spec = jax.eval_shape(
        lambda v: global_amax(v, granularity, axis=axis, block_shape=block_shape),
        jax.ShapeDtypeStruct(tuple(x.shape), x.dtype))
    bs = None if block_shape is None else tuple(int(b) for b in block_shape)
    return cls(jnp.zeros((int(length), *spec.shape), jnp.float32), granularity, axis, bs, algo)

  def update(self, x) -> "AmaxHistory":
    """Records ``x``'s amax (finite elements only) as the newest entry, dropping the oldest."""
    new = global_amax(x, self.granularity, axis=self.axis, block_shape=self.block_shape)
    if new.shape != self.history.shape[1:]:
      raise ValueError(f"AmaxHistory.update: x of shape {tuple(jnp.shape(x))} gives an amax of shape "
                       f"{new.shape}, the history holds {self.history.shape[1:]}")
    return dataclasses.replace(self, history=jnp.concatenate([new[None], self.history[:-1]], axis=0))

  def amax(self):
    """float32 amax: the maximum over the window (``"max"``) or the newest entry."""
    return jnp.max(self.history, axis=0) if self.algo == "max" else self.history[0]

  def global_scale(self, fmt: Format | str = "nvfp4", *, scale_rule: str | None = None):
    """NVFP4's decode factor(s) from :meth:`amax`: pass as ``quantize(..., global_scale=)``."""
    return global_scale_from_amax(self.amax(), get_format(fmt), scale_rule=scale_rule)


jax.tree_util.register_dataclass(
    AmaxHistory, data_fields=["history"], meta_fields=["granularity", "axis", "block_shape", "algo"])
