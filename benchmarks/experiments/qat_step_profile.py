"""Where the QAT step's time goes on a GPU (issue 15): per-kernel times of benchmarks/qat_step.py's step.

For each MODE:BACKEND, runs three steps back to back under jax.profiler and writes the busy time, the top
kernels (by total time over the profiled steps), the span and where the GPU idles (the gaps between kernels,
by the kernels around them) to OUT/qat_step_profile.json.
Usage: PYTHONPATH=. python benchmarks/experiments/qat_step_profile.py --out DIR
  [--runs bf16:xla,mxfp4:pallas,mxfp4+int8:pallas]
"""
import argparse, json, os, sys

import jax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import gpu_profile  # noqa: E402
import qat_step  # noqa: E402

from fp4jax.qat import dot as qdot  # noqa: E402


def run(mode, backend, d, ffn, tokens, steps):
  """``mode`` may end in ``+int8``: the step with fp4jax.qat.dot.INT8_FORWARD and INT8_BACKWARD on; without
  it both are off (the fake-quantized bf16 GEMMs, as every profile before they existed). Restored after."""
  mode, int8 = mode.removesuffix("+int8"), mode.endswith("+int8")
  switches = qdot.INT8_FORWARD, qdot.INT8_BACKWARD
  qdot.INT8_FORWARD = qdot.INT8_BACKWARD = int8
  params, xs, ts = qat_step.inputs(d, ffn, tokens)
  step = qat_step.make_step(qat_step.config_of(mode, backend))
  state = {"p": params}

  def call(i):
    state["p"], v = step(state["p"], xs[0], ts[0], jax.random.key(i))
    return v

  try:
    return gpu_profile.profile(call, steps, block_each=False)  # back to back, as benchmarks/qat_step.py
  finally:
    qdot.INT8_FORWARD, qdot.INT8_BACKWARD = switches


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--runs", default="bf16:xla,mxfp4:xla,mxfp4:pallas,nvfp4:pallas")
  p.add_argument("--small", action="store_true")
  a = p.parse_args()
  d, ffn, tokens = (128, 256, 256) if a.small else (4096, 14336, 8192)
  os.makedirs(a.out, exist_ok=True)
  res = {}
  for r in a.runs.split(","):
    mode, backend = r.split(":")
    res[r] = run(mode, backend, d, ffn, tokens, 3)
    print(r, json.dumps(res[r])[:3000], flush=True)
    with open(os.path.join(a.out, "qat_step_profile.json"), "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
