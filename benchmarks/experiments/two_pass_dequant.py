"""How fast can XLA dequantize a 4-bit weight to bfloat16, and what does the two-pass path lose? (issues 11, 12)

The 2-GPU prefill profile (tp_prefill_profile.py) shows each 4096 x 14336 MXFP4 weight dequantized in
140 us on one H200 (~1 TB/s of HBM traffic) and each up projection's float32 output converted to bfloat16
in a separate 83 us pass. Candidates, each exact (checked against ``common.dequantize_tile``):
- ``tile``: today's ``common.dequantize_tile`` (nibbles interleaved by stack + reshape: XLA emits a
  concatenate fusion);
- ``pairs``: low and high nibbles decoded to bfloat16 separately and packed as one uint32 per byte
  (bitcast to two bfloat16s), so the interleave is a bitcast, not a concatenate (first measured here
  as a local function; now ``common.dequantize_bf16_pairs``, what ``run_two_pass`` runs);
and, through the whole two-pass product ``x @ w`` with bfloat16 output: the dot's float32 output then a
convert (today) vs the dot asked for bfloat16 output directly (cuBLAS rounds its float32 sums once, as the
convert does). Times: median of 5 samples of 20 calls, weights rotated over 3 copies (> L2).

  PYTHONPATH=. python benchmarks/experiments/two_pass_dequant.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fp4jax as fj
from fp4jax.kernels import matmul_common as common
from fp4jax.matmul import byte_matrix

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_rebase import bench  # noqa: E402

DN = (((1,), (1,)), ((), ()))


def deq_tile(data, scales, fmt):
  return common.dequantize_tile(data, scales, fmt, jnp.bfloat16)


def deq_pairs(data, scales, fmt):
  return common.dequantize_bf16_pairs(data, scales, fmt)


DEQ = {"tile": deq_tile, "pairs": deq_pairs}


def two_pass(x, w, deq, direct):
  data, scales = byte_matrix(w)
  b = deq(data, scales, w.fmt)
  x, b = lax.optimization_barrier((x, b))
  if direct:
    return lax.dot_general(x, b, DN, preferred_element_type=jnp.bfloat16)
  return lax.dot_general(x, b, DN, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--small", action="store_true")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  rows = []
  # Exactness over every byte and every scale byte (the block of each row uses one scale).
  for fmt in (fj.MXFP4, fj.NVFP4):
    data = jnp.tile(jnp.arange(256, dtype=jnp.uint8)[None, :], (256, 1))  # (256, 256) bytes
    nb = 256 * 2 // fmt.block_size
    sc = jnp.tile(jnp.arange(256, dtype=jnp.uint8)[:, None], (1, nb))
    if not fmt.power_of_two_scales:  # E4M3: skip the NaN bytes 0x7F / 0xFF
      sc = jnp.where((sc & 0x7F) == 0x7F, 0x38, sc).astype(jnp.uint8)
    ref = np.asarray(jax.jit(deq_tile, static_argnums=2)(data, sc, fmt)).view(np.uint16)
    got = np.asarray(jax.jit(deq_pairs, static_argnums=2)(data, sc, fmt)).view(np.uint16)
    rows.append({"check": f"pairs == tile, {fmt.name}, every byte x scale byte", "equal": bool((ref == got).all())})
    print(rows[-1], flush=True)
  shapes = [(4096, 4096, 14336), (4096, 14336, 4096), (4096, 4096, 4096), (8192, 4096, 4096), (1024, 8192, 8192)]
  if a.small:
    shapes = [(64, 256, 512)]
  for fmt in (fj.MXFP4, fj.NVFP4):
    for (m, k, n) in shapes:
      # (K, N) weights blocked along K, stored as (N, K/2) byte rows (quantize_params' default)
      ws = [fj.quantize(jax.random.normal(jax.random.key(i), (k, n), jnp.float32), fmt, axis=0).with_layout("rows")
            for i in range(3)]
      xs = [jax.random.normal(jax.random.key(10 + i), (m, k), jnp.bfloat16) for i in range(3)]
      row = {"fmt": fmt.name, "m": m, "k": k, "n": n}
      for name, deq in DEQ.items():
        f = jax.jit(lambda w, deq=deq: deq(*byte_matrix(w), w.fmt))
        row[f"deq_{name}_us"] = bench(f, [(w,) for w in ws])
      row["deq_GBps_pairs"] = (n * k // 2 + n * k // fmt.block_size + 2 * n * k) / row["deq_pairs_us"] / 1e3
      outs = {}
      for name, deq in DEQ.items():
        for direct in (False, True):
          f = jax.jit(lambda x, w, deq=deq, direct=direct: two_pass(x, w, deq, direct))
          row[f"two_pass_{name}_{'bf16out' if direct else 'f32out'}_us"] = bench(f, list(zip(xs, ws)))
          outs[(name, direct)] = np.asarray(f(xs[0], ws[0]).astype(jnp.float32))
      base = outs[("tile", False)]
      row["bits_equal"] = {f"{n_}_{d}": bool((o == base).all()) for (n_, d), o in outs.items()}
      wb = [jnp.asarray(fj.dequantize(w, jnp.bfloat16)).T for w in ws]  # bf16 (N, K): no transpose in the dot
      row["xla_bf16_us"] = bench(jax.jit(lambda x, w: lax.dot_general(x, w, DN)), list(zip(xs, wb)))
      row["fj_scaled_matmul_us"] = bench(jax.jit(lambda x, w: fj.scaled_matmul(x, w, preferred_element_type=jnp.bfloat16)),
                                         list(zip(xs, ws)))
      rows.append(row)
      print(json.dumps(row), flush=True)
      with open(os.path.join(a.out, "two_pass_dequant.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
