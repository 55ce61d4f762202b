"""W4A16 at M = 32-128 (issue 11 asks >= 1.5x the bf16 dot at M = 64-256): the bit decode with split-K
and swap AB, configs not tried before.

The earlier sweep (`w4a16_bits.py --more`) tried the bit decode at M >= 32 only in the ``x @ w.T``
orientation with split-K <= 4: best 54.9 us at 64 x 8192 x 8192 against 40.7 us for the bf16 dot.
Two things were left out: the decode default's own shape (128 x 256 tiles, K split 8, which gives
512 programs) with a taller M tile, and ``swap_ab`` (``w @ x.T``: the decoded weight is the MMA's
M side, which on Hopper may stay in registers as wgmma's A operand while ``x.T`` is read from shared
memory). Every config is checked against the float32 reference (rel. error) and timed against XLA's
bf16 dot in the same process (benchmarks/experiments/w4a16_decode.case).

  PYTHONPATH=. python benchmarks/experiments/w4a16_mid.py --out DIR [--budget-s S]
  ... --layers: jitted QDense.apply against nn.Dense.apply in bf16 at the same shapes
  (--blocks, which timed Config.decode="bits_blocks", went with that option: commit 1652100 has both)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import matmul as B  # noqa: E402
import w4a16_decode as D  # noqa: E402
import fp4jax as fj  # noqa: E402
from fp4jax.kernels import w4a16_matmul as wk  # noqa: E402
from w4a16_splitk import mma  # noqa: E402

CASES = [(64, 8192, 8192), (128, 8192, 8192), (32, 8192, 8192), (64, 4096, 14336), (64, 14336, 4096)]


def configs(m, k):
  bm = max(16, 1 << (m - 1).bit_length())
  out = {}
  for swap, bn, bk, sk, nw in itertools.product((False, True), (64, 128), (128, 256), (2, 4, 8), (4,)):
    if k % (bk * sk) == 0:
      out[f"{'swap' if swap else 'xwT'}_{bm}x{bn}x{bk}_s{sk}_w{nw}"] = wk.Config(bm, bn, bk, sk, swap, nw, 3, decode="bits")
  for bn, sk in itertools.product((128, 256), (4, 8)):  # two warpgroups on the weight rows
    if k % (256 * sk) == 0:
      out[f"swap_{bm}x{bn}x256_s{sk}_w8"] = wk.Config(bm, bn, 256, sk, True, 8, 3, decode="bits")
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--budget-s", type=float, default=300)
  ap.add_argument("--cases", default=None, help="MxKxN,... (default: CASES)")
  ap.add_argument("--layers", action="store_true",
                  help="instead: jitted QDense.apply (the library's default config) vs nn.Dense.apply in bf16")
  args = ap.parse_args()
  end = time.time() + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  cases = CASES if not args.cases else [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": []}
  if args.layers:
    return layers(cases, res, args.out, end)
  for m, k, n in cases:
    if time.time() > end:
      break
    methods = {"default": (mma(None), False)}
    methods.update({name: (mma(cfg), False) for name, cfg in configs(m, k).items()})
    r = D.case(m, k, n, fj.MXFP4, methods)
    t = r["t"]
    best = min((v, name) for name, v in t.items() if name not in ("xla_bf16",))
    r["best"] = best[1]
    B.log("case", m, k, n, "bf16", f"{t['xla_bf16'] * 1e6:.1f}us", "default", f"{t.get('default', 0) * 1e6:.1f}us",
          "best", best[1], f"{best[0] * 1e6:.1f}us", "worst err", max((e for e in r["err"].values() if isinstance(e, float)),
                                                                  default=None))
    res["cases"].append(r)
    with open(os.path.join(args.out, "w4a16_mid.json"), "w") as f:
      json.dump(res, f, indent=1)


def layers(cases, res, out, end):
  for m, k, n in cases:
    if time.time() > end:
      break
    for fmt in (fj.MXFP4, fj.NVFP4):
      t = D.layer_times(m, k, n, fmt)
      res["cases"].append({"m": m, "k": k, "n": n, "fmt": fmt.name, "t": t})
      B.log("layer", m, k, n, fmt.name, {name: f"{v * 1e6:.1f}us" for name, v in t.items()},
            f"{t['nn.Dense.apply'] / t['QDense.apply']:.2f}x")
      with open(os.path.join(out, "w4a16_mid_layers.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
