"""MXFP4 x MXFP4 on the FP8 tensor cores by re-basing each row to one power-of-two scale (issue 15).

An E2M1 value times 2**d is exact in E4M3 for d in [-8, 6]. Each row (of A (M, K) and of the weight
rows B (N, K)) gets one exponent ``e_row = e_top - 6`` (``e_top``: the largest block exponent among
its nonzero blocks); blocks with ``e - e_row >= -8`` become exact E4M3 values, the product is one
FP8 GEMM times ``2**(ea_row + eb_row)``. Other blocks (and NaN blocks) are the residual, here only
counted. This script measures two things on a GPU:
1. accuracy: the FP8 GEMM's error against float64, in units of the float32 bound
   ``(K + 2) * 2**-24 * sum|a||b|`` (>1: beyond float32 rounding), for XLA's default precision,
   ANY_F8_ANY_F8_F32 and its FAST_ACCUM variant, on random and adversarial inputs;
2. speed: bf16 dot vs rebase + FP8 dot (and the FP8 dot alone) at the issue's shapes.
Usage: python benchmarks/experiments/fp8_rebase.py --out DIR [--quick]
"""
import argparse, json, os, statistics, time
import numpy as np, jax, jax.numpy as jnp
from jax import lax
import fp4jax as fj
from fp4jax import _bits
from fp4jax.kernels import matmul_common as C

DN = (((1,), (1,)), ((), ()))


def rebase_rows(data, scales):
  """(R, K/2) packed E2M1 bytes, (R, K/32) E8M0 bytes -> (E4M3 (R, K), row exponent (R,), residual blocks (R, K/32))."""
  e = scales.astype(jnp.int32) - 127
  r, kb = data.shape
  nb = scales.shape[1]
  blk = data.reshape(r, nb, 16)
  nonzero = jnp.any((blk & 0x77) != 0, axis=-1)
  nan = scales == 255
  e_top = jnp.max(jnp.where(nonzero & ~nan, e, -1000), axis=-1)
  e_row = jnp.where(e_top > -1000, e_top - 6, 0)
  d = e - e_row[:, None]
  main = nonzero & ~nan & (d >= -8)
  v = C.decode_elements(data, fj.MXFP4).astype(jnp.float32)  # E2M1 * 2**-6
  f = _bits.exp2i(jnp.where(main, d + 6, 0)) * main  # 0 for residual blocks
  a8 = (v * C.expand_blocks(f, 32)).astype(jnp.float8_e4m3fn)
  return a8, e_row, (nonzero | nan) & ~main


def fp8_product(a8, ea, b8, eb, precision=None):
  out = lax.dot_general(a8, b8, DN, preferred_element_type=jnp.float32, precision=precision)
  return _bits.scale_by_pow2(out, ea[:, None] + eb[None, :])


def bench(f, args_sets, n_inner=20, n_outer=5):
  jax.block_until_ready(f(*args_sets[0]))
  ts = []
  for _ in range(n_outer):
    t0 = time.perf_counter()
    for i in range(n_inner):
      o = f(*args_sets[i % len(args_sets)])
    jax.block_until_ready(o)
    ts.append((time.perf_counter() - t0) / n_inner * 1e6)
  return statistics.median(ts)


def make(rng, shape, spread):
  x = rng.standard_t(3, size=shape).astype(np.float32)
  x *= np.exp2(rng.uniform(-spread, spread, (shape[0], shape[1] // 32, 1))).repeat(32, -1).reshape(shape) if spread else 1
  return x


def accuracy(out_dir, quick):
  rng = np.random.default_rng(0)
  precisions = {"default": None, "F8_F32": lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32,
                "F8_F32_FAST": lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM}
  rows = []
  for k in (32, 64, 256, 1024, 8192):
    for case in ("t3", "spread4", "spread7", "adversarial", "span10"):
      m, n = 64, 64
      if case in ("adversarial", "span10"):  # per row one block at the top, the rest far below it
        a = make(rng, (m, k), 0); b = make(rng, (n, k), 0)
        a[:, 32:] *= 2.0**-12 if case == "adversarial" else 2.0**-10
        if case == "adversarial":
          b[:, 32:] *= 2.0**-2
      else:
        spread = {"t3": 0, "spread4": 4, "spread7": 7}[case]
        a, b = make(rng, (m, k), spread), make(rng, (n, k), spread)
      qa = fj.quantize(a, fj.MXFP4, axis=-1, layout="rows"); qb = fj.quantize(b, fj.MXFP4, axis=-1, layout="rows")
      da = np.asarray(fj.dequantize(qa, jnp.float32), np.float64); db = np.asarray(fj.dequantize(qb, jnp.float32), np.float64)
      exact = da @ db.T
      bound = (k + 2) * 2.0**-24 * (np.abs(da) @ np.abs(db).T)
      a8, ea, ra = jax.jit(rebase_rows)(qa.values, lax.bitcast_convert_type(qa.scales, jnp.uint8))
      b8, eb, rb = jax.jit(rebase_rows)(qb.values, lax.bitcast_convert_type(qb.scales, jnp.uint8))
      row = {"k": k, "case": case, "residual_blocks_a": int(ra.sum()), "residual_blocks_b": int(rb.sum())}
      ref32 = np.asarray(jax.jit(lambda x, y: lax.dot_general(x, y, DN, precision=lax.Precision.HIGHEST,
                                                               preferred_element_type=jnp.float32))(da.astype(np.float32), db.astype(np.float32)), np.float64)
      row["f32_highest"] = float(np.max((np.abs(ref32 - exact) / np.where(bound > 0, bound, 1))))
      # exactness of the rebase itself: float64 product of the E4M3 values, rescaled
      # The exact product of what the FP8 GEMM is given (the main blocks): float64 of the E4M3 values.
      a8f, b8f = np.asarray(a8.astype(jnp.float32), np.float64), np.asarray(b8.astype(jnp.float32), np.float64)
      pw = np.exp2(np.asarray(ea, np.float64)[:, None] + np.asarray(eb, np.float64)[None, :])
      e8 = (a8f @ b8f.T) * pw
      bound8 = (k + 2) * 2.0**-24 * (np.abs(a8f) @ np.abs(b8f).T) * pw
      main_only = row["residual_blocks_a"] == 0 and row["residual_blocks_b"] == 0
      row["rebase_exact"] = bool(np.array_equal(e8, exact)) if main_only else None
      ok = bound8 > 0
      for name, p in precisions.items():
        try:
          got = np.asarray(jax.jit(lambda *z: fp8_product(*z, precision=p))(a8, ea, b8, eb), np.float64)
          row[name] = float(np.max(np.abs(got - e8)[ok] / bound8[ok]))
          row[name + "_exact_frac"] = float(np.mean(got == e8))
        except Exception as ex:  # noqa: BLE001
          row[name] = f"{type(ex).__name__}: {str(ex)[:200]}"
      print(json.dumps(row), flush=True)
      rows.append(row)
  json.dump(rows, open(os.path.join(out_dir, "accuracy.json"), "w"), indent=1)


def speed(out_dir, quick):
  rng = np.random.default_rng(1)
  shapes = [(8192, 8192, 8192), (4096, 4096, 14336), (1024, 8192, 8192)]
  rows = []
  for m, k, n in shapes:
    sets = []
    for s in range(2 if quick else 3):
      a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
      b = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
      qa = fj.quantize(a, fj.MXFP4, axis=-1, layout="rows", backend="xla"); qb = fj.quantize(b, fj.MXFP4, axis=-1, layout="rows", backend="xla")
      sets.append((a, b, qa, qb))
    bf16 = jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    row = {"m": m, "k": k, "n": n, "bf16_us": bench(bf16, [(a, b) for a, b, _, _ in sets])}
    for name, p in (("default", None), ("F8_F32", lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32),
                    ("F8_F32_FAST", lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM)):
      def full(qa, qb, p=p):
        a8, ea, _ = rebase_rows(qa.values, lax.bitcast_convert_type(qa.scales, jnp.uint8))
        b8, eb, _ = rebase_rows(qb.values, lax.bitcast_convert_type(qb.scales, jnp.uint8))
        return fp8_product(a8, ea, b8, eb, p).astype(jnp.bfloat16)
      try:
        row[f"rebase+fp8_{name}_us"] = bench(jax.jit(full), [(qa, qb) for _, _, qa, qb in sets])
        pre = [jax.jit(rebase_rows)(q.values, lax.bitcast_convert_type(q.scales, jnp.uint8)) for _, _, q, _ in sets]
        preb = [jax.jit(rebase_rows)(q.values, lax.bitcast_convert_type(q.scales, jnp.uint8)) for _, _, _, q in sets]
        only = jax.jit(lambda a8, ea, b8, eb, p=p: fp8_product(a8, ea, b8, eb, p).astype(jnp.bfloat16))
        row[f"fp8_{name}_only_us"] = bench(only, [(x[0], x[1], y[0], y[1]) for x, y in zip(pre, preb)])
        wonly = jax.jit(lambda qa, b8, eb, p=p: fp8_product(*rebase_rows(qa.values, lax.bitcast_convert_type(qa.scales, jnp.uint8))[:2], b8, eb, p).astype(jnp.bfloat16))
        row[f"rebase_a+fp8_{name}_us"] = bench(wonly, [(s[2], y[0], y[1]) for s, y in zip(sets, preb)])
      except Exception as ex:  # noqa: BLE001
        row[name] = f"{type(ex).__name__}: {str(ex)[:200]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
  json.dump(rows, open(os.path.join(out_dir, "speed.json"), "w"), indent=1)


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--skip-speed", action="store_true")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  print(jax.devices(), flush=True)
  accuracy(args.out, args.quick)
  if not args.skip_speed:
    speed(args.out, args.quick)
