"""Which implementation runs a public call: the one place fp4jax decides.

``fp4jax.quantize``, ``fp4jax.dequantize`` and ``fp4jax.scaled_dot_general``
validate their arguments, ask this module once for a :class:`Plan`, and call
the implementation the plan names. The plan is made from three things:

* ``backend=``: ``"xla"`` (the reference), ``"pallas"`` (a kernel, or a
  ValueError saying why none can run), ``"auto"`` (a kernel where one exists
  for the case and its bits were confirmed on a GPU, else the reference);
* the case: why no kernel takes it (an "obstacle", ``None`` when one does),
  computed by the ``*_obstacle`` functions here from the kernels' own
  ``supported`` checks;
* the machine: a GPU, or :func:`fp4jax.kernels.interpret_mode` for tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import kernels
from fp4jax.formats import Format
from fp4jax.qarray import QArray, xla_only_reason
from fp4jax.scales import SCALE_RULES

__all__ = ["BACKENDS", "Plan", "check_backend", "choose", "GPU_UNVERIFIED", "gpu_unverified_reason",
           "gpu_verified", "sharded_reason", "quantize_obstacle", "dequantize_obstacle", "fake_quant_obstacle", "dot_kernel",
           "KERNEL_MAX_ROWS"]

BACKENDS = ("auto", "xla", "pallas")

#: Under ``backend="auto"`` on a GPU, the most ``lhs`` rows (product of its free
#: axes) for which a matmul kernel runs; above, the two-pass path. From the
#: crossover measured in benchmarks/results/matmul.md.
KERNEL_MAX_ROWS = {"w4a16": 256, "mx": 64}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one call runs.

  Attributes:
    impl: ``"kernel"`` (a Pallas kernel), ``"two_pass"`` (matmuls: exact
      bfloat16 dequantize, then XLA's GEMM) or ``"xla"`` (the reference).
    kernel: the kernel's name when ``impl`` is not ``"xla"`` (``"quantize"``,
      ``"dequantize"``, ``"w4a16"``, ``"mx"``), else ``""``.
    interpret: run the kernel in Pallas interpret mode.
    reason: why the reference runs, when it does (for errors and tests).
  """

  impl: str
  kernel: str = ""
  interpret: bool = False
  reason: str = ""


def check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


#: The kernel cases ``backend="auto"`` does not take on a GPU, each with its reason: ``(op, format
#: name, scale rule, input dtype)`` -> why, ``"*"`` matching anything. Every other kernel case is
#: taken. The kernels are built to be bit-exact in every case (``tests/test_cross_platform.py``);
#: an entry goes when a GPU run of ``benchmarks/gpu_check.py`` shows its case bit-exact there.
GPU_UNVERIFIED: dict[tuple[str, str, str, str], str] = {}


def gpu_unverified_reason(op: str, fmt: Format | None = None, scale_rule: str | None = None,
                          dtype=None) -> str | None:
  """Why ``backend="auto"`` keeps this case off the kernels on a GPU (from :data:`GPU_UNVERIFIED`), or None."""
  case = (op, "*" if fmt is None else fmt.name, scale_rule or "*", "*" if dtype is None else np.dtype(dtype).name)
  for key, why in GPU_UNVERIFIED.items():
    if all(k == "*" or k == c for k, c in zip(key, case)):
      return why
  return None


def gpu_verified(op: str, fmt: Format | None = None, scale_rule: str | None = None, dtype=None) -> bool:
  """Whether ``backend="auto"`` takes the kernel on a GPU for this case (no entry in :data:`GPU_UNVERIFIED`).

  Cases are still reachable with ``backend="pallas"``.
  """
  return gpu_unverified_reason(op, fmt, scale_rule, dtype) is None


def choose(op: str, backend: str, obstacle: str | None, *, verified: bool = True,
           interpret_without_gpu: bool = False, fallback: str = "xla") -> Plan:
  """The plan for kernel ``op`` given ``backend=`` and why no kernel takes the case.

  Args:
    op: the kernel's name, for the plan and the error messages.
    backend: ``"auto"``, ``"xla"`` or ``"pallas"`` (already checked).
    obstacle: why no kernel takes this case, or None.
    verified: whether ``"auto"`` may take the kernel (bits confirmed on a GPU).
    interpret_without_gpu: ``"pallas"`` without a GPU interprets the kernel
      instead of raising (the matmuls; quantize and dequantize ask for
      :func:`fp4jax.kernels.interpret_mode`).
    fallback: the plan's ``impl`` when ``"auto"`` does not take the kernel.

  Raises:
    ValueError: ``backend="pallas"`` and no kernel can run, naming why.
  """
  interpret = kernels.interpreting()
  gpu = kernels.on_gpu()
  if backend == "xla":
    return Plan("xla", reason="backend='xla'")
  if backend == "auto":
    if obstacle is None and verified and gpu:
      return Plan("kernel", op, interpret=interpret)
    reason = obstacle or ("not yet verified on a GPU" if not verified else "no GPU")
    return Plan(fallback, op if fallback != "xla" else "", reason=reason)
  if obstacle is not None:
    raise ValueError(f"backend='pallas': no Pallas {op} kernel for this case: {obstacle}")
  if not gpu and not (interpret or interpret_without_gpu):
    raise ValueError(
        f"backend='pallas' runs the {op} kernel on a GPU; the default backend is "
        f"{jax.default_backend()!r} (use fp4jax.kernels.interpret_mode() to interpret it)")
  return Plan("kernel", op, interpret=interpret or not gpu)


def sharded_reason(*arrays) -> str | None:
  """Why a kernel cannot take arrays whose type carries a mesh axis (``Explicit`` sharding), or None.

  ``pallas_call`` takes only unsharded types (inside ``shard_map`` each shard is one); under
  ``jit`` with ``Explicit`` mesh axes it raises. ``jax.make_mesh`` makes ``Explicit`` axes by default.
  """
  for a in jax.tree.leaves(arrays):
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None) or ()
    if any(p is not None for p in spec):
      return (f"an operand of shape {a.shape} is sharded as {spec} (Explicit mesh axes): the kernels "
              "take unsharded arrays, so call them inside jax.shard_map, one shard each")
  return None


def quantize_obstacle(x, fmt: Format, *, axis: int, scale_rule: str, global_scale, hessian, pad: bool,
                      block_shape, keep, axis_name=None) -> str | None:
  """Why no quantize kernel takes these (validated) arguments, or None."""
  from fp4jax.kernels import quantize_pack  # lazy: Pallas loads only when a kernel may run

  if axis_name is not None:
    return f"axis_name={axis_name!r}: the amax across shard_map shards is on the XLA path"
  if why := sharded_reason(x, global_scale):
    return why
  if block_shape is not None:
    return f"2-D blocks (block_shape={block_shape}) run on the XLA path only"
  if scale_rule not in SCALE_RULES:
    return f"scale_rule {scale_rule!r} runs on the XLA path only"
  if keep or (global_scale is not None and jnp.ndim(global_scale) != 0):
    return "a global scale per row / leading index runs on the XLA path only"
  if hessian is not None:
    return "hessian= (Hessian-weighted 'mse') runs on the XLA path only"
  if pad and x.shape[axis] % fmt.block_size:
    return f"pad=True with length {x.shape[axis]} along axis {axis} (not a multiple of {fmt.block_size})"
  return quantize_pack.supported(x.shape, x.dtype, fmt, axis, scale_rule, pack_last=True)


def dequantize_obstacle(q: QArray, dtype) -> str | None:
  """Why no dequantize kernel takes ``q`` (validated) to ``dtype``, or None."""
  from fp4jax.kernels import dequantize

  return (xla_only_reason(q) or sharded_reason(q)
          or dequantize.supported(q.shape, q.fmt, q.axis, np.dtype(dtype), packed_last=True))


def fake_quant_obstacle(x, fmt: Format, axis: int, scale_rule: str, key, axis_name=None,
                        view_shape=None, hadamard: int = 0) -> str | None:
  """Why the fused QAT fake-quantization kernel does not take ``x`` (``key``: None rounds to nearest), or None.

  ``view_shape``: the 2-D view of ``x`` the kernel would read (``axis`` an axis of it); default ``x.shape``.
  ``hadamard``: the size of the Hadamard transform the kernel applies first (0: none).
  """
  from fp4jax.kernels import fake_quant

  if axis_name is not None:
    return f"axis_name={axis_name!r}: the amax across shard_map shards is on the XLA path"
  if why := sharded_reason(x):
    return why
  if key is not None:
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else "threefry2x32"
    if "threefry" not in impl:
      return f"a {impl} key: the kernel draws as threefry2x32 does"
  shape = x.shape if view_shape is None else view_shape
  return fake_quant.supported(shape, x.dtype, fmt, axis, scale_rule, key is not None, hadamard)


def _block_axis(x) -> int:
  return x.axis % x.ndim


def dot_kernel(lhs, rhs, dims, out_dtype) -> tuple[str | None, str]:
  """Which matmul kernel takes validated operands: ``("w4a16" | "mx", "")`` or ``(None, why not)``."""
  (lc, rc), (lb, rb) = dims
  if lb or len(lc) != 1:
    return None, "the kernels take one contracting axis and no batch axes"
  if not isinstance(rhs, QArray) or len(rhs.shape) != 2:
    return None, "the kernels need a 2-D QArray rhs"
  for operand in (lhs, rhs):
    if isinstance(operand, QArray) and (why := xla_only_reason(operand)):
      return None, why
  if why := sharded_reason(lhs, rhs):
    return None, why
  if _block_axis(rhs) != rc[0]:
    return None, f"rhs is blocked along axis {_block_axis(rhs)}, not its contracting axis {rc[0]}"
  if not jnp.issubdtype(out_dtype, jnp.floating):
    return None, f"preferred_element_type {out_dtype} is not floating"
  if isinstance(lhs, QArray):
    if _block_axis(lhs) != lc[0]:
      return None, f"lhs is blocked along axis {_block_axis(lhs)}, not its contracting axis {lc[0]}"
    if lhs.fmt.block_size != rhs.fmt.block_size:
      return None, f"block sizes differ: {lhs.fmt!r} vs {rhs.fmt!r}"
    return "mx", ""
  if jnp.dtype(lhs.dtype) != jnp.bfloat16:
    return None, f"the w4a16 kernel takes bfloat16 activations, got {jnp.dtype(lhs.dtype)}"
  return "w4a16", ""
