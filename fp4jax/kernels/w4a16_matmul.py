"""Weight-only block-scaled matmul (W4A16): bfloat16 ``x`` times a 4-bit weight.

``out (M, N) = x (M, K) @ dequantize(w) (K, N)``, with the weight held as the
byte matrices of :func:`fp4jax.matmul.byte_matrix` (the leaves of a QArray
stored as ``layout="rows"``): ``data (N, K/2)`` uint8, ``scales (N, K/block)``
uint8. Each program owns a ``(block_m, block_n)`` output tile
(and a ``1/split_k`` share of ``K``) and walks ``K`` in ``block_k`` chunks:
load the chunk's bytes (``block_n`` contiguous runs), decode the E2M1 codes to
E4M3 with shifts and masks, upcast, multiply by the block scales (exact in
bfloat16), and feed one bfloat16 tensor-core product with float32
accumulation. ``Config.decode="bits"`` (the decode default for 4-bit weights)
instead builds the bfloat16 values from the nibbles' bits in inline PTX
(:mod:`fp4jax.kernels.e2m1_bits`) and multiplies the low nibbles with the even
columns of ``x`` and the high ones with the odd. With ``swap_ab`` the product
is ``w @ x.T`` so that a small ``M`` is the MMA's narrow ``N`` side and the
decoded weight the register operand.

8-bit weights (MXFP8) go through the same kernel (no nibble decode).
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
from fp4jax.kernels import e2m1_bits
from fp4jax.kernels import matmul_common as common
from fp4jax.qarray import QArray
from fp4jax.reference import scaled_dot_general_reference

__all__ = ["Config", "w4a16_matmul", "w4a16_matmul_reference", "default_config"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and launch parameters (all static).

  ``block_m``, ``block_n``, ``block_k``: powers of two, ``block_m, block_n >=
  16``; ``block_k`` a multiple of the format's block size dividing ``K``.
  ``split_k``: programs sharing one output tile along ``K`` (float32 partial
  sums, added by XLA). ``swap_ab``: compute ``w @ x.T`` (see module doc).
  ``decode`` (4-bit weights): ``"jnp"`` (the shared decode) or ``"bits"`` (PTX
  bit tricks, :mod:`fp4jax.kernels.e2m1_bits`, whose jnp twin runs in
  interpret mode): the low nibbles go into one product with the even columns
  of ``x`` and the high ones into another with the odd columns, so the decoded
  halves are never interleaved (interleaving them gave wrong sums on the H200;
  strided reads of the two column sets measured no faster than this split).
  """

  block_m: int = 16
  block_n: int = 64
  block_k: int = 256
  split_k: int = 1
  swap_ab: bool = False
  num_warps: int = 4
  num_stages: int = 3
  decode: str = "jnp"


def default_config(m: int, k: int, n: int, fmt: Format) -> Config:
  """A config that is valid for the shape, from the sweeps in benchmarks/ (H100, then H200).

  Decode (``M <= 16``): ``K`` split 8 ways where it divides (fewer
  otherwise). One program a 64-column tile left one 4-warp program per SM,
  issue-bound (ncu: 0.58 instructions a scheduler cycle); eight share each tile
  now (H200, 1 x 8192 x 8192: 47 -> 41 us; 1 x 14336 x 4096: 66 -> 37 us;
  ``benchmarks/results/w4a16_splitk.json``). 4-bit weights then use the bit
  decode (about 11 -> 4.7 instructions a weight; 1 x 8192 x 8192: 39 -> 24 us,
  ``benchmarks/results/w4a16_bits.json``) with 128 x 256 tiles; 8-bit weights
  64 x 128 tiles.
  ``16 < M <= 128``, 4-bit weights: one ``block_m`` of rows, the bit decode,
  ``K`` split 4 ways; up to 32 rows the ``x @ w.T`` orientation with 128 x 256
  tiles, above it ``swap_ab`` (the decoded weight on the MMA's wide side) with
  64 x 256 tiles (64 rows) or 128 x 128 (128 rows). H200, MXFP4, against the
  jnp-decode tiles used before (``benchmarks/results/w4a16_mid.json``): 32 x
  8192^2 53 -> 33 us, 64 x 8192^2 70 -> 47 us, 64 x 14336 x 4096 85 -> 41 us,
  128 x 8192^2 142 -> 66 us (XLA's bf16 dot: 40, 41, 38, 44 us).
  Otherwise ``M <= 64`` (8-bit weights): one ``block_m`` of rows, ``block_n``
  small enough for at least 128 programs on the 132 SMs, long ``block_k``
  chunks. Prefill: large tiles, so each decoded weight tile feeds many rows.
  """
  minimum = max(16, fmt.block_size)
  if m <= 16:
    # The bit decode splits each chunk into halves of depth block_k / 2, and a product needs >= 16.
    block_k = common.pick_block(k, 256, 32) if fmt.elem_bits == 4 else None
    bits = block_k is not None
    if not bits:
      block_k = common.pick_block(k, 128, minimum)
    split_k = next((s for s in (8, 4, 2) if block_k and k % (block_k * s) == 0), 1)
    cfg = Config(block_m=16, block_n=128 if bits else 64, block_k=block_k or 0, split_k=split_k, swap_ab=False,
                 num_warps=4, num_stages=3, decode="bits" if bits else "jnp")
  elif m <= 128 and fmt.elem_bits == 4 and common.pick_block(k, 128, 32):
    block_m = max(32, 1 << (m - 1).bit_length())
    swap = block_m > 32
    block_k = common.pick_block(k, 128 if block_m == 128 else 256, 32)
    split_k = next(s for s in (4, 2, 1) if k % (block_k * s) == 0)
    cfg = Config(block_m=block_m, block_n=64 if block_m == 64 else 128, block_k=block_k, split_k=split_k,
                 swap_ab=swap, num_warps=4, num_stages=3, decode="bits")
  elif m <= 64:
    block_k = common.pick_block(k, 256, minimum)
    block_m = max(16, 1 << (max(m, 1) - 1).bit_length())
    block_n = 64 if n >= 128 * 64 else 32
    cfg = Config(block_m=block_m, block_n=block_n, block_k=block_k or 0, split_k=1, swap_ab=False,
                 num_warps=4, num_stages=4)
  else:
    block_k = common.pick_block(k, 64, minimum)
    cfg = Config(block_m=256 if m >= 2048 else 128, block_n=128, block_k=block_k or 0, split_k=1,
                 swap_ab=False, num_warps=8, num_stages=3)
  if block_k is None:
    raise ValueError(f"w4a16: K={k} is not a multiple of {minimum}")
  return cfg


def _kernel(x_ref, w_ref, s_ref, *rest, fmt: Format, cfg: Config, k_steps: int,
            has_global: bool, m: int, n: int, interpret: bool):
  g_ref = rest[0] if has_global else None
  o_ref = rest[-1]  # an aliased output buffer, if any, sits just before it
  bk = cfg.block_k
  bytes_k = bk * fmt.elem_bits // 8
  nb = bk // fmt.block_size
  rows_m = common.row_mask(1, cfg.block_m, m)
  rows_n = common.row_mask(0, cfg.block_n, n)

  bits = cfg.decode == "bits" and fmt.elem_bits == 4

  def product(x, w):
    if cfg.swap_ab:
      return lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  def body(i, acc):
    x = common.load_rows(x_ref.at[:, pl.ds(pl.multiple_of(i * bk, bk), bk)], rows_m)
    wd = common.load_rows(w_ref.at[:, pl.ds(pl.multiple_of(i * bytes_k, bytes_k), bytes_k)], rows_n)
    ws = common.load_rows(s_ref.at[:, pl.ds(pl.multiple_of(i * nb, nb), nb)], rows_n)
    if not bits:
      return acc + product(x, common.dequantize_tile(wd, ws, fmt, x.dtype))  # w: (block_n, block_k)
    scales = common.expand_blocks(common.scale_to_f32(ws, fmt).astype(jnp.bfloat16), fmt.block_size // 2)
    # (block_n, block_k / 2) each: the chunk's even and odd columns of the weight.
    lo, hi = e2m1_bits.decode_scaled(wd, scales, interpret=interpret)
    x_even, x_odd = jnp.unstack(x.reshape(x.shape[0], bk // 2, 2), axis=-1)
    return acc + product(x_even, lo) + product(x_odd, hi)

  shape = (cfg.block_n, cfg.block_m) if cfg.swap_ab else (cfg.block_m, cfg.block_n)
  acc = lax.fori_loop(0, k_steps, body, jnp.zeros(shape, jnp.float32))
  if cfg.swap_ab:
    acc = acc.T
  if has_global:
    acc = acc * g_ref[0]
  common.store_tile(o_ref, acc.astype(o_ref.dtype), rows_m, rows_n)


def _check(x, w_data, w_scales, global_scale, fmt: Format, cfg: Config):
  if x.ndim != 2 or w_data.ndim != 2 or w_scales.ndim != 2:
    raise ValueError(f"w4a16: expected x (M, K), data (N, K*bits/8), scales (N, K/block); got shapes "
                     f"{x.shape}, {w_data.shape}, {w_scales.shape}")
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"w4a16: x must be bfloat16, got dtype {x.dtype}")
  if w_data.dtype != jnp.uint8 or w_scales.dtype != jnp.uint8:
    raise ValueError(f"w4a16: data and scales must be uint8, got {w_data.dtype} and {w_scales.dtype}")
  m, k = x.shape
  n = w_data.shape[0]
  if w_data.shape[1] * 8 != k * fmt.elem_bits or w_scales.shape != (n, k // fmt.block_size) or k % fmt.block_size:
    raise ValueError(f"w4a16: x shape {x.shape} does not match {fmt!r} weight data {w_data.shape} "
                     f"and scales {w_scales.shape} (expected ({n}, {k * fmt.elem_bits // 8}) and "
                     f"({n}, {k // fmt.block_size}))")
  if fmt.has_global_scale != (global_scale is not None):
    raise ValueError(f"w4a16: {fmt!r} {'needs' if fmt.has_global_scale else 'has no'} global scale")
  if cfg.decode not in ("jnp", "bits"):
    raise ValueError(f"w4a16: Config.decode must be 'jnp' or 'bits', got {cfg.decode!r}")
  if cfg.decode == "bits" and fmt.elem_bits == 4 and cfg.block_k < 32:
    raise ValueError(f"w4a16: Config.decode='bits' needs block_k >= 32 (each half of a chunk feeds a product "
                     f"of depth block_k / 2, at least 16), got block_k={cfg.block_k}")
  for name in ("block_m", "block_n", "block_k"):
    v = getattr(cfg, name)
    if v < 16 or v & (v - 1):
      raise ValueError(f"w4a16: Config.{name}={v} must be a power of two >= 16")
  if cfg.block_k % fmt.block_size or k % (cfg.block_k * cfg.split_k):
    raise ValueError(f"w4a16: K={k} must be a multiple of block_k*split_k={cfg.block_k}*{cfg.split_k}, "
                     f"and block_k of {fmt!r}'s block size {fmt.block_size}")


@functools.partial(jax.jit, static_argnames=("fmt", "out_dtype", "config", "interpret"))
def w4a16_matmul(x, w_data, w_scales, global_scale=None, *, fmt: Format, out_dtype=jnp.bfloat16,
                 config: Config | None = None, interpret: bool = False, out_buffer=None):
  """``x @ dequantize(w)`` through the Pallas kernel.

  Args:
    x: bfloat16 ``(M, K)``.
    w_data: uint8 ``(N, K * fmt.elem_bits // 8)`` (see module doc).
    w_scales: uint8 ``(N, K // fmt.block_size)``.
    global_scale: float32 scalar for NVFP4, else None.
    fmt: the weight's format.
    out_dtype: output dtype.
    config: a :class:`Config`; default :func:`default_config`.
    interpret: run in Pallas interpret mode (CPU).
    out_buffer: optional buffer the kernel writes in place (tests fill it with
      NaN to check that every element is written): ``(M, N)`` ``out_dtype``, or
      with ``split_k > 1`` the float32 partial sums ``(split_k, M, N)``.

  Returns:
    ``(M, N)`` in ``out_dtype``.
  """
  m, k = x.shape
  n = w_data.shape[0]
  cfg = config or default_config(m, k, n, fmt)
  _check(x, w_data, w_scales, global_scale, fmt, cfg)
  out_dtype = np.dtype(out_dtype)
  s = cfg.split_k
  ks = k // s
  grid = (pl.cdiv(n, cfg.block_n), pl.cdiv(m, cfg.block_m), s)
  in_specs = [
      pl.BlockSpec((cfg.block_m, ks), lambda j, i, t: (i, t)),
      pl.BlockSpec((cfg.block_n, ks * fmt.elem_bits // 8), lambda j, i, t: (j, t)),
      pl.BlockSpec((cfg.block_n, ks // fmt.block_size), lambda j, i, t: (j, t)),
  ]
  args = [x, w_data, w_scales]
  # Split-K leaves the global scale to the XLA sum that follows anyway.
  has_global = global_scale is not None and s == 1
  if has_global:
    in_specs.append(pl.BlockSpec((1,), lambda j, i, t: (0,)))
    args.append(jnp.reshape(global_scale, (1,)).astype(jnp.float32))
  if s == 1:
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_spec = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda j, i, t: (i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((s, m, n), jnp.float32)
    out_spec = pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda j, i, t: (t, i, j))
  aliases = {}
  if out_buffer is not None:
    if out_buffer.shape != out_shape.shape or out_buffer.dtype != out_shape.dtype:
      raise ValueError(f"w4a16: out_buffer must be {out_shape.dtype} {out_shape.shape}, got "
                       f"{out_buffer.dtype} {out_buffer.shape}")
    aliases = {len(args): 0}
    in_specs.append(out_spec)  # never read: the kernel only writes through the output ref
    args.append(out_buffer)
  kernel = functools.partial(_kernel, fmt=fmt, cfg=cfg, k_steps=ks // cfg.block_k, has_global=has_global,
                             m=m, n=n, interpret=interpret)
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      input_output_aliases=aliases,
      compiler_params=_triton_params(cfg),
      interpret=interpret,
      name=f"w4a16_{fmt.name}",
  )(*args)
  if s == 1:
    return out
  out = out.sum(axis=0)
  if global_scale is not None:
    out = out * global_scale
  return out.astype(out_dtype)


def _triton_params(cfg):
  from jax.experimental.pallas import triton as plt

  return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def w4a16_matmul_reference(x, w_data, w_scales, global_scale=None, *, fmt: Format, out_dtype=jnp.bfloat16):
  """The XLA reference on the same byte matrices: dequantize, float32 dot, cast."""
  w = QArray(w_data, w_scales, global_scale, fmt, -1, layout="rows")
  return scaled_dot_general_reference(x, w, (((1,), (1,)), ((), ())), out_dtype)
