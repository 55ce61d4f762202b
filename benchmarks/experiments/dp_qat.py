"""Why the data-parallel QAT step misses 1.85x on 2 GPUs, and what closes the gap (issue 12).

benchmarks/multi_gpu.py measured (H200 x2, NVFP4): 1 GPU 17.9-18.4 ms; DP with the same per-GPU
batch 19.6-20.2 ms (1.82-1.83x; goal 1.85x), about the 1.65 ms that 352 MB of bf16 weight gradients
take at the measured 213 GB/s all-reduce rate, as if nothing overlapped; DP with the same global
batch (half the work per GPU) 26.4 ms, slower than one GPU. This script times the step under
automatic partitioning with XLA options that let the all-reduces overlap the backward GEMMs, and an
explicit ``shard_map`` data-parallel step (local grads, one psum per weight), and reads a profiler
trace of each (per-kernel time, NCCL time overlapped with other kernels).

``--sr-barrier`` puts ``lax.optimization_barrier`` on the stochastic-rounding uniforms (a patch of
``jax.random.uniform`` in this process), so that XLA cannot fuse the threefry hash into the
transposing quantize fusions; the profile of the same-global-batch step showed one such fusion at
7.2 ms a step. Found with it on one GPU: the 4096-token step (23.9 ms) was slower than the 8192-token one (18.3 ms);
at 4096 XLA laid the blocked-along-tokens codes out transposed (f4e2m1fn[14336,256,16]) and wrote
them from transpose fusions with the threefry hash inside, one of them 7.2 ms a step; at 8192 it kept
them in the input's order ([512,16,14336]) in loop fusions. A ``--last-axis`` patch of
``fp4jax.qat.dot._backward_operand`` (quantize such operands after moving the axis last behind an
optimization barrier) measured 11.4 ms (commit ffdfe18); fp4jax does that itself since cf70679, so
the patch is gone. ``--cases`` picks cases by index (``--list`` prints them).

Usage (2 GPUs): PYTHONPATH=. python benchmarks/experiments/dp_qat.py --out DIR [--modes nvfp4,mxfp4]
CPU smoke: JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
  PYTHONPATH=. python benchmarks/experiments/dp_qat.py --small --out /tmp/dp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import multi_gpu as MG  # noqa: E402  (its QAT parameters and batches)
import qat_step  # noqa: E402
from gpu_profile import profile  # noqa: E402
from multi_gpu_support import LHS, bench, log  # noqa: E402

from fp4jax import sharding  # noqa: E402

OPTIONS = {
    "default": None,
    "lhs": LHS,
    "lhs+prio": {**LHS, "xla_gpu_enable_highest_priority_async_stream": True},
    "lhs+prio+overlap2": {**LHS, "xla_gpu_enable_highest_priority_async_stream": True,
                          "xla_gpu_experimental_parallel_collective_overlap_limit": 2},
}


def shard_map_step(config_fn, mesh, global_tokens, lr=1e-3):
  """Data-parallel step: each GPU differentiates its shard's share of the global mean loss; one
  psum per weight gradient. NVFP4's tensor amax is pmax-ed over the batch axis (axis_name)."""
  config = dataclasses.replace(config_fn(), axis_name="tp")
  loss = qat_step.make_loss(config)

  def body(params, x, target, key):
    key = jax.random.fold_in(key, lax.axis_index("tp"))  # independent stochastic rounding per shard
    share = x.shape[0] / global_tokens

    def local(p):
      return loss(p, x, target, key) * share

    value, grads = jax.value_and_grad(local)(params)
    grads = [lax.psum(g, "tp") for g in grads]
    return tuple(p - lr * g for p, g in zip(params, grads)), lax.psum(value, "tp")

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("tp", None), P("tp", None), P()),
                       out_specs=(P(), P()), check_vma=False)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--modes", default="nvfp4")
  p.add_argument("--tokens", type=int, default=8192, help="per GPU")
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--budget-s", type=float, default=300)
  p.add_argument("--small", action="store_true")
  p.add_argument("--sr-barrier", action="store_true")
  p.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
  p.add_argument("--no-profile", action="store_true")
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  if a.small:
    a.d, a.ffn, a.tokens, a.samples, a.steps = 256, 512, 256, 2, 2
  os.makedirs(a.out, exist_ok=True)
  if a.sr_barrier:
    uniform = jax.random.uniform
    jax.random.uniform = lambda *args, **kw: lax.optimization_barrier(uniform(*args, **kw))
  devs = jax.devices()
  meshes = {n: Mesh(np.array(devs[:n]), ("tp",)) for n in (1, 2)}
  base = MG.qat_params(a.d, a.ffn)
  results = []
  t_start = time.perf_counter()

  def save():
    with open(os.path.join(a.out, "dp_qat.json"), "w") as f:
      json.dump(results, f, indent=1)

  for mode in a.modes.split(","):
    cases = [("1 GPU", 1, a.tokens, "jit", "default"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "jit", "default"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "jit", "lhs"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "jit", "lhs+prio"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "shard_map", "default"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "shard_map", "lhs"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "shard_map", "lhs+prio"),
             ("DP per-GPU batch", 2, 2 * a.tokens, "jit", "lhs+prio+overlap2"),
             ("DP global batch", 2, a.tokens, "jit", "default"),
             ("DP global batch", 2, a.tokens, "shard_map", "default"),
             ("1 GPU, half the tokens", 1, a.tokens // 2, "jit", "default")]
    if a.cases:
      cases = [cases[int(i)] for i in a.cases.split(",")]
    for name, n, tokens, how, opt in cases:
      if time.perf_counter() - t_start > a.budget_s:
        log(f"budget: skipped {mode} {name} {how} {opt}")
        continue
      mesh = meshes[n]
      rep, bsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("tp", None))
      psh = (rep,) * 3
      try:
        if how == "jit":
          fn = qat_step.make_step(qat_step.MODES[mode]()).__wrapped__
        else:
          fn = shard_map_step(qat_step.MODES[mode], mesh, tokens)
        jitted = jax.jit(fn, in_shardings=(psh, bsh, bsh, rep), out_shardings=(psh, rep), donate_argnums=(0,),
                         compiler_options=OPTIONS[opt])
        params = jax.device_put(base, psh)
        batches = [jax.device_put(MG.qat_batch(i, tokens, a.d, jnp.bfloat16), (bsh, bsh)) for i in range(2)]
        keys = [jax.device_put(jax.random.fold_in(jax.random.key(1), i), rep) for i in range(200)]
        t0 = time.perf_counter()
        compiled = jitted.lower(params, *batches[0], keys[0]).compile()
        compile_s = time.perf_counter() - t0
        tag = f"{mode}_{name}_{how}_{opt}".replace(" ", "_").replace("+", "_")
        if not a.no_profile:
          with open(os.path.join(a.out, f"{tag}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
        state = {"p": params}

        def call(i):
          x, t = batches[i % 2]
          state["p"], loss = compiled(state["p"], x, t, keys[i % len(keys)])
          return loss

        timing = bench(call, a.samples, n=a.steps)
        prof = {} if a.no_profile else profile(call, n=2, out_dir=os.path.join(a.out, "trace_" + tag))
        row = {"mode": mode, "case": name, "devices": n, "tokens": tokens, "how": how, "options": opt,
               "sr_barrier": a.sr_barrier,
               "compile_s": compile_s, **timing, "tokens_per_s": tokens / timing["median_s"],
               "collectives": [str(c) for c in sharding.hlo_collectives(compiled.as_text())], "profile": prof}
        results.append(row)
        log(f"{mode} {name} {how} {opt}: {timing['median_s'] * 1e3:.2f} ms, {row['tokens_per_s']:.0f} tok/s")
        for dev, s in prof.items():
          if isinstance(s, dict):
            log(f"   {dev}: nccl {s['nccl_us']:.0f} us (overlapped {s['nccl_overlapped_us']:.0f}), "
                f"other {s['other_us']:.0f} us; top: {s['top'][:5]}")
      except Exception as e:  # noqa: BLE001 - record and go on
        results.append({"mode": mode, "case": name, "how": how, "options": opt, "error": f"{type(e).__name__}: {str(e)[:800]}"})
        log(f"{mode} {name} {how} {opt}: {type(e).__name__}: {str(e)[:300]}")
      save()
  one = {r["mode"]: r["tokens_per_s"] for r in results if r.get("devices") == 1 and r["tokens"] == a.tokens}
  for r in results:
    if "tokens_per_s" in r and r["mode"] in one:
      print(f"| {r['mode']} | {r['case']} | {r['tokens']} | {r['how']} | {r['options']} | sr_barrier={a.sr_barrier} | "
            f"{r['median_s'] * 1e3:.2f} ms | "
            f"{r['tokens_per_s'] / one[r['mode']]:.3f}x |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
