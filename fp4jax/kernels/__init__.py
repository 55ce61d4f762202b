"""Pallas GPU kernels, each bit-identical to (or, for matmuls, within float32 rounding of) the reference.

Kernels: :mod:`~fp4jax.kernels.quantize_pack` (fused quantize + pack, and
NVFP4's tensor amax), :mod:`~fp4jax.kernels.dequantize`,
:mod:`~fp4jax.kernels.w4a16_matmul` and :mod:`~fp4jax.kernels.mx_matmul`.
They import only the layers below them (formats, QArray, scales, the
reference); which kernel a public call runs is decided once, in
:mod:`fp4jax.backend`.

This module holds the two facts that decision reads: whether a GPU is the
default backend, and whether the caller asked for Pallas interpret mode
(:func:`interpret_mode`, how the CPU tests run the kernels).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

__all__ = ["on_gpu", "interpret_mode", "interpreting"]

_INTERPRET = contextvars.ContextVar("fp4jax_kernels_interpret", default=False)


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU."""
  return jax.default_backend() == "gpu"


def interpreting() -> bool:
  """Whether the calling code is inside :func:`interpret_mode`."""
  return _INTERPRET.get()


@contextlib.contextmanager
def interpret_mode(enabled: bool = True):
  """Within this context ``backend="pallas"`` runs the kernels in Pallas interpret mode.

  For tests on machines without a GPU::

    with fp4jax.kernels.interpret_mode():
      q = fp4jax.quantize(x, fp4jax.MXFP4, backend="pallas")

  The choice is read when ``quantize`` is traced, so a function jitted inside
  the context keeps interpret mode.
  """
  token = _INTERPRET.set(bool(enabled))
  try:
    yield
  finally:
    _INTERPRET.reset(token)
