"""Pallas GPU kernels and the dispatch the core calls lazily for ``backend=``.

``maybe_quantize`` / ``maybe_dequantize`` return None when no kernel takes the
case under ``backend="auto"`` (not on a GPU, or an unsupported case), so the
caller falls back to the XLA reference; with ``backend="pallas"`` an
unsupported case raises ValueError instead.
"""

from __future__ import annotations

import jax


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def maybe_quantize(x, fmt, *, axis, scale_rule, global_scale, hessian, pad, backend):
  if backend == "pallas":
    raise ValueError(f"no Pallas quantize kernel for {fmt!r} with scale_rule={scale_rule!r}")
  return None


def maybe_dequantize(q, *, dtype, backend):
  if backend == "pallas":
    raise ValueError(f"no Pallas dequantize kernel for {q.fmt!r}")
  return None
