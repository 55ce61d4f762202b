"""Benchmark of fp4jax's block-scaled matmul kernels against what users run today.

On a GPU (the committed results came from this, through the device tool)::

  PYTHONPATH=. python benchmarks/matmul.py --check --table \
      --json benchmarks/results/matmul.json --out benchmarks/results/matmul.md

``--check`` runs every kernel against the XLA reference on odd shapes (all
formats, NaN-poisoned output buffers); ``--table`` times every shape of the
issue with the library's default configs; ``--sweep`` times a few configs per
regime (decode, prefill, MX); ``--render JSON`` rewrites the markdown from a
saved result; ``--smoke`` runs tiny shapes in interpret mode on the CPU to
check the script itself.

Method: every number of a row comes from one process. A jitted dispatch runs
many calls on distinct inputs (activations distinct per call when small,
weights rotating through more than 3x the 50 MB L2, so repeated calls read
HBM); dispatches are queued back to back; the wall time over all calls is one
sample; the median of 5 samples is reported, after a warm-up. Inputs are random
normal data, quantized with each format's default scale rule.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fp4jax as fj
from fp4jax.kernels import mx_matmul as mk
from fp4jax.kernels import w4a16_matmul as wk
from fp4jax import matmul as mm

ROTATE_BYTES = 160e6  # > 3x the H100's 50 MB L2
MS = (1, 8, 16, 64, 256, 1024, 4096, 8192)
KNS = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096))
T0 = time.time()


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def bench(fn, calls, target_s=0.02, samples=5):
  """Median seconds per call of ``fn(*args)`` over the list ``calls`` of argument tuples.

  One jitted dispatch runs every call in ``calls`` (distinct arguments, so XLA
  cannot merge them); dispatches are queued back to back.
  """
  many = jax.jit(lambda cs: [fn(*c) for c in cs])
  jax.block_until_ready(many(calls))  # compile + warm-up
  t = time.perf_counter()
  jax.block_until_ready(many(calls))
  one = max(time.perf_counter() - t, 1e-6)
  reps = max(2, min(200, int(math.ceil(target_s / one))))
  times = []
  for _ in range(samples):
    t = time.perf_counter()
    outs = [many(calls) for _ in range(reps)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t) / (reps * len(calls)))
    del outs
  return statistics.median(times)


def make_calls(xs, ws):
  """Pairs each activation with a weight, cycling through the weight sets."""
  return [(x, ws[i % len(ws)]) for i, x in enumerate(xs)]


def n_calls(x_bytes, weight_sets):
  """Calls per dispatch: >= 32 distinct activations when they are small (so a
  dispatch holds enough GPU work), else one per weight set."""
  return max(weight_sets, 32) if x_bytes <= 8e6 else weight_sets


def copy_bandwidth():
  x = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.bfloat16)  # 1 GiB
  t = bench(lambda a: a + 1, [(x,)], target_s=0.05)
  return 2 * x.nbytes / t


def n_sets(bytes_per_set, cap=16):
  return int(max(1, min(cap, math.ceil(ROTATE_BYTES / bytes_per_set))))


def make_weights(k, n, fmt, count, seed=1):
  out = []
  for i in range(count):
    w = jax.random.normal(jax.random.key(seed + 100 * i), (k, n), jnp.float32)
    out.append(fj.quantize(w, fmt, axis=0))
  return out


def rel_err(out, ref):
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def ref_matmul(a, b):
  """float32 reference on the device (dequantize, HIGHEST dot)."""
  return fj.scaled_matmul(a, b, preferred_element_type=jnp.float32, backend="xla")


# ---- W4A16 -------------------------------------------------------------------------------
def w4a16_case(m, k, n, fmt, *, configs=None, baselines=True, interpret=False, check=True):
  """Times our kernel (and the baselines) at one shape; returns a dict of results."""
  qs = make_weights(k, n, fmt, n_sets(k * n * fmt.bits_per_element / 8))
  pws = [q.with_layout("rows") for q in qs]
  xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16)
        for i in range(n_calls(m * k * 2, len(qs)))]
  res = {"m": m, "k": k, "n": n, "fmt": fmt.name, "sets": len(qs), "calls": len(xs),
         "weight_bytes": int(pws[0].values.nbytes + pws[0].scales.nbytes)}
  ref = ref_matmul(xs[0], qs[0]).astype(jnp.bfloat16).astype(jnp.float32) if check else None
  dims = (((1,), (1,)), ((), ()))
  methods = dict(configs or {"kernel": None})
  if configs is None:
    methods["two_pass"] = "two_pass"
  outs = {}
  for name, cfg in methods.items():
    try:
      if cfg is None:
        f = lambda x, p: fj.scaled_matmul(x, p, preferred_element_type=jnp.bfloat16, backend="pallas")
      elif cfg == "two_pass":
        f = lambda x, p: mm.run_two_pass("w4a16", x, p, dims, jnp.bfloat16)
      else:
        f = functools.partial(_w4a16_direct, fmt=fmt, cfg=cfg, interpret=interpret)
      if check:
        res[f"{name}_err"] = rel_err(jax.jit(f)(xs[0], pws[0]).astype(jnp.float32), ref)
      outs[name] = bench(f, make_calls(xs, pws))
    except Exception as e:  # noqa: BLE001 - a failing config is a result too
      res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log("FAILED", name, cfg, res[f"{name}_error"])
  if baselines:
    wb = [q.dequantize(jnp.bfloat16) for q in qs[: n_sets(k * n * 2)]]
    outs["xla_bf16"] = bench(lambda x, w: jnp.dot(x, w), make_calls(xs, wb))
    del wb
    deq = lambda x, p: jnp.dot(x, p.dequantize(jnp.bfloat16))
    outs["xla_deq_dot"] = bench(deq, make_calls(xs, pws))
  res["t"] = outs
  return res


def _w4a16_direct(x, p, *, fmt, cfg, interpret):
  return wk.w4a16_matmul(x, p.values, p.scales, p.global_scale, fmt=fmt, out_dtype=jnp.bfloat16,
                         config=cfg, interpret=interpret)


# ---- MX x MX -----------------------------------------------------------------------------
def mx_case(m, k, n, fmt, *, configs=None, baselines=True, interpret=False, check=True):
  w_sets = n_sets(k * n * fmt.bits_per_element / 8)
  bs = make_weights(k, n, fmt, w_sets)
  pws = [b.with_layout("rows") for b in bs]
  count = n_calls(m * k, w_sets)
  a_f = [jax.random.normal(jax.random.key(11 + i), (m, k), jnp.float32) for i in range(count)]
  aqs = [fj.quantize(a, fmt, axis=-1) for a in a_f]
  res = {"m": m, "k": k, "n": n, "fmt": fmt.name, "sets": w_sets, "calls": count}
  ref = ref_matmul(aqs[0], bs[0]).astype(jnp.bfloat16).astype(jnp.float32) if check else None
  dims = (((1,), (1,)), ((), ()))
  methods = dict(configs or {"kernel": None})
  if configs is None:
    methods["two_pass"] = "two_pass"
  outs = {}
  for name, cfg in methods.items():
    try:
      if cfg is None:
        f = lambda a, p: fj.scaled_matmul(a, p, preferred_element_type=jnp.bfloat16, backend="pallas")
      elif cfg == "two_pass":
        f = lambda a, p: mm.run_two_pass("mx", a, p, dims, jnp.bfloat16)
      else:
        f = functools.partial(_mx_direct, cfg=cfg, interpret=interpret)
      if check:
        res[f"{name}_err"] = rel_err(jax.jit(f)(aqs[0], pws[0]).astype(jnp.float32), ref)
      outs[name] = bench(f, make_calls(aqs, pws))
    except Exception as e:  # noqa: BLE001
      res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log("FAILED", name, cfg, res[f"{name}_error"])
  if baselines:
    xb = [a.astype(jnp.bfloat16) for a in a_f]
    wb = [b.dequantize(jnp.bfloat16) for b in bs[: n_sets(k * n * 2)]]
    outs["xla_bf16"] = bench(lambda x, w: jnp.dot(x, w), make_calls(xb, wb))
    del xb, wb
    deq = lambda a, p: jnp.dot(a.dequantize(jnp.bfloat16), p.dequantize(jnp.bfloat16))
    outs["xla_deq_dot"] = bench(deq, make_calls(aqs, pws))
    try:
      def nn_scaled(a, b):
        return jax.nn.scaled_matmul(a.values[None], b.values.T[None], a.scales[None], b.scales.T[None],
                                    preferred_element_type=jnp.bfloat16)[0]
      outs["jax_nn_scaled_matmul"] = bench(nn_scaled, make_calls(aqs, bs))
    except Exception as e:  # noqa: BLE001
      res["jax_nn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  res["t"] = outs
  return res


def _mx_direct(a, p, *, cfg, interpret, out_buffer=None):
  ad, asc = mm.byte_matrix(a)
  return mk.mx_matmul(ad, asc, a.global_scale, p.values, p.scales, p.global_scale, a_fmt=a.fmt, b_fmt=p.fmt,
                      out_dtype=jnp.bfloat16, config=cfg, interpret=interpret, out_buffer=out_buffer)


# ---- sweep and table ---------------------------------------------------------------------
def decode_configs():
  c = {}
  for bn, bk, sk, warps, stages in ((32, 256, 1, 4, 4), (64, 256, 1, 4, 4), (128, 256, 1, 4, 4),
                                     (64, 512, 1, 4, 3), (32, 512, 1, 4, 3), (64, 256, 2, 4, 4),
                                     (32, 256, 2, 4, 4), (64, 128, 1, 4, 6), (64, 256, 1, 8, 4),
                                     (128, 512, 1, 8, 3)):
    c[f"bn{bn}_bk{bk}_s{sk}_w{warps}_st{stages}"] = wk.Config(16, bn, bk, sk, True, warps, stages)
  c["noswap_bn64_bk256"] = wk.Config(16, 64, 256, 1, False, 4, 4)
  return c


def prefill_configs():
  c = {}
  for bm, bn, bk, swap, warps, stages in ((128, 128, 64, False, 8, 3), (128, 128, 128, False, 8, 3),
                                          (128, 256, 64, False, 8, 3), (128, 128, 64, False, 4, 4),
                                          (128, 128, 64, True, 8, 3), (128, 256, 64, True, 8, 3),
                                          (64, 256, 64, True, 4, 4), (256, 128, 64, False, 8, 3)):
    c[f"bm{bm}_bn{bn}_bk{bk}_{'swap' if swap else 'nn'}_w{warps}_st{stages}"] = wk.Config(bm, bn, bk, 1, swap, warps, stages)
  return c


def mx_configs():
  c = {}
  for bm, bn, bk, mma, warps, stages in ((128, 128, 128, "fp8", 8, 3), (128, 256, 128, "fp8", 8, 3),
                                         (128, 128, 64, "fp8", 8, 4), (64, 128, 128, "fp8", 4, 4),
                                         (128, 128, 128, "fp8", 4, 3), (128, 256, 64, "bf16", 8, 3),
                                         (128, 128, 64, "bf16", 8, 3), (128, 128, 128, "bf16", 8, 3)):
    c[f"{mma}_bm{bm}_bn{bn}_bk{bk}_w{warps}_st{stages}"] = mk.Config(bm, bn, bk, mma, warps, stages)
  return c


def check():
  """Kernels and the two-pass path vs the XLA reference on odd shapes, every format, on the
  device (the GPU twin of the interpret tests), plus NaN-poisoned output buffers."""
  worst = 0.0
  dims = (((1,), (1,)), ((), ()))

  def rec(tag, out, ref):
    nonlocal worst
    e = rel_err(out, ref)
    worst = max(worst, e)
    log(f"check {tag}: rel err {e:.2e}")

  for fmt in (fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3):
    for m, k, n in ((1, 96, 48), (300, 640, 272), (17, 4160, 200)):
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      w = make_weights(k, n, fmt, 1)[0]
      ref, p = ref_matmul(x, w), w.with_layout("rows")
      rec(f"w4a16 kernel {fmt.name} M={m} K={k} N={n}",
          fj.scaled_matmul(x, p, preferred_element_type=jnp.float32, backend="pallas"), ref)
      rec(f"w4a16 two-pass {fmt.name} M={m} K={k} N={n}",
          mm.run_two_pass("w4a16", x, p, dims, jnp.float32), ref)
  x = jax.random.normal(jax.random.key(5), (17, 4160), jnp.bfloat16)
  w = make_weights(4160, 200, fj.MXFP4, 1)[0]
  ref, p = ref_matmul(x, w), w.with_layout("rows")
  for cfg in (wk.Config(16, 32, 64, 1, False, 4, 3), wk.Config(32, 64, 64, 5, True, 4, 3)):
    shape = (17, 200) if cfg.split_k == 1 else (cfg.split_k, 17, 200)
    out = wk.w4a16_matmul(x, p.values, p.scales, None, fmt=fj.MXFP4, out_dtype=jnp.float32, config=cfg,
                          out_buffer=jnp.full(shape, jnp.nan, jnp.float32))
    rec(f"w4a16 poisoned {cfg}", out, ref)
  pairs = ((fj.MXFP4, fj.MXFP4), (fj.MXFP8_E4M3, fj.MXFP8_E4M3), (fj.MXFP8_E4M3, fj.MXFP4),
           (fj.NVFP4, fj.NVFP4), (fj.MXFP8_E5M2, fj.MXFP8_E5M2))
  for af, bf in pairs:
    m, k, n = 130, 640, 272
    a = fj.quantize(jax.random.normal(jax.random.key(m), (m, k)), af, axis=-1)
    w = make_weights(k, n, bf, 1)[0]
    ref, p = ref_matmul(a, w), w.with_layout("rows")
    rec(f"mx kernel {af.name} x {bf.name}",
        fj.scaled_matmul(a, p, preferred_element_type=jnp.float32, backend="pallas"), ref)
    rec(f"mx two-pass {af.name} x {bf.name}", mm.run_two_pass("mx", a, p, dims, jnp.float32), ref)
    if mk.fp8_mma_supported(af, bf):
      out = _mx_direct(a, p, cfg=mk.Config(64, 64, 64, "fp8", 4, 3), interpret=False,
                       out_buffer=jnp.full((m, n), jnp.nan, jnp.bfloat16))
      rec(f"mx fp8-mma poisoned {af.name} x {bf.name}", out, ref.astype(jnp.bfloat16))
  log(f"check: worst rel err {worst:.2e}")
  return worst


def probe():
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
    names = [n for n in ("kernel", "wgmma", "emit_pipeline_warp_specialized", "ACC", "planar_snake")
             if hasattr(plgpu, n)]
    log("mosaic_gpu has:", names)
  except Exception as e:  # noqa: BLE001
    log("mosaic_gpu import failed:", e)


def sweep(args):
  out = []
  for m in (1, 16):
    if time.time() - T0 > args.budget_s:
      return out
    r = w4a16_case(m, 8192, 8192, fj.MXFP4, configs=decode_configs(), baselines=(m == 1))
    out.append(r)
    _print_sweep(r)
  if time.time() - T0 > args.budget_s:
    return out
  r = w4a16_case(4096, 8192, 8192, fj.MXFP4, configs=prefill_configs(), baselines=True)
  out.append(r)
  _print_sweep(r)
  for fmt in (fj.MXFP8_E4M3, fj.MXFP4):
    if time.time() - T0 > args.budget_s:
      return out
    r = mx_case(8192, 8192, 8192, fmt, configs=mx_configs(), baselines=(fmt == fj.MXFP8_E4M3))
    out.append(r)
    _print_sweep(r)
  return out


def _print_sweep(r):
  flops = 2 * r["m"] * r["k"] * r["n"]
  log(f"== {r['fmt']} M={r['m']} K={r['k']} N={r['n']} sets={r['sets']}")
  for name, t in sorted(r["t"].items(), key=lambda kv: kv[1]):
    err = r.get(f"{name}_err")
    log(f"   {name:40s} {t * 1e6:9.1f} us {flops / t / 1e12:7.1f} TFLOP/s err={err}")


def table(args):
  rows = []
  shapes = [(m, k, n) for k, n in KNS for m in MS][args.skip_rows:]
  for m, k, n in shapes:
    if time.time() - T0 > args.budget_s:
      log("budget reached, stopping the W4A16 table")
      return rows
    r = w4a16_case(m, k, n, fj.MXFP4, check=(m <= args.check_max_m))
    rows.append(r)
    _print_sweep(r)
  return rows


MX_FP8 = mk.Config(128, 128, 128, "fp8", 8, 3)


def mx_table(args):
  rows = []
  for fmt, (m, k, n) in ((fj.MXFP8_E4M3, (8192, 8192, 8192)), (fj.MXFP4, (8192, 8192, 8192)),
                         (fj.MXFP8_E4M3, (16, 8192, 8192)), (fj.MXFP4, (16, 8192, 8192)),
                         (fj.MXFP8_E4M3, (1024, 8192, 8192)), (fj.MXFP8_E4M3, (4096, 4096, 14336))):
    if time.time() - T0 > args.budget_s:
      log("budget reached, stopping the MX table")
      return rows
    configs = {"kernel": None, "two_pass": "two_pass"}
    if m == 8192:
      configs["kernel_fp8_mma"] = MX_FP8
    r = mx_case(m, k, n, fmt, configs=configs)
    rows.append(r)
    _print_sweep(r)
  return rows


def _auto(r, kind):
  """The time of the strategy backend="auto" picks for this shape."""
  name = "kernel" if r["m"] <= mm.KERNEL_MAX_ROWS[kind] else "two_pass"
  return name, r["t"].get(name)


def _us(t):
  return f"{t * 1e6:.1f}" if t else "n/a"


def markdown(result):
  rows, mx_rows, copy_bw = result["w4a16"], result["mx"], result["copy_bw"]
  env = result["env"]
  lines = [
      "# Block-scaled matmul benchmark",
      "",
      f"Device: {env['device']}, jax {env['jax']}, Python {env['python']}. Produced by "
      f"`{env['command']}` (through the device tool), rendered by `python benchmarks/matmul.py "
      f"--render <json>`.",
      f"Measured copy bandwidth (bf16 `x + 1` over 1 GiB, bytes read + written): {copy_bw / 1e12:.2f} TB/s.",
      f"GPU check of every kernel and the two-pass path on odd shapes, all formats, poisoned buffers: "
      f"worst relative error {result.get('check_worst_rel_err', float('nan')):.1e} (float32 outputs).",
      "",
      "Method: all numbers from one process; median of 5 samples, each many back-to-back calls in jitted",
      "dispatches of >= 32 distinct calls (activations distinct per call, weights rotating over > 160 MB",
      "so they come from HBM, not the 50 MB L2). Columns:",
      "",
      "* `kernel`: `fj.scaled_matmul(x, w.with_layout(\"rows\"), backend=\"pallas\")`, the Pallas-Triton kernel",
      "  with its default config;",
      "* `two-pass`: dequantize to bf16 (exact) in one XLA fusion, then a bf16 GEMM (`lax.dot_general`,",
      "  f32 accumulation);",
      f"* `auto`: what `backend=\"auto\"` runs: the kernel up to {mm.KERNEL_MAX_ROWS} rows, else two-pass;",
      "* `xla_bf16`: `jnp.dot` of bf16 operands (what users run today); `xla_deq_dot`: `jnp.dot(x,",
      "  dequantize(w, bf16))` in one jit, left to XLA's fusion;",
      "* BW: weight bytes (packed codes + scales; bf16 for xla_bf16) / time / copy bandwidth;",
      "* err: ||kernel - ref|| / ||ref||, ref = float32 reference rounded to bf16.",
      "",
      "## W4A16: bf16 activations x MXFP4 weights",
      "",
      "| M | K | N | kernel us | kernel TFLOP/s | kernel BW | two-pass us | auto us | xla_bf16 us | "
      "bf16 BW | xla_deq_dot us | auto vs bf16 | err |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    t = r["t"]
    flops = 2 * r["m"] * r["k"] * r["n"]
    ker, bf = t.get("kernel"), t.get("xla_bf16")
    _, auto = _auto(r, "w4a16")
    lines.append(
        f"| {r['m']} | {r['k']} | {r['n']} | {_us(ker)} | "
        f"{flops / ker / 1e12 if ker else float('nan'):.1f} | "
        f"{r['weight_bytes'] / ker / copy_bw if ker else float('nan'):.2f} | {_us(t.get('two_pass'))} | "
        f"{_us(auto)} | {_us(bf)} | {r['k'] * r['n'] * 2 / bf / copy_bw:.2f} | "
        f"{_us(t.get('xla_deq_dot'))} | {bf / auto if auto else float('nan'):.2f}x | "
        f"{_err(r, 'kernel')} |")
  lines += [
      "",
      "## MX x MX: QArray activations x `\"rows\"` weights (same format on both sides)",
      "",
      "`kernel` uses bf16 MMAs on exactly dequantized tiles (the faster path measured); `fp8-MMA` is",
      "the per-32-block fp8 product path (`mx_matmul.Config(mma=\"fp8\")`, 128x128x128 tiles).",
      "",
      "| fmt | M | K | N | kernel us | fp8-MMA us | two-pass us | auto us | auto TFLOP/s | xla_bf16 us | "
      "xla_deq_dot us | jax.nn.scaled_matmul us | auto vs bf16 | err |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in mx_rows:
    t = r["t"]
    flops = 2 * r["m"] * r["k"] * r["n"]
    _, auto = _auto(r, "mx")
    bf = t.get("xla_bf16")
    nn = _us(t["jax_nn_scaled_matmul"]) if t.get("jax_nn_scaled_matmul") else r.get("jax_nn_error", "n/a")[:50]
    lines.append(
        f"| {r['fmt']} | {r['m']} | {r['k']} | {r['n']} | {_us(t.get('kernel'))} | "
        f"{_us(t.get('kernel_fp8_mma'))} | {_us(t.get('two_pass'))} | {_us(auto)} | "
        f"{flops / auto / 1e12 if auto else float('nan'):.1f} | {_us(bf)} | {_us(t.get('xla_deq_dot'))} | {nn} | "
        f"{bf / auto if auto else float('nan'):.2f}x | {_err(r, 'kernel')} |")
  return "\n".join(lines) + "\n"


def _err(r, name):
  if f"{name}_error" in r:
    return r[f"{name}_error"][:60]
  e = r.get(f"{name}_err")
  return f"{e:.1e}" if e is not None else "n/a"


def smoke():
  """Tiny shapes, interpret mode, CPU: exercises every code path of this script."""
  global ROTATE_BYTES
  ROTATE_BYTES = 1e4
  r = w4a16_case(3, 256, 64, fj.MXFP4, configs={"kernel": wk.Config(16, 32, 128, 1, True, 4, 3),
                                                 "two_pass": "two_pass"}, interpret=True)
  _print_sweep(r)
  r2 = mx_case(32, 256, 64, fj.MXFP4, configs={"kernel": mk.Config(16, 32, 64, "fp8", 4, 3),
                                              "two_pass": "two_pass"}, interpret=True)
  _print_sweep(r2)
  r["weight_bytes"] = 1
  print(markdown({"w4a16": [r], "mx": [r2], "copy_bw": 1e12, "env": _env()}))


def _env():
  dev = jax.devices()[0]
  return {"device": f"{dev.device_kind} ({jax.default_backend()})", "jax": jax.__version__,
          "python": sys.version.split()[0], "command": "python benchmarks/matmul.py " + " ".join(sys.argv[1:])}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--table", action="store_true")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--check", action="store_true")
  p.add_argument("--render", default=None, help="re-render the markdown of a saved JSON result")
  p.add_argument("--out", default="matmul.md")
  p.add_argument("--json", default=None)
  p.add_argument("--budget-s", type=float, default=400)
  p.add_argument("--skip-rows", type=int, default=0, help="skip the first W4A16 table rows")
  p.add_argument("--check-max-m", type=int, default=4096, help="largest M checked against the reference")
  p.add_argument("--no-mx", action="store_true")
  args = p.parse_args()
  if args.smoke:
    smoke()
    return
  if args.render:
    with open(args.render) as fh:
      result = json.load(fh)
    with open(args.out, "w") as fh:
      fh.write(markdown(result))
    return
  log("jax", jax.__version__, jax.devices())
  result = {"env": _env(), "copy_bw": copy_bandwidth()}
  log(f"copy bandwidth {result['copy_bw'] / 1e12:.2f} TB/s")

  def save():
    if args.json:
      with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1, default=str)

  if args.check:
    probe()
    result["check_worst_rel_err"] = check()
    save()
  if args.sweep:
    result["sweep"] = sweep(args)
    save()
  if args.table:
    result["mx"] = [] if args.no_mx else mx_table(args)
    save()
    result["w4a16"] = table(args)
    save()
    md = markdown(result)
    with open(args.out, "w") as fh:
      fh.write(md)
    print(md)


if __name__ == "__main__":
  main()
