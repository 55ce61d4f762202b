"""Why a jitted QDense.apply at 1 x 4096 x 4096 took 21 us while the kernel alone took 10 (issue 11).

Times QDense.apply with and without bias at M = 1 and 16 and prints the fusions of the optimized HLO.
Usage: PYTHONPATH=. python benchmarks/experiments/w4a16_m1_layer.py
"""
import os, re, sys

import jax, jax.numpy as jnp
import flax.linen as nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import matmul as B  # noqa: E402
import fp4jax as fj  # noqa: E402
from fp4jax.flax import QDense  # noqa: E402

k = n = 4096
for bias in (True, False):
  params = [jax.jit(nn.Dense(n, use_bias=bias, param_dtype=jnp.bfloat16).init)(jax.random.key(i), jnp.zeros((1, k), jnp.bfloat16))
            for i in range(16)]
  qparams = [fj.quantize_params(p, fj.MXFP4) for p in params]
  layer = QDense(n, use_bias=bias, dtype=jnp.bfloat16)
  for m in (1, 16):
    xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(32)]
    t = B.bench(lambda x, p: layer.apply(p, x), B.make_calls(xs, qparams))
    hlo = jax.jit(layer.apply).lower(qparams[0], xs[0]).compile().as_text()
    kernels = re.findall(r"^\s*ROOT.*|^\s*\S+ = \S+ (?:fusion|custom-call)\(.*?(?:kind=\w+|custom_call_target=\"[^\"]+\")", hlo, re.M)
    print(f"bias={bias} M={m}: {t * 1e6:.1f} us", flush=True)
    for line in kernels[:12]:
      print("   ", line.strip()[:200])
