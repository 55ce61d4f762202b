"""Placing QArrays on a device mesh.

``quantize`` and ``dequantize`` need no help under ``jit`` on sharded inputs:
every block is reduced within itself, so when each shard holds whole blocks
along the block axis, XLA keeps values and scales sharded like the input and
inserts no all-gather (NVFP4 adds one all-reduce, for the tensor amax behind
its global scale). A shard boundary inside a block forces XLA to gather the
block axis (or, with ``AxisType.Explicit`` mesh axes, the reshape into blocks
fails). These helpers check that condition and build matching shardings for
QArrays, e.g. to ``jax.device_put`` a checkpoint or as orbax restore targets.

Under ``jax.shard_map`` each device quantizes its own shard; NVFP4's tensor
amax then needs ``fp4jax.quantize(..., axis_name=...)`` (or
``QatConfig(axis_name=...)``) to be the amax of the whole tensor.
:func:`qarray_partition_spec` gives a QArray's ``in_specs`` / ``out_specs``,
and :func:`hlo_collectives` lists the collectives of a compiled program, to
check that nothing is gathered.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from fp4jax.formats import Format, get_format
from fp4jax.qarray import QArray, normalize_axis

__all__ = ["check_block_sharding", "qarray_sharding", "qarray_partition_spec", "shard_qarray",
           "abstract_with_sharding", "Collective", "hlo_collectives", "COLLECTIVE_OPS"]

#: XLA's collective opcodes (their asynchronous ``-start`` forms count as the op).
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                  "collective-permute", "collective-broadcast")


def check_block_sharding(shape, sharding: jax.sharding.Sharding, fmt: Format | str, axis: int = -1) -> None:
  """Raises ValueError unless every shard of ``shape`` holds whole blocks along ``axis``.

  Args:
    shape: the logical (unquantized) shape.
    sharding: how the array is (or will be) laid out, e.g. ``NamedSharding``.
    fmt: the format, whose ``block_size`` consecutive elements share a scale.
    axis: the block axis.
  """
  fmt = get_format(fmt)
  shape = tuple(shape)
  ax = normalize_axis(axis, len(shape), shape)
  try:
    shard = sharding.shard_shape(shape)
  except ValueError as e:
    raise ValueError(f"sharding {sharding} does not divide shape {shape}: {e}") from None
  if shard[ax] % fmt.block_size:
    raise ValueError(
        f"shape {shape} sharded as {sharding} gives shards of length {shard[ax]} along block axis "
        f"{axis}, not a multiple of {fmt!r}'s block size {fmt.block_size}: a shard boundary would "
        "fall inside a block, and quantizing would gather the axis"
    )


def qarray_sharding(q: QArray, sharding: NamedSharding) -> QArray:
  """Shardings for each leaf of ``q``: a QArray-shaped pytree for ``device_put``, ``jit`` or orbax.

  ``values`` and ``scales`` get ``sharding`` (the scales have the values' rank,
  so one ``PartitionSpec`` fits both); ``global_scale`` is replicated. A
  ``"rows"`` QArray's leaves are ``(N, K...)`` whatever its logical
  orientation, so they get the logical spec with its ``N`` and ``K`` entries
  in that order: sharding a ``(K, N)`` weight along ``N`` shards its byte rows.

  Args:
    q: a QArray, or its abstract form (``jax.eval_shape``), of shape ``S``.
    sharding: a ``NamedSharding`` for an array of shape ``S`` (the logical
      shape, for either storage layout).

  Raises:
    ValueError: if a shard would split a block (see :func:`check_block_sharding`).
  """
  if not isinstance(q, QArray):
    raise ValueError(f"qarray_sharding expects a fp4jax.QArray, got {type(q).__name__}")
  if not isinstance(sharding, NamedSharding):
    raise ValueError(f"qarray_sharding expects a NamedSharding, got {type(sharding).__name__}")
  for axis in q.block_axes:  # 2-D blocks must not be split along either axis
    check_block_sharding(q.shape, sharding, q.fmt, axis)
  if q.global_scale is not None and len(q.global_scale.shape) > 0:
    raise ValueError(f"qarray_sharding: a per-group global scale of shape {tuple(q.global_scale.shape)} "
                     "has no sharding rule yet; use a tensor-wide global scale")
  replicated = None if q.global_scale is None else NamedSharding(sharding.mesh, PartitionSpec())
  leaves = NamedSharding(sharding.mesh, _leaf_spec(q, sharding.spec))
  return QArray(leaves, leaves, replicated, q.fmt, q.axis, q.block_shape, q.layout)


def _leaf_spec(q: QArray, spec: PartitionSpec) -> PartitionSpec:
  """The spec of ``q``'s values and scales for ``spec``, a spec of its logical shape.

  A ``"rows"`` QArray's leaves are ``(N, K...)`` whatever its logical
  orientation: a ``(K, N)`` weight's spec is reversed.
  """
  if q.layout != "rows":
    return spec
  entries = tuple(spec) + (None,) * (2 - len(spec))
  return PartitionSpec(*(entries[::-1] if q.axis == -2 else entries))


def qarray_partition_spec(q: QArray, spec: PartitionSpec) -> QArray:
  """``shard_map`` ``in_specs`` / ``out_specs`` for ``q``: a QArray-shaped pytree of PartitionSpecs.

  ``values`` and ``scales`` get ``spec``; ``global_scale`` gets ``P()``
  (replicated: under ``shard_map`` it must then be the same on every shard,
  which for a global scale computed inside needs ``quantize(...,
  axis_name=...)``).

  Args:
    q: a QArray, or its abstract form (``jax.eval_shape``).
    spec: a ``PartitionSpec`` for an array of ``q``'s shape (the logical
      shape, for either storage layout: a ``"rows"`` QArray's leaves get it
      in their own axis order, as in :func:`qarray_sharding`). A shard must
      hold whole blocks (:func:`check_block_sharding`); inside ``shard_map``
      a local shape that is not whole blocks fails ``quantize``'s checks.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"qarray_partition_spec expects a fp4jax.QArray, got {type(q).__name__}")
  if not isinstance(spec, PartitionSpec):
    raise ValueError(f"qarray_partition_spec expects a PartitionSpec, got {type(spec).__name__}")
  if q.global_scale is not None and len(q.global_scale.shape) > 0:
    raise ValueError(f"qarray_partition_spec: a per-group global scale of shape {tuple(q.global_scale.shape)} "
                     "has no sharding rule yet; use a tensor-wide global scale")
  leaves = _leaf_spec(q, spec)
  return QArray(leaves, leaves, None if q.global_scale is None else PartitionSpec(), q.fmt, q.axis, q.block_shape,
                q.layout)


def shard_qarray(q: QArray, sharding: NamedSharding) -> QArray:
  """``jax.device_put(q, qarray_sharding(q, sharding))``."""
  return jax.device_put(q, qarray_sharding(q, sharding))


def abstract_with_sharding(q: Any, sharding: NamedSharding) -> QArray:
  """``q``'s leaves as ``jax.ShapeDtypeStruct``s carrying :func:`qarray_sharding`: an orbax restore target."""
  shardings = qarray_sharding(q, sharding)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), q, shardings)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program.

  Attributes:
    op: the opcode, one of :data:`COLLECTIVE_OPS` (``all-reduce-start`` is
      reported as ``all-reduce``).
    name: the instruction's name in the HLO text.
    shapes: ``(dtype, dims)`` of each buffer of its result (an asynchronous
      start returns a tuple: operands and results).
  """

  op: str
  name: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]

  @property
  def elements(self) -> int:
    """The element count of its largest buffer (1 for a scalar)."""
    return max((math.prod(d) for _, d in self.shapes), default=0)

  def __str__(self) -> str:
    return f"{self.op} " + ", ".join(f"{t}[{','.join(map(str, d))}]" for t, d in self.shapes)


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s(?P<op>"
                          + "|".join(re.escape(o) for o in sorted(COLLECTIVE_OPS, key=len, reverse=True))
                          + r")(?:-start)?\(", re.M)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def hlo_collectives(hlo_text: str) -> list[Collective]:
  """The collectives in an HLO module's text, e.g. ``jitted.lower(*args).compile().as_text()``.

  Each instruction counts once (an async ``-start``/``-done`` pair as its
  start; a collective wrapped in an ``async-start`` as the wrapped one).
  Sharded ``quantize`` / ``dequantize`` / matmuls with whole blocks per shard
  should show no ``all-gather``: only the ``all-reduce`` of NVFP4's scalar
  amax, and of partial sums where a contracting axis is sharded.
  """
  out = []
  for m in _INSTRUCTION.finditer(hlo_text):
    shapes = tuple((t, tuple(int(v) for v in d.split(",") if v)) for t, d in _SHAPE.findall(m.group("type")))
    out.append(Collective(m.group("op"), m.group("name"), shapes))
  return out
