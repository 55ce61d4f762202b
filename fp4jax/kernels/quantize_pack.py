"""Pallas-Triton kernels: fused quantize + pack, and NVFP4's tensor amax.

One pass over the input per program tile: load, flush float32 subnormals,
block absolute maxima, the scale rule, the element codes (bit arithmetic, see
:mod:`fp4jax.kernels.common`), the NaN scale for non-finite blocks, packing
two E2M1 codes a byte, and the stores. The results match
``fp4jax.reference.quantize_reference`` bit for bit.

NVFP4 without a given ``global_scale`` takes two passes over the input: the
block scales are ``amax_block / 6 * 448 / amax_tensor`` rounded to E4M3, so no
element code can be written before the whole tensor has been read; keeping
the tensor on chip until then is impossible beyond the L2 size (50 MB), so the
first pass (:func:`tensor_amax`) reduces the tensor's amax (per-tile partial
maxima, then one tiny XLA max) and the second quantizes. Two reads and one
write; with a calibrated ``global_scale`` it is one pass.

Layouts: an input of shape ``S`` with block axis ``axis`` is viewed as
``(A, K, C)`` (free reshape). ``C == 1`` ("row"): tiles ``(block_m, block_k)``
of the ``(A, K)`` matrix, blocks contiguous. ``C > 1`` ("column", e.g. a
``(K, N)`` weight quantized along ``K``): tiles ``(block_k, block_m)`` of one
``(K, C)`` slab, a block is ``block_size`` rows of one column.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fp4jax import _bits
from fp4jax.formats import Format, get_format
from fp4jax.kernels import common as C
from fp4jax.packing import pack_fp4
from fp4jax.qarray import QArray, normalize_axis
from fp4jax.reference import given_global_encode, global_factors, quantize_reference
from fp4jax.scales import SCALE_RULES, dequant_unit_factor, loss_unit_target, search_window

__all__ = [
    "Config",
    "default_config",
    "quantize_packed",
    "quantize",
    "quantize_qarray",
    "quantize_rows",
    "quantize_columns_to_rows",
    "tensor_amax",
    "quantize_packed_reference",
    "supported",
]

_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


#: Tile sizes and launch parameters (see :class:`fp4jax.kernels.common.TileConfig`).
Config = C.TileConfig
default_config = C.default_tiles


# ---- the scale rules on per-block values ------------------------------------------
def pow2_rule_exponent(amax_bits, fmt: Format, rule: str):
  """E8M0 floor / ceil exponents from int32 amax bits (scales.py's formulas)."""
  e = (amax_bits >> 23) - 127 - fmt.elem_emax
  if rule == "ceil" or rule == "mse":
    e = e + ((amax_bits & 0x7FFFFF) > fmt.elem_max_significand_bits).astype(jnp.int32)
  return jnp.clip(e, fmt.scale_exp_min, fmt.scale_exp_max)


def e4m3_scale_code(amax_bits, genc, fmt: Format, rule: str):
  """NVFP4 block scale codes (int32 0..0x7E) for "floor" / "ceil" / "nearest"."""
  sc = C.ElemCodec.of(fmt.scale_dtype)
  amax = C.i32_to_f32(amax_bits)
  # The reference's order: one tensor-wide factor encode * float32(1 / M),
  # each product flushed where it is subnormal (fp4jax.scales.fixed._ideal_scale).
  factor = C.flush_f32(genc * (np.float32(1) / np.float32(fmt.elem_max)))
  ideal = C.flush_f32(amax * factor)
  code, got = C.round_to_grid(jnp.minimum(jnp.maximum(ideal, 0.0), np.float32(fmt.scale_max)), sc)
  if rule == "floor":
    code = code - (got > ideal).astype(jnp.int32)
  elif rule == "ceil" or rule == "mse":
    code = code + (got < ideal).astype(jnp.int32)
  return jnp.clip(code, 0, fmt.scale_nan_byte - 1)


def encode_pow2(x, e, codec, fmt):
  """Element codes (signed, int32) and rounded |values| for E8M0 exponent ``e``."""
  y = C.flush_f32(x) * C.i32_to_f32((127 - e) << 23)  # exact: 2**-e is normal
  code, r = C.round_to_grid(jnp.minimum(jnp.abs(y), np.float32(fmt.elem_max)), codec)
  return code | C.sign_code(C.f32_to_i32(y), codec), r


def _encode_e4m3(x, code_s, gdec, codec, fmt):
  """Element codes and rounded |values| for NVFP4 block scale codes ``code_s``."""
  y = C.flush_f32(x) * e4m3_encode_factor(code_s, gdec, fmt)
  code, r = C.round_to_grid(jnp.minimum(jnp.abs(y), np.float32(fmt.elem_max)), codec)
  return code | C.sign_code(C.f32_to_i32(y), codec), r


def e4m3_encode_factor(code_s, gdec, fmt):
  """``1 / (s * g)`` per NVFP4 block scale code: the product flushed, the reciprocal correctly
  rounded, 0 for a zero scale (``fp4jax.scales.element_factor``)."""
  s = C.flush_f32(C.decode_magnitude(code_s, C.ElemCodec.of(fmt.scale_dtype)) * gdec)
  pos = s > 0
  # compute_once: in interpret mode XLA would otherwise fuse the division into every element's
  # loss terms, and jax 0.11's CPU compiler then takes minutes on the "mse" search.
  return _bits.compute_once(jnp.where(pos, _bits.div_rn(1.0, jnp.where(pos, s, 1.0)), 0.0))


def _mse_loss(target, dq, axis):
  """The reference's block loss (fp4jax.scales.search._loss_function): same ops, same order."""
  r = C.flush_f32(target - C.flush_f32(dq))
  return jnp.expand_dims(_bits.halving_sum(_bits.exact_square(r), axis), axis)


def _unit_target(x, amax_bits, genc=None):
  """The reference's ``loss_unit_target`` of a tile: ``unit`` per block (block axis kept) and ``target``."""
  return loss_unit_target(C.flush_f32(jnp.abs(x)), C.i32_to_f32(amax_bits), genc)


# ---- the kernel ----------------------------------------------------------------------
def block_amax_bits(x, rax: int):
  """int32 bits of each block's amax along ``rax`` (kept), 0 where the block is non-finite or
  all subnormal / zero; and where it is non-finite."""
  return flush_amax_bits(jnp.max(C.f32_to_i32(x) & 0x7FFFFFFF, axis=rax, keepdims=True))


def flush_amax_bits(amax_bits):
  """:func:`block_amax_bits` from a block's largest ``|x|`` bits (int32): 0 where the block is
  non-finite or all subnormal / zero; and where it is non-finite."""
  nonfinite = amax_bits >= 0x7F800000
  # Flushing after the max: only a block of subnormals and zeros has a
  # subnormal max, and the reference sees zeros there.
  return jnp.where(nonfinite | (amax_bits < 0x00800000), 0, amax_bits), nonfinite


def quantize_pack_kernel(*refs, fmt: Format, rule: str, tiling: C.Tiling, pack_axis, has_global: bool):
  """One tile: ``x`` -> codes (packed two a byte for 4-bit elements) and scale bytes.

  Refs: ``x`` tile ``(t0, t1)`` (``tiling.tile``), [``gdec (1,)``, ``genc (1,)``],
  ``codes``, ``scales`` (uint8). ``pack_axis``: the axis of the blocked view
  (``(t0, nb, B)`` rows, ``(nb, B, t1)`` columns) along which pairs of codes
  share a byte, or None for 8-bit elements.
  """
  if has_global:
    x_ref, gdec_ref, genc_ref, codes_ref, scales_ref = refs
  else:
    x_ref, codes_ref, scales_ref = refs
  rax = tiling.kax + 1  # the within-block axis of the blocked view
  codec = C.ElemCodec.of(fmt.elem_dtype)

  x = C.split_axis(tiling.load(x_ref).astype(jnp.float32), tiling.kax, fmt.block_size)
  amax_bits, nonfinite = block_amax_bits(x, rax)

  if fmt.power_of_two_scales:
    if rule == "mse":
      e, codes = _mse_pow2(x, amax_bits, fmt, codec, rax)
    else:
      e = pow2_rule_exponent(amax_bits, fmt, rule)
      codes, _ = encode_pow2(x, e, codec, fmt)
    scale_code = e + fmt.scale_bias
  else:
    gdec, genc = gdec_ref[0], genc_ref[0]
    if rule == "mse":
      scale_code, codes = _mse_e4m3(x, amax_bits, gdec, genc, fmt, codec, rax)
    else:
      scale_code = e4m3_scale_code(amax_bits, genc, fmt, rule)
      codes, _ = _encode_e4m3(x, scale_code, gdec, codec, fmt)
  scale_code = jnp.where(nonfinite, fmt.scale_nan_byte, scale_code)
  codes = jnp.where(nonfinite, 0, codes)  # the reference zeroes non-finite blocks

  out = codes.astype(jnp.uint8) if pack_axis is None else C.pack_pairs(codes, pack_axis)
  tiling.store(codes_ref, out.reshape(codes_ref.shape))
  tiling.store(scales_ref, jnp.squeeze(scale_code, rax).astype(jnp.uint8))


def _mse_pow2(x, amax_bits, fmt, codec, rax):
  unit, target = _unit_target(x, amax_bits)
  anchor = pow2_rule_exponent(amax_bits, fmt, "ceil") + fmt.scale_bias
  best_loss = best_e = best_codes = None
  offsets, _ = search_window(fmt, False)
  for off in offsets:
    e = jnp.clip(anchor + off, 0, fmt.scale_nan_byte - 1) - fmt.scale_bias
    codes, r = encode_pow2(x, e, codec, fmt)
    loss = _mse_loss(target, _bits.scale_by_pow2(r, e - unit), rax)
    if best_loss is None:
      best_loss, best_e, best_codes = loss, e, codes
    else:
      better = loss < best_loss  # ties keep the smaller scale, as the reference
      best_loss = jnp.where(better, loss, best_loss)
      best_e = jnp.where(better, e, best_e)
      best_codes = jnp.where(better, codes, best_codes)
  return best_e, best_codes


def _mse_e4m3(x, amax_bits, gdec, genc, fmt, codec, rax):
  sc = C.ElemCodec.of(fmt.scale_dtype)
  unit, target = _unit_target(x, amax_bits, genc)
  anchor = jnp.maximum(e4m3_scale_code(amax_bits, genc, fmt, "ceil"), fmt.scale_min_normal_byte)
  offsets, with_zero = search_window(fmt, False)
  assert not with_zero and offsets.step == 1

  def candidate(off):
    code_s = jnp.clip(anchor + off, 0, fmt.scale_max_byte)
    codes, r = _encode_e4m3(x, code_s, gdec, codec, fmt)
    dec = dequant_unit_factor(C.decode_magnitude(code_s, sc), unit)  # per block
    return _mse_loss(target, r * dec, rax), code_s, codes  # r * dec is exact

  def step(i, carry):
    best_loss, best_code, best_codes = carry
    loss, code_s, codes = candidate(i)
    better = loss < best_loss  # candidates ascend: ties keep the smaller scale
    return (jnp.where(better, loss, best_loss), jnp.where(better, code_s, best_code),
            jnp.where(better, codes, best_codes))

  # A loop, not 16 unrolled copies: compile time stays small.
  carry = lax.fori_loop(offsets.start + 1, offsets.stop, step, candidate(offsets.start))
  return carry[1], carry[2]


# ---- wrappers ------------------------------------------------------------------------
def supported(x_shape, x_dtype, fmt: Format, axis: int, scale_rule: str, pack_last: bool) -> str | None:
  """None if the kernel handles the case, else the reason it does not."""
  if np.dtype(x_dtype) not in [np.dtype(d) for d in _INPUT_DTYPES]:
    return f"input dtype {np.dtype(x_dtype)} (expected float32, bfloat16 or float16)"
  if scale_rule not in SCALE_RULES:
    return f"scale_rule {scale_rule!r}"
  if scale_rule == "nearest" and fmt.power_of_two_scales:
    return f"scale_rule 'nearest' with {fmt!r}'s power-of-two scales"
  return C.unsupported_layout(x_shape, fmt, axis, pack_last)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "scale_rule", "pack_last", "config", "interpret"))
def _quantize_core(x, global_scale, *, fmt: Format, axis: int, scale_rule: str, pack_last: bool,
                   config: Config | None, interpret: bool):
  """(codes uint8, scale bytes uint8, global_scale or None), in the kernel's 2-D / 3-D view."""
  shape3d = C.as_3d(x.shape, axis)
  cfg = config or default_config(shape3d, fmt, x.dtype.itemsize)
  cfg.check(fmt, shape3d, pack_last)
  tiling = C.Tiling(shape3d, cfg.block_m, cfg.block_k)
  x3 = tiling.view(x)
  if fmt.elem_bits == 4:
    # Rows pack along the block; columns along the last axis (QArray's
    # memory order) or along the block axis (pack_fp4's convention).
    pack_axis = 2 if (not tiling.col or pack_last) else 1
    k_div, m_div = (2, 1) if pack_axis == tiling.kax + 1 else (1, 2)
  else:
    pack_axis, k_div, m_div = None, 1, 1
  operands, in_specs = [x3], [tiling.spec()]
  if fmt.has_global_scale:
    if global_scale is None:
      amax = C.i32_to_f32(tensor_amax_bits(x3, tiling, cfg, interpret=interpret))
      genc, global_scale = global_factors(amax, fmt)
    else:
      global_scale = jnp.asarray(global_scale, jnp.float32)
      genc = given_global_encode(global_scale)
    operands += [global_scale.reshape(1), genc.reshape(1)]
    in_specs += [tiling.scalar_spec(), tiling.scalar_spec()]
  kernel = functools.partial(
      quantize_pack_kernel, fmt=fmt, rule=scale_rule, tiling=tiling, pack_axis=pack_axis,
      has_global=fmt.has_global_scale)
  codes, scales = pl.pallas_call(
      kernel,
      grid=tiling.grid,
      in_specs=in_specs,
      out_specs=[tiling.spec(k_div, m_div), tiling.spec(fmt.block_size)],
      out_shape=[jax.ShapeDtypeStruct(tiling.array_shape(k_div, m_div), jnp.uint8),
                 jax.ShapeDtypeStruct(tiling.array_shape(fmt.block_size), jnp.uint8)],
      compiler_params=C.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name=f"quantize_{fmt.name}_{scale_rule}",
  )(*operands)
  return codes, scales, (global_scale if fmt.has_global_scale else None)


# ---- NVFP4 tensor amax -------------------------------------------------------------
def tensor_amax_kernel(x_ref, o_ref, *, tiling: C.Tiling):
  """Partial tensor amax of one tile, as float32 bits, with the reference's rules.

  NaN and Inf elements are skipped (the finite elements of their blocks still
  count) and float32 subnormals count as zero.
  """
  abits = C.f32_to_i32(tiling.load(x_ref).astype(jnp.float32)) & 0x7FFFFFFF
  amax = jnp.max(jnp.where(abits < 0x7F800000, abits, 0))
  # Flushing after the max: it is subnormal only if every element was.
  o_ref[...] = jnp.where(amax < 0x00800000, 0, amax)


def tensor_amax_bits(x3, tiling: C.Tiling, config: Config, *, interpret: bool):
  """int32 bits of NVFP4's tensor amax of the kernel view ``x3``: one read pass.

  Each program writes its tile's maximum; XLA reduces those (one int32 per
  tile, under 0.1% of the input bytes).
  """
  partial = pl.pallas_call(
      functools.partial(tensor_amax_kernel, tiling=tiling),
      grid=tiling.grid,
      in_specs=[tiling.spec()],
      out_specs=tiling.program_spec(),
      out_shape=jax.ShapeDtypeStruct(tiling.grid, jnp.int32),
      compiler_params=C.compiler_params(config.num_warps, config.num_stages),
      interpret=interpret,
      name="tensor_amax",
  )(x3)
  return jnp.max(partial)


# ---- public entry points -------------------------------------------------------------
def _canonical(x, fmt, axis, scale_rule, pack_last):
  fmt = get_format(fmt)
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("quantize_packed needs an array with at least one axis, got a scalar")
  axis = normalize_axis(axis, x.ndim, x.shape)
  scale_rule = fmt.default_scale_rule if scale_rule is None else scale_rule
  why = supported(x.shape, x.dtype, fmt, axis, scale_rule, pack_last)
  if why is not None:
    raise ValueError(f"no Pallas quantize kernel for input shape {tuple(x.shape)} dtype {x.dtype} "
                     f"axis {axis} {fmt!r} scale_rule={scale_rule!r}: {why}")
  return x, fmt, axis, scale_rule


def quantize_packed(x, fmt, *, axis: int = -1, scale_rule: str | None = None, global_scale=None,
                    config: Config | None = None, interpret: bool = False):
  """Quantizes ``x`` along ``axis`` and packs the codes, in one kernel pass.

  Args:
    x: float32 / bfloat16 / float16 array of shape ``S``; ``S[axis]`` a multiple
      of ``fmt.block_size``.
    fmt: ``MXFP4``, ``NVFP4``, ``MXFP8_E4M3``, ``MXFP8_E5M2`` or a name.
    axis: the block axis.
    scale_rule: ``"floor"``, ``"ceil"``, ``"mse"`` or (NVFP4) ``"nearest"``;
      default ``fmt.default_scale_rule``.
    global_scale: NVFP4's float32 decode factor; computed from the tensor amax
      (an extra pass) when None.
    config: tile sizes (:class:`Config`); a heuristic when None.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    ``(codes, scales, global_scale)``: ``codes`` uint8 shaped ``S`` with
    ``S[axis]`` halved (4-bit elements, two a byte, element ``2i`` in the low
    nibble, as :func:`fp4jax.pack_fp4` along ``axis``) or ``fmt.elem_dtype``
    shaped ``S`` (8-bit elements); ``scales`` in ``fmt.scale_dtype`` shaped
    ``S`` with ``S[axis] // block_size``; ``global_scale`` a float32 scalar
    (NVFP4) or None. Bit-identical to ``fp4jax.quantize(..., backend="xla")``.
  """
  x, fmt, axis, scale_rule = _canonical(x, fmt, axis, scale_rule, pack_last=False)
  codes, scales, gs = _quantize_core(x, global_scale, fmt=fmt, axis=axis, scale_rule=scale_rule,
                                     pack_last=False, config=config, interpret=interpret)
  shape = list(x.shape)
  sshape = list(shape)
  sshape[axis] //= fmt.block_size
  if fmt.elem_bits == 4:
    shape[axis] //= 2
    codes = codes.reshape(shape)
  else:
    codes = lax.bitcast_convert_type(codes, fmt.elem_dtype).reshape(shape)
  scales = lax.bitcast_convert_type(scales, fmt.scale_dtype).reshape(sshape)
  return codes, scales, gs


def quantize(x, fmt, *, axis: int = -1, scale_rule: str | None = None, global_scale=None,
             config: Config | None = None, interpret: bool = False) -> QArray:
  """:func:`fp4jax.quantize` through the kernel: a :class:`QArray`, same bits.

  4-bit codes are packed along the last axis in memory and reinterpreted as
  ``float4_e2m1fn`` of shape ``S`` (a bitcast and a reshape).
  """
  x, fmt, axis, scale_rule = _canonical(x, fmt, axis, scale_rule, pack_last=True)
  return quantize_qarray(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale, config=config,
                         interpret=interpret)


def quantize_qarray(x, fmt: Format, *, axis: int, scale_rule: str, global_scale=None,
                    config: Config | None = None, interpret: bool = False) -> QArray:
  """:func:`quantize` of arguments the caller has checked (``supported`` is None, ``axis`` negative)."""
  codes, scales, gs = _quantize_core(x, global_scale, fmt=fmt, axis=axis, scale_rule=scale_rule,
                                     pack_last=True, config=config, interpret=interpret)
  values = lax.bitcast_convert_type(codes, fmt.elem_dtype).reshape(x.shape)
  sshape = list(x.shape)
  sshape[axis] //= fmt.block_size
  scales = lax.bitcast_convert_type(scales, fmt.scale_dtype).reshape(sshape)
  return QArray(values, scales, gs, fmt, axis)


def quantize_rows(x, fmt: Format, *, scale_rule: str, global_scale=None, config: Config | None = None,
                  interpret: bool = False) -> QArray:
  """:func:`quantize_qarray` of a 2-D ``x`` blocked along its last axis, stored ``layout="rows"``.

  The kernel's packed bytes are already the byte rows (two codes a byte along the last axis, element
  ``2i`` low): they become the QArray's leaves as they are, where ``with_layout(quantize_qarray(...),
  "rows")`` would reinterpret them as ``float4_e2m1fn`` and pack them again (on a GPU, XLA copies for
  the first and runs a pass for the second). The same leaves either way (tests compare them).
  """
  codes, scales, gs = _quantize_core(x, global_scale, fmt=fmt, axis=-1, scale_rule=scale_rule,
                                     pack_last=True, config=config, interpret=interpret)
  m, k = x.shape
  return QArray(codes.reshape(m, k * fmt.elem_bits // 8), scales.reshape(m, k // fmt.block_size), gs, fmt, -1,
                None, "rows")


def quantize_columns_to_rows(x, fmt: Format, *, axis: int, scale_rule: str, global_scale=None,
                             config: Config | None = None, interpret: bool = False) -> QArray:
  """:func:`quantize_qarray` of a 2-D ``x (K, N)`` blocked along its first axis (``axis`` 0 or -2, kept
  as the QArray's), stored ``layout="rows"``: the byte rows are ``(N, K * bits / 8)`` and ``(N, K / B)``.

  The kernel packs two codes a byte along ``K`` (:func:`fp4jax.pack_fp4`'s convention, element ``2i``
  low), so the rows are its bytes transposed: one uint8 transpose of ``K * N / 2`` bytes, where
  ``with_layout(quantize_qarray(...), "rows")`` would unpack ``K * N`` codes, transpose them and pack them
  again (on the H200, for a 4096 x 14336 weight of ``benchmarks/qat_step.py``: transpose and pack fusions
  of about 50 + 40 us each call). The same leaves either way (tests compare them).
  """
  codes, scales, gs = _quantize_core(x, global_scale, fmt=fmt, axis=axis, scale_rule=scale_rule,
                                     pack_last=False, config=config, interpret=interpret)
  k, n = x.shape
  return QArray(codes.reshape(k * fmt.elem_bits // 8, n).T, scales.reshape(k // fmt.block_size, n).T, gs, fmt,
                axis, None, "rows")


def tensor_amax(x, fmt, *, axis: int = -1, config: Config | None = None, interpret: bool = False):
  """NVFP4's tensor amax of ``x`` (float32 scalar) as the reference computes it."""
  x, fmt, axis, _ = _canonical(x, fmt, axis, None, pack_last=False)
  shape3d = C.as_3d(x.shape, axis)
  cfg = config or default_config(shape3d, fmt, x.dtype.itemsize)
  cfg.check(fmt)
  tiling = C.Tiling(shape3d, cfg.block_m, cfg.block_k)
  return C.i32_to_f32(tensor_amax_bits(tiling.view(x), tiling, cfg, interpret=interpret))


def quantize_packed_reference(x, fmt, *, axis: int = -1, scale_rule: str | None = None, global_scale=None):
  """:func:`quantize_packed` through the jnp reference and ``pack_fp4``."""
  fmt = get_format(fmt)
  axis = normalize_axis(axis, x.ndim, x.shape)
  rule = fmt.default_scale_rule if scale_rule is None else scale_rule
  q = quantize_reference(x, global_scale, None, fmt=fmt, axis=axis, scale_rule=rule, pad=False)
  codes = pack_fp4(q.values, axis=axis) if fmt.elem_bits == 4 else q.values
  return codes, q.scales, q.global_scale
