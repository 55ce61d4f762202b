"""Where the W4A4 product's time goes besides the GEMM (issue 15), and what a stored int8 weight would buy.

``benchmarks/w4a4.py`` times the whole int8 path and its parts; two questions were left (results/w4a4.md):

1. At 1024x8192x8192 the weight's per-call re-basing and residual check (~100 us) exceed the GEMM (93 us). A
   weight stored re-based (int8 codes, row exponents and its residual known when it is stored) would leave
   only the activation's passes, the cond and the GEMM. ``stored_w``: that path, timed here on codes made
   once outside the timing (the library has no such layout yet); ``stored_w_no_cond``: the same without
   the activation's residual check and the ``lax.cond``; ``stored_w_const_cond``: a cond whose predicate
   comes from no pass (a compare of the row exponents), pricing the conditional itself.
2. The W4A4 ``QDense`` costs ~190 us more than the pre-quantized product at 8192^3. ``quantize_rows``: the
   activation's quantize alone (``quantize(x, MXFP4, axis=-1, layout="rows")``); ``qdense``: the layer;
   ``rows_product``: ``scaled_matmul`` on stored rows. The layer's optimized HLO goes to
   ``OUT/qdense_hlo_<shape>.txt`` (what runs, in order).

  PYTHONPATH=. python3 benchmarks/experiments/w4a4_parts.py --out DIR [--shapes 1024x8192x8192,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matmul as mb  # noqa: E402  (benchmarks/matmul.py: bench, n_sets)
import w4a4  # noqa: E402  (operands, rebase)

import fp4jax as fj  # noqa: E402
from fp4jax import int8_matmul  # noqa: E402
from fp4jax.flax import QDense  # noqa: E402
from fp4jax.kernels import int8_gemm  # noqa: E402
from fp4jax.prepared import byte_matrix  # noqa: E402
from fp4jax.qat import OperandConfig, QatConfig  # noqa: E402

DIMS = (((1,), (0,)), ((), ()))


def stored_w(a, w, cb, eb, nb, *, check=True, const=False):
  """The int8 path with the weight's codes given: the activation re-based, one cond, the fused GEMM."""
  data, scales = byte_matrix(a)
  base, nan_a = int8_matmul.row_bases(scales)

  def exact():
    ca = int8_matmul.rows_codes(data, scales, base, kernel=True)[0]
    return int8_gemm.scaled_gemm(ca, cb, int8_matmul.row_exponent(base), eb, nan_a, nb, out_dtype=jnp.bfloat16)

  if not check:
    return exact()
  if const:
    pred = jnp.any(base > 300)  # never true: a byte; prices the conditional, not a pass
  else:
    pred = jnp.any(int8_matmul.rows_residual(data, scales, base, kernel=True))
  return lax.cond(pred, lambda: fj.matmul.run_two_pass("mx", a, w, DIMS, jnp.bfloat16), exact)


def case(m, k, n, out_dir):
  sets = mb.n_sets(m * k * 2 + k * n * 2, cap=8)
  aq, wq = w4a4.operands(m, k, n, sets)
  aq = [a.with_layout("rows") for a in aq]
  stored = [w4a4.rebase(w) for w in wq]
  calls = [(a, wq[i % sets], *stored[i % sets]) for i, a in enumerate(aq)]
  keys = jax.random.split(jax.random.key(3), 2 * sets)
  xb = [jax.random.normal(keys[i], (m, k), jnp.bfloat16) for i in range(sets)]
  wb = [jax.random.normal(keys[sets + i], (k, n), jnp.bfloat16) for i in range(sets)]
  t = {"bf16": mb.bench(lambda x, w: jnp.dot(x, w), mb.make_calls(xb, wb))}
  t["rows_product"] = mb.bench(lambda a, w, *_: fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16), calls)
  t["stored_w"] = mb.bench(stored_w, calls)
  t["stored_w_no_cond"] = mb.bench(lambda *c: stored_w(*c, check=False), calls)
  t["stored_w_const_cond"] = mb.bench(lambda *c: stored_w(*c, const=True), calls)
  layer = QDense(n, use_bias=False, dtype=jnp.bfloat16, preferred_element_type=jnp.bfloat16,
                 config=QatConfig(lhs=OperandConfig(fj.MXFP4), rhs=OperandConfig(None), grad=OperandConfig(None)))
  apply = lambda x, w: layer.apply({"params": {"kernel": w}}, x)
  t["qdense"] = mb.bench(apply, mb.make_calls(xb, wq))
  t["quantize_rows"] = mb.bench(lambda x: fj.quantize(x, fj.MXFP4, axis=-1, layout="rows"), [(x,) for x in xb])
  hlo = jax.jit(apply).lower(xb[0], wq[0]).compile().as_text()
  with open(os.path.join(out_dir, f"qdense_hlo_{m}x{k}x{n}.txt"), "w") as f:
    f.write(hlo)
  row = {"m": m, "k": k, "n": n, "sets": sets, "us": {kk: v * 1e6 for kk, v in t.items()}}
  row["x_bf16"] = {kk: t["bf16"] / v for kk, v in t.items()}
  return row


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--shapes", default="1024x8192x8192,8192x8192x8192,4096x4096x14336")
  p.add_argument("--budget-s", type=float, default=200)
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}
  for shape in args.shapes.split(","):
    if time.time() - t0 > args.budget_s:
      res["stopped"] = f"budget reached before {shape}"
      break
    res["rows"].append(case(*map(int, shape.split("x")), args.out))
    print(json.dumps(res["rows"][-1]), flush=True)
    with open(os.path.join(args.out, "w4a4_parts.json"), "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
