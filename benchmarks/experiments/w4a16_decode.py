"""Decode-time W4A16 (M <= 16): the CUDA-core GEMV kernel against XLA's bf16 dot and the MMA kernel.

Usage (GPU): ``PYTHONPATH=. python benchmarks/w4a16_decode.py --out DIR [--sweep] [--budget-s S]``

* ``--sweep``: a config sweep of :mod:`fp4jax.kernels.w4a16_gemv` at 1 x 8192 x 8192 MXFP4.
* ``--flat``: a sweep of the flat GEMV variant at 8192 x 8192, M = 1 and 4.
* the table: for each shape ``(K, N)`` of issue 11 and ``M`` in 1, 16, times
  (median, inputs rotated beyond L2, one process) of: XLA's bf16 dot, the MMA
  kernel (``w4a16_matmul``) on a ``"rows"`` weight, ``fj.scaled_matmul(x, w)``
  on a plain QArray (the per-call relayout), and the jitted layers users call:
  ``nn.Dense.apply`` (bf16) and ``QDense.apply`` with ``quantize_params``
  weights, each kernel checked against the float32 reference.

Writes ``DIR/w4a16_decode.json`` and ``DIR/w4a16_decode.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import matmul as B  # noqa: E402  (the shared timing helpers of benchmarks/matmul.py)

import fp4jax as fj  # noqa: E402
import w4a16_gemv as G  # noqa: E402
from fp4jax.kernels import w4a16_matmul as wk  # noqa: E402

KNS = ((8192, 8192), (4096, 4096), (4096, 14336), (14336, 4096))


def _gemv(cfg):
  return lambda x, p: G.w4a16_gemv(x, p.values, p.scales, p.global_scale, fmt=p.fmt, config=cfg)


def _mma(x, p):
  return wk.w4a16_matmul(x, p.values, p.scales, p.global_scale, fmt=p.fmt)


def case(m, k, n, fmt, methods, check=True):
  qs = B.make_weights(k, n, fmt, B.n_sets(k * n * fmt.bits_per_element / 8))
  pws = [q.with_layout("rows") for q in qs]
  xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16)
        for i in range(B.n_calls(m * k * 2, len(qs)))]
  ref = B.ref_matmul(xs[0], qs[0]).astype(jnp.bfloat16).astype(jnp.float32) if check else None
  res = {"m": m, "k": k, "n": n, "fmt": fmt.name, "weight_bytes": int(pws[0].values.nbytes + pws[0].scales.nbytes),
         "t": {}, "err": {}}
  for name, (f, on_qarray) in methods.items():
    ws = qs if on_qarray else pws
    try:
      if check:
        res["err"][name] = B.rel_err(jax.jit(f)(xs[0], ws[0]).astype(jnp.float32), ref)
      res["t"][name] = B.bench(f, B.make_calls(xs, ws))
    except Exception as e:  # noqa: BLE001 - a failing method is a result too
      res["err"][name] = f"{type(e).__name__}: {str(e)[:200]}"
      B.log("FAILED", name, res["err"][name])
  wb = [q.dequantize(jnp.bfloat16) for q in qs[: B.n_sets(k * n * 2)]]
  res["t"]["xla_bf16"] = B.bench(lambda x, w: jnp.dot(x, w), B.make_calls(xs, wb))
  return res


def layer_times(m, k, n, fmt):
  """Jitted ``QDense.apply`` with ``quantize_params`` weights vs ``nn.Dense.apply`` in bf16 (what users call)."""
  import flax.linen as nn

  from fp4jax.flax import QDense

  sets = B.n_sets(k * n * 2)
  params = [jax.jit(nn.Dense(n, param_dtype=jnp.bfloat16).init)(jax.random.key(i), jnp.zeros((1, k), jnp.bfloat16))
            for i in range(sets)]
  qparams = [fj.quantize_params(p, fmt) for p in params[: B.n_sets(k * n * fmt.bits_per_element / 8)]]
  xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(B.n_calls(m * k * 2, sets))]
  return {"QDense.apply": B.bench(lambda x, p: QDense(n, dtype=jnp.bfloat16).apply(p, x), B.make_calls(xs, qparams)),
          "nn.Dense.apply": B.bench(lambda x, p: nn.Dense(n, dtype=jnp.bfloat16).apply(p, x), B.make_calls(xs, params))}


def layers_with_default(default, rows, save, end):
  """``layer_times`` at M = 1 for each issue-11 shape (MXFP4) until ``end``, appended to ``rows``, with
  ``default(m, k, n, fmt, orig)`` standing in for the kernel's ``default_config`` (``orig``), restored after."""
  orig = wk.default_config
  wk.default_config = lambda m, k, n, fmt: default(m, k, n, fmt, orig)
  jax.clear_caches()  # the kernel's jit traced with the old default
  try:
    for k, n in KNS:
      if time.time() > end:
        break
      t = layer_times(1, k, n, fj.MXFP4)
      B.log("layers", k, n, {kk: f"{v * 1e6:.1f}us" for kk, v in t.items()})
      rows.append({"k": k, "n": n, "t": t})
      save()
  finally:
    wk.default_config = orig
    jax.clear_caches()


def stack_times(m, fmt, pairs=4, d=4096, h=14336):
  """A jitted stack of ``2 * pairs`` QDense layers (d -> h -> d pairs, the issue's end-to-end figure)
  decoding ``m`` tokens, against the same stack of nn.Dense in bf16: seconds a step each."""
  import flax.linen as nn

  from fp4jax.flax import QDense

  class Stack(nn.Module):
    dense: type

    @nn.compact
    def __call__(self, x):
      for i in range(pairs):
        x = self.dense(h, jnp.bfloat16, f"up_{i}")(x)
        x = self.dense(d, jnp.bfloat16, f"down_{i}")(x)
      return x

  ref = Stack(lambda f, dtype, name: nn.Dense(f, dtype=dtype, param_dtype=jnp.bfloat16, name=name))
  params = jax.jit(ref.init)(jax.random.key(0), jnp.zeros((m, d), jnp.bfloat16))
  qparams = fj.quantize_params(params, fmt)
  q = Stack(lambda f, dtype, name: QDense(f, dtype=dtype, name=name))
  xs = [jax.random.normal(jax.random.key(60 + i), (m, d), jnp.bfloat16) for i in range(8)]
  return {"stack QDense": B.bench(lambda x, p: q.apply(p, x), B.make_calls(xs, [qparams])),
          "stack nn.Dense": B.bench(lambda x, p: ref.apply(p, x), B.make_calls(xs, [params]))}


def sweep(budget_end):
  out = []
  grid = [c + (1,) + w for c in itertools.product((32, 64, 128), (256, 512)) for w in ((4, 3), (8, 3), (4, 4), (8, 2))]
  grid += [(64, 256, 2, 4, 3), (32, 256, 2, 4, 3), (16, 256, 1, 2, 3), (16, 512, 1, 4, 3)]
  for bn, bk, sk, nw, ns in grid:
    if time.time() > budget_end:
      B.log("sweep: budget spent")
      break
    cfg = G.Config(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=ns)
    r = case(1, 8192, 8192, fj.MXFP4, {"gemv": (_gemv(cfg), False)}, check=True)
    r["config"] = [bn, bk, sk, nw, ns]
    B.log("sweep", r["config"], {k: f"{v * 1e6:.1f}us" for k, v in r["t"].items()}, r["err"])
    out.append(r)
  return out


def flat_sweep(budget_end):
  out = []
  for (bn, bk, nw, ns), m in itertools.product(((32, 256, 4, 3), (64, 256, 4, 3), (64, 256, 8, 3), (128, 256, 8, 3),
                                                 (64, 512, 8, 3), (32, 512, 4, 3), (16, 512, 2, 3)), (1, 4)):
    if time.time() > budget_end:
      break
    cfg = G.Config(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, flat=True)
    r = case(m, 8192, 8192, fj.MXFP4, {"flat": (_gemv(cfg), False)})
    r["config"] = [bn, bk, nw, ns]
    B.log("flat", m, r["config"], {k: f"{v * 1e6:.1f}us" for k, v in r["t"].items()}, r["err"])
    out.append(r)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=".")
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--budget-s", type=float, default=300)
  p.add_argument("--formats", default="mxfp4,nvfp4")
  p.add_argument("--flat", action="store_true", help="sweep only the flat variant, then stop")
  p.add_argument("--stack", action="store_true", help="also time the 8-layer QDense stack (M = 1, 4, 16)")
  args = p.parse_args()
  end = time.time() + args.budget_s
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_Bps": B.copy_bandwidth(),
            "rows": []}
  path = os.path.join(args.out, "w4a16_decode.json")

  def save():
    with open(path, "w") as f:
      json.dump(result, f, indent=1)

  if args.flat:
    result["flat_sweep"] = flat_sweep(end)
    save()
    return
  if args.sweep:
    result["sweep"] = sweep(time.time() + args.budget_s / 2)
    save()
  methods = {
      "mma": (_mma, False),
      "scaled_matmul(x, q)": (lambda x, q: fj.scaled_matmul(x, q), True),
  }
  for fmt_name in args.formats.split(","):
    fmt = fj.get_format(fmt_name)
    for (k, n), m in itertools.product(KNS, (1, 16)):
      if time.time() > end:
        B.log("table: budget spent")
        break
      r = case(m, k, n, fmt, methods)
      try:
        r["t"].update(layer_times(m, k, n, fmt))
      except Exception as e:  # noqa: BLE001
        r["err"]["layers"] = f"{type(e).__name__}: {str(e)[:200]}"
      B.log(fmt.name, m, k, n, {kk: f"{v * 1e6:.1f}us" for kk, v in r["t"].items()}, r["err"])
      result["rows"].append(r)
      save()
  save()
  if args.stack:
    result["stack"] = []
    for fmt_name, m in itertools.product(args.formats.split(","), (1, 4, 16)):
      t = stack_times(m, fj.get_format(fmt_name))
      B.log("stack", fmt_name, m, {kk: f"{v * 1e6:.1f}us" for kk, v in t.items()})
      result["stack"].append({"fmt": fmt_name, "m": m, "t": t})
      save()
  lines = [f"# W4A16 decode, {result['device']}, jax {result['jax']}, copy {result['copy_Bps'] / 1e12:.2f} TB/s", "",
           "| fmt | M | K | N | floor us | bf16 us | gemv us | mma us | scaled_matmul(x, q) us | nn.Dense.apply us | "
           "QDense.apply us | QDense vs Dense | gemv err |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    t = r["t"]
    floor = r["weight_bytes"] / result["copy_Bps"] * 1e6
    us = lambda key: f"{t[key] * 1e6:.1f}" if key in t else "-"  # noqa: E731
    ratio = f"{t['nn.Dense.apply'] / t['QDense.apply']:.2f}x" if "QDense.apply" in t else "-"  # > 1: faster
    lines.append(f"| {r['fmt']} | {r['m']} | {r['k']} | {r['n']} | {floor:.1f} | {us('xla_bf16')} | {us('gemv')} | "
                 f"{us('mma')} | {us('scaled_matmul(x, q)')} | {us('nn.Dense.apply')} | {us('QDense.apply')} | "
                 f"{ratio} | {r['err'].get('gemv')} |")
  if result.get("stack"):
    lines += ["", "8 QDense layers (4 pairs 4096 -> 14336 -> 4096), jitted, one decode step; tokens/s = M / step time.",
              "", "| fmt | M | bf16 stack us | QDense stack us | bf16 tokens/s | QDense tokens/s | QDense vs bf16 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["stack"]:
      tq, tb = r["t"]["stack QDense"], r["t"]["stack nn.Dense"]
      lines.append(f"| {r['fmt']} | {r['m']} | {tb * 1e6:.1f} | {tq * 1e6:.1f} | {r['m'] / tb:.0f} | {r['m'] / tq:.0f} | "
                   f"{tb / tq:.2f}x |")
  with open(os.path.join(args.out, "w4a16_decode.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
