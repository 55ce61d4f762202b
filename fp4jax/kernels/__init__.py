"""Pallas GPU kernels and the dispatch the core calls lazily for ``backend=``.

``fp4jax.quantize`` / ``fp4jax.dequantize`` call :func:`maybe_quantize` /
:func:`maybe_dequantize` unless ``backend="xla"``:

* ``backend="auto"``: the kernel on a GPU for the cases whose bits were
  shown identical to XLA's on a GPU (:func:`gpu_verified`), else None (the
  caller falls back to the XLA reference).
* ``backend="pallas"``: the kernel, or ValueError naming why it cannot run
  (unsupported case, or no GPU). Inside :func:`interpret_mode` it runs in
  Pallas interpret mode on any platform, which is how the CPU tests check
  that both back ends give the same bits.

Kernels: :mod:`~fp4jax.kernels.quantize_pack` (fused quantize + pack, and
NVFP4's tensor amax) and :mod:`~fp4jax.kernels.dequantize`.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np

__all__ = ["on_gpu", "interpret_mode", "gpu_verified", "maybe_quantize", "maybe_dequantize"]

_INTERPRET = contextvars.ContextVar("fp4jax_kernels_interpret", default=False)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


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


def gpu_verified(op: str, fmt=None, scale_rule=None, dtype=None) -> bool:
  """Whether ``backend="auto"`` takes the kernel on a GPU for this case.

  Only cases whose bits matched XLA's on the GPU in benchmarks/quantize.py
  (benchmarks/results/quantize.md): MX formats with "floor" / "ceil", and
  NVFP4 "nearest" on 16-bit inputs. Excluded, still reachable with
  ``backend="pallas"``: "mse" (on the GPU XLA's choice between candidates
  differed systematically from the CPU reference's, and so from the kernel's),
  NVFP4 "floor" / "ceil" (XLA's GPU result equals its "nearest" rule, an
  apparent elision of the float32 -> E4M3 -> float32 round trip in the
  reference), NVFP4 on float32 inputs (79 of 2**28 codes differed, XLA's
  approximate reciprocal being fused differently), and dequantize (its
  signed-zero fix has not run on a GPU yet).
  """
  if op == "dequantize":
    return False
  if scale_rule not in ("floor", "ceil", "nearest"):
    return False
  if fmt.has_global_scale:
    return scale_rule == "nearest" and np.dtype(dtype).itemsize == 2
  return True


def _runnable(backend: str, why: str | None, what: str, verified: bool = True):
  """True to run the kernel, False to fall back; raises for an impossible "pallas"."""
  interpret = _INTERPRET.get()
  if backend == "auto":
    return why is None and verified and on_gpu()
  if why is not None:
    raise ValueError(f"backend='pallas': no Pallas {what} kernel for this case: {why}")
  if not on_gpu() and not interpret:
    raise ValueError(
        f"backend='pallas' runs the {what} kernel on a GPU; the default backend is "
        f"{jax.default_backend()!r} (use fp4jax.kernels.interpret_mode() to interpret it)")
  return True


def maybe_quantize(x, fmt, *, axis, scale_rule, global_scale, hessian, pad, backend):
  """The kernel's QArray for ``fp4jax.quantize``'s arguments, or None to fall back."""
  from fp4jax.kernels import quantize_pack

  why = None
  if hessian is not None:
    why = "hessian= (Hessian-weighted 'mse') runs on the XLA path only"
  elif pad and x.shape[axis] % fmt.block_size:
    why = f"pad=True with length {x.shape[axis]} along axis {axis} (not a multiple of {fmt.block_size})"
  else:
    why = quantize_pack.supported(x.shape, x.dtype, fmt, axis, scale_rule, pack_last=True)
  if not _runnable(backend, why, "quantize", gpu_verified("quantize", fmt, scale_rule, x.dtype)):
    return None
  return quantize_pack.quantize(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale,
                                interpret=_INTERPRET.get())


def maybe_dequantize(q, *, dtype, backend):
  """The kernel's ``dequantize(q, dtype)``, or None to fall back."""
  from fp4jax.kernels import dequantize

  from fp4jax.qarray import xla_only_reason

  why = xla_only_reason(q) or dequantize.supported(q.shape, q.fmt, q.axis, np.dtype(dtype), packed_last=True)
  if why is None and q.axis != -1 and on_gpu() and not _INTERPRET.get():
    # The last GPU run found mismatches along a non-last axis whose cause is
    # not known (benchmarks/results/quantize.md): refuse rather than risk
    # wrong numbers until a GPU run shows it bit-exact.
    why = f"dequantize along axis {q.axis} (not the last) is not yet verified on the GPU"
  if not _runnable(backend, why, "dequantize", gpu_verified("dequantize", q.fmt)):
    return None
  return dequantize.dequantize(q, dtype, interpret=_INTERPRET.get())
