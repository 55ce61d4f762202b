"""Do NCCL's settings limit the 2-GPU ratios of benchmarks/multi_gpu.py? (issue 12)

A profile of the data-parallel QAT step on 2 H200s (benchmarks/experiments/dp_qat.py) showed its
117 MB gradient all-reduces running NCCL's ``RING_LL`` kernels, the low-latency protocol, whose
8-byte flagged stores move about half the link rate; the psum table measured 213 GB/s. This script
runs, in one process, the parts of multi_gpu.py the missed goals rest on: the psum sizes, the
tensor-parallel prefill (1 and 2 GPUs) and the QAT step (1 GPU, DP with the same per-GPU batch).
Run it once per setting of NCCL's environment (NCCL reads it when the communicator is made), e.g.:

  for p in "" Simple LL128; do NCCL_PROTO=$p PYTHONPATH=. python benchmarks/experiments/nccl_env.py \\
      --out DIR/$p; done

Measured (H200 x2, 2026-11-30): NCCL_PROTO unset / Simple / LL128 gave the same psum rate (217 / 217 /
197 GB/s at 117 MB) and the same ratios, so the protocol is not the limit (the "RING_LL" in the
profiled kernel's name did not mean the LL protocol was chosen; why NCCL names it so was not checked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import multi_gpu as MG  # noqa: E402
from multi_gpu_support import Run, log  # noqa: E402

import fp4jax as fj  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--small", action="store_true", help="CPU smoke sizes")
  p.add_argument("--qat-mode", default="nvfp4")
  a0 = p.parse_args(argv)
  small = a0.small
  a = argparse.Namespace(
      d=256 if small else 4096, ffn=512 if small else 14336, pairs=2 if small else 4, formats=[fj.MXFP4],
      decode_m=[1], prefill_m=[128 if small else 4096], prefill_variants=[(1, True)], qat_modes=[a0.qat_mode],
      qat_tokens=256 if small else 8192, qat_steps=2 if small else 5, samples=2 if small else 5,
      target_s=0.02 if small else 0.1, backend="auto", budget_s=1e9, small=small, commit="", out=a0.out, devices=2)
  devs = jax.devices()
  meshes = {n: Mesh(np.array(devs[:n]), ("tp",), axis_types=(AxisType.Auto,)) for n in (1, 2)}
  run = Run(a)
  run.data["meta"]["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
  log(f"NCCL environment: {run.data['meta']['nccl_env']}")
  MG.interconnect_section(run, meshes)
  MG.tp_section(run, meshes, fj.MXFP4)
  layouts = MG.qat_layouts(meshes, a.qat_tokens)
  base = MG.qat_params(a.d, a.ffn)
  for name in ("1 GPU", "2 GPUs DP, same per-GPU batch"):
    run.guarded(f"QAT {name}", MG.qat_case, run, a.qat_modes[0], name, layouts[name], base)
  run.write()
  summary = {"nccl_env": run.data["meta"]["nccl_env"],
             "psum": [(r["shape"], round(r["median_s"] * 1e6, 1), round(r["algbw_GBps"], 1))
                      for r in run.data["interconnect"]],
             "tp": [(r["m"], r["label"], round(r["median_s"] * 1e3, 3)) for r in run.data["tp"]],
             "qat": [(r["layout"], round(r["median_s"] * 1e3, 2)) for r in run.data["qat"]],
             "errors": [e["case"] + ": " + e["error"][:200] for e in run.data["errors"]]}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
