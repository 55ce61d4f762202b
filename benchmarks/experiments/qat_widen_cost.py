"""What fp4jax._bits.widen costs the QAT step on the XLA path (issue 15).

widen fences the bfloat16 rounding of every quantized input against XLA's excess-precision
rewrite. On an H200 the first version (shifting the bit pattern) took the XLA-path QAT step from
16.3 to 20.2 ms (MXFP4) and 18.6 to 21.8 ms (NVFP4). Times the step with each way of widening:
``reduce_precision`` (the library's), ``bits`` (the shift) and ``astype`` (no fence: the old,
wrong-where-elided path), one process, caches cleared between.
Usage: PYTHONPATH=. python benchmarks/experiments/qat_widen_cost.py --out DIR [--modes mxfp4,nvfp4]
"""
import argparse, json, os, sys

import jax, jax.numpy as jnp
from jax import lax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import qat_step  # noqa: E402
from fp4jax import _bits  # noqa: E402

LIBRARY = _bits.widen


def _bits_shift(x):
  if x.dtype == jnp.bfloat16:
    return _bits.from_f32_bits(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16)
  return LIBRARY(x)


VARIANTS = {"reduce_precision": LIBRARY, "bits": _bits_shift, "astype": lambda x: x.astype(jnp.float32)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--modes", default="mxfp4,nvfp4")
  p.add_argument("--variants", default="reduce_precision,bits,astype")
  p.add_argument("--small", action="store_true")
  a = p.parse_args()
  d, ffn, tokens, samples, steps = (128, 256, 256, 2, 2) if a.small else (4096, 14336, 8192, 3, 5)
  os.makedirs(a.out, exist_ok=True)
  res = {"bf16_ms": qat_step.bench("bf16", d, ffn, tokens, samples, steps, "threefry2x32", False)[0] * 1e3}
  for mode in a.modes.split(","):
    for name in a.variants.split(","):
      _bits.widen = VARIANTS[name]
      jax.clear_caches()
      med, lo, hi, comp, loss = qat_step.bench(mode, d, ffn, tokens, samples, steps, "threefry2x32", False, "xla")
      res[f"{mode}_{name}"] = {"ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3, "loss": loss}
      print(mode, name, json.dumps(res[f"{mode}_{name}"]), flush=True)
      with open(os.path.join(a.out, "qat_widen_cost.json"), "w") as f:
        json.dump(res, f, indent=1)
  _bits.widen = LIBRARY


if __name__ == "__main__":
  main()
