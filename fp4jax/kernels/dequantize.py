"""Pallas-Triton kernel: dequantize (codes + scales -> float) in one pass.

Reads the element codes (two E2M1 codes a byte, or one FP8 code a byte) and
the scale bytes once, writes ``dtype`` once. Elements are decoded from their
bits, scaled as ``fp4jax.scales.decode_blocks`` does (E8M0: two power-of-two
factors; E4M3: the scale, then the global decode factor), float32 subnormal
results flushed, saturated to ``dtype``'s range and cast: bit-identical to
``fp4jax.reference.dequantize_reference`` (NaN payloads aside).

Layouts as in :mod:`fp4jax.kernels.quantize_pack`: ``(A, K)`` rows or
``(A, K, C)`` columns, 4-bit codes packed along the block axis or, for
columns, along the last axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fp4jax.formats import Format, get_format
from fp4jax.kernels import common as C
from fp4jax.packing import unpack_fp4
from fp4jax.qarray import QArray, normalize_axis, validate_qarray, xla_only_reason
from fp4jax.reference import dequantize_reference

__all__ = ["Config", "dequantize_packed", "dequantize", "dequantize_qarray", "dequantize_packed_reference",
           "supported"]

#: Tile sizes and launch parameters (see :class:`fp4jax.kernels.common.TileConfig`).
Config = C.TileConfig

_OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _decode(code, codec: C.ElemCodec, dtype):
  """(float32 magnitude, int32 sign bit in bit 31) of sign-magnitude ``code``.

  The sign stays an integer until the end: Triton may fold the sign of a
  zero away in float arithmetic (``-0.0`` came out as ``+0.0`` on the GPU).
  """
  mag = code & ((1 << codec.sign_shift) - 1)
  v = C.decode_magnitude(jnp.minimum(mag, codec.max_code), codec)
  for c, val in C.special_values(dtype).items():  # NaN / Inf codes above max_code
    v = jnp.where(mag == c, np.float32(abs(val)), v)
  sign = ((code >> codec.sign_shift) & 1) << 31  # code 8 of E2M1 is -0.0, as XLA decodes it
  return v, sign


def scale_magnitudes(v, sign, sbytes, fmt: Format, gdec, out_dtype):
  """``decode_blocks`` then the saturating cast, for magnitudes ``v`` and sign bits ``sign``."""
  if fmt.power_of_two_scales:
    e = sbytes - fmt.scale_bias
    a = e >> 1
    # The reference's scale_by_pow2: two normal factors, same rounding.
    out = v * C.i32_to_f32((a + 127) << 23) * C.i32_to_f32((e - a + 127) << 23)
    out = jnp.where(sbytes == fmt.scale_nan_byte, np.float32(np.nan), out)
  else:
    s, s_sign = _decode(sbytes, C.ElemCodec.of(fmt.scale_dtype), fmt.scale_dtype)
    out = v * s
    sign = sign ^ s_sign
    if gdec is not None:
      out = out * jnp.abs(gdec)
      sign = sign ^ (C.f32_to_i32(gdec) & jnp.int32(-(2**31)))
  bits = C.f32_to_i32(out)
  bits = jnp.where((bits & 0x7F800000) == 0, 0, bits)  # flush (signs come below)
  # A Python int: a bitcast of a numpy constant inside the kernel does not
  # lower for Triton (jax 0.10 and 0.11 fail on every GPU call).
  big = int(np.float32(jnp.finfo(out_dtype).max).view(np.int32))
  is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
  bits = jnp.where(is_nan, bits, jnp.minimum(bits, big))  # saturate the magnitude
  return C.i32_to_f32(bits | sign).astype(out_dtype)


def dequantize_kernel(*refs, fmt: Format, tiling: C.Tiling, pack_axis, words: bool, has_global: bool,
                      out_dtype, overflow: str = "saturate"):
  """One tile: codes + scale bytes -> ``out_dtype`` values.

  Refs: ``codes`` (uint8), ``scales`` (uint8), [``gdec (1,)``], ``out``.
  ``pack_axis``: tile axis along which two 4-bit codes share a byte, or None.
  ``words``: 2-byte outputs of codes packed along the last axis are written
  as uint32 words holding both halves of a byte's pair, so the kernel never
  interleaves even and odd elements (the caller bitcasts the words back).
  """
  if has_global:
    codes_ref, scales_ref, gdec_ref, out_ref = refs
    gdec = gdec_ref[0]
  else:
    codes_ref, scales_ref, out_ref = refs
    gdec = None
  kax, rax = tiling.kax, tiling.kax + 1
  codec = C.ElemCodec.of(fmt.elem_dtype)
  decode = lambda c: _decode(c, codec, fmt.elem_dtype)
  # "cast": saturate at float32's range, then the plain cast (inf beyond out_dtype's), as fake quantization.
  sat_dtype = out_dtype if overflow == "saturate" else np.dtype(np.float32)
  scaled = lambda *args: scale_magnitudes(*args, fmt, gdec, sat_dtype).astype(out_dtype)
  raw = tiling.load(codes_ref).astype(jnp.int32)
  sbytes = tiling.load(scales_ref).astype(jnp.int32)
  if words:
    lo, hi = raw & 0xF, raw >> 4
    if kax == 1:  # rows: a byte's pair lies in one block
      bsz = fmt.block_size // 2
      s_lo = s_hi = jnp.expand_dims(sbytes, rax)
    else:  # columns packed along the last axis: neighbouring columns' scales
      bsz = fmt.block_size
      s_lo, s_hi = (jnp.expand_dims(t, rax) for t in lax.unstack(C.split_axis(sbytes, 1, 2), axis=-1))
    out_lo = scaled(*decode(C.split_axis(lo, kax, bsz)), s_lo)
    out_hi = scaled(*decode(C.split_axis(hi, kax, bsz)), s_hi)
    half = lambda o: lax.bitcast_convert_type(o, jnp.uint16).astype(jnp.uint32)
    word = half(out_lo) | (half(out_hi) << 16)
    tiling.store(out_ref, word.reshape(out_ref.shape))
    return
  codes = raw if pack_axis is None else C.unpack_pairs(raw, pack_axis)
  v, sign = decode(C.split_axis(codes, kax, fmt.block_size))
  out = scaled(v, sign, jnp.expand_dims(sbytes, rax))
  tiling.store(out_ref, out.reshape(out_ref.shape))


def supported(shape, fmt: Format, axis: int, dtype, packed_last: bool) -> str | None:
  """None if the kernel handles the case, else why not."""
  if np.dtype(dtype) not in [np.dtype(d) for d in _OUT_DTYPES]:
    return f"output dtype {np.dtype(dtype)} (expected float32, bfloat16 or float16)"
  return C.unsupported_layout(shape, fmt, axis, packed_last)


@functools.partial(jax.jit, static_argnames=("shape", "fmt", "axis", "packed_last", "dtype", "config",
                                             "interpret", "overflow"))
def _dequantize_core(codes, scales, global_scale, *, shape, fmt: Format, axis: int, packed_last: bool,
                     dtype, config: Config | None, interpret: bool, overflow: str = "saturate"):
  shape3d = C.as_3d(shape, axis)
  cfg = config or C.default_tiles(shape3d, fmt, np.dtype(dtype).itemsize)
  cfg.check(fmt, shape3d, packed_last)
  tiling = C.Tiling(shape3d, cfg.block_m, cfg.block_k)
  if fmt.elem_bits == 4:
    along_k = not tiling.col or not packed_last
    pack_axis = tiling.kax if along_k else 1
    k_div, m_div = (2, 1) if along_k else (1, 2)
  else:
    pack_axis, k_div, m_div = None, 1, 1
  words = pack_axis == 1 and np.dtype(dtype).itemsize == 2
  operands = [codes.reshape(tiling.array_shape(k_div, m_div)),
              scales.reshape(tiling.array_shape(fmt.block_size))]
  in_specs = [tiling.spec(k_div, m_div), tiling.spec(fmt.block_size)]
  if fmt.has_global_scale:
    operands.append(jnp.asarray(global_scale, jnp.float32).reshape(1))
    in_specs.append(tiling.scalar_spec())
  kernel = functools.partial(dequantize_kernel, fmt=fmt, tiling=tiling, pack_axis=pack_axis, words=words,
                             has_global=fmt.has_global_scale, out_dtype=np.dtype(dtype), overflow=overflow)
  if words:
    out_spec, out_struct = tiling.spec(k_div, m_div), jax.ShapeDtypeStruct(tiling.array_shape(k_div, m_div), jnp.uint32)
  else:
    out_spec, out_struct = tiling.spec(), jax.ShapeDtypeStruct(tiling.array_shape(), dtype)
  out = pl.pallas_call(
      kernel,
      grid=tiling.grid,
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_struct,
      compiler_params=C.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name=f"dequantize_{fmt.name}",
  )(*operands)
  if words:
    out = lax.bitcast_convert_type(out, dtype)  # (..., 2): low half = even element
  return out.reshape(shape)


def _check(shape, fmt, axis, dtype, packed_last):
  why = supported(shape, fmt, axis, dtype, packed_last)
  if why is not None:
    raise ValueError(f"no Pallas dequantize kernel for shape {tuple(shape)} {fmt!r} axis {axis} "
                     f"dtype {np.dtype(dtype)}: {why}")


def dequantize_packed(codes, scales, global_scale=None, *, fmt, axis: int = -1, dtype=jnp.bfloat16,
                      config: Config | None = None, interpret: bool = False, overflow: str = "saturate"):
  """Inverse of :func:`fp4jax.kernels.quantize_pack.quantize_packed`, in one pass.

  Args:
    codes: 4-bit formats: uint8 of shape ``S`` with ``S[axis]`` halved (two
      codes a byte along ``axis``, element ``2i`` in the low nibble); 8-bit
      formats: ``fmt.elem_dtype`` (or uint8) of shape ``S``.
    scales: ``fmt.scale_dtype`` (or uint8) of shape ``S`` with ``S[axis] //
      block_size``.
    global_scale: float32 scalar for NVFP4, else None.
    fmt: the format (or its name).
    axis: the block axis.
    dtype: float32, bfloat16 or float16 output.
    config: tile sizes; a heuristic when None.
    interpret: Pallas interpret mode (CPU tests).
    overflow: ``"saturate"`` (results beyond ``dtype``'s range become its
      largest finite value, as ``fp4jax.dequantize``) or ``"cast"`` (computed
      in float32, saturating at its range, then cast to ``dtype``: beyond
      ``dtype``'s range, inf; the bits of ``fp4jax.qat``'s fake quantization).

  Returns:
    ``dtype`` array of shape ``S``, bit-identical to ``fp4jax.dequantize``
    (``overflow="cast"``: to ``fp4jax.dequantize(q, float32).astype(dtype)``).
  """
  if overflow not in ("saturate", "cast"):
    raise ValueError(f"dequantize_packed: overflow must be 'saturate' or 'cast', got {overflow!r}")
  fmt = get_format(fmt)
  codes, scales = jnp.asarray(codes), jnp.asarray(scales)
  axis = normalize_axis(axis, codes.ndim, codes.shape)
  shape = list(codes.shape)
  if fmt.elem_bits == 4:
    if codes.dtype != jnp.uint8:
      raise ValueError(f"dequantize_packed: {fmt!r} codes must be uint8 (two a byte), got dtype {codes.dtype}")
    shape[axis] *= 2
  elif codes.dtype not in (np.dtype(fmt.elem_dtype), np.dtype(jnp.uint8)):
    raise ValueError(f"dequantize_packed: {fmt!r} codes must be {np.dtype(fmt.elem_dtype)} or uint8, got {codes.dtype}")
  want = list(shape)
  want[axis] //= fmt.block_size
  if scales.dtype not in (np.dtype(fmt.scale_dtype), np.dtype(jnp.uint8)) or list(scales.shape) != want:
    raise ValueError(f"dequantize_packed: scales must be {np.dtype(fmt.scale_dtype)} (or uint8) of shape "
                     f"{tuple(want)} for codes of shape {tuple(codes.shape)}, got {scales.dtype} {tuple(scales.shape)}")
  if fmt.has_global_scale != (global_scale is not None):
    raise ValueError(f"dequantize_packed: {fmt!r} {'needs' if fmt.has_global_scale else 'takes no'} global_scale")
  _check(shape, fmt, axis, dtype, packed_last=False)
  return _dequantize_core(lax.bitcast_convert_type(codes, jnp.uint8), lax.bitcast_convert_type(scales, jnp.uint8),
                          global_scale, shape=tuple(shape), fmt=fmt, axis=axis, packed_last=False,
                          dtype=np.dtype(dtype), config=config, interpret=interpret, overflow=overflow)


def qarray_codes(q: QArray):
  """The kernel's view of ``q.values``: uint8, 4-bit codes packed in pairs in memory order, flat.

  A bitcast of float4 pairs to bytes, element ``2i`` in the low nibble; XLA
  stores float4 arrays packed on the GPU, so this moves no data there.
  Consecutive elements in memory pair along the last axis when it is even,
  and along the block axis when every axis after it has length 1 (the row
  layout, e.g. shape ``(32, 1)`` blocked along axis 0): the caller reshapes.
  """
  v = q.values
  if q.fmt.elem_bits == 4:
    v = v.reshape(-1, 2)
  return lax.bitcast_convert_type(v, jnp.uint8)


def dequantize(q: QArray, dtype=jnp.float32, *, config: Config | None = None, interpret: bool = False):
  """``fp4jax.dequantize(q, dtype)`` through the kernel: same bits, one pass."""
  validate_qarray(q)
  if why := xla_only_reason(q):
    raise ValueError(f"kernels.dequantize: {why}")
  _check(q.shape, q.fmt, q.axis, dtype, packed_last=True)
  return dequantize_qarray(q, dtype, config=config, interpret=interpret)


def dequantize_qarray(q: QArray, dtype, *, config: Config | None = None, interpret: bool = False):
  """:func:`dequantize` of a QArray the caller has checked (valid, ``supported`` is None)."""
  return _dequantize_core(qarray_codes(q), lax.bitcast_convert_type(q.scales, jnp.uint8), q.global_scale,
                          shape=tuple(q.shape), fmt=q.fmt, axis=q.axis % q.ndim, packed_last=True,
                          dtype=np.dtype(dtype), config=config, interpret=interpret)


def dequantize_packed_reference(codes, scales, global_scale=None, *, fmt, axis: int = -1, dtype=jnp.bfloat16):
  """:func:`dequantize_packed` through ``unpack_fp4`` and the jnp reference."""
  fmt = get_format(fmt)
  axis = normalize_axis(axis, codes.ndim, codes.shape)
  values = unpack_fp4(codes, axis=axis) if fmt.elem_bits == 4 else lax.bitcast_convert_type(codes, fmt.elem_dtype)
  q = QArray(values, lax.bitcast_convert_type(scales, fmt.scale_dtype),
             None if global_scale is None else jnp.asarray(global_scale, jnp.float32), fmt, axis)
  return dequantize_reference(q, dtype=np.dtype(dtype))
