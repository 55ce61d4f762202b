"""Decode-time W4A16 on the CUDA cores: a few bfloat16 rows times a 4-bit weight.

``out (M, N) = x (M, K) @ dequantize(w) (K, N)`` for small ``M`` (decoding),
with the weight as the byte matrices of :func:`fp4jax.prepared.byte_matrix`:
``data (N, K/2)`` uint8 (two E2M1 codes a byte, low nibble = even ``k``) and
``scales (N, K/B)`` uint8.

Why not the tensor cores: at ``M = 1`` a matrix product wastes 15/16 of every
MMA and, worse, the decoded weight tile has to be moved into the MMA operand
layout through shared memory. Here each program owns ``block_n`` output
channels, streams its share of ``K`` in ``block_k`` chunks (``block_n`` runs of
``block_k / 2`` contiguous bytes), and never moves a decoded value:

* each code becomes the float32 ``2 * E2M1(code)`` (an integer 0..12 and a
  sign) with a handful of integer operations;
* the low nibbles multiply the even activations and the high nibbles the odd
  ones (the activation chunk is split in registers, not reordered in memory);
* products are summed per 32-element block in float32 and multiplied once by
  the block scale (times 1/2); the global scale (NVFP4) is applied at the end.

Every decoded element and every scale is exact, so the result equals the
float32 reference up to the order of the float32 additions.
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

__all__ = ["Config", "default_config", "w4a16_gemv", "MAX_ROWS"]

#: The most rows of ``x`` the kernel takes: beyond, the products outgrow the
#: registers and the tensor-core kernel wins.
MAX_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and launch parameters (all static).

  ``block_n``: output channels per program (a power of two >= 16).
  ``block_k``: elements of ``K`` per step, a power of two and a multiple of
  the block size dividing ``K / split_k``. ``split_k``: programs sharing one
  output tile along ``K`` (float32 partial sums, added by XLA).
  """

  block_n: int = 64
  block_k: int = 256
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  flat: bool = False  # 2-D tiles only: strided activation loads, per-element scales, a row loop


def default_config(m: int, k: int, n: int, fmt: Format) -> Config:
  """At least one program per SM (132 on an H200) without splitting ``K`` where ``N`` allows."""
  del m
  block_k = common.pick_block(k, 256, max(32, fmt.block_size))
  if block_k is None:
    raise ValueError(f"w4a16_gemv: K={k} is not a multiple of {max(32, fmt.block_size)}")
  block_n = 64 if n >= 128 * 64 else 32
  return Config(block_n=block_n, block_k=block_k)


def _twice_e2m1(c):
  """int32 E2M1 codes 0..15 -> float32 ``2 * E2M1(code)``: exact small integers with a sign."""
  mag = c & 7
  # 2 * E2M1 magnitudes are 0, 1 (subnormals) and (2 + m) << (e - 1) for e >= 1.
  twice = jnp.where(mag < 2, mag, (2 + (mag & 1)) << jnp.maximum((mag >> 1) - 1, 0))
  v = twice.astype(jnp.float32)
  return jnp.where(c >= 8, -v, v)


def _kernel(x_ref, w_ref, s_ref, *rest, fmt: Format, cfg: Config, k_steps: int, has_global: bool,
            m: int, n: int):
  # ``x_ref`` holds ``rows`` (a power of two, as Triton needs) >= m rows; the extra ones read as 0.
  g_ref = rest[0] if has_global else None
  o_ref = rest[-1]
  bk = cfg.block_k
  half = bk // 2
  nb = bk // fmt.block_size
  per_block = fmt.block_size // 2  # bytes of one block's codes
  rows_n = common.row_mask(0, cfg.block_n, n)
  rows = x_ref.shape[0]
  rows_m = None if rows == m else lax.broadcasted_iota(jnp.int32, (rows,), 0) < m

  def body(i, acc):
    wb = common.load_rows(w_ref.at[:, pl.ds(pl.multiple_of(i * half, half), half)], rows_n)
    sb = common.load_rows(s_ref.at[:, pl.ds(pl.multiple_of(i * nb, nb), nb)], rows_n)
    wb = wb.astype(jnp.int32)
    lo, hi = _twice_e2m1(wb & 15), _twice_e2m1(wb >> 4)  # (block_n, half)
    x = common.load_rows(x_ref.at[:, pl.ds(pl.multiple_of(i * bk, bk), bk)], rows_m).astype(jnp.float32)
    x_even, x_odd = jnp.unstack(x.reshape(rows, half, 2), axis=-1)  # (rows, half)
    p = lo[None] * x_even[:, None, :] + hi[None] * x_odd[:, None, :]  # (rows, block_n, half)
    p = p.reshape(rows, cfg.block_n, nb, per_block).sum(axis=-1)
    s = common.scale_to_f32(sb, fmt, -1)  # the block scale times the 1/2 of _twice_e2m1
    return acc + (p * s[None]).sum(axis=-1)

  def flat_body(i, acc):
    # Every tensor 2-D (block_n, half): no 3-D products, reshapes or unstacking,
    # which may cost Triton layout conversions; the scale multiplies each element.
    wb = common.load_rows(w_ref.at[:, pl.ds(pl.multiple_of(i * half, half), half)], rows_n).astype(jnp.int32)
    sb = common.load_rows(s_ref.at[:, pl.ds(pl.multiple_of(i * nb, nb), nb)], rows_n)
    s = common.expand_blocks(common.scale_to_f32(sb, fmt, -1), per_block)  # (block_n, half)
    lo, hi = _twice_e2m1(wb & 15) * s, _twice_e2m1(wb >> 4) * s
    out = []
    for r in range(m):  # one row at a time (the carry holds one (1, block_n) sum per row)
      xe = x_ref[pl.ds(r, 1), pl.ds(pl.multiple_of(i * bk, bk), half, stride=2)].astype(jnp.float32)
      xo = x_ref[pl.ds(r, 1), pl.ds(i * bk + 1, half, stride=2)].astype(jnp.float32)
      out.append(acc[r] + jnp.sum(lo * xe + hi * xo, axis=1)[None])
    return tuple(out)

  if cfg.flat:
    sums = lax.fori_loop(0, k_steps, flat_body, tuple(jnp.zeros((1, cfg.block_n), jnp.float32) for _ in range(m)))
    for r, acc in enumerate(sums):
      if has_global:
        acc = acc * g_ref[0]
      common.store_tile(o_ref.at[pl.ds(r, 1), :], acc.astype(o_ref.dtype), None, rows_n)
    return
  acc = lax.fori_loop(0, k_steps, body, jnp.zeros((rows, cfg.block_n), jnp.float32))
  if has_global:
    acc = acc * g_ref[0]
  common.store_tile(o_ref, acc.astype(o_ref.dtype), rows_m, rows_n)


def _check(x, w_data, w_scales, global_scale, fmt: Format, cfg: Config):
  if fmt.elem_bits != 4:
    raise ValueError(f"w4a16_gemv: 4-bit weights only, got {fmt!r}")
  if x.ndim != 2 or w_data.ndim != 2 or w_scales.ndim != 2:
    raise ValueError(f"w4a16_gemv: expected x (M, K), data (N, K/2), scales (N, K/block); got shapes "
                     f"{x.shape}, {w_data.shape}, {w_scales.shape}")
  if x.shape[0] > MAX_ROWS:
    raise ValueError(f"w4a16_gemv: at most {MAX_ROWS} rows of x, got shape {x.shape}")
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"w4a16_gemv: x must be bfloat16, got dtype {x.dtype}")
  if w_data.dtype != jnp.uint8 or w_scales.dtype != jnp.uint8:
    raise ValueError(f"w4a16_gemv: data and scales must be uint8, got {w_data.dtype} and {w_scales.dtype}")
  m, k = x.shape
  n = w_data.shape[0]
  if 2 * w_data.shape[1] != k or w_scales.shape != (n, k // fmt.block_size) or k % fmt.block_size:
    raise ValueError(f"w4a16_gemv: x shape {x.shape} does not match {fmt!r} weight data {w_data.shape} "
                     f"and scales {w_scales.shape} (expected ({n}, {k // 2}) and ({n}, {k // fmt.block_size}))")
  if fmt.has_global_scale != (global_scale is not None):
    raise ValueError(f"w4a16_gemv: {fmt!r} {'needs' if fmt.has_global_scale else 'has no'} global scale")
  for name in ("block_n", "block_k"):
    v = getattr(cfg, name)
    if v < 16 or v & (v - 1):
      raise ValueError(f"w4a16_gemv: Config.{name}={v} must be a power of two >= 16")
  if cfg.block_k % fmt.block_size or k % (cfg.block_k * cfg.split_k):
    raise ValueError(f"w4a16_gemv: K={k} must be a multiple of block_k*split_k={cfg.block_k}*{cfg.split_k}, "
                     f"and block_k of {fmt!r}'s block size {fmt.block_size}")


@functools.partial(jax.jit, static_argnames=("fmt", "out_dtype", "config", "interpret"))
def w4a16_gemv(x, w_data, w_scales, global_scale=None, *, fmt: Format, out_dtype=jnp.bfloat16,
               config: Config | None = None, interpret: bool = False, out_buffer=None):
  """``x @ dequantize(w)`` for ``x (M <= 16, K)`` bfloat16 through the CUDA-core kernel.

  Arguments as :func:`fp4jax.kernels.w4a16_matmul.w4a16_matmul` (4-bit
  formats only); ``out_buffer`` likewise (``(M, N)``, or ``(split_k, M, N)``
  float32 with ``split_k > 1``).
  """
  m, k = x.shape
  n = w_data.shape[0]
  cfg = config or default_config(m, k, n, fmt)
  _check(x, w_data, w_scales, global_scale, fmt, cfg)
  out_dtype = np.dtype(out_dtype)
  s = cfg.split_k
  ks = k // s
  rows = 1 << (m - 1).bit_length()  # Triton's tiles have power-of-two sizes
  grid = (pl.cdiv(n, cfg.block_n), s)
  in_specs = [
      pl.BlockSpec((rows, ks), lambda j, t: (0, t)),
      pl.BlockSpec((cfg.block_n, ks // 2), lambda j, t: (j, t)),
      pl.BlockSpec((cfg.block_n, ks // fmt.block_size), lambda j, t: (j, t)),
  ]
  args = [x, w_data, w_scales]
  has_global = global_scale is not None and s == 1  # with split-K, XLA applies it after the sum
  if has_global:
    in_specs.append(pl.BlockSpec((1,), lambda j, t: (0,)))
    args.append(jnp.reshape(global_scale, (1,)).astype(jnp.float32))
  if s == 1:
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_spec = pl.BlockSpec((rows, cfg.block_n), lambda j, t: (0, j))
  else:
    out_shape = jax.ShapeDtypeStruct((s, m, n), jnp.float32)
    out_spec = pl.BlockSpec((None, rows, cfg.block_n), lambda j, t: (t, 0, j))
  aliases = {}
  if out_buffer is not None:
    if out_buffer.shape != out_shape.shape or out_buffer.dtype != out_shape.dtype:
      raise ValueError(f"w4a16_gemv: out_buffer must be {out_shape.dtype} {out_shape.shape}, got "
                       f"{out_buffer.dtype} {out_buffer.shape}")
    aliases = {len(args): 0}
    in_specs.append(out_spec)  # never read: the kernel only writes through the output ref
    args.append(out_buffer)
  kernel = functools.partial(_kernel, fmt=fmt, cfg=cfg, k_steps=ks // cfg.block_k, has_global=has_global,
                             m=m, n=n)
  from jax.experimental.pallas import triton as plt

  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      input_output_aliases=aliases,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name=f"w4a16_gemv_{fmt.name}",
  )(*args)
  if s == 1:
    return out
  out = out.sum(axis=0)
  if global_scale is not None:
    out = out * global_scale
  return out.astype(out_dtype)
