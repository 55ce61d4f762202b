"""Issue 12: does the process's earlier work change multi_gpu.py's DP gradient check?

In benchmarks/multi_gpu.py's runs at 67009d7 and ac4bcd6 (H200 x2) the float32 NVFP4 gradients of the
'same global batch' DP step differed from one GPU's by 1.99e-2 (bound 1.95e-3), twice alike; the same
programs built the same way in a fresh process (multi_gpu_support.Program, plain jit, jit with in or out
shardings) agreed to 1.2e-6. This script runs multi_gpu.qat_grad_check fresh, after the interconnect section, after
qat_section's four plain timing cases and after its two LHS ones (the order multi_gpu.py runs them in), and reports each
result (multi_gpu.qat_grad_check's own relative errors and check) and whether each layout's gradients
equal their first computation bit for bit.

  PYTHONPATH=. python benchmarks/experiments/dp_grad_state.py            # H200 x2, ~5 min
  PYTHONPATH=. python benchmarks/experiments/dp_grad_state.py --fresh-only [--direct-route]
  # multi_gpu.py's order (the check only at the end), against a fresh process's gradients:
  PYTHONPATH=. python benchmarks/experiments/dp_grad_state.py --fresh-only --save /tmp/g.npz
  PYTHONPATH=. python benchmarks/experiments/dp_grad_state.py --no-fresh --timing 5 5 --against /tmp/g.npz
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    PYTHONPATH=. python benchmarks/experiments/dp_grad_state.py --small  # CPU (no interconnect section)
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from fp4jax.qat import dot as qdot

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import multi_gpu as MG  # noqa: E402
from multi_gpu_support import Run  # noqa: E402

T0 = time.perf_counter()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="d=256, ffn=512, 256 tokens; skips the psum section")
  p.add_argument("--mode", default="nvfp4")
  p.add_argument("--direct-route", action="store_true",
                 help="quantize leading-axis backward operands in place, as before cf70679")
  p.add_argument("--fresh-only", action="store_true", help="only the fresh check")
  p.add_argument("--no-fresh", action="store_true",
                 help="no check before the other sections: the first check runs last, as in multi_gpu.py")
  p.add_argument("--save", help="write the first check's gradients to this .npz")
  p.add_argument("--against", help="also compare every check's gradients with this --save file, bit for bit")
  p.add_argument("--timing", type=int, nargs=2, default=(1, 1), metavar=("SAMPLES", "STEPS"),
                 help="timing samples and steps of each QAT case (multi_gpu.py: 5 5)")
  p.add_argument("--dims", type=int, nargs=3, metavar=("D", "FFN", "TOKENS"), help="instead of the defaults")
  a = p.parse_args()
  if a.direct_route:
    def direct(x, axis, op, cfg, key, dtype, multiple):
      x = qdot.pad_axis(x, axis, multiple)
      return qdot.fake_quantize_operand(x, op, axis, dtype, key, axis_name=cfg.axis_name)
    qdot._backward_operand = direct  # _backward_gemm looks it up at trace time
  # The fields multi_gpu's sections read.
  a.d, a.ffn, a.qat_tokens = a.dims or ((256, 512, 256) if a.small else (4096, 14336, 8192))
  (a.samples, a.qat_steps), a.target_s, a.budget_s = a.timing, 0.01, 1e9
  a.decode_m, a.prefill_m, a.commit, a.devices = [1], [a.qat_tokens // 2], "", 2
  a.out = None  # Run.write: no files; this script prints
  devs = jax.devices()
  meshes = {n: Mesh(np.array(devs[:n]), ("tp",), axis_types=(AxisType.Auto,)) for n in (1, 2)}
  layouts = MG.qat_layouts(meshes, a.qat_tokens)
  base = MG.qat_params(a.d, a.ffn)
  run = Run(a)
  first = {}
  saved = np.load(a.against) if a.against else None

  def check(label):
    """multi_gpu.qat_grad_check itself (1 GPU, DP same global batch, TP), then each layout's
    gradients against its first computation, bit for bit."""
    grads = MG.qat_grad_check(run, a.mode, layouts, base)
    for name, g in grads.items():
      first.setdefault(name, g)
      same = all(np.array_equal(u, v) for u, v in zip(g, first[name]))
      print(f"[{time.perf_counter() - T0:6.1f}s] {label:>28} | {name:<40} | bits as its first: {same}", flush=True)
      if saved is not None:
        diffs = [float(np.max(np.abs(u - saved[f"{name}/{i}"])) / np.max(np.abs(saved[f"{name}/{i}"])))
                 for i, u in enumerate(g)]
        print(f"{'':>39} against {a.against}: max |diff| / max |saved| per gradient {diffs}", flush=True)
    if a.save and not os.path.exists(a.save):
      np.savez(a.save, **{f"{name}/{i}": u for name, g in grads.items() for i, u in enumerate(g)})

  if not a.no_fresh:
    check("fresh")
  if a.fresh_only:
    return
  if not a.small:  # the CPU's in-process collectives can stall in the psum timing loop
    MG.interconnect_section(run, meshes)
    if not a.no_fresh:
      check("after interconnect")
  for name, layout in layouts.items():
    MG.qat_case(run, a.mode, name, layout, base)
  if not a.no_fresh:
    check("after the plain QAT cases")
  for name in ("2 GPUs DP, same global batch", "2 GPUs DP, same per-GPU batch"):
    MG.qat_case(run, a.mode, name + " + LHS", layouts[name], base, lhs=True)
  check("after the LHS QAT cases")


if __name__ == "__main__":
  main()
