"""W4A16 decode: the even/odd "halves" product against the interleaved one (issue 11).

The interleaved kernel decodes low and high nibbles and interleaves them into one (block_n, block_k)
tile, a register shuffle over the large weight tile. ``Config.halves`` instead splits the small
activation tile into its even and odd columns and runs two products, one per nibble. Times both at
every issue-11 shape (M = 1, 16), a few halves configs at 8192^2, and a jitted QDense.apply with the
halves default against nn.Dense in bf16.

Needs `git apply benchmarks/experiments/w4a16_halves.patch` (the Config.halves kernel option, not kept).
Usage: PYTHONPATH=. python benchmarks/experiments/w4a16_halves.py --out DIR [--budget-s S]
"""
from __future__ import annotations

import argparse, dataclasses, itertools, json, os, sys, time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import matmul as B  # noqa: E402
import w4a16_decode as D  # noqa: E402
import fp4jax as fj  # noqa: E402
from fp4jax.kernels import w4a16_matmul as wk  # noqa: E402
from w4a16_splitk import mma  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--budget-s", type=float, default=200)
  args = ap.parse_args()
  end = time.time() + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  res = {"sweep": [], "shapes": [], "layers": []}
  save = lambda: json.dump(res, open(os.path.join(args.out, "w4a16_halves.json"), "w"), indent=1)
  best = None
  for bn, bk, sk in itertools.product((32, 64), (128, 256), (4, 8)):
    cfg = wk.Config(16, bn, bk, sk, False, 4, 3, halves=True)
    r = D.case(1, 8192, 8192, fj.MXFP4, {"halves": (mma(cfg), False)})
    r["config"] = [bn, bk, sk]
    B.log("sweep", r["config"], {k: f"{v * 1e6:.1f}us" for k, v in r["t"].items()}, r["err"])
    res["sweep"].append(r); save()
    if "halves" in r["t"] and (best is None or r["t"]["halves"] < best[1]):
      best = (cfg, r["t"]["halves"])
  B.log("best", best)
  for (k, n), m in itertools.product(D.KNS, (1, 16)):
    if time.time() > end - 50:
      break
    d = wk.default_config(m, k, n, fj.MXFP4)
    h = dataclasses.replace(best[0], split_k=d.split_k if k % (best[0].block_k * best[0].split_k) else best[0].split_k)
    r = D.case(m, k, n, fj.MXFP4, {"default": (mma(None), False), "halves": (mma(h), False)})
    B.log("shape", m, k, n, {kk: f"{v * 1e6:.1f}us" for kk, v in r["t"].items()}, r["err"])
    res["shapes"].append(r); save()
  D.layers_with_default(lambda m, k, n, fmt, orig: (dataclasses.replace(orig(m, k, n, fmt), halves=True,
                                                                       block_n=best[0].block_n)
                                                   if m <= 16 and fmt.elem_bits == 4 else orig(m, k, n, fmt)),
                        res["layers"], save, end)


if __name__ == "__main__":
  main()
