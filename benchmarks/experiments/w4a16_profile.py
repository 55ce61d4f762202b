"""A few W4A16 decode calls (1 x 8192 x 8192 MXFP4, the 'rows' weight users get) for ncu to profile (issue 11).

ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 3 --launch-count 1 --set full \
    python benchmarks/experiments/w4a16_profile.py
"""
import jax, jax.numpy as jnp
import fp4jax as fj

k = n = 8192
w = fj.quantize(jax.random.normal(jax.random.key(0), (k, n), jnp.float32), fj.MXFP4, axis=0, layout="rows")
x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
f = jax.jit(lambda x, w: fj.scaled_matmul(x, w))
for _ in range(6):
  out = f(x, w)
jax.block_until_ready(out)
print("ok", out.shape, out.dtype)
