"""The searched scale rules: "mse" (optionally Hessian-weighted) and "4over6".

Why the unweighted "mse" search is exact. Let ``t = amax / M`` (the real scale
at which ``amax`` just fits) and ``s_c`` the "ceil" scale. Losses are in units of
``s_c**2``; ``h(v)`` is half the element spacing at ``v``.

(1) Nothing above the window wins. If ``s >= 2 t`` every element is at most
``M s / 2``, and the grid ``s * G`` below ``M s / 2`` lies inside ``(s / 2) * G``
(halving a floating-point grid keeps its points), so each element is at least
as close to the grid of ``s / 2``: ``loss(s / 2) <= loss(s)``. Halving from any
larger scale thus reaches a scale in ``[s_c, 2 t)`` that is no worse, as long as
every halved scale is representable: always for E8M0, and for E4M3 from
``2**-5`` down (below, codes are ``k * 2**-9`` and odd ``k`` do not halve, so the
window keeps every code below ``2**-5``).

(2) Nothing far below wins. For ``s`` small enough the block's largest element
clips to ``M s`` and loses more than all the other elements can gain: an element
gains at most ``err(s_c)**2 <= h(x)**2``, and only if it lies below ``M s + h(x)``
(above that its clipped error under ``s`` exceeds its error under ``s_c``).

* E8M0 scales, ``s <= s_c / 4``: ``amax > M/2``, so ``amax`` clips by more than
  ``M/4`` and its loss rises by more than ``(M/4)**2 - h(M/2)**2``; the other
  ``B - 1`` gain at most ``(B - 1) * h(M/4)**2``. E2M1: 2.0 > 31/16; E4M3:
  12480 > 496; E5M2: 2.0e8 > 3.3e7; E2M3: 3.5 > 0.122; E3M2: 48 > 7.75; MXINT8
  (its grid ``k / 64`` read as one binade with 6 mantissa bits and subnormals
  of the same step, for which (1) holds too): 0.246 > 0.0019. The window is
  ``{s_c / 2, s_c}``.
* E4M3 scales (NVFP4, B = 16), ``s <= s_c / 2``: a normal ``s_c`` is within 1/8
  of ``t`` (within 1/7 for codes 8..15), so ``amax > 5.25``; it clips to at
  most 3, a rise of at least ``2.25**2 - 0.75**2 = 4.5``; only elements below
  3.5 can gain, at most ``0.5**2`` each: ``15 * 0.25 = 3.75 < 4.5``. The window
  is the 16 codes ``c - 8 .. c + 7`` around ``c = max(code(s_c), 8)``, which for
  a subnormal ``s_c`` is every code up to ``15`` (including the zero scale).

Every bound is strict, so no scale outside the window even ties with the best
one inside it. The losses themselves are float32 sums: two scales whose losses
agree to float32 rounding (about 1e-6 relative) may be ordered either way, but
the same way on every backend: each loss is computed with exact products,
correctly rounded differences and a fixed summation tree (see
:func:`_loss_function`), so CPU, GPU and kernels choose the same scale.
``tests/test_scales.py`` checks the result against a float64 brute force over
all 255 finite E8M0 scales and all 127 non-negative finite E4M3 scales.

With a Hessian the per-element argument fails (residuals can cancel) and the
optimum moves further from ``s_c``, above it too: with correlated activations
the best E8M0 scale can sit two steps above the floor rule. The search then
spans E8M0 exponents from ``ceil - 8`` up to the first exponent at which the
whole block rounds to zero (all larger scales give that same loss), and E4M3
codes from four octaves below ``s_c`` to five above (where E2M1 rounds every
element to zero) plus the zero scale: 14 candidates for MXFP4, 28 and 42 for
MXFP8 E4M3 / E5M2, 74 for NVFP4. That window is a search, not a proof. The
tests find it equal to a brute force over every scale for AR(1) activations
up to rho = 0.99 plus a shared factor three times their size; with a nearly
rank-one Hessian (rho = 0.999 and that factor) the best NVFP4 scale can lie
further down, and a few blocks per thousand get a slightly worse one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format
from fp4jax.scales.elements import element_factor, per_element, scale_bytes, scales_from_bytes
from fp4jax.scales.fixed import BlockContext, ceil_rule, require_scale_kind, round_scale

__all__ = ["search_window", "mse_rule", "four_over_six_rule", "block_hessians", "loss_unit_target",
           "dequant_unit_factor"]


def search_window(fmt: Format, weighted: bool) -> tuple[range, bool]:
  """The "mse" candidates: byte offsets from the anchor code, and whether to add the zero scale.

  The anchor is the "ceil" scale's byte; for E4M3 scales it is raised to at
  least the smallest normal code (8), see the module docstring. ``weighted``
  asks for the wide window (Hessian-weighted losses, 2-D blocks).
  """
  if fmt.power_of_two_scales:
    if not weighted:
      return range(-1, 1), False
    # Up to the first exponent at which the whole block rounds to 0:
    # amax < 2**(A+1) and e >= A + 2 - log2(smallest subnormal) put every
    # element below half the smallest subnormal; ceil >= A - emax.
    first_zero = fmt.elem_emax + 2 - fmt.elem_log2_smallest_subnormal
    return range(-8, first_zero + 1), False
  octave = 1 << fmt.scale_finfo.nmant  # codes per factor of two in the normal range
  if not weighted:
    return range(-octave, octave), False
  return range(-4 * octave, 5 * octave + 1), True


def _tile_sum(sq, b: int):
  """Sum of ``(..., b * b)`` row-major tile entries, bit-identical for a tile and its transpose.

  Entry ``(i, j)`` and ``(j, i)`` are added first (float addition commutes),
  the pair sums sit in the upper triangle, and that same array is reduced in
  the fixed order of :func:`fp4jax._bits.halving_sum`.
  """
  s = sq.reshape(*sq.shape[:-1], b, b)
  pairs = s + jnp.swapaxes(s, -1, -2)
  upper = np.triu(np.ones((b, b), bool), 1)
  diag = np.eye(b, dtype=bool)
  kept = jnp.where(upper, pairs, jnp.where(diag, s, 0.0))
  return _bits.halving_sum(kept.reshape(*sq.shape[:-1], b * b), -1)


def _block_loss(residual, hessian, tile=None):
  if hessian is None:
    sq = _bits.exact_square(residual)
    # Computed once per block: XLA would otherwise fuse the tree's last adds
    # (and the comparisons of candidates) into every element's encode.
    return _bits.compute_once(_bits.halving_sum(sq, -1) if tile is None else _tile_sum(sq, tile))
  # A dot: its accumulation order (and FMA use) is the backend's, so weighted
  # losses, and the scales they pick in near-ties, may differ across backends.
  return jnp.einsum("...nb,nbd,...nd->...n", residual, hessian, residual,
                    precision=lax.Precision.HIGHEST)


def _pow2_factors(e):
  """2**e for integer ``e`` in [-252, 254] as two normal float32 factors (see scale_by_pow2)."""
  a = e >> 1
  return _bits.exp2i(a), _bits.exp2i(e - a)


def loss_unit_target(mag, amax, global_encode=None):
  """``(unit, target)``: the power of two a block's residuals are measured in, and its magnitudes in it.

  ``unit = floor(log2(amax))`` (``amax`` shaped like ``mag`` with the block
  axis of length 1), so squares stay in float32's range for any input. With a
  global scale the block is first multiplied by the tensor encode factor, so
  that residuals are ``x * encode - q * s`` in block-scale units: that orders
  candidates as ``x - q * s * decode`` does, and keeps every product that meets
  a subtraction exact (``q * s`` is exact, a power-of-two scaling is exact), so
  no backend's FMA contraction can round a residual differently. Exact ties
  (two scales that dequantize a block identically) stay exact ties. Products
  are flushed where they underflow. The kernels call this too.
  """
  if global_encode is not None:
    mag = _bits.flush_subnormals(mag * global_encode)
    amax = _bits.flush_subnormals(amax * global_encode)
  unit = _bits.floor_log2(_bits.f32_bits(amax))
  return unit, _bits.flush_subnormals(_bits.scale_by_pow2(mag, -unit))


def dequant_unit_factor(scales, unit):
  """E4M3 scales in units of ``2**unit`` (exact; flushed where they underflow): element values times it
  are the dequantized block in the units of :func:`loss_unit_target`, exactly."""
  return _bits.flush_subnormals(_bits.scale_by_pow2(scales.astype(jnp.float32), -unit))


def _loss_function(blocks, ctx: BlockContext):
  """``loss_of(code)``: each block's loss (``(..., nb)`` float32) under scale bytes ``code``.

  Every operation is exact or correctly rounded and in a fixed order, so the
  loss has the same bits on every backend and in the kernels: the block and
  its dequantized value in the units of :func:`loss_unit_target` (exact
  products), their difference (one rounding), squares summed by
  :func:`fp4jax._bits.exact_square` and :func:`fp4jax._bits.halving_sum`.
  """
  fmt = ctx.fmt
  weighted = ctx.hessian is not None
  mag = jnp.abs(blocks)
  genc = None if ctx.global_encode is None else per_element(ctx.global_encode)
  unit, target = loss_unit_target(mag, ctx.amax[..., None], genc)
  unit = unit[..., 0]

  def per_block(f):
    # Per-block factors are computed once per block and broadcast: XLA would
    # otherwise recompute them (bitcasts, an E4M3 decode, a division) for
    # every element (see fp4jax._bits.compute_once; the barrier alone does
    # that on the GPU, not on the CPU).
    return lax.optimization_barrier(jax.tree.map(_bits.compute_once, f))

  def loss_of(code):
    # Magnitudes suffice without a Hessian: x and its rounding share a sign.
    if fmt.power_of_two_scales:
      e = code - fmt.scale_bias
      (e1, e2), (d1, d2) = per_block((_pow2_factors(-e), _pow2_factors(e - unit)))
      y = mag * e1[..., None] * e2[..., None]
      dq_unit = lambda q: q * d1[..., None] * d2[..., None]
    else:
      s = scales_from_bytes(code, fmt)
      enc, dec = per_block((element_factor(s, fmt, ctx.global_decode), dequant_unit_factor(s, unit)))
      y = mag * enc[..., None]
      dq_unit = lambda q: q * dec[..., None]
    q = _bits.round_to_grid(jnp.minimum(y, fmt.elem_max), fmt.elem_nmant, fmt.elem_emin, fmt.elem_emax)
    r = _bits.flush_subnormals(target - _bits.flush_subnormals(dq_unit(q)))
    if weighted:
      r = jnp.where(blocks < 0, -r, r)
    return _block_loss(r, ctx.hessian, ctx.tile)

  return loss_of


def mse_rule(blocks, ctx: BlockContext):
  fmt = ctx.fmt
  offsets, with_zero = search_window(fmt, ctx.hessian is not None or ctx.tile is not None)
  anchor = scale_bytes(ceil_rule(blocks, ctx)).astype(jnp.int32)
  if not fmt.power_of_two_scales:
    anchor = jnp.maximum(anchor, fmt.scale_min_normal_byte)
  loss_of = _loss_function(blocks, ctx)

  def better(carry, code):
    best_loss, best_code = carry
    loss = loss_of(code)
    take = loss < best_loss  # candidates ascend, so ties keep the smaller scale
    return jnp.where(take, loss, best_loss), jnp.where(take, code, best_code)

  n_zero = int(with_zero)  # the zero scale, when searched, is candidate 0

  def candidate(i):
    code = jnp.clip(anchor + (offsets.start + i - n_zero), 0, fmt.scale_max_byte)
    return jnp.where(i < n_zero, 0, code) if with_zero else code

  # Every candidate's loss is computed by the same code (all inside the loop,
  # or all unrolled); the losses are exact-order sums either way, so an exact
  # tie is a tie wherever it is computed.
  carry = (jnp.full(anchor.shape, jnp.inf, jnp.float32), candidate(0))
  n = len(offsets) + n_zero
  if n <= 3:
    for i in range(n):
      carry = better(carry, candidate(i))
  else:
    # A loop, not an unrolled chain: compile time stays flat in the window size.
    carry = lax.fori_loop(0, n, lambda i, c: better(c, candidate(i)), carry)
  return scales_from_bytes(carry[1], fmt)


def four_over_six_rule(blocks, ctx: BlockContext):
  require_scale_kind(ctx.fmt, "4over6")
  fmt = ctx.fmt
  six = round_scale(ctx, 0)
  four = round_scale(ctx, 0, target=2.0**fmt.elem_emax)
  loss_of = _loss_function(blocks, ctx)
  take_four = loss_of(scale_bytes(four).astype(jnp.int32)) < loss_of(scale_bytes(six).astype(jnp.int32))
  return jnp.where(take_four, four, six)


def block_hessians(x, block_size: int):
  """Per-block Hessians ``X_j^T X_j`` of activations for Hessian-weighted MSE.

  Args:
    x: activations ``(..., K)``; all leading axes are samples.
    block_size: the format's block size ``B``; ``K`` must be a multiple.

  Returns:
    float32 ``(K // B, B, B)``: for a weight ``w`` of shape ``(K, N)`` used as
    ``x @ w`` and quantized along ``K`` (axis 0), block ``j`` of every column
    has loss ``r^T H[j] r``, its contribution to ``||x @ (w - dq)||^2``.
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"block_hessians needs activations of shape (..., K), got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"block_hessians needs floating activations, got dtype {x.dtype}")
  if block_size <= 0:
    raise ValueError(f"block_hessians: block_size must be positive, got {block_size}")
  k = x.shape[-1]
  if k % block_size:
    raise ValueError(f"block_hessians: K={k} (shape {x.shape}) is not a multiple of block size {block_size}")
  xb = _bits.widen(x.reshape(-1, k // block_size, block_size))
  return jnp.einsum("snb,snd->nbd", xb, xb, precision=lax.Precision.HIGHEST)
