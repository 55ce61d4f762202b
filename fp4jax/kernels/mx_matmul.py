"""Block-scaled x block-scaled matmul (MX x MX) on fp8 tensor cores.

``out (M, N) = dequantize(a) (M, K) @ dequantize(b).T`` for two operands held
as byte matrices (:func:`fp4jax.matmul.byte_matrix`): ``a_data (M, K*bits/8)``
with ``a_scales (M, K/32)``, and ``b_data (N, K*bits/8)`` with ``b_scales
(N, K/32)`` (the leaves of the weight stored as a ``layout="rows"`` QArray).

This is Blackwell's block-scaled MMA emulated on Hopper. Two ways to feed the
tensor cores (``Config.mma``):

* ``"fp8"``: per 32-wide ``K`` block, one fp8 product of the element codes
  (E2M1 codes become E4M3 exactly, see :mod:`.matmul_common`), then
  ``acc += p * sa[:, None] * sb[None, :]`` in float32. Exact products, one
  rounding per block. MX formats (power-of-two scales, block 32) with E2M1 or
  E4M3 elements on both sides, or E5M2 on both sides.
* ``"bf16"``: each operand dequantized to bfloat16 in registers (exact: a
  power-of-two or E4M3 scale times a 2- to 4-bit significand fits in
  bfloat16's 8 bits), then one bfloat16 product per ``block_k`` chunk. Any
  pair of formats with the same block size (NVFP4 too).

Global scales (NVFP4) multiply the float32 accumulator at the end.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fp4jax.formats import Format
from fp4jax.kernels import matmul_common as common
from fp4jax.qarray import QArray
from fp4jax.reference import scaled_dot_general_reference

__all__ = ["Config", "mx_matmul", "mx_matmul_reference", "default_config", "fp8_mma_supported"]

_FP8_BLOCK = 32  # one fp8 tensor-core K step (wgmma k32) per scale block


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes (powers of two, >= 16; ``block_k`` a multiple of the block
  size dividing ``K``), the MMA path (``"fp8"`` or ``"bf16"``) and launch
  parameters."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  mma: str = "fp8"
  num_warps: int = 8
  num_stages: int = 3


def _fp8_type(fmt: Format):
  return jnp.dtype(jnp.float8_e4m3fn) if fmt.elem_bits == 4 else jnp.dtype(fmt.elem_dtype)


def fp8_mma_supported(a_fmt: Format, b_fmt: Format) -> bool:
  """Whether the ``"fp8"`` path takes this pair of formats."""
  return (a_fmt.block_size == _FP8_BLOCK and b_fmt.block_size == _FP8_BLOCK
          and a_fmt.power_of_two_scales and b_fmt.power_of_two_scales
          and a_fmt.elem_bits in (4, 8) and b_fmt.elem_bits in (4, 8)
          and _fp8_type(a_fmt) == _fp8_type(b_fmt))


def default_config(m: int, k: int, n: int, a_fmt: Format, b_fmt: Format) -> Config:
  """A valid config for the shape (tuned on an H100, see benchmarks/)."""
  # The fp8 path measured 2x slower than the bf16 one at 8192^3 on an H100
  # (benchmarks/results/matmul.md): the per-block float32 scaling dominates.
  mma = "bf16"
  minimum = max(16, a_fmt.block_size)
  block_k = common.pick_block(k, 128, minimum)
  if block_k is None:
    raise ValueError(f"mx_matmul: K={k} is not a multiple of {minimum}")
  if m > 64:
    return Config(block_m=128, block_n=256, block_k=min(block_k, 64), mma=mma, num_warps=8, num_stages=3)
  block_m = max(16, 1 << (max(m, 1) - 1).bit_length())
  return Config(block_m=block_m, block_n=64, block_k=block_k, mma=mma, num_warps=4, num_stages=4)


def _kernel(a_ref, as_ref, b_ref, bs_ref, *rest, a_fmt: Format, b_fmt: Format, cfg: Config,
            k_steps: int, has_global: bool, has_flags: bool, m: int, n: int):
  flag_refs, rest = (rest[:2], rest[2:]) if has_flags else (None, rest)
  g_ref = rest[0] if has_global else None
  o_ref = rest[-1]  # an aliased output buffer, if any, sits just before it
  bk = cfg.block_k
  a_bytes, b_bytes = bk * a_fmt.elem_bits // 8, bk * b_fmt.elem_bits // 8
  nb = bk // a_fmt.block_size
  rows_a = common.row_mask(1, cfg.block_m, m)
  rows_b = common.row_mask(0, cfg.block_n, n)

  def chunk(ref, i, width, rows):
    return common.load_rows(ref.at[:, pl.ds(pl.multiple_of(i * width, width), width)], rows)

  def body_bf16(i, acc):
    a = common.dequantize_tile(chunk(a_ref, i, a_bytes, rows_a), chunk(as_ref, i, nb, rows_a), a_fmt,
                               jnp.bfloat16)
    b = common.dequantize_tile(chunk(b_ref, i, b_bytes, rows_b), chunk(bs_ref, i, nb, rows_b), b_fmt,
                               jnp.bfloat16)
    return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  a_sub, b_sub = _FP8_BLOCK * a_fmt.elem_bits // 8, _FP8_BLOCK * b_fmt.elem_bits // 8
  a_off, b_off = -common.element_log2_offset(a_fmt), -common.element_log2_offset(b_fmt)

  def body_fp8(i, acc):
    # All of the chunk's per-block products are issued before any is scaled,
    # so the tensor cores need not wait on the float32 scaling between them.
    prods = []
    for j in range(nb):
      blk = i * nb + j
      a = common.decode_elements(chunk(a_ref, blk, a_sub, rows_a), a_fmt)
      b = common.decode_elements(chunk(b_ref, blk, b_sub, rows_b), b_fmt)
      prods.append(lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    for j, p in enumerate(prods):
      blk = i * nb + j
      sa = common.scale_to_f32(chunk(as_ref, blk, 1, rows_a), a_fmt, a_off)                 # (bm, 1)
      sb = common.scale_to_f32(chunk(bs_ref, blk, 1, rows_b), b_fmt, b_off).reshape(1, -1)  # (1, bn)
      acc = acc + p * (sa * sb)
    return acc

  body = body_fp8 if cfg.mma == "fp8" else body_bf16

  def tile():
    acc = lax.fori_loop(0, k_steps, body, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
    if has_global:
      acc = acc * g_ref[0]
    common.store_tile(o_ref, acc.astype(o_ref.dtype), rows_a, rows_b)

  if not has_flags:
    tile()
    return
  # Only tiles with a flagged row or column are computed; the others leave the aliased buffer as it is.
  fa, fb = common.load_rows(flag_refs[0], rows_a), common.load_rows(flag_refs[1], rows_b)
  pl.when((jnp.max(fa) > 0) | (jnp.max(fb) > 0))(tile)


def _check(a_data, a_scales, b_data, b_scales, a_fmt, b_fmt, a_gs, b_gs, cfg):
  for name, arr in (("a_data", a_data), ("a_scales", a_scales), ("b_data", b_data), ("b_scales", b_scales)):
    if arr.ndim != 2 or arr.dtype != jnp.uint8:
      raise ValueError(f"mx_matmul: {name} must be a 2-D uint8 array, got {arr.dtype} shape {arr.shape}")
  if a_fmt.block_size != b_fmt.block_size:
    raise ValueError(f"mx_matmul: block sizes differ: {a_fmt!r} vs {b_fmt!r}")
  k = a_scales.shape[1] * a_fmt.block_size
  m, n = a_data.shape[0], b_data.shape[0]
  want = {"a_data": (m, k * a_fmt.elem_bits // 8), "a_scales": (m, k // a_fmt.block_size),
          "b_data": (n, k * b_fmt.elem_bits // 8), "b_scales": (n, k // b_fmt.block_size)}
  got = {"a_data": a_data.shape, "a_scales": a_scales.shape, "b_data": b_data.shape, "b_scales": b_scales.shape}
  if want != {key: tuple(v) for key, v in got.items()}:
    raise ValueError(f"mx_matmul: shapes {got} do not agree on K={k}: expected {want}")
  for fmt, gs, side in ((a_fmt, a_gs, "a"), (b_fmt, b_gs, "b")):
    if fmt.has_global_scale != (gs is not None):
      raise ValueError(f"mx_matmul: {side} is {fmt!r}, which {'needs' if fmt.has_global_scale else 'has no'} global scale")
  for name in ("block_m", "block_n", "block_k"):
    v = getattr(cfg, name)
    if v < 16 or v & (v - 1):
      raise ValueError(f"mx_matmul: Config.{name}={v} must be a power of two >= 16")
  if cfg.block_k % a_fmt.block_size or k % cfg.block_k:
    raise ValueError(f"mx_matmul: K={k} must be a multiple of block_k={cfg.block_k}, itself a multiple "
                     f"of the block size {a_fmt.block_size}")
  if cfg.mma not in ("fp8", "bf16"):
    raise ValueError(f"mx_matmul: Config.mma must be 'fp8' or 'bf16', got {cfg.mma!r}")
  if cfg.mma == "fp8" and not fp8_mma_supported(a_fmt, b_fmt):
    raise ValueError(f"mx_matmul: the fp8 path does not take {a_fmt!r} x {b_fmt!r}; use mma='bf16'")


@functools.partial(jax.jit, static_argnames=("a_fmt", "b_fmt", "out_dtype", "config", "interpret"))
def mx_matmul(a_data, a_scales, a_global, b_data, b_scales, b_global, *, a_fmt: Format, b_fmt: Format,
              out_dtype=jnp.bfloat16, config: Config | None = None, interpret: bool = False,
              out_buffer=None, row_flags=None):
  """``dequantize(a) @ dequantize(b).T`` through the Pallas kernel.

  Args:
    a_data, a_scales: uint8 ``(M, K * a_bits // 8)`` and ``(M, K // block)``.
    a_global: float32 scalar (NVFP4) or None.
    b_data, b_scales, b_global: the same for ``b`` with ``N`` rows.
    a_fmt, b_fmt: formats (equal block sizes).
    out_dtype: output dtype.
    config: a :class:`Config`; default :func:`default_config`.
    interpret: run in Pallas interpret mode (CPU).
    out_buffer: optional ``(M, N)`` ``out_dtype`` buffer the kernel writes in
      place (tests fill it with NaN to check that every element is written).
    row_flags: optional ``(flags_a (M,), flags_b (N,))`` bools, with
      ``out_buffer``: only the output tiles with a flagged row of ``a`` or of
      ``b`` are computed, the others keep ``out_buffer``'s values (the int8
      path's exact fallback on the device, :mod:`fp4jax.int8_matmul`).

  Returns:
    ``(M, N)`` in ``out_dtype``.
  """
  k = a_scales.shape[1] * a_fmt.block_size
  m, n = a_data.shape[0], b_data.shape[0]
  cfg = config or default_config(m, k, n, a_fmt, b_fmt)
  _check(a_data, a_scales, b_data, b_scales, a_fmt, b_fmt, a_global, b_global, cfg)
  out_dtype = np.dtype(out_dtype)
  grid = (pl.cdiv(n, cfg.block_n), pl.cdiv(m, cfg.block_m))
  nb_all = k // a_fmt.block_size
  in_specs = [
      pl.BlockSpec((cfg.block_m, a_data.shape[1]), lambda j, i: (i, 0)),
      pl.BlockSpec((cfg.block_m, nb_all), lambda j, i: (i, 0)),
      pl.BlockSpec((cfg.block_n, b_data.shape[1]), lambda j, i: (j, 0)),
      pl.BlockSpec((cfg.block_n, nb_all), lambda j, i: (j, 0)),
  ]
  args = [a_data, a_scales, b_data, b_scales]
  if row_flags is not None:
    if out_buffer is None:
      raise ValueError("mx_matmul: row_flags needs out_buffer (the values of the tiles not computed)")
    fa, fb = row_flags
    if tuple(fa.shape) != (m,) or tuple(fb.shape) != (n,):
      raise ValueError(f"mx_matmul: row_flags must have shapes ({m},) and ({n},), got {tuple(fa.shape)} and "
                       f"{tuple(fb.shape)}")
    in_specs += [pl.BlockSpec((cfg.block_m,), lambda j, i: (i,)), pl.BlockSpec((cfg.block_n,), lambda j, i: (j,))]
    args += [fa.astype(jnp.int32), fb.astype(jnp.int32)]
  gs = [g for g in (a_global, b_global) if g is not None]
  if gs:
    g = functools.reduce(lambda u, v: u * v, [jnp.asarray(x, jnp.float32) for x in gs])
    in_specs.append(pl.BlockSpec((1,), lambda j, i: (0,)))
    args.append(jnp.reshape(g, (1,)))
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  out_spec = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda j, i: (i, j))
  aliases = {}
  if out_buffer is not None:
    if out_buffer.shape != out_shape.shape or out_buffer.dtype != out_dtype:
      raise ValueError(f"mx_matmul: out_buffer must be {out_dtype} {out_shape.shape}, got "
                       f"{out_buffer.dtype} {out_buffer.shape}")
    aliases = {len(args): 0}
    in_specs.append(out_spec)  # never read: the kernel only writes through the output ref
    args.append(out_buffer)
  kernel = functools.partial(_kernel, a_fmt=a_fmt, b_fmt=b_fmt, cfg=cfg, k_steps=k // cfg.block_k,
                             has_global=bool(gs), has_flags=row_flags is not None, m=m, n=n)
  from jax.experimental.pallas import triton as plt

  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      input_output_aliases=aliases,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name=f"mx_matmul_{a_fmt.name}_{b_fmt.name}_{cfg.mma}",
  )(*args)


def mx_matmul_reference(a_data, a_scales, a_global, b_data, b_scales, b_global, *, a_fmt: Format,
                        b_fmt: Format, out_dtype=jnp.bfloat16):
  """The XLA reference on the same byte matrices: dequantize both, float32 dot, cast."""
  a = QArray(a_data, a_scales, a_global, a_fmt, -1, layout="rows")
  b = QArray(b_data, b_scales, b_global, b_fmt, -1, layout="rows")
  return scaled_dot_general_reference(a, b, (((1,), (1,)), ((), ())), out_dtype)
