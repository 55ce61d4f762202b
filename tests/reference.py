"""Independent numpy references for fp4jax's numerics (used by the tests only).

Nothing here imports fp4jax. Formats are described by their ml_dtypes types
and block sizes; exponents come from ``np.frexp`` or from comparisons in
float64, element rounding from ml_dtypes casts (round to nearest even), and
the "mse" rule is a brute force over every finite scale of the scale dtype.
The NVFP4 recipe steps that the spec defines in float32 (the tensor encode
factor and its reciprocal, the block scale ``amax * (encode * float32(1/6))``, the element
factor ``1 / (scale * decode)``) are evaluated in numpy float32; everything
else is float64.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

F32_TINY = 2.0**-126  # smallest normal float32
F32_MAX = float(np.finfo(np.float32).max)

# E2M1 by code, from the OCP MX spec's table: sign bit 3, exponent bits 2..1
# (bias 1), mantissa bit 0.
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the reference needs to know about a format."""

  name: str
  elem: type
  scale: type
  block: int
  global_scale: bool = False


SPECS = {
    "mxfp4": Spec("mxfp4", ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e8m0fnu, 32),
    "nvfp4": Spec("nvfp4", ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e4m3fn, 16, True),
    "mxfp8_e4m3": Spec("mxfp8_e4m3", ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu, 32),
    "mxfp8_e5m2": Spec("mxfp8_e5m2", ml_dtypes.float8_e5m2, ml_dtypes.float8_e8m0fnu, 32),
}


def pow2_scales(spec: Spec) -> bool:
  return spec.scale == ml_dtypes.float8_e8m0fnu


def elem_max(spec: Spec) -> float:
  return float(ml_dtypes.finfo(spec.elem).max)


def elem_grid(spec: Spec) -> np.ndarray:
  """Sorted non-negative finite element values, float64, from every bit pattern."""
  bits = ml_dtypes.finfo(spec.elem).bits
  codes = np.arange(2 ** (bits - 1), dtype=np.uint8)  # sign bit clear
  if bits == 4:
    vals = codes.astype(ml_dtypes.uint4).view(spec.elem)
  else:
    vals = codes.view(spec.elem)
  vals = vals.astype(np.float64)
  return np.unique(vals[np.isfinite(vals)])


def scale_table(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
  """(bytes, float64 values) of every finite non-negative scale, ascending."""
  b = np.arange(256, dtype=np.uint8)
  v = b.view(spec.scale).astype(np.float64)
  keep = np.isfinite(v) & (v >= 0) & ~np.signbit(v)
  return b[keep], v[keep]


def decode_scale_bytes(b, spec: Spec) -> np.ndarray:
  """float64 value of scale bytes; E8M0 byte e is 2.0**(e - 127), 0xFF NaN."""
  b = np.asarray(b, np.uint8)
  if pow2_scales(spec):
    return np.where(b == 0xFF, np.nan, np.ldexp(1.0, b.astype(np.int64) - 127))
  return b.view(spec.scale).astype(np.float64)


def round_elements(y, spec: Spec) -> np.ndarray:
  """Saturate to +-max, then round to nearest even via the ml_dtypes cast; float64."""
  m = elem_max(spec)
  return np.clip(np.asarray(y, np.float64), -m, m).astype(spec.elem).astype(np.float64)


def flush_f32_subnormals(x) -> np.ndarray:
  """|x| < 2**-126 -> signed zero; NaN and Inf pass."""
  x = np.asarray(x)
  return np.where(np.abs(x) < F32_TINY, np.copysign(np.zeros_like(x), x), x)


def global_factors(amax) -> tuple[np.float32, np.float32]:
  """NVFP4 (encode, decode) from the tensor's finite amax, in float32 as the recipe does."""
  amax = np.float32(amax)
  if not np.isfinite(amax) or amax <= 0:
    return np.float32(1.0), np.float32(1.0)
  with np.errstate(over="ignore"):
    enc = np.float32(6.0 * 448.0) / amax
  enc = min(enc, np.float32(2.0**126))
  return np.float32(enc), np.float32(np.float32(1.0) / enc)


# ---- fixed rules --------------------------------------------------------------
def floor_log2(a) -> np.ndarray:
  """Exact floor(log2(a)) for positive float64 ``a`` (frexp: a = m * 2**e, m in [0.5, 1))."""
  _, e = np.frexp(np.asarray(a, np.float64))
  return e.astype(np.int64) - 1


def pow2_scale_exponent(amax, spec: Spec, rule: str) -> np.ndarray:
  """E8M0 exponent of the floor / ceil rule for block maxima ``amax`` (float64)."""
  amax = np.asarray(amax, np.float64)
  emax = int(floor_log2(elem_max(spec)))
  if rule == "floor":
    e = np.where(amax > 0, floor_log2(np.where(amax > 0, amax, 1.0)) - emax, -127)
  elif rule == "ceil":
    # The smallest k with amax <= M * 2**k, by trying every k (exact in float64).
    ks = np.arange(-127, 128)
    fits = amax[..., None] <= elem_max(spec) * np.ldexp(1.0, ks)
    e = np.where(fits.any(-1), ks[np.argmax(fits, -1)], 127)
  else:
    raise ValueError(rule)
  return np.clip(e, -127, 127)


def e4m3_scale(ideal, rule: str) -> np.ndarray:
  """Round float32 ideal scales to E4M3 bytes: down / up / nearest-even (saturating)."""
  ideal = np.asarray(ideal, np.float32)
  codes, vals = scale_table(SPECS["nvfp4"])
  if rule == "nearest":
    return np.clip(ideal, 0, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
  if rule == "floor":
    idx = np.searchsorted(vals, ideal.astype(np.float64), side="right") - 1
  elif rule == "ceil":
    idx = np.searchsorted(vals, ideal.astype(np.float64), side="left")
  else:
    raise ValueError(rule)
  return codes[np.clip(idx, 0, len(vals) - 1)]


# ---- quantization ------------------------------------------------------------------
def encode(blocks, scale_value, spec: Spec, decode=None) -> np.ndarray:
  """Element values (float64) of float32 ``blocks`` (nb, B) under scales (nb,)."""
  scale_value = np.asarray(scale_value, np.float64)
  if pow2_scales(spec):
    return round_elements(blocks / scale_value[:, None], spec)  # exact division
  # The recipe: multiply by the float32 reciprocal of scale * decode.
  with np.errstate(over="ignore", divide="ignore"):
    s = np.float32(scale_value) * np.float32(decode)
    s = flush_f32_subnormals(s.astype(np.float32))
    factor = np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, np.float32(1)), np.float32(0))
  return round_elements(blocks.astype(np.float32) * factor.astype(np.float32)[:, None], spec)


def dequant(values, scale_value, spec: Spec, decode=None) -> np.ndarray:
  """values * scale * decode in float64 (NaN scales give NaN blocks)."""
  out = values * np.asarray(scale_value, np.float64)[:, None]
  if decode is not None:
    out = out * np.float64(decode)
  return out


def brute_force_mse(blocks, spec: Spec, decode=None, hessian=None):
  """The "mse" rule by trying every finite non-negative scale.

  Args:
    blocks: float32 (nb, B), finite.
    hessian: optional (nb, B, B): loss r^T H r per block instead of r^T r.

  Returns:
    (best byte per block (nb,), losses (nb, n_scales) float64, scale bytes).
    Ties go to the smaller scale (the first minimum).
  """
  blocks = np.asarray(blocks, np.float32)
  codes, vals = scale_table(spec)
  x = blocks.astype(np.float64)
  losses = np.empty((blocks.shape[0], len(codes)))
  for j, s in enumerate(vals):
    sv = np.full(blocks.shape[0], s)
    r = x - dequant(encode(blocks, sv, spec, decode), sv, spec, decode)
    if hessian is None:
      losses[:, j] = np.sum(r * r, axis=-1)
    else:
      losses[:, j] = np.einsum("nb,nbd,nd->n", r, np.asarray(hessian, np.float64), r)
  return codes[np.argmin(losses, axis=-1)], losses, codes


def near_tie_blocks(rng, spec: Spec, n: int, decode=None) -> np.ndarray:
  """float32 blocks (<= n, B) whose two best scales have losses a few float32 ulps apart.

  There, which scale "mse" picks depends on how the losses are rounded and
  summed: a kernel or backend that adds in another order, or fuses a product
  into an add, picks the other scale in about half of them. Built by moving one
  element (not the block maximum) to where the float64 losses of the two best
  scales cross, to the nearest float32.
  """
  b = spec.block
  blocks = rng.uniform(-1, 1, (n, b)) * elem_max(spec)
  # Element 0 fixes amax a little above a grid maximum, where the "floor" and
  # "ceil" scales compete (one clips it, the other rounds the rest coarsely);
  # element 1 moves.
  blocks[:, 0] = elem_max(spec) * rng.uniform(1.0, 1.3, n)
  blocks = (blocks * np.exp2(rng.integers(-8, 8, (n, 1)))).astype(np.float32)
  _, losses, codes = brute_force_mse(blocks, spec, decode)
  order = np.argsort(losses, axis=1, kind="stable")
  _, vals = scale_table(spec)
  s1, s2 = vals[order[:, 0]], vals[order[:, 1]]

  def gap(e):  # loss(best) - loss(second) with element 1 set to e, float64
    x = blocks.copy()
    x[:, 1] = e
    d = [np.sum((x - dequant(encode(x, s, spec, decode), s, spec, decode)) ** 2, axis=1) for s in (s1, s2)]
    return d[0] - d[1]

  amax = blocks[:, 0].astype(np.float64)
  grid = np.linspace(0.0, 0.99, 65)
  signs = np.stack([np.sign(gap((amax * t).astype(np.float32))) for t in grid], axis=1)
  change = np.argmax(signs[:, :-1] * signs[:, 1:] < 0, axis=1)
  ok = (signs[:, :-1] * signs[:, 1:] < 0).any(axis=1)
  lo = (amax * grid[change]).astype(np.float32).view(np.int32)
  hi = (amax * grid[change + 1]).astype(np.float32).view(np.int32)
  g_lo = np.sign(gap(lo.view(np.float32)))
  for _ in range(32):  # bisect on the bit patterns of positive float32s
    mid = lo + (hi - lo) // 2
    same = np.sign(gap(mid.view(np.float32))) == g_lo
    lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
  g_lo, g_hi = np.abs(gap(lo.view(np.float32))), np.abs(gap(hi.view(np.float32)))
  blocks[:, 1] = np.where(g_lo <= g_hi, lo, hi).view(np.float32)
  # A crossing at a rounding boundary of element 1 is a jump, not a near tie.
  near = np.minimum(g_lo, g_hi) <= 1e-6 * losses.min(axis=1)
  return blocks[ok & near]


def quantize(x, spec: Spec, rule: str, axis: int = -1, global_scale=None, hessian=None):
  """The whole reference quantizer.

  Args:
    x: float32 / bfloat16 / float16 numpy array; ``x.shape[axis]`` a multiple
      of the block size.
    spec, rule, axis: format, scale rule, block axis.
    global_scale: NVFP4 decode factor, or None to compute it from the amax.
    hessian: (n_blocks_along_axis, B, B) for the weighted "mse" rule.

  Returns:
    (values float64 shape of x, scale bytes uint8 with axis // B, decode or None).
  """
  x = flush_f32_subnormals(np.asarray(x).astype(np.float32))
  xm = np.moveaxis(x, axis, -1)
  lead, n = xm.shape[:-1], xm.shape[-1]
  nbk = n // spec.block
  blocks = xm.reshape(-1, spec.block)
  bad = ~np.isfinite(blocks).all(-1)
  fin = np.where(bad[:, None], np.float32(0), blocks)
  amax = np.abs(fin).max(-1).astype(np.float32)

  decode = encode_f = None
  if spec.global_scale:
    if global_scale is None:
      finite = np.abs(x[np.isfinite(x)])
      encode_f, decode = global_factors(finite.max() if finite.size else 0.0)
    else:
      decode = np.float32(global_scale)
      encode_f = np.float32(1.0) / decode

  if rule == "mse":
    h = None
    if hessian is not None:
      h = np.broadcast_to(np.asarray(hessian, np.float64), (int(np.prod(lead, dtype=int)), nbk, spec.block, spec.block))
      h = h.reshape(-1, spec.block, spec.block)
    sbytes, _, _ = brute_force_mse(fin, spec, decode, h)
  elif pow2_scales(spec):
    sbytes = (pow2_scale_exponent(amax, spec, rule) + 127).astype(np.uint8)
  else:
    # One tensor-wide factor: the encode factor times the float32 reciprocal of 6.
    ideal = amax * np.float32(encode_f * np.float32(1.0 / elem_max(spec)))
    sbytes = e4m3_scale(ideal.astype(np.float32), rule)
  sbytes = np.where(bad, 0xFF if pow2_scales(spec) else 0x7F, sbytes).astype(np.uint8)
  svals = decode_scale_bytes(np.where(bad, 0, sbytes), spec)
  values = encode(fin, svals, spec, decode)
  values = np.moveaxis(values.reshape(*lead, n), -1, axis)
  scales = np.moveaxis(sbytes.reshape(*lead, nbk), -1, axis)
  return values, scales, decode


def dequantize(values, scale_bytes, spec: Spec, axis: int = -1, decode=None, dtype=np.float32):
  """float64 values * scales * decode, then float32 (subnormals flushed), saturated, then dtype."""
  v = np.moveaxis(np.asarray(values, np.float64), axis, -1)
  s = np.moveaxis(decode_scale_bytes(scale_bytes, spec), axis, -1)
  out = v.reshape(*s.shape, spec.block) * s[..., None]
  if decode is not None:
    out = out * np.float64(decode)
  dtype = np.dtype(dtype)
  big = min(float(ml_dtypes.finfo(dtype).max), F32_MAX)
  with np.errstate(over="ignore"):
    out = np.clip(flush_f32_subnormals(out.astype(np.float32)), -big, big)
  out = np.moveaxis(out.reshape(v.shape), -1, axis)
  return out.astype(dtype)


def dequantize_packed(blocks, scales, block_size: int = 32) -> np.ndarray:
  """MXFP4 decode, float64: E2M1[code] * 2**(byte - 127) (ldexp), NaN over a block with E8M0's NaN byte 0xFF."""
  b = np.asarray(blocks).view(np.uint8)
  s = np.asarray(scales).view(np.uint8)
  codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)
  vals = E2M1_TABLE[codes].reshape(*s.shape, block_size)
  out = np.ldexp(vals, s.astype(np.int64)[..., None] - 127)
  return np.where((s == 0xFF)[..., None], np.nan, out).reshape(*b.shape[:-1], -1)


def half_ulp(v, spec: Spec) -> np.ndarray:
  """Half the element grid spacing at magnitude ``|v|`` (float64)."""
  fi = ml_dtypes.finfo(spec.elem)
  e = np.maximum(floor_log2(np.maximum(np.abs(v), 1e-300)), int(fi.minexp))
  return np.ldexp(0.5, e - int(fi.nmant))


# ---- breadth: MXFP6, MXINT8, "even", "4over6", 2-D tiles (added functions only) ----------
SPECS_BREADTH = {
    "mxfp6_e2m3": Spec("mxfp6_e2m3", ml_dtypes.float6_e2m3fn, ml_dtypes.float8_e8m0fnu, 32),
    "mxfp6_e3m2": Spec("mxfp6_e3m2", ml_dtypes.float6_e3m2fn, ml_dtypes.float8_e8m0fnu, 32),
}

# MXINT8 (OCP MX v1.0): int8 codes k meaning k / 64; quantization clips to +-127/64.
MXINT8_MAX = 127.0 / 64.0


@dataclasses.dataclass(frozen=True)
class Elem:
  """An element grid for the E8M0 references: its max, emax, mantissa bits, rounding."""

  name: str
  max: float
  emax: int
  nmant: int
  kind: str  # "float" (an ml_dtypes type in `dtype`) or "int8"
  dtype: type = None

  def round(self, y) -> np.ndarray:
    """Saturate, then round to nearest even on the grid; float64 (int8: codes / 64, never -0)."""
    y = np.clip(np.asarray(y, np.float64), -self.max, self.max)
    if self.kind == "int8":
      return np.round(y * 64.0).astype(np.int64) / 64.0
    return y.astype(self.dtype).astype(np.float64)


def float_elem(dtype) -> Elem:
  fi = ml_dtypes.finfo(dtype)
  m = float(fi.max)
  return Elem(np.dtype(dtype).name, m, int(floor_log2(m)), int(fi.nmant), "float", dtype)


ELEMS = {
    "mxfp4": float_elem(ml_dtypes.float4_e2m1fn),
    "mxfp8_e4m3": float_elem(ml_dtypes.float8_e4m3fn),
    "mxfp8_e5m2": float_elem(ml_dtypes.float8_e5m2),
    "mxfp6_e2m3": float_elem(ml_dtypes.float6_e2m3fn),
    "mxfp6_e3m2": float_elem(ml_dtypes.float6_e3m2fn),
    "mxint8": Elem("int8", MXINT8_MAX, 0, 6, "int8"),
}


def even_exponent(amax, elem: Elem) -> np.ndarray:
  """torchao's EVEN, restated in float64: round amax to (nmant + 1) significant bits,
  ties away from zero, then floor(log2(.)) - emax (clamped to E8M0's range)."""
  amax = np.asarray(amax, np.float64)
  m, e = np.frexp(np.where(amax > 0, amax, 1.0))  # amax = m * 2**e, m in [0.5, 1)
  q = np.floor(m * 2.0 ** (elem.nmant + 1) + 0.5) * 2.0 ** (e - elem.nmant - 1)
  out = np.where(amax > 0, floor_log2(q) - elem.emax, -127)
  return np.clip(out, -127, 127)


def mx_exponents(blocks, elem: Elem, rule: str) -> np.ndarray:
  """E8M0 exponents of float32 finite blocks (nb, B) for floor / ceil / even / mse (brute force)."""
  x = np.asarray(blocks, np.float64)
  amax = np.abs(x).max(-1)
  if rule == "floor":
    return np.clip(np.where(amax > 0, floor_log2(np.where(amax > 0, amax, 1.0)) - elem.emax, -127), -127, 127)
  if rule == "ceil":
    ks = np.arange(-127, 128)
    fits = amax[:, None] <= elem.max * np.ldexp(1.0, ks)
    return np.where(fits.any(-1), ks[np.argmax(fits, -1)], 127)
  if rule == "even":
    return even_exponent(amax, elem)
  if rule == "mse":
    ks = np.arange(-127, 128)
    losses = np.stack([np.sum((x - elem.round(x / 2.0**k) * 2.0**k) ** 2, -1) for k in ks], -1)
    return ks[np.argmin(losses, -1)]
  raise ValueError(rule)


def quantize_mx(x, elem: Elem, rule: str, axis: int = -1, block: int = 32):
  """E8M0-scaled reference for any element grid: (values float64, scale bytes uint8).

  Float32 subnormal inputs count as zero; finite inputs only.
  """
  x = flush_f32_subnormals(np.asarray(x).astype(np.float32)).astype(np.float64)
  xm = np.moveaxis(x, axis, -1)
  lead, n = xm.shape[:-1], xm.shape[-1]
  blocks = xm.reshape(-1, block)
  e = mx_exponents(blocks, elem, rule)
  vals = elem.round(blocks / np.ldexp(1.0, e)[:, None])
  values = np.moveaxis(vals.reshape(*lead, n), -1, axis)
  sbytes = np.moveaxis((e + 127).astype(np.uint8).reshape(*lead, n // block), -1, axis)
  return values, sbytes


def nvfp4_four_over_six(x, axis: int = -1, global_scale=None, block: int = 16):
  """NVFP4 "4over6": (values float64, scale bytes, decode float32, sse6, sse4 per block).

  The recipe's float32 steps: encode = 6 * 256 / amax (or 1 / global_scale),
  candidate scales amax * (encode * float32(1/6)) and amax * (encode *
  float32(1/4)) rounded to the nearest E4M3; elements by the float32 reciprocal
  of scale * decode; the block keeps "4" iff its float64 squared error is lower.
  """
  spec = SPECS["nvfp4"]
  x = flush_f32_subnormals(np.asarray(x).astype(np.float32))
  xm = np.moveaxis(x, axis, -1)
  lead, n = xm.shape[:-1], xm.shape[-1]
  blocks = xm.reshape(-1, block)
  amax = np.abs(blocks).max(-1).astype(np.float32)
  if global_scale is None:
    t = np.float32(np.abs(x).max())
    if t > 0:
      enc = min(np.float32(np.float32(6.0 * 256.0) / t), np.float32(2.0**126))
    else:
      enc = np.float32(1.0)
    dec = np.float32(np.float32(1.0) / enc)
  else:
    dec = np.float32(global_scale)
    enc = np.float32(np.float32(1.0) / dec)
  cands, sse = [], []
  for target in (6.0, 4.0):
    ideal = (amax * np.float32(enc * np.float32(1.0 / target))).astype(np.float32)
    sb = e4m3_scale(ideal, "nearest")
    sv = decode_scale_bytes(sb, spec)
    v = encode(blocks, sv, spec, dec)
    err = blocks.astype(np.float64) - dequant(v, sv, spec, dec)
    cands.append((v, sb))
    sse.append(np.sum(err * err, -1))
  four = sse[1] < sse[0]
  vals = np.where(four[:, None], cands[1][0], cands[0][0])
  sb = np.where(four, cands[1][1], cands[0][1]).astype(np.uint8)
  values = np.moveaxis(vals.reshape(*lead, n), -1, axis)
  scales = np.moveaxis(sb.reshape(*lead, n // block), -1, axis)
  return values, scales, dec, sse[0], sse[1]


def to_tiles(x, b: int) -> np.ndarray:
  """(..., M, N) -> (..., M // b * N // b, b * b): tiles in row-major tile order, each flattened row-major."""
  *lead, m, n = x.shape
  t = np.asarray(x).reshape(*lead, m // b, b, n // b, b)
  return np.swapaxes(t, -3, -2).reshape(*lead, (m // b) * (n // b), b * b)


def from_tiles(t, b: int, m: int, n: int) -> np.ndarray:
  *lead, _, _ = t.shape
  x = np.swapaxes(np.asarray(t).reshape(*lead, m // b, n // b, b, b), -3, -2)
  return x.reshape(*lead, m, n)
