"""Issue 15: tiles and warps of the NVFP4 + RHT16 step's two passes that transform along the lanes.

In the QAT step of benchmarks/qat_step.py, ``dh = dy @ W2^T`` contracts over the model axis, the last axis of
both operands, so its operands are transformed and quantized along their lanes: the output gradient (8192,
4096), stochastic, and W2 (14336, 4096), to nearest. Along the lanes the transform in the kernel costs ~540 us an
(8192, 14336) pass where along the tokens it costs 24-76 us (rht_fused.json, run3). This times, for each of the
two, ``fake_quantize_2d(..., hadamard=16)`` (the user's call: with its tensor-amax pass) on each tile of
``TILES`` and each warp count of ``WARPS``, and the same tile without the transform; every output's bits are
compared with the default tile's (the tile changes the programs, never the values).

  PYTHONPATH=. python3 benchmarks/experiments/rht_tiles.py --out DIR          # GPU, ~3 min (~1.5 --no-baseline)
  PYTHONPATH=. python3 benchmarks/experiments/rht_tiles.py --small --out DIR  # CPU smoke run, interpret mode

The JSON is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fp4jax as fj
from fp4jax.kernels import fake_quant as fk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: (name, shape, stochastic): the step's operands transformed along axis 1.
CASES = [("dy_sr", (8192, 4096), True), ("w2_rn", (14336, 4096), False)]
TILES = [None, (16, 512), (64, 128), (16, 256), (8, 512), (128, 64), (32, 128)]  # None: the library's choice
WARPS = [None, 4, 8]  # None: fk.NUM_WARPS's
N = 16


def run_case(name, shape, stochastic, a, result, path):
  import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)

  if a.small:
    shape = (256, 512)
  xs = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(2 if a.small else 4)]
  key = jax.random.key(3) if stochastic else None
  default_warps, baseline_warps = fk.LANES_TRANSFORM_WARPS, fk.NUM_WARPS[1, stochastic]
  reference = None
  for tile in TILES:
    for warps in WARPS:
      if (tile is None) != (warps is None):
        continue
      row = {"tile": tile or "default", "warps": warps or default_warps}
      for h in (N,) if a.no_baseline else (N, 0):
        # The warps of the transformed pass; the baseline without the transform: the same, or its default.
        fk.LANES_TRANSFORM_WARPS, fk.NUM_WARPS[1, stochastic] = warps or default_warps, warps or baseline_warps
        jax.clear_caches()  # fake_quantize_2d's jit cache does not see the warps
        f = jax.jit(lambda v, h=h: fk.fake_quantize_2d(v, key, fmt=fj.NVFP4, rule="nearest", axis=1,
                                                       dtype=jnp.bfloat16, interpret=a.small, tile=tile,
                                                       hadamard=h, seed=0))
        label = "us" if h else "us_no_transform"
        try:
          row[label] = round(B.bench(f, [(v,) for v in xs]) * 1e6, 1)
          if h:
            bits = np.asarray(f(xs[0])).view(np.uint16)
            reference = bits if reference is None else reference
            row["differing_from_default"] = int(np.sum(bits != reference))
        except Exception as e:  # a tile the compiler refuses: recorded, not fatal
          row[label] = f"{type(e).__name__}: {str(e)[:160]}"
      fk.LANES_TRANSFORM_WARPS, fk.NUM_WARPS[1, stochastic] = default_warps, baseline_warps
      result.setdefault(name, []).append(row)
      print(name, json.dumps(row), flush=True)
      with open(path, "w") as fh:
        json.dump(result, fh, indent=1)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", type=lambda v: v.split(","), help="only these (dy_sr, w2_rn)")
  p.add_argument("--no-baseline", action="store_true", help="skip the tiles' times without the transform")
  p.add_argument("--small", action="store_true", help="CPU smoke run: small shapes, interpret mode")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "rht_tiles.json")
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for name, shape, stochastic in CASES:
    if not a.cases or name in a.cases:
      run_case(name, shape, stochastic, a, result, path)


if __name__ == "__main__":
  main()
