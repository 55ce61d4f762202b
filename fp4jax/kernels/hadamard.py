"""The random Hadamard transform inside Triton kernels, and the tensor amax of a transformed operand.

``transform_tile`` is :func:`fp4jax.hadamard.butterfly` on one 2-D tile, the same float32 operations in the
same order (tests/test_kernels_fake_quant.py checks the bits), written in operations Triton lowers; along the
lanes :func:`read_tile` applies it across the planes of the tile's runs instead (:func:`lane_planes`), where each
step is elementwise. The fused fake-quantization kernel reads an operand and transforms each tile itself; NVFP4's
global scale needs the tensor amax of the transformed values before that pass, which :func:`transformed_amax`
computes in one read pass of its own, from lane planes or row planes (the operand read through one block spec a
plane), by the butterfly's sums alone where no flush can change them. XLA cannot do either well: fusing one
butterfly stage into the next computes the first twice, so it writes every stage out (an (8192, 14336) operand:
five float32 passes of about 0.47 ms each on the H200, benchmarks/results/rht_fused.json).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from fp4jax.hadamard import flush_below_normal, grouped_shape
from fp4jax.kernels import common as C

__all__ = ["transform_tile", "transformed_amax", "AMAX_CELL"]

#: The partial maxima's granularity: each program writes the max of every 16 x 16 cell of its tile, so the
#: partial array's shape, (R / 16, C / 16), does not depend on the tile (a shard's is its part of it).
AMAX_CELL = 16
_F32_INF_BITS = 0x7F800000


def transform_tile(v, axis: int, n: int, signs):
  """``fp4jax.hadamard.butterfly(v, axis, n, signs)`` of a 2-D float32 tile. Triton cannot slice a tile, so
  each stage splits the pairs by a reshape and combines them by sums over the pair axis: ``a + b`` and
  ``a + (-b)``, which is ``a - b`` exactly."""
  shape = v.shape
  v = v.reshape(grouped_shape(shape, axis, n)) * signs.reshape((1, n, 1) if axis == 0 else (1, 1, n))
  v = flush_below_normal(v).reshape(shape)
  h = 1
  while h < n:
    t = v.reshape(grouped_shape(shape, axis, 2, h))  # (..., pairs, 2, h, ...): a at index 0, b at 1
    first = lax.broadcasted_iota(jnp.int32, t.shape, axis + 1) == 0
    both = jnp.sum(t, axis=axis + 1, keepdims=True)
    diff = jnp.sum(jnp.where(first, t, -t), axis=axis + 1, keepdims=True)
    v = flush_below_normal(jnp.where(first, both, diff)).reshape(shape)
    h *= 2
  return flush_below_normal(v * np.float32(1 / math.sqrt(n)))


def lane_planes(v, n: int) -> list:
  """The ``n`` planes of a 2-D tile's runs of ``n`` along its lanes: ``planes[k][i, g] == v[i, n * g + k]``.

  Each run is halved by its last axis of 2 (``v[..., 2j + t]``: ``tt.split`` in Triton, free once a thread holds
  a run), ``log2 n`` times, so the butterfly between planes is elementwise: no pair splits along the lanes at
  every stage. The tensors stay 3-D or 4-D, the ranks the kernels' other reshapes take."""
  parts = {0: v.reshape(v.shape[0], v.shape[1] // n, n)}
  b = 0
  while len(parts) < n:  # the last axis of 2 is bit b of k
    parts = {k | (t << b): half for k, p in parts.items()
             for t, half in enumerate(lax.unstack(p.reshape(*p.shape[:2], p.shape[2] // 2, 2), axis=-1))}
    b += 1
  return [parts[k].reshape(v.shape[0], v.shape[1] // n) for k in range(n)]


def from_lane_planes(planes):
  """The tile of :func:`lane_planes`' planes: plane ``k`` and ``k + n / 2`` joined along a new last axis
  (``tt.join``), then those two at a time the same way, each run's trailing axes merged as they grow, so
  element ``k`` of every run lands at index ``k``."""
  while len(planes) > 1:
    half = len(planes) // 2
    planes = [jnp.stack([planes[k], planes[k + half]], axis=-1) for k in range(half)]
    planes = [p.reshape(*p.shape[:2], -1) for p in planes]
  (t,) = planes
  return t.reshape(t.shape[0], -1)


def planes_butterfly(planes, signs, flush=flush_below_normal, scale: bool = True):
  """:func:`fp4jax.hadamard.butterfly` across ``n`` planes (``signs``: ``n`` arrays that broadcast against
  them): the same float32 operations in the same order, each one elementwise. ``flush=None, scale=False``:
  the sums alone (:func:`_plane_cells`' fast path)."""
  n, flush = len(planes), flush or (lambda v: v)
  planes = [flush(p * s) for p, s in zip(planes, signs)]
  h = 1
  while h < n:
    nxt = list(planes)
    for i in range(n):
      if not i & h:  # a at i, b at i + h: a + b and a - b, as the butterfly's partner sums
        nxt[i], nxt[i + h] = flush(planes[i] + planes[i + h]), flush(planes[i] - planes[i + h])
    planes, h = nxt, h * 2
  return [flush(p * np.float32(1 / math.sqrt(n))) for p in planes] if scale else planes


#: The largest transform done on lane planes (:func:`read_tile` along axis 1); a longer one splits pairs along
#: the lanes (:func:`transform_tile`), its n log n elementwise steps being too many for one kernel.
LANE_PLANES_MAX = 32


def _on_lane_planes(axis: int, n: int) -> bool:
  """Whether a tile's ``n``-point transform along ``axis`` runs across lane planes (:func:`lane_planes`)."""
  return bool(n) and axis == 1 and n <= LANE_PLANES_MAX


def _sign_planes(sign_ref, n: int) -> list:
  return lane_planes(sign_ref[...].reshape(1, n), n)  # (1, 1) each


def read_tile(x_ref, sign_ref, axis: int, n: int):
  """The tile as float32, transformed along ``axis`` where ``n`` (the transform's size) is not 0."""
  if _on_lane_planes(axis, n):
    planes = lane_planes(x_ref[...].astype(jnp.float32), n)
    return from_lane_planes(planes_butterfly(planes, _sign_planes(sign_ref, n)))
  v = x_ref[...].astype(jnp.float32)
  return transform_tile(v, axis, n, sign_ref[...]) if n else v


class _AmaxCall(NamedTuple):
  axis: int
  n: int
  interpret: bool
  tiles: tuple  # candidate tiles, the first that fits the (local) array runs
  num_warps: int


def _finite_magnitudes(v):
  """float32 ``v``'s magnitudes as int32 bits (nondecreasing in the magnitude), NaN and Inf as 0."""
  bits = C.f32_to_i32(v) & 0x7FFFFFFF
  return jnp.where(bits < _F32_INF_BITS, bits, 0)


#: float32's spacing is 2**-125 or more from 2**-102 up (the bits of 2**-102), see :func:`_plane_cells`.
_SPACING_2M125_BITS = (127 - 102) << 23


def _has_tiny(v):
  """Whether float32 ``v`` holds a nonzero magnitude below 2**-102 (an int32 0 or 1, of the whole tile)."""
  bits = C.f32_to_i32(v) & 0x7FFFFFFF
  tiny = jnp.where((bits > 0) & (bits < _SPACING_2M125_BITS), 1, 0)
  return jnp.max(jnp.max(tiny, axis=1), axis=0)


def _plane_cells(planes, signs, tiny, cells_of):
  """``cells_of`` (int32 magnitudes, one array a plane -> the tile's cells, by maxima) of the planes' transform's
  finite magnitudes (NaN and Inf as 0), the butterfly's flushes and scale included.

  Where the tile holds no ``tiny`` magnitude (nonzero and below 2**-102), it computes the sums alone and scales
  and flushes the cells' maxima: every input is then 0 or a multiple of 2**-125 (float32's spacing from 2**-102
  up), and so is every sum of two (exact before rounding, and rounding to float32 keeps a multiple of 2**-125: it
  is exact below 2**-101 and lands on a spacing of 2**-124 or more above), so no sum is a nonzero below 2**-125:
  the butterfly's flushes change nothing but the sign of a zero, which no magnitude sees. The final ``* (1 /
  sqrt(n))`` rounded and flushed is nondecreasing in the magnitude, so it commutes with the maximum. The fast
  path spends about half the operations an element (benchmarks/experiments/rht_amax.py times it against the exact
  path)."""
  n = len(planes)

  def exact():
    return cells_of([_finite_magnitudes(p) for p in planes_butterfly(planes, signs)])

  def fast():
    top = cells_of([_finite_magnitudes(p) for p in planes_butterfly(planes, signs, flush=None, scale=False)])
    return C.f32_to_i32(flush_below_normal(C.i32_to_f32(top) * np.float32(1 / math.sqrt(n))))

  return lax.cond(tiny > 0, exact, fast)


def _lane_cells(magnitudes):
  """The maxima of each row's runs of :data:`AMAX_CELL` lanes, ``(r, c / cell)``, from the magnitudes of the tile's
  :func:`lane_planes` (``n`` of them, ``(r, c / n)`` each): elementwise maxima across planes, no join back into
  the tile's order."""
  n = len(magnitudes)
  if n <= AMAX_CELL:  # one maximum a run, then AMAX_CELL / n runs a cell
    runs = functools.reduce(jnp.maximum, magnitudes)
    return jnp.max(C.split_axis(runs, 1, AMAX_CELL // n), axis=2) if n < AMAX_CELL else runs
  # A run holds n / AMAX_CELL cells: planes [k * cell, (k + 1) * cell) make cell k, joined in the lanes' order.
  return from_lane_planes([functools.reduce(jnp.maximum, magnitudes[k:k + AMAX_CELL])
                           for k in range(0, n, AMAX_CELL)])


def _row_cells(magnitudes):
  """The tile's cells from the magnitudes of its ``n`` row planes (``(r / n, c)`` each)."""
  n = len(magnitudes)
  groups = functools.reduce(jnp.maximum, magnitudes)  # (r / n, c): each group's per lane
  if n < AMAX_CELL:  # AMAX_CELL / n groups a cell
    groups = jnp.max(C.split_axis(groups, 0, AMAX_CELL // n), axis=1)
  return jnp.max(C.split_axis(groups, 1, AMAX_CELL), axis=2)  # (r / cell, c / cell)


def _cells_of_rows(rows):
  return jnp.max(C.split_axis(rows, 0, AMAX_CELL), axis=1)  # (r, c / cell) -> (r / cell, c / cell)


def _amax_kernel(x_ref, sign_ref, o_ref, *, axis: int, n: int):
  if _on_lane_planes(axis, n):
    # Along the lanes the maxima come straight from the transformed planes: the tile is never put back together.
    x = x_ref[...].astype(jnp.float32)
    o_ref[...] = _plane_cells(lane_planes(x, n), _sign_planes(sign_ref, n), _has_tiny(x),
                              lambda m: _cells_of_rows(_lane_cells(m)))
  else:
    # Two 3-D splits, the shapes the fake-quantization kernel's blocks already take in Triton.
    rows = jnp.max(C.split_axis(_finite_magnitudes(read_tile(x_ref, sign_ref, axis, n)), 1, AMAX_CELL), axis=2)
    o_ref[...] = _cells_of_rows(rows)


def _amax_row_planes_kernel(*refs, n: int):
  """:func:`_amax_kernel` along the rows from ``n`` row planes (``refs``: the planes, the signs, the output)."""
  *x_refs, sign_ref, o_ref = refs
  planes = [r[...].astype(jnp.float32) for r in x_refs]
  tiny = functools.reduce(jnp.maximum, map(_has_tiny, planes))
  o_ref[...] = _plane_cells(planes, _sign_planes(sign_ref, n), tiny, _row_cells)


#: The largest transform along the rows (axis 0) that the amax pass reads as row planes: the operand viewed
#: (R / n, n, C) through ``n`` block specs, plane ``k`` the rows ``n g + k`` of the tile, so that the butterfly is
#: elementwise across planes, as along the lanes (Triton cannot slice a tile, and pair splits along the rows cost
#: the pass ~100 us on an (8192, 14336) operand on the H200: benchmarks/results/rht_amax.json). Up to a cell's
#: 16 rows: a longer group's cells would have to be interleaved back along the rows.
ROW_PLANES_MAX = AMAX_CELL


def _on_row_planes(axis: int, n: int) -> bool:
  return axis == 0 and 0 < n <= ROW_PLANES_MAX


def _tile(call: _AmaxCall, shape):
  return next((t for t in call.tiles if C.tile_fits(t, shape, call.axis, call.n)), None)


def _amax_pallas(call: _AmaxCall, x, signs):
  tile = _tile(call, x.shape)
  cell = (tile[0] // AMAX_CELL, tile[1] // AMAX_CELL)
  if _on_row_planes(call.axis, call.n):
    n = call.n  # the same operand n times, each block spec reading one plane of the tile
    operands = [x.reshape(x.shape[0] // n, n, x.shape[1])] * n
    specs = [pl.BlockSpec((tile[0] // n, None, tile[1]), functools.partial(lambda i, j, k: (i, k, j), k=k))
             for k in range(n)]
    kernel = functools.partial(_amax_row_planes_kernel, n=n)
  else:
    operands, specs = [x], [pl.BlockSpec(tile, lambda i, j: (i, j))]
    kernel = functools.partial(_amax_kernel, axis=call.axis, n=call.n)
  return pl.pallas_call(
      kernel,
      grid=(x.shape[0] // tile[0], x.shape[1] // tile[1]),
      in_specs=[*specs, pl.BlockSpec(signs.shape, lambda i, j: (0,))],
      out_specs=pl.BlockSpec(cell, lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((x.shape[0] // AMAX_CELL, x.shape[1] // AMAX_CELL), jnp.int32),
      compiler_params=C.compiler_params(call.num_warps, 2),
      interpret=call.interpret,
      name=f"hadamard{call.n}_amax_axis{call.axis}",
  )(*operands, signs)


def transformed_amax(x, axis: int, n: int, signs, *, tiles, num_warps: int = 4, interpret: bool = False):
  """``fp4jax.reference.finite_amax(butterfly(x, axis, n, signs))`` of 2-D ``x`` in one Pallas pass: float32,
  the max of the finite magnitudes (NaN and Inf left out, subnormals flushed by the transform).

  ``tiles``: (rows, columns) candidates, multiples of :data:`AMAX_CELL`; the first that divides ``x`` (with
  whole ``n``-point groups along ``axis``) runs. Under ``jit`` with sharded ``x`` each device reads its shard
  and XLA reduces the partial maxima across them.
  """
  call = _AmaxCall(axis, n, interpret, tuple(tuple(t) for t in tiles), num_warps)
  if _tile(call, x.shape) is None:
    raise ValueError(f"transformed_amax: shape {tuple(x.shape)} tiles by none of {call.tiles} with whole "
                     f"{n}-point groups along axis {axis}")
  return lax.bitcast_convert_type(jnp.max(_partitioned(call, x, signs)), jnp.float32)


# ---- under jit with sharded operands: each device reduces its shard (fp4jax.kernels.fake_quant does the same) --
@functools.partial(custom_partitioning, static_argnums=(0,))
def _partitioned(call: _AmaxCall, x, signs):
  return _amax_pallas(call, x, signs)


def _shard_spec(call: _AmaxCall, mesh, sharding, shape):
  spec, counts, local = C.shard_of_2d(sharding, mesh, shape)
  if any(n * c != t for n, c, t in zip(local, counts, shape)) or _tile(call, local) is None:
    return PartitionSpec(None, None)
  return PartitionSpec(*spec)


def _infer(call, mesh, arg_shapes, result_shape):
  return NamedSharding(mesh, _shard_spec(call, mesh, arg_shapes[0].sharding, arg_shapes[0].shape))


def _partition(call, mesh, arg_shapes, result_shape):
  spec = _shard_spec(call, mesh, arg_shapes[0].sharding, arg_shapes[0].shape)
  sharding = NamedSharding(mesh, spec)
  lower = lambda x, signs: _amax_pallas(call, x, signs)  # noqa: E731
  return mesh, lower, sharding, (sharding, NamedSharding(mesh, PartitionSpec()))


_partitioned.def_partition(infer_sharding_from_operands=_infer, partition=_partition,
                           sharding_rule="i j, s -> k l")
