"""The int8 path's GEMM and finish as one Pallas Mosaic GPU kernel (issue 15): bits and tilings.

Today (``fp4jax/int8_matmul.py``) the int8 product on Hopper is :mod:`fp4jax.kernels.int8_gemm`: a persistent,
warp-specialised GEMM (a TMA producer warpgroup, two wgmma consumer warpgroups, int32 accumulators in
registers) whose epilogue is the finish pass (``S * 2**(ea + eb)`` rounded once, NaN rows and columns). Before,
XLA's s8 x s8 -> s32 dot (cuBLASLt) and a separate finish pass that read the int32 sums back (at 8192^3 the GEMM
713-772 us and the finish 114). This script checks the kernel's bits against those XLA ops for several tilings
(``int8_gemm.Config``) and times them against XLA's GEMM (+ finish) and the bf16 dot.

The first run (``benchmarks/results/int8_gemm_mgpu.json``) timed this file's own copy of the kernel, which also had
the two consumer warpgroups along M and the grid's snake along M as options (bits equal, not faster); the kernel
moved into the library without them, and the script now runs the library's.

  PYTHONPATH=. python benchmarks/experiments/int8_gemm_mgpu.py --lower     # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/int8_gemm_mgpu.py --out DIR   # GPU: bits vs XLA, timings
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax.kernels.int8_gemm import NAN_EXPONENT, Config
from fp4jax.kernels.int8_gemm import scaled_gemm as _scaled_gemm
from fp4jax.int8_matmul import finish_sums

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matmul as B  # noqa: E402  (benchmarks/matmul.py: bench, n_sets)


def int8_scaled_gemm(a, b, ea, eb, *, out_dtype=jnp.bfloat16, config: Config = Config()):
  """The library kernel with NaN rows folded into the exponents (as ``make_inputs`` marks them)."""
  return _scaled_gemm(a, b, ea, eb, ea >= NAN_EXPONENT // 2, eb >= NAN_EXPONENT // 2, out_dtype=out_dtype,
                      config=config)


def reference(a, b, ea, eb, out_dtype=jnp.bfloat16):
  """XLA: the int8 dot and the finish (the int8 path's ops off Hopper)."""
  sums = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  return finish_sums(sums, ea, eb, ea >= NAN_EXPONENT // 2, eb >= NAN_EXPONENT // 2, out_dtype)


def make_inputs(m, k, n, seed=0, nan_rows=True):
  """int8 codes like the int8 path's (|v| <= 96), exponents over the whole range, a NaN row and column."""
  ks = jax.random.split(jax.random.key(seed), 4)
  vals = jnp.array([0, 1, 2, 3, 4, 6, 8, 12], jnp.int32)
  def codes(key, shape):
    kv, ksh, ksg = jax.random.split(key, 3)
    v = vals[jax.random.randint(kv, shape, 0, 8)] << jax.random.randint(ksh, shape, 0, 4)
    return jnp.where(jax.random.bernoulli(ksg, 0.5, shape), -v, v).astype(jnp.int8)
  a, b = codes(ks[0], (m, k)), codes(ks[1], (n, k))
  ea = jax.random.randint(ks[2], (m,), -128, 124)
  eb = jax.random.randint(ks[3], (n,), -128, 124)
  # Also the common case: exponents near 0 (most outputs finite and normal).
  ea = jnp.where(jnp.arange(m) % 2 == 0, ea // 16, ea)
  eb = jnp.where(jnp.arange(n) % 2 == 0, eb // 16, eb)
  if nan_rows:
    ea, eb = ea.at[3].set(NAN_EXPONENT), eb.at[5].set(NAN_EXPONENT)
  return a, b, ea.astype(jnp.int32), eb.astype(jnp.int32)


CONFIGS = {
    "m128n128k128s3": Config(),
    "m128n128k128s4": Config(stages=4),  # bfloat16 out only: no room for a float32 epilogue tile
    "m128n128k64s6": Config(tile_k=64, stages=6),
    "m128n128k128s3_w4": Config(grid_tile_width=4),
    "m128n128k128s3_w16": Config(grid_tile_width=16),
    # Consecutive wgmma groups overlapped (one left in flight), and clusters of two CTAs multicasting the
    # operand tile they share (ninth session).
    "d1": Config(delay_release=1),
    "d1_s4": Config(delay_release=1, stages=4),
    "d1_cn": Config(delay_release=1, cluster="n"),
    "d1_cm": Config(delay_release=1, cluster="m"),
    "d1_cm_w16": Config(delay_release=1, cluster="m", grid_tile_width=16),
    "d1_cn_s4": Config(delay_release=1, cluster="n", stages=4),
    "d0_cm": Config(cluster="m"),
}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--lower", action="store_true", help="lower every config for CUDA (works on a CPU)")
  p.add_argument("--out", help="GPU: bits against XLA and timings, OUT/int8_gemm_mgpu.json")
  p.add_argument("--shapes", default="8192x8192x8192,4096x4096x14336,1024x8192x8192,4096x14336x4096")
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--budget-s", type=float, default=300)
  args = p.parse_args(argv)
  names = args.configs.split(",")
  if args.lower:
    a, b, ea, eb = make_inputs(512, 1024, 512)
    for name in names:
      try:
        text = jax.jit(functools.partial(int8_scaled_gemm, config=CONFIGS[name])).trace(a, b, ea, eb).lower(
            lowering_platforms=("cuda",)).as_text()
        print(f"{name}: lowered for CUDA ({len(text)} chars)", flush=True)
      except Exception as e:  # noqa: BLE001 - report each config
        print(f"{name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
  if not args.out:
    return 0
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}

  def save():
    with open(os.path.join(args.out, "int8_gemm_mgpu.json"), "w") as f:
      json.dump(res, f, indent=1)

  # Bits first, at a small and a mid shape, every config (float32 and bfloat16 out).
  checks = {}
  for (m, k, n) in [(512, 1024, 512), (1024, 4096, 2048)]:
    a, b, ea, eb = make_inputs(m, k, n)
    for od in (jnp.bfloat16, jnp.float32):
      ref = np.asarray(jax.jit(functools.partial(reference, out_dtype=od))(a, b, ea, eb)).astype(np.float32)
      for name in names:
        key = f"{m}x{k}x{n}/{jnp.dtype(od).name}/{name}"
        try:
          out = np.asarray(jax.jit(functools.partial(int8_scaled_gemm, out_dtype=od, config=CONFIGS[name]))(
              a, b, ea, eb)).astype(np.float32)
          same = (out == ref) | (np.isnan(out) & np.isnan(ref))
          checks[key] = {"equal_fraction": float(same.mean()), "nan_out": int(np.isnan(out).sum()),
                         "nan_ref": int(np.isnan(ref).sum())}
        except Exception as e:  # noqa: BLE001
          checks[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(key, checks[key], flush=True)
  res["checks"] = checks
  save()
  def exact(nm):  # every output bit-equal wherever it ran; bfloat16 (what is timed) must run
    mine = {kk: v for kk, v in checks.items() if kk.endswith("/" + nm)}
    return all(v.get("equal_fraction", 1.0) == 1.0 for v in mine.values()) and all(
        "equal_fraction" in v for kk, v in mine.items() if "/bfloat16/" in kk)

  good = [nm for nm in names if exact(nm)]
  res["exact_configs"] = good
  for shape in args.shapes.split(","):
    if time.time() - t0 > args.budget_s:
      res["stopped"] = f"budget reached before {shape}"
      break
    m, k, n = (int(v) for v in shape.split("x"))
    sets = B.n_sets(m * k + n * k)
    ins = [make_inputs(m, k, n, seed=s, nan_rows=False) for s in range(sets)]
    row = {"m": m, "k": k, "n": n, "sets": sets, "us": {}}
    xla = jax.jit(reference)
    row["us"]["xla_int8_dot_and_finish"] = B.bench(xla, ins) * 1e6
    dot = jax.jit(lambda a, b, ea, eb: lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.int32))
    row["us"]["xla_int8_dot_alone"] = B.bench(dot, ins) * 1e6
    xs = [(jax.random.normal(jax.random.key(100 + s), (m, k), jnp.bfloat16),
           jax.random.normal(jax.random.key(200 + s), (k, n), jnp.bfloat16)) for s in range(sets)]
    row["us"]["bf16_dot"] = B.bench(jax.jit(jnp.dot), xs) * 1e6
    for name in good:
      if time.time() - t0 > args.budget_s:
        break
      try:
        row["us"][name] = B.bench(jax.jit(functools.partial(int8_scaled_gemm, config=CONFIGS[name])), ins) * 1e6
      except Exception as e:  # noqa: BLE001
        row["us"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    row["x_bf16"] = {kk: row["us"]["bf16_dot"] / v for kk, v in row["us"].items() if isinstance(v, float)}
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    save()
  save()
  return 0


if __name__ == "__main__":
  sys.exit(main())
