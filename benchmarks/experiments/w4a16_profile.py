"""A few W4A16 decode calls (1 x 8192 x 8192 MXFP4, the 'rows' weight users get) for ncu to profile (issue 11).

ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 3 --launch-count 1 --set full \
    python benchmarks/experiments/w4a16_profile.py [DECODE BLOCK_N BLOCK_K SPLIT_K NUM_WARPS]

With no arguments the kernel runs with its default config; with them, that Config (M block 16, 3 stages).
"""
import sys

import jax, jax.numpy as jnp
import fp4jax as fj
from fp4jax.kernels import w4a16_matmul as wk

k = n = 8192
w = fj.quantize(jax.random.normal(jax.random.key(0), (k, n), jnp.float32), fj.MXFP4, axis=0, layout="rows")
x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
if len(sys.argv) > 1:
  dec, bn, bk, sk, nw = sys.argv[1], *map(int, sys.argv[2:6])
  cfg = wk.Config(16, bn, bk, sk, False, nw, 3, decode=dec)
  f = jax.jit(lambda x, w: wk.w4a16_matmul(x, w.values, w.scales, fmt=w.fmt, config=cfg))
else:
  f = jax.jit(lambda x, w: fj.scaled_matmul(x, w))
for _ in range(6):
  out = f(x, w)
jax.block_until_ready(out)
print("ok", out.shape, out.dtype)
