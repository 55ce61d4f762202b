"""Shared pieces of the quantize / dequantize kernels.

Everything here is plain ``jnp``/``lax`` on int32 and float32 values, so the
same code runs inside a Pallas-Triton kernel on the GPU and in Pallas
interpret mode on the CPU. Triton has no float4/float8 conversions on Hopper,
so element and scale codes are built from the float32 bit pattern with
integer arithmetic (round to nearest even, saturating), which also makes them
independent of how a backend treats float32 subnormals.

Layout helpers: a quantized array of shape ``S`` with block axis ``axis`` is
seen as ``(A, K, C)`` (``A``: the axes before, ``K``: the block axis, ``C``:
the axes after). ``C == 1`` is the "row" layout (blocks contiguous in memory,
kernel tiles ``(bm, bk)``); otherwise the "column" layout (a block is
``block_size`` rows of one column, kernel tiles ``(bk, bc)`` for one ``a``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4jax.formats import Format

__all__ = [
    "ElemCodec",
    "compiler_params",
    "round_to_grid",
    "sign_code",
    "decode_magnitude",
    "split_axis",
    "pack_pairs",
    "unpack_pairs",
    "flush_f32",
]

_F32_ABS = 0x7FFFFFFF
_F32_MANT = 23
_F32_BIAS = 127


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler parameters under their name in this jax version."""
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


# ---- element / scale codecs -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ElemCodec:
  """A small float format as the integers needed to encode it from float32 bits.

  Attributes:
    nmant: explicit mantissa bits ``p``.
    emin: exponent of the smallest normal binade (``finfo.minexp``).
    max_code: magnitude code of the largest finite value (saturation).
    sign_shift: position of the sign bit in the code.
  """

  nmant: int
  emin: int
  max_code: int
  sign_shift: int

  @classmethod
  @functools.cache
  def of(cls, dtype) -> "ElemCodec":
    fi = ml_dtypes.finfo(dtype)
    # numpy stores every ml_dtypes float in whole bytes, the code in the low bits.
    code = int(np.array(fi.max, dtype=dtype).view(np.uint8))
    return cls(nmant=int(fi.nmant), emin=int(fi.minexp), max_code=code, sign_shift=int(fi.bits) - 1)


def f32_to_i32(x):
  """float32 -> int32 bit pattern (sign in bit 31)."""
  return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def i32_to_f32(b):
  return lax.bitcast_convert_type(b.astype(jnp.int32), jnp.float32)


def flushed_bits(x):
  """float32 bits with subnormals set to signed zero (the reference's flush)."""
  bits = f32_to_i32(x)
  is_sub = (bits & 0x7F800000) == 0
  return jnp.where(is_sub, bits & jnp.int32(-(2**31)), bits)


@functools.cache
def _special_values(dtype) -> tuple:
  codec = ElemCodec.of(dtype)
  out = []
  for c in range(codec.max_code + 1, 1 << codec.sign_shift):
    raw = np.array([c], np.uint8)
    val = (raw.astype(ml_dtypes.uint4) if codec.sign_shift == 3 else raw).view(dtype).astype(np.float32)[0]
    out.append((c, float(val)))
  return tuple(out)


def special_values(dtype) -> dict:
  """``{magnitude code: float}`` for the NaN / Inf codes above the largest finite one."""
  return dict(_special_values(np.dtype(dtype)))


def decode_magnitude(code, codec: ElemCodec):
  """float32 value of a magnitude code (exact)."""
  p, emin = codec.nmant, codec.emin
  e_field = code >> p
  mant = code & ((1 << p) - 1)
  sig = jnp.where(e_field == 0, mant, mant + (1 << p)).astype(jnp.float32)
  exp = jnp.maximum(e_field, 1) - 1 + emin - p
  return sig * i32_to_f32((exp + _F32_BIAS) << _F32_MANT)


def round_to_grid(a, codec: ElemCodec):
  """Rounds ``a`` (float32, ``0 <= a <= max``) to the format's grid, ties to even.

  Adding ``m``, a power of two whose float32 ulp is the grid step at ``a``,
  makes the FPU round at that step (round-to-nearest-even, the default mode);
  ``bits(a + m) - bits(m)`` is then the rounded value's index in its binade,
  from which the code follows. Exact, and a handful of instructions.

  Returns:
    ``(code, value)``: int32 magnitude codes and the rounded float32 values
    (decoded from the codes: ``(a + m) - m`` would be exact too, but a
    compiler allowed to reassociate folds it to ``a``).
  """
  p, emin = codec.nmant, codec.emin
  lo = np.float32(2.0**emin)
  m_bits = (f32_to_i32(jnp.maximum(a, lo)) & 0x7F800000) + ((_F32_MANT - p) << _F32_MANT)
  z = a + i32_to_f32(m_bits)
  code = f32_to_i32(z) - m_bits + (m_bits >> (_F32_MANT - p)) - ((_F32_BIAS + _F32_MANT - p + emin) << p)
  return code, decode_magnitude(code, codec)


def sign_code(y_bits, codec: ElemCodec):
  """The code's sign bit for a value with float32 bits ``y_bits`` (int32)."""
  return (y_bits >> (31 - codec.sign_shift)) & (1 << codec.sign_shift)


# ---- tile reshaping -----------------------------------------------------------
def split_axis(v, axis: int, size: int):
  """Splits ``axis`` of ``v`` into ``(n // size, size)``; returns the view."""
  shape = v.shape
  return v.reshape(*shape[:axis], shape[axis] // size, size, *shape[axis + 1:])


def pack_pairs(codes, axis: int):
  """int32 4-bit codes -> uint8, element ``2i`` in the low nibble, along ``axis``."""
  pairs = split_axis(codes, axis, 2)
  if axis != codes.ndim - 1:  # Triton splits only a trailing axis of size 2
    perm = [d for d in range(pairs.ndim) if d != axis + 1] + [axis + 1]
    pairs = jnp.transpose(pairs, perm)
  lo, hi = lax.unstack(pairs, axis=-1)
  return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_pairs(packed, axis: int):
  """uint8 -> int32 4-bit codes, twice as long along ``axis`` (inverse of pack_pairs)."""
  b = packed.astype(jnp.int32)
  lo, hi = b & 0xF, b >> 4
  pairs = jnp.stack([lo, hi], axis=-1)  # Triton joins along a new trailing axis
  if axis != packed.ndim - 1:
    perm = list(range(axis + 1)) + [packed.ndim] + list(range(axis + 1, packed.ndim))
    pairs = jnp.transpose(pairs, perm)
  shape = packed.shape
  return pairs.reshape(*shape[:axis], 2 * shape[axis], *shape[axis + 1:])


def flush_f32(x):
  """Float32 subnormals to signed zero (exactly, by bits)."""
  return i32_to_f32(flushed_bits(x))


def tile_fits(tile, shape, axis: int, multiple: int) -> bool:
  """Whether ``tile`` divides ``shape`` and its side along ``axis`` is a multiple of ``multiple``."""
  return tile[axis] % multiple == 0 and all(n % t == 0 for n, t in zip(shape, tile))


def spec_axes(entry) -> tuple:
  """The mesh axes of one ``PartitionSpec`` entry: None, one name or a tuple of names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_of_2d(sharding, mesh, shape):
  """A 2-D operand's sharding as a ``custom_partitioning`` rule sees it: the spec's two entries, the number of
  devices along each axis, and one shard's shape (rounded down)."""
  spec = (tuple(getattr(sharding, "spec", None) or ()) + (None, None))[:2]
  counts = [math.prod(mesh.shape[a] for a in spec_axes(p)) for p in spec]
  return spec, counts, [n // c for n, c in zip(shape, counts)]


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pow2_at_most(n: int) -> int:
  return 1 << (max(int(n), 1).bit_length() - 1)


def as_3d(shape, axis: int):
  """(A, K, C) for a shape and a (negative) block axis."""
  axis = axis % len(shape)
  return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def unsupported_layout(shape, fmt: Format, axis: int, packed_last: bool) -> str | None:
  """Why the quantize/dequantize kernels cannot hold ``fmt`` data of ``shape``, or None.

  The checks both kernels share: native 4- or 8-bit elements, 8-bit E8M0 or
  E4M3 scales, whole blocks along ``axis``, and an even last dimension when
  4-bit codes are packed in pairs along it.
  """
  if fmt.elem_storage != "native":
    return f"{fmt!r} stores its elements as {fmt.elem_storage!r} (XLA path only)"
  if fmt.scale_finfo.bits != 8 or fmt.elem_bits not in (4, 8):
    return f"{fmt!r}: only 4- and 8-bit elements with 8-bit scales"
  if fmt.has_global_scale and fmt.power_of_two_scales:
    return f"{fmt!r}: a global scale with power-of-two block scales"
  if not fmt.power_of_two_scales and np.dtype(fmt.scale_dtype) != np.dtype(jnp.float8_e4m3fn):
    return f"{fmt!r}: block scales must be E8M0 or E4M3"
  if len(shape) == 0:
    return "a scalar"
  _, k, c = as_3d(shape, axis)
  if k % fmt.block_size:
    return f"length {k} along axis {axis} is not a multiple of the block size {fmt.block_size}"
  if fmt.elem_bits == 4 and c > 1 and packed_last and c % 2:
    return f"odd last dimension {c} cannot hold packed 4-bit pairs"
  return None


# ---- tiling shared by the kernels --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile sizes and launch parameters of the quantize / dequantize kernels.

  Attributes:
    block_m: tile extent across blocks: rows of the ``(A, K)`` matrix (row
      layout) or columns of a ``(K, C)`` slab (column layout). Power of 2.
    block_k: tile extent along the block axis; a power-of-2 multiple of the
      format's block size.
    num_warps: Triton warps per program.
    num_stages: Triton pipelining depth (1: no loop to pipeline).
  """

  block_m: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 1

  def check(self, fmt: Format, shape3d=None, packed_last: bool = False):
    """Raises ValueError for tiles the kernels cannot use for ``fmt`` (and the ``(A, K, C)`` view)."""
    for name in ("block_m", "block_k"):
      v = getattr(self, name)
      if v <= 0 or v & (v - 1):
        raise ValueError(f"Config.{name} must be a positive power of 2, got {v}")
    if self.block_k % fmt.block_size:
      raise ValueError(f"Config.block_k={self.block_k} is not a multiple of {fmt!r}'s block size {fmt.block_size}")
    if fmt.elem_bits == 4 and packed_last and shape3d is not None and shape3d[2] > 1 and self.block_m < 2:
      raise ValueError(f"Config.block_m={self.block_m}: a column tile of 4-bit codes packed two a byte along the "
                       f"last axis needs block_m >= 2 (array viewed as {tuple(shape3d)})")


def default_tiles(shape3d, fmt: Format, itemsize: int) -> TileConfig:
  """About 8K elements a tile (16 KiB of bf16), at least one block deep."""
  a, k, c = shape3d
  elems = 8192
  if c == 1:
    bk = max(fmt.block_size, min(512, 1 << (k - 1).bit_length()))
    bm = max(1, min(elems // bk, 1 << (max(a, 1) - 1).bit_length()))
  else:
    bm = max(2, min(256, 1 << (c - 1).bit_length()))
    bk = max(fmt.block_size, min(elems // bm, 1 << (k - 1).bit_length()))
  return TileConfig(block_m=bm, block_k=bk, num_warps=4 if bm * bk <= 4096 else 8)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Grid and tile geometry of one kernel launch over an ``(A, K, C)`` view.

  Row layout (``C == 1``): grid ``(A / bm, K / bk)``, tiles ``(bm, bk)``, the
  block axis is tile axis 1. Column layout: grid ``(A, K / bk, C / bm)``,
  tiles ``(bk, bm)`` of one ``(K, C)`` slab, the block axis is tile axis 0.
  ``extents[ax]`` is the array extent along tile axis ``ax`` where the last
  tile is partial (loads and stores are then masked), else None.
  """

  shape3d: tuple
  bm: int
  bk: int

  @property
  def col(self) -> bool:
    return self.shape3d[2] > 1

  @property
  def kax(self) -> int:
    return 0 if self.col else 1

  @property
  def tile(self) -> tuple:
    return (self.bk, self.bm) if self.col else (self.bm, self.bk)

  @property
  def grid(self) -> tuple:
    a, k, c = self.shape3d
    if self.col:
      return (a, cdiv(k, self.bk), cdiv(c, self.bm))
    return (cdiv(a, self.bm), cdiv(k, self.bk))

  @property
  def extents(self) -> tuple:
    a, k, c = self.shape3d
    if self.col:
      return (k if k % self.bk else None, c if c % self.bm else None)
    return (a if a % self.bm else None, k if k % self.bk else None)

  def view(self, x):
    """The array as the 2-D (row) or 3-D (column) operand of the kernel."""
    a, k, c = self.shape3d
    return x.reshape((a, k, c) if self.col else (a, k))

  def array_shape(self, k_div: int = 1, m_div: int = 1) -> tuple:
    """Shape of an operand whose block axis is ``k_div`` and other axis ``m_div`` times shorter."""
    a, k, c = self.shape3d
    if self.col:
      return (a, k // k_div, c // m_div)
    return (a // m_div, k // k_div)

  def spec(self, k_div: int = 1, m_div: int = 1) -> pl.BlockSpec:
    """BlockSpec of such an operand, tile for tile with the input."""
    if self.col:
      return pl.BlockSpec((None, self.bk // k_div, self.bm // m_div), lambda n, j, i: (n, j, i))
    return pl.BlockSpec((self.bm // m_div, self.bk // k_div), lambda i, j: (i, j))

  def scalar_spec(self) -> pl.BlockSpec:
    """A (1,) operand every program reads."""
    return pl.BlockSpec((1,), (lambda n, j, i: (0,)) if self.col else (lambda i, j: (0,)))

  def program_spec(self) -> pl.BlockSpec:
    """One element per program of an output shaped like the grid."""
    if self.col:
      return pl.BlockSpec((None, None, None), lambda n, j, i: (n, j, i))
    return pl.BlockSpec((None, None), lambda i, j: (i, j))

  # -- inside the kernel --
  def _start(self, ax: int):
    pid = pl.program_id(1) if ax == self.kax else pl.program_id(2 if self.col else 0)
    return pid * self.tile[ax]

  def mask(self, shape):
    """Validity mask of a tile of ``shape`` (a divisor of the input tile), or None."""
    m = None
    for ax in range(2):
      if self.extents[ax] is None:
        continue
      ratio = self.tile[ax] // shape[ax]
      idx = self._start(ax) // ratio + lax.broadcasted_iota(jnp.int32, shape, ax)
      ok = idx < cdiv(self.extents[ax], ratio)
      m = ok if m is None else m & ok
    return m

  def load(self, ref):
    m = self.mask(ref.shape)
    return ref[...] if m is None else plgpu.load(ref, mask=m, other=0)

  def store(self, ref, value):
    m = self.mask(ref.shape)
    if m is None:
      ref[...] = value
    else:
      plgpu.store(ref, value, mask=m)
