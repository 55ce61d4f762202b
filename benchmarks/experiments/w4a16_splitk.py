"""Split-K for the W4A16 MMA kernel at decode, in the fast x @ w.T orientation (issue 11).

ncu at 1 x 8192 x 8192 (benchmarks/results/w4a16_ncu.txt): 128 programs of 4 warps, one per SM,
6.25% achieved occupancy, 0.58 instructions issued per scheduler cycle, DRAM 17% busy: latency-bound
for want of warps. The earlier sweeps tried split-K only with swap_ab. This one sweeps split_k with
swap_ab=False, then times the best config at every issue-11 shape, through the kernel and through a
jitted QDense.apply (default_config patched to it) against nn.Dense in bf16.

Usage: PYTHONPATH=. python benchmarks/experiments/w4a16_splitk.py --out DIR [--budget-s S]
"""
from __future__ import annotations

import argparse, itertools, json, os, sys, time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import matmul as B  # noqa: E402
import w4a16_decode as D  # noqa: E402
import fp4jax as fj  # noqa: E402
from fp4jax.kernels import w4a16_matmul as wk  # noqa: E402


def mma(cfg):
  return lambda x, p: wk.w4a16_matmul(x, p.values, p.scales, p.global_scale, fmt=p.fmt, config=cfg)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--budget-s", type=float, default=240)
  args = ap.parse_args()
  end = time.time() + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  res = {"sweep": [], "shapes": [], "layers": []}
  path = os.path.join(args.out, "w4a16_splitk.json")
  save = lambda: json.dump(res, open(path, "w"), indent=1)
  grid = [(64, 256, 1, 4, 4)] + [(bn, bk, sk, 4, ns) for bn, bk, sk, ns in itertools.product(
      (32, 64, 128), (128, 256), (2, 4, 8), (3, 4)) if not (bn == 128 and sk == 8)]
  best = None
  for bn, bk, sk, nw, ns in grid:
    if time.time() > end - 120:
      break
    cfg = wk.Config(16, bn, bk, sk, False, nw, ns)
    r = D.case(1, 8192, 8192, fj.MXFP4, {"mma": (mma(cfg), False)}, check=True)
    r["config"] = [bn, bk, sk, nw, ns]
    B.log("sweep", r["config"], {k: f"{v * 1e6:.1f}us" for k, v in r["t"].items()}, r["err"])
    res["sweep"].append(r); save()
    if "mma" in r["t"] and (best is None or r["t"]["mma"] < best[1]):
      best = (cfg, r["t"]["mma"])
  if best is None:
    return
  cfg = best[0]
  B.log("best", cfg, best[1])
  for (k, n), m in itertools.product(D.KNS, (1, 16)):
    if time.time() > end - 40:
      break
    c = wk.Config(16, cfg.block_n, cfg.block_k, cfg.split_k if k % (cfg.block_k * cfg.split_k) == 0 else 1,
                  False, cfg.num_warps, cfg.num_stages)
    r = D.case(m, k, n, fj.MXFP4, {"best": (mma(c), False), "default": (mma(None), False)})
    r["config"] = list(dataclass_tuple(c))
    B.log("shape", m, k, n, {kk: f"{v * 1e6:.1f}us" for kk, v in r["t"].items()}, r["err"])
    res["shapes"].append(r); save()
  D.layers_with_default(lambda m, k, n, fmt, orig: (wk.Config(16, cfg.block_n, cfg.block_k, cfg.split_k, False,
                                                              cfg.num_warps, cfg.num_stages)
                                                   if m <= 16 and k % (cfg.block_k * cfg.split_k) == 0
                                                   else orig(m, k, n, fmt)),
                        res["layers"], save, end)


def dataclass_tuple(c):
  return (c.block_m, c.block_n, c.block_k, c.split_k, c.swap_ab, c.num_warps, c.num_stages)


if __name__ == "__main__":
  main()
