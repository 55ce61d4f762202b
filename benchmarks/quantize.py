"""GPU benchmark of the quantize / dequantize kernels against the XLA path.

Run on a GPU machine from the repository root::

  PYTHONPATH=. python benchmarks/quantize.py --mode full --out benchmarks/results/quantize.md

For every variant it checks the kernel's bits against the XLA path on the GPU
(codes, scales, global scale; dequantized values), then times both: median
of 5 samples, each many back-to-back calls after a warm-up, inputs rotating
over several buffers (more than the 50 MB L2 together). Bandwidth counts the
bytes a single pass must move (input read once, packed codes and scales
written once), for the kernel and the XLA path alike, as a fraction of the
copy bandwidth (bf16 ``x + 1`` over 1 GiB) measured in the same process.

``--mode smoke``: small shapes, environment probes and a tile sweep.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import fp4jax as fj
from fp4jax.kernels import dequantize as dqk
from fp4jax.kernels import quantize_pack as qk
from fp4jax.reference import dequantize_reference, quantize_reference

MiB = 1 << 20
LOG = []
REPORT = [lambda: None]
INTERP = {"interpret": False}  # --dry-run: interpret mode and tiny sizes, to test this script on a CPU
SCALE = [1]


def log(*a):
  s = " ".join(str(x) for x in a)
  LOG.append(s)
  print(s, flush=True)


# ---- timing ---------------------------------------------------------------------------
def timeit(fn, inputs, reps: int, samples: int = 5):
  """Median seconds per call of ``fn`` over rotating ``inputs``."""
  jax.block_until_ready(fn(inputs[0]))
  jax.block_until_ready(fn(inputs[-1]))
  out = []
  for _ in range(samples):
    t = time.perf_counter()
    r = None
    for i in range(reps):
      r = fn(inputs[i % len(inputs)])
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / reps)
  return statistics.median(out)


def batched(f, n):
  """One jit applying ``f`` to ``n`` distinct inputs: one dispatch for ``n`` launches."""
  return jax.jit(lambda xs: [f(x) for x in xs]), n


def time_op(f, make_input, nbytes_in: int, budget_s: float = 0.6):
  """Seconds per call of jitted ``f``; batches small inputs so launches stay back to back."""
  if nbytes_in <= 256 * MiB:
    n = 8
    g = jax.jit(lambda *xs: [f(x) for x in xs])
    xs = [make_input(i) for i in range(n)]
    per = timeit(lambda _: g(*xs), [None], reps=1, samples=2) / n
    reps = max(1, min(50, int(budget_s / 5 / max(per * n, 1e-6))))
    return timeit(lambda _: g(*xs), [None], reps=reps) / n
  xs = [make_input(i) for i in range(2)]
  jf = jax.jit(f)
  per = timeit(jf, xs, reps=1, samples=2)
  reps = max(2, min(40, int(budget_s / 5 / max(per, 1e-6))))
  return timeit(jf, xs, reps=reps)


# ---- inputs ---------------------------------------------------------------------------
def make_x(shape, dtype, seed, specials=False):
  k = jax.random.key(seed)
  k1, k2 = jax.random.split(k)
  x = jax.random.normal(k1, shape, jnp.float32)
  # A spread of block magnitudes, as in real activations.
  x = x * jnp.exp2(jnp.floor(jax.random.uniform(k2, shape[:1] + (1,) * (len(shape) - 1), minval=-6, maxval=6)))
  if specials:
    flat = x.reshape(-1)
    n = flat.shape[0]
    idx = jnp.arange(n)
    flat = jnp.where(idx % 997 == 5, jnp.nan, flat)
    flat = jnp.where(idx % 1499 == 7, jnp.inf, flat)
    flat = jnp.where(idx % 1499 == 9, -jnp.inf, flat)
    flat = jnp.where((idx // 64) % 211 == 3, 0.0, flat)  # whole zero blocks
    flat = jnp.where(idx % 503 == 11, 1e-40, flat)  # float32 subnormals
    flat = jnp.where(idx % 509 == 13, 3.0e38, flat)
    flat = jnp.where((idx // 32) % 307 == 1, flat * 2.0**-120, flat)  # tiny blocks
    x = flat.reshape(shape)
  return x.astype(dtype)


def qbytes(n_elem, fmt, in_itemsize):
  out = n_elem * fmt.elem_bits // 8 + n_elem // fmt.block_size
  return n_elem * in_itemsize + out


def _as_ints(a):
  if a.dtype == jnp.float4_e2m1fn:
    return jax.lax.bitcast_convert_type(a, jnp.uint4).astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype.itemsize == 1 else a


def count_diff(a, b):
  """Elements whose bits differ (NaN == NaN whatever the payload)."""
  a, b = _as_ints(a), _as_ints(b)
  if jnp.issubdtype(a.dtype, jnp.floating):
    nan = jnp.isnan(a.astype(jnp.float32)) & jnp.isnan(b.astype(jnp.float32))
    ib = {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    eq = (jax.lax.bitcast_convert_type(a, ib) == jax.lax.bitcast_convert_type(b, ib)) | nan
  else:
    eq = a == b
  return int(jnp.sum(~eq))


# ---- probes ---------------------------------------------------------------------------
def probes():
  from jax.experimental.pallas import triton as plgpu

  log("## Environment")
  log(f"- jax {jax.__version__}, devices {jax.devices()}")
  log(f"- pallas triton params class: {[n for n in dir(plgpu) if 'Params' in n]}")
  x = jnp.zeros((1 << 20,), jnp.float4_e2m1fn)
  try:
    sz = x.addressable_data(0).on_device_size_in_bytes()
  except Exception as e:  # noqa: BLE001
    sz = repr(e)
  log(f"- float4 array of 2**20 elements: {sz} bytes on device")
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((200000, 32)) * np.exp2(rng.integers(-20, 20, (200000, 32)))).astype(np.float32)
  for b in (32, 16):
    aa = a[:, :b]
    got = np.asarray(jax.jit(lambda v: jnp.sum(v * v, axis=-1))(aa))
    sq = aa * aa
    h = sq
    while h.shape[1] > 1:
      h = h[:, : h.shape[1] // 2] + h[:, h.shape[1] // 2 :]
    seq = sq[:, 0].copy()
    for j in range(1, b):
      seq = seq + sq[:, j]
    fma = np.zeros(aa.shape[0], np.float32)
    log(f"- XLA GPU sum of {b} squares: matches halving tree {np.mean(got == h[:, 0]):.4f}, sequential {np.mean(got == seq):.4f}")
    del fma
  v = rng.uniform(0, 1000, 1 << 20).astype(np.float32)
  d6 = np.asarray(jax.jit(lambda t: t / 6.0)(v))
  log(f"- XLA GPU t/6 == t*f32(1/6): {np.mean(d6 == v * (np.float32(1) / np.float32(6))):.4f}, == t/6 (IEEE): {np.mean(d6 == v / np.float32(6)):.4f}")
  r = np.asarray(jax.jit(lambda t: 1.0 / t)(v + 1e-3))
  log(f"- XLA GPU 1/t == IEEE: {np.mean(r == np.float32(1) / (v + np.float32(1e-3))):.4f}")


# ---- XLA's GPU float rounding, and fp4jax's backend-proof arithmetic on it ----------------------
def calibrate():
  """Logs how XLA rounds the inexact float operations on this GPU, and checks that
  fp4jax's replacements (``fp4jax._bits``) give numpy's CPU bits there.

  Nothing is set from the findings: the reference and the kernels no longer
  depend on the backend's division, flushing or reduction order."""
  from fp4jax import _bits

  log("## XLA GPU numerics, and fp4jax's backend-proof replacements")
  rng = np.random.default_rng(1)
  v = np.exp2(rng.uniform(-120, 120, 1 << 20)).astype(np.float32)
  w = np.exp2(rng.uniform(-120, 120, 1 << 20)).astype(np.float32)
  ieee = v / w
  log(f"- XLA a / b == IEEE: {np.mean(np.asarray(jax.jit(lambda a, b: a / b)(v, w)) == ieee):.5f}")
  log(f"- XLA 1 / b == IEEE: {np.mean(np.asarray(jax.jit(lambda b: 1.0 / b)(w)) == np.float32(1) / w):.5f}")
  got = np.asarray(jax.jit(_bits.div_rn)(v, w))
  normal = np.abs(ieee) >= np.float32(2.0**-126)
  log(f"- fp4jax div_rn == IEEE (normal quotients): {np.mean(got[normal] == ieee[normal]):.5f} (must be 1)")
  tiny = jnp.float32(1e-20)
  log(f"- XLA flushes subnormal float32 products: {float(jax.jit(lambda a, b: a * b)(tiny, tiny)) == 0.0}")
  u, x, y = (rng.standard_normal(1 << 20).astype(np.float32) for _ in range(3))
  log(f"- XLA a * b + c == unfused: {np.mean(np.asarray(jax.jit(lambda a, b, c: a * b + c)(u, x, y)) == u * x + y):.5f}")
  a = (rng.standard_normal((100000, 32)) * np.exp2(rng.integers(-20, 20, (100000, 32)))).astype(np.float32)
  got = np.asarray(jax.jit(lambda t: _bits.halving_sum(_bits.exact_square(t)))(a))
  h = (a.view(np.int32) & np.int32(-(1 << 12))).view(np.float32)
  lo = a - h
  sq = np.where(np.abs(a) < np.float32(2.0**-32), np.float32(0), (h * h + (h + h) * lo) + lo * lo)
  while sq.shape[1] > 1:
    sq = sq[:, : sq.shape[1] // 2] + sq[:, sq.shape[1] // 2:]
  log(f"- XLA jnp.sum of 32 squares == halving tree: {np.mean(np.asarray(jax.jit(lambda t: jnp.sum(t * t, -1))(a)) == sq[:, 0]):.4f}")
  log(f"- fp4jax halving_sum(exact_square) == numpy op by op: {np.mean(got == sq[:, 0]):.5f} (must be 1)")
  dec = np.asarray(jax.jit(lambda c: jax.lax.bitcast_convert_type(c.astype(jnp.uint4), jnp.float4_e2m1fn)
                           .astype(jnp.float32))(jnp.arange(16, dtype=jnp.uint8)))
  want = np.arange(16, dtype=np.uint8).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
  log(f"- XLA float4 -> float32 equals ml_dtypes on all 16 codes (sign of -0 too): "
      f"{bool(np.array_equal(dec.view(np.uint32), want.view(np.uint32)))}")


# ---- correctness on the GPU ---------------------------------------------------------------
RULES = {"mxfp4": ("floor", "ceil", "mse"), "nvfp4": ("nearest", "floor", "ceil", "mse"),
         "mxfp8_e4m3": ("floor", "ceil", "mse"), "mxfp8_e5m2": ("floor", "ceil", "mse")}


def check_quantize(shape, axis, fmt, rule, dtype, seed, config=None, specials=True, gscale=None, packed=True):
  x = make_x(shape, dtype, seed, specials=specials)
  ref = quantize_reference(x, gscale, None, fmt=fmt, axis=axis % len(shape) - len(shape), scale_rule=rule, pad=False)
  q = qk.quantize(x, fmt, axis=axis, scale_rule=rule, global_scale=gscale, config=config, **INTERP)
  bad = count_diff(q.values, ref.values) + count_diff(q.scales, ref.scales)
  if fmt.has_global_scale:
    bad += int(np.asarray(q.global_scale).view(np.uint32) != np.asarray(ref.global_scale).view(np.uint32))
  if not packed:
    return bad, 0, ref
  codes, scales, _ = qk.quantize_packed(x, fmt, axis=axis, scale_rule=rule, global_scale=gscale, config=config,
                                        **INTERP)
  rc, rs, _ = qk.quantize_packed_reference(x, fmt, axis=axis, scale_rule=rule, global_scale=gscale)
  bad_packed = count_diff(codes, rc) + count_diff(scales, rs)
  return bad, bad_packed, ref


def check_dequantize(ref_q, dtype, config=None):
  out = dqk.dequantize(ref_q, dtype, config=config, **INTERP)
  want = dequantize_reference(ref_q, dtype=np.dtype(dtype))
  return count_diff(out, want)


def correctness(shapes, dry_run=False):
  """Kernel vs XLA on the GPU: every format and rule in bf16 on each shape, the
  other input dtypes on one rule per format, user-given global scale, partial tiles."""
  log("## Bit-exactness against the XLA path on the GPU (mismatching elements)")
  total = 0
  seed = 0
  cases = []
  for fmt in (fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2):
    for i, rule in enumerate(RULES[fmt.name]):
      for j, (shape, axis) in enumerate(shapes):
        cases.append((fmt, rule, shape, axis, jnp.bfloat16))
        if i == 0 and j == 0 and not dry_run:
          cases += [(fmt, rule, shape, axis, jnp.float32), (fmt, rule, shape, axis, jnp.float16)]
  for fmt, rule, shape, axis, dtype in cases:
    seed += 1
    try:
      # Row layouts pack the same way for both entry points: check packing on columns.
      col = axis % len(shape) != len(shape) - 1
      bad, badp, ref = check_quantize(shape, axis, fmt, rule, dtype, seed, packed=col)
      badd = check_dequantize(ref, jnp.bfloat16)
      if dtype == jnp.float32:
        badd += check_dequantize(ref, jnp.float32) + check_dequantize(ref, jnp.float16)
    except Exception as e:  # noqa: BLE001
      log(f"- ERROR {fmt.name} {rule} {shape} axis={axis} {np.dtype(dtype)}: {type(e).__name__}: {str(e)[:600]}")
      traceback.print_exc()
      total += 1
      continue
    total += bad + badp + badd
    if bad or badp or badd:
      log(f"- MISMATCH {fmt.name} {rule} {shape} axis={axis} {np.dtype(dtype)}: qarray {bad} packed {badp} dequant {badd}")
  extra = [((96, 160), -1, fj.NVFP4, "nearest", jnp.bfloat16, jnp.float32(0.0123), None),
           ((96, 160), -1, fj.NVFP4, "mse", jnp.bfloat16, jnp.float32(0.0123), None),
           ((3, 96, 40), 1, fj.MXFP4, "floor", jnp.float32, None, qk.Config(16, 64)),
           ((5, 96), -1, fj.MXFP8_E4M3, "ceil", jnp.float16, None, qk.Config(4, 64))]
  for shape, axis, fmt, rule, dtype, gs, cfg in extra:
    try:
      bad, badp, _ = check_quantize(shape, axis, fmt, rule, dtype, 99, config=cfg, gscale=gs)
    except Exception as e:  # noqa: BLE001
      log(f"- ERROR {fmt.name} {rule} {shape} axis={axis}: {type(e).__name__}: {str(e)[:600]}")
      bad, badp = 1, 0
    total += bad + badp
    if bad or badp:
      log(f"- MISMATCH {fmt.name} {rule} {shape} axis={axis} gs={gs} cfg={cfg}: qarray {bad} packed {badp}")
  log(f"- total mismatches: {total}")
  return total


# ---- timing tables -------------------------------------------------------------------------
def copy_bandwidth():
  n = 512 * MiB // SCALE[0]  # bf16 elements: 1 GiB
  make = lambda i: make_x((n // 8192, 8192), jnp.bfloat16, 1000 + i)
  t = time_op(lambda x: x + 1, make, 2 * n)
  bw = 2 * n * 2 / t
  log(f"- copy bandwidth (bf16 x + 1 over 1 GiB, read + write): {bw / 1e12:.3f} TB/s ({t * 1e3:.3f} ms)")
  return bw


def shape_for(nbytes, itemsize, axis):
  n = nbytes // itemsize // SCALE[0]
  cols = 32768 if n >= 32768 * 2048 else (8192 if n >= 8192 * 256 else 256)
  rows = n // cols
  return ((rows, cols), -1) if axis == "last" else ((rows, cols), 0)


def bench_quantize(fmt, rule, dtype, nbytes, axis_kind, bw, rows, config=None, check=True):
  itemsize = np.dtype(dtype).itemsize
  shape, axis = shape_for(nbytes, itemsize, axis_kind)
  n = int(np.prod(shape))
  make = lambda i: make_x(shape, dtype, 17 + i)
  nb = qbytes(n, fmt, itemsize)
  ax = axis % 2 - 2
  xla = lambda x: quantize_reference(x, None, None, fmt=fmt, axis=ax, scale_rule=rule, pad=False)
  kq = lambda x: qk.quantize(x, fmt, axis=axis, scale_rule=rule, config=config, **INTERP)
  kp = lambda x: qk.quantize_packed(x, fmt, axis=axis, scale_rule=rule, config=config, **INTERP)
  bad = "-"
  if check:
    x = make(0)
    r, q = jax.jit(xla)(x), jax.jit(kq)(x)
    bad = count_diff(r.values, q.values) + count_diff(r.scales, q.scales)
    if fmt.has_global_scale:
      bad += int(np.asarray(q.global_scale).view(np.uint32) != np.asarray(r.global_scale).view(np.uint32))
    del r, q, x
  t_x = time_op(xla, make, nbytes)
  t_q = time_op(kq, make, nbytes)
  t_p = time_op(kp, make, nbytes)
  best = min(t_q, t_p)
  row = (f"| quantize {fmt.name} | {rule} | {np.dtype(dtype).name} | {nbytes // MiB} | {axis_kind} "
         f"| {t_p * 1e3:.3f} | {t_q * 1e3:.3f} | {nb / best / bw:.2f} | {t_x * 1e3:.3f} | {nb / t_x / bw:.2f} "
         f"| {t_x / best:.2f} | {bad} |")
  rows.append(row)
  log(row)


def bench_dequantize(fmt, out_dtype, nbytes_out, axis_kind, bw, rows, config=None, check=True):
  itemsize = np.dtype(out_dtype).itemsize
  shape, axis = shape_for(nbytes_out, itemsize, axis_kind)
  n = int(np.prod(shape))
  rule = "nearest" if fmt.has_global_scale else "floor"
  ax = axis % 2 - 2
  mk_q = lambda i: quantize_reference(make_x(shape, jnp.bfloat16, 50 + i), None, None, fmt=fmt, axis=ax,
                                 scale_rule=rule, pad=False)
  nb = n * itemsize + n * fmt.elem_bits // 8 + n // fmt.block_size
  xla = lambda q: dequantize_reference(q, dtype=np.dtype(out_dtype))
  kd = lambda q: dqk.dequantize(q, out_dtype, config=config, **INTERP)
  packed = lambda i: qk.quantize_packed(make_x(shape, jnp.bfloat16, 50 + i), fmt, axis=axis, scale_rule=rule,
                                         **INTERP)
  kp = lambda cs: dqk.dequantize_packed(cs[0], cs[1], cs[2], fmt=fmt, axis=axis, dtype=out_dtype, config=config,
                                        **INTERP)
  bad = "-"
  if check:
    q = mk_q(0)
    bad = count_diff(jax.jit(xla)(q), jax.jit(kd)(q))
    del q
  t_x = time_op(xla, mk_q, nbytes_out)
  t_q = time_op(kd, mk_q, nbytes_out)
  t_p = time_op(kp, packed, nbytes_out)
  best = min(t_q, t_p)
  row = (f"| dequantize {fmt.name} | - | {np.dtype(out_dtype).name} out | {nbytes_out // MiB} | {axis_kind} "
         f"| {t_p * 1e3:.3f} | {t_q * 1e3:.3f} | {nb / best / bw:.2f} | {t_x * 1e3:.3f} | {nb / t_x / bw:.2f} "
         f"| {t_x / best:.2f} | {bad} |")
  rows.append(row)
  log(row)


HEADER = ("| op | rule | input | MiB | axis | kernel packed ms | kernel QArray ms | kernel BW frac "
          "| XLA ms | XLA BW frac | speed-up | mismatches |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def sweep(bw):
  """Kernel-only times of a few tile configurations (MXFP4 floor / dequantize, bf16, 1 GiB)."""
  log("## Tile sweep (packed kernel only; MXFP4 floor quantize and dequantize, bf16, 1 GiB)")
  for axis_kind, cfgs in (("last", [(16, 512, 8), (32, 256, 8), (16, 256, 4), (64, 256, 8)]),
                          ("K", [(128, 64, 8), (256, 32, 8), (64, 64, 4), (128, 128, 8)])):
    shape, axis = shape_for(1024 * MiB, 2, axis_kind)
    n = int(np.prod(shape))
    make = lambda i: make_x(shape, jnp.bfloat16, 17 + i)
    packed = [qk.quantize_packed(make(i), fj.MXFP4, axis=axis, **INTERP) for i in range(2)]
    for bm, bk, w in cfgs:
      cfg = qk.Config(bm, bk, num_warps=w)
      try:
        tq = time_op(lambda x: qk.quantize_packed(x, fj.MXFP4, axis=axis, config=cfg, **INTERP), make, 1024 * MiB)
        td = time_op(lambda cs: dqk.dequantize_packed(cs[0], cs[1], fmt=fj.MXFP4, axis=axis, config=cfg, **INTERP),
                     lambda i: packed[i % 2], 1024 * MiB)
        nq = qbytes(n, fj.MXFP4, 2)
        nd = n * 2 + n // 2 + n // 32
        log(f"- {axis_kind} {cfg}: quantize {tq * 1e3:.3f} ms ({nq / tq / bw:.2f} of copy), "
            f"dequantize {td * 1e3:.3f} ms ({nd / td / bw:.2f})")
      except Exception as e:  # noqa: BLE001
        log(f"- ERROR sweep {axis_kind} {cfg}: {type(e).__name__}: {str(e)[:300]}")


def full(bw, rows):
  """The results table, most important variants first."""
  q = lambda fmt, rule, dtype, size, ak: lambda: bench_quantize(fmt, rule, dtype, size * MiB, ak, bw, rows)
  d = lambda fmt, dtype, size, ak: lambda: bench_dequantize(fmt, dtype, size * MiB, ak, bw, rows)
  fmts = (fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3)
  plan = [q(f, r, jnp.bfloat16, 1024, "last") for f in fmts for r in RULES[f.name]]
  plan += [d(f, t, 1024, "last") for t in (jnp.bfloat16, jnp.float32) for f in fmts]
  plan += [q(f, r, jnp.bfloat16, 1024, "K") for f in fmts for r in RULES[f.name]]
  plan += [d(f, jnp.bfloat16, 1024, "K") for f in fmts]
  plan += [q(f, r, jnp.float32, 1024, "last") for f in fmts for r in RULES[f.name]]
  plan += [q(f, r, jnp.bfloat16, size, "last") for size in (16, 2048)
           for f, r in ((fj.MXFP4, "floor"), (fj.MXFP8_E4M3, "floor"), (fj.NVFP4, "nearest"))]
  plan += [d(f, jnp.bfloat16, size, "last") for size in (16, 2048) for f in fmts]
  for step in plan:
    try:
      step()
    except Exception as e:  # noqa: BLE001
      log(f"- ERROR: {type(e).__name__}: {str(e)[:300]}")
      traceback.print_exc()
    REPORT[0]()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mode", choices=("smoke", "full"), default="full")
  ap.add_argument("--out", default="benchmarks/results/quantize.md")
  ap.add_argument("--dry-run", action="store_true", help="interpret mode, sizes / 4096: tests the script on a CPU")
  args = ap.parse_args()
  if args.dry_run:
    INTERP["interpret"] = True
    SCALE[0] = 4096
  t0 = time.time()
  if not args.dry_run:
    calibrate()
  else:
    probes()
  shapes = [((64, 512), -1), ((256, 96), 0)]
  if args.mode == "smoke":
    shapes = [((64, 512), -1), ((2, 64, 3, 8), 1)]
  if args.dry_run:
    shapes = [((8, 64), -1), ((64, 4), 0)]
  bad = correctness(shapes, dry_run=args.dry_run)
  log(f"(correctness took {time.time() - t0:.0f} s)")
  bw = copy_bandwidth()
  rows = []
  dev = jax.devices()[0]

  def report():
    with open(args.out, "w") as f:
      f.write(f"# Quantize / dequantize kernels vs the XLA path ({args.mode})\n\n")
      f.write(f"Device: {getattr(dev, 'device_kind', dev)}; jax {jax.__version__}; "
              f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
              f"command: `PYTHONPATH=. python benchmarks/quantize.py --mode {args.mode}`\n\n")
      f.write(f"Copy bandwidth (bf16 x + 1, 1 GiB, read + write): {bw / 1e12:.3f} TB/s. "
              f"GPU bit-exactness mismatches over the correctness set: {bad}.\n\n")
      f.write(HEADER + "\n" + "\n".join(rows) + "\n\n## Log\n\n" + "\n".join(LOG) + "\n")

  REPORT[0] = report
  if args.mode == "smoke":
    for fmt, rule in ((fj.MXFP4, "floor"), (fj.NVFP4, "nearest"), (fj.MXFP8_E4M3, "floor"), (fj.MXFP4, "mse")):
      try:
        bench_quantize(fmt, rule, jnp.bfloat16, 1024 * MiB, "last", bw, rows)
      except Exception as e:  # noqa: BLE001
        log(f"- ERROR {fmt.name} {rule}: {type(e).__name__}: {str(e)[:300]}")
    try:
      bench_dequantize(fj.MXFP4, jnp.bfloat16, 1024 * MiB, "last", bw, rows)
    except Exception as e:  # noqa: BLE001
      log(f"- ERROR dequantize: {type(e).__name__}: {str(e)[:300]}")
    sweep(bw)
  else:
    full(bw, rows)
  report()
  log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  sys.exit(main())
