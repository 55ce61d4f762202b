"""How often would the MXFP4 QAT step's GEMM operands need the int8 path's fallback? (issue 15, CPU)

The int8 path (``fp4jax/int8_matmul.py``) multiplies MXFP4 x MXFP4 exactly on the int8 tensor cores when every
row of both operands keeps its nonzero blocks within 4 binades of the row's top block; one row outside sends the
whole product to the two-pass bfloat16 fallback. Putting QAT's GEMMs on the int8 path only pays if the operands of
``benchmarks/qat_step.py`` (SwiGLU block, d = 4096, ffn = 14336, random data as there) mostly have no such row.

This counts, per operand as the int8 path would see it (rows = the GEMM's free axis, blocks along its contracting
axis), the fraction of rows with residual blocks, with the step's own data at full contraction lengths and fewer
tokens (the row fraction does not depend on how many rows there are):

* forward: ``x`` (tokens x d), ``W1^T`` / ``W3^T`` (ffn x d), ``h = silu(x W1) * (x W3)`` (tokens x ffn), ``W2^T``
  (d x ffn);
* backward, unquantized gradients as a stand-in for the stochastically rounded ones (the same blocks' exponents up to
  rounding): ``g = 2 (y - t) / size`` (tokens x d) and ``W2`` (ffn x d) of ``dh = g W2^T``; ``dh`` (tokens x ffn) of
  ``dx``; and the weight gradients' operands blocked along tokens: ``x^T``, ``h^T``, ``g^T`` and the pre-activation
  gradients ``g1^T``, ``g3^T``. Rows blocked along tokens have ``tokens / 32`` blocks: fewer tokens than the step's
  8192 can only under-count them.

``--chunks 128,512,...``: also, for the operands with residual rows, what a GEMM with one base exponent per row
and K-chunk would meet (the int8 sums of each chunk exact, chunks added in float32, as a bfloat16 GEMM adds its
k-steps): the fraction of (row, chunk) pairs whose chunk still has a residual block below its own top, and of
(128-row tile, chunk) pairs with such a row (a tile kernel would take those chunks another way).

  PYTHONPATH=. python benchmarks/experiments/qat_int8_residual.py --out DIR [--tokens 2048] [--chunks 128,512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

import fp4jax as fj
from fp4jax import int8_matmul
from fp4jax.prepared import byte_matrix


def residual_rows(x):
  """Fraction of rows of ``x`` (rows, K), quantized to MXFP4 along K, with residual blocks (the fallback's trigger)."""
  data, scales = byte_matrix(fj.quantize(x, fj.MXFP4, axis=-1, layout="rows"))
  base, _ = int8_matmul.row_bases(scales)
  return float(jnp.mean(int8_matmul.rows_residual(data, scales, base)))


def residual_chunks(x, chunk: int, tile_rows: int = 128):
  """``(pairs, tiles)``: the fraction of (row, chunk) pairs of ``x`` (rows, K), MXFP4 along K, whose ``chunk``
  elements have a residual block below the chunk's own top block, and of (``tile_rows``-row tile, chunk)
  pairs holding one."""
  data, scales = byte_matrix(fj.quantize(x, fj.MXFP4, axis=-1, layout="rows"))
  rows, nb = scales.shape
  cb = min(chunk // 32, nb)  # a chunk no longer than the row
  if nb % cb:
    return None, None
  s, d = scales.reshape(rows * (nb // cb), cb), data.reshape(rows * (nb // cb), cb * 16)
  base, _ = int8_matmul.row_bases(s)
  res = int8_matmul.rows_residual(d, s, base).reshape(rows, nb // cb)
  tiles = jnp.any(res[: rows // tile_rows * tile_rows].reshape(rows // tile_rows, tile_rows, -1), axis=1)
  return float(jnp.mean(res)), float(jnp.mean(tiles))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--chunks", default="", help="K-chunk lengths (multiples of 32) for the per-chunk counts")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  d, ffn, t = a.d, a.ffn, a.tokens
  k = jax.random.split(jax.random.key(0), 8)  # benchmarks/qat_step.py's inputs(), fewer tokens
  w1, w3 = (jax.random.normal(k[i], (d, ffn)) * d**-0.5 for i in (0, 1))
  w2 = jax.random.normal(k[2], (ffn, d)) * ffn**-0.5
  x = jax.random.normal(k[3], (t, d), jnp.bfloat16).astype(jnp.float32)
  target = jax.random.normal(k[5], (t, d), jnp.float32)
  a1, a3 = x @ w1, x @ w3
  h = jax.nn.silu(a1) * a3
  y = h @ w2
  g = 2 * (y - target) / y.size
  dh = g @ w2.T
  # Gradients at the two pre-activations (the weight gradients' other operands).
  g1 = dh * a3 * jax.grad(lambda v: jnp.sum(jax.nn.silu(v)))(a1)
  g3 = dh * jax.nn.silu(a1)
  res = {"tokens": t, "d": d, "ffn": ffn, "residual_row_fraction": {
      "x (tokens x d)": residual_rows(x),
      "W1^T (ffn x d)": residual_rows(w1.T),
      "W3^T (ffn x d)": residual_rows(w3.T),
      "h (tokens x ffn)": residual_rows(h),
      "W2^T (d x ffn)": residual_rows(w2.T),
      "g (tokens x d)": residual_rows(g),
      "W2 (ffn x d)": residual_rows(w2),
      "dh (tokens x ffn)": residual_rows(dh),
      # Weight gradients dW = X^T G sum over tokens: rows are features, blocks along tokens.
      "x^T (d x tokens)": residual_rows(x.T),
      "g1^T (ffn x tokens)": residual_rows(g1.T),
      "g3^T (ffn x tokens)": residual_rows(g3.T),
      "h^T (ffn x tokens)": residual_rows(h.T),
      "g^T (d x tokens)": residual_rows(g.T),
  }}
  wide = {"h (tokens x ffn)": h, "g1^T (ffn x tokens)": g1.T, "g3^T (ffn x tokens)": g3.T, "h^T (ffn x tokens)": h.T}
  for c in [int(v) for v in a.chunks.split(",") if v]:
    res.setdefault("residual_per_chunk", {})[str(c)] = {
        name: dict(zip(("row_chunk_pairs", "tile_chunk_pairs"), residual_chunks(v, c))) for name, v in wide.items()}
  print(json.dumps(res, indent=1), flush=True)
  with open(os.path.join(a.out, "qat_int8_residual.json"), "w") as f:
    json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
