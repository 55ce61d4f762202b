"""Tile sweep of the single passes around the QAT int8 products (issue 15), at benchmarks/qat_step.py's shapes.

Times, on a GPU, each (block_m, block_k, num_warps) of :class:`fp4jax.kernels.common.TileConfig` for:
``quantize_rows`` (MXFP4 floor, bfloat16 rows (8192, 14336): the down product's h), ``quantize_columns_to_rows``
((4096, 14336) blocked along axis 0: W1 / W3; (14336, 4096): W2), and ``dequantize_packed(overflow="cast")`` of the h rows to
bfloat16; the first row of each is the default heuristic (``default_tiles``). Each time: median of 5 samples of
10 back-to-back calls over two inputs (each beyond the 50 MB L2); the bits are compared with the default's.

  PYTHONPATH=. python3 benchmarks/experiments/pass_tiles.py --out DIR   # GPU, ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.formats import MXFP4
from fp4jax.kernels import common as C
from fp4jax.kernels import dequantize as dqk
from fp4jax.kernels import quantize_pack as qk

ROWS = [None, (16, 512, 8), (32, 512, 8), (8, 1024, 8), (16, 1024, 8), (32, 256, 4), (32, 256, 8), (64, 256, 8),
        (16, 512, 4), (32, 1024, 8)]
COLS = [None, (128, 32, 4), (256, 32, 4), (128, 64, 8), (64, 64, 4), (64, 128, 8), (256, 64, 8), (128, 128, 8),
        (512, 32, 8), (32, 128, 4)]


def timed(fn, xs, calls=10, samples=5):
  jax.block_until_ready(fn(xs[0]))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for i in range(calls):
      out = fn(xs[i % len(xs)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls * 1e6)
  return round(statistics.median(times), 1)


def sweep(name, make, xs, configs):
  rows, ref = [], None
  for c in configs:
    cfg = None if c is None else C.TileConfig(block_m=c[0], block_k=c[1], num_warps=c[2])
    try:
      fn = jax.jit(make(cfg))
      out = jax.block_until_ready(fn(xs[0]))
      bits = [np.asarray(jax.lax.bitcast_convert_type(o, jnp.uint8) if o.dtype.itemsize == 1 else o).tobytes()
              for o in jax.tree.leaves(out)]
      ref = bits if ref is None else ref
      rows.append({"config": c or "default", "us": timed(fn, xs), "same_bits": bits == ref})
    except Exception as e:  # a tile the compiler refuses: recorded, not fatal
      rows.append({"config": c, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    print(name, rows[-1], flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--cols-only", action="store_true", help="the column sweeps alone (W1/W3, W2)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  k = jax.random.split(jax.random.key(0), 4)
  h = [jax.random.normal(k[i], (8192, 14336), jnp.bfloat16) for i in range(2)]
  w = [jax.random.normal(k[2 + i], (4096, 14336), jnp.bfloat16) for i in range(2)]
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if not a.cols_only:
    res["quantize_rows_h"] = sweep("rows", lambda cfg: lambda x: qk.quantize_rows(
        x, MXFP4, scale_rule="floor", config=cfg), h, ROWS)
  res["quantize_columns_to_rows_w"] = sweep("cols", lambda cfg: lambda x: qk.quantize_columns_to_rows(
      x, MXFP4, axis=0, scale_rule="floor", config=cfg), w, COLS)
  w2 = [jax.random.normal(k[i], (14336, 4096), jnp.bfloat16) for i in range(2)]
  res["quantize_columns_to_rows_w2"] = sweep("cols_w2", lambda cfg: lambda x: qk.quantize_columns_to_rows(
      x, MXFP4, axis=0, scale_rule="floor", config=cfg), w2, COLS[:3] + [(512, 32, 4), (64, 32, 4)])
  if a.cols_only:
    return _write(a, res)
  qs = [qk.quantize_rows(x, MXFP4, scale_rule="floor") for x in h]
  packed = [(q.values, q.scales) for q in qs]
  res["dequantize_rows_h"] = sweep("dequant", lambda cfg: lambda vs: dqk.dequantize_packed(
      vs[0], vs[1], fmt=MXFP4, axis=-1, dtype=jnp.bfloat16, overflow="cast", config=cfg), packed, ROWS)
  return _write(a, res)


def _write(a, res):
  with open(os.path.join(a.out, "pass_tiles.json"), "w") as f:
    json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  main()
