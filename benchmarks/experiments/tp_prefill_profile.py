"""Where the 2-GPU tensor-parallel prefill's time goes (issue 12): per-kernel GPU time, 1 vs 2 GPUs.

Builds benchmarks/multi_gpu.py's stack (d=4096, ffn=14336, 4 pairs, MXFP4 weights, M=4096) on a
1-device and a 2-device mesh under shard_map, times each program (multi_gpu_support.bench) and
profiles three calls of each (gpu_profile.profile: per-GPU kernel totals, NCCL time, how much of
it ran alongside other kernels). Variants: "psum" (one all-reduce per pair, the benchmark's
default), "prefetch" (the next pair's weights tied to this pair's partial sums), "sp" (sequence parallel: reduce-scatter + all-gather), "splitN" (each down projection in N column parts, an all-reduce each), "chunksN" (N row chunks, each
through the whole stack) and "interleavedN" (N row chunks, pair by pair), "loopN" (N decode steps in one call, a ``fori_loop``); chunked variants with
XLA's all-reduce combining off (so for "splitN"). A "+lhs" suffix: the latency-hiding scheduler; then "+pgle": profile-guided latency estimation
(``jax_enable_pgle``, two profiled calls, then a recompile). ``--m 1 --pairs N --no-profile``: the
decode question, whether a 2-device call is bound by the host issuing it (its enqueue time per call
against its wall time per call) and how that changes with the layers a call runs.

  PYTHONPATH=. python benchmarks/experiments/tp_prefill_profile.py --out DIR   # 2 GPUs
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import fp4jax as fj
from fp4jax.flax import QDense

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import gpu_profile  # noqa: E402
from multi_gpu_support import (  # noqa: E402
    LHS, NO_COMBINE, Pair, Program, Stack, bench, make_params, param_shardings, param_specs, rms_norm,
    sequence_parallel_stack)


# ---- the variants tried (multi_gpu_support has the Stack, its sequence-parallel and exchange forms)
def prefetch_stack(params, x, d, ffn, pairs, axis_name, dot_general=None):
  """The Stack's local shard with each pair's all-reduce given the next pair's weights to hide
  behind.

  Prefill dequantizes each weight to bfloat16 before its GEMM (the two-pass path), work that does
  not depend on the activations. ``optimization_barrier`` ties the next pair's QArray weights to
  this pair's partial sums, so their dequantization is ready to run exactly when this pair's
  all-reduce starts, instead of wherever XLA puts it (all at the front, say), and the all-reduce's
  transfer runs alongside it. The same ops and the same sums as ``Stack``.
  """
  pair = Pair(d, ffn, None, dot_general)
  layers = [params["params"][f"pair_{i}"] for i in range(pairs)]
  for i in range(pairs):
    y = pair.apply({"params": layers[i]}, x, method=Pair.branch)
    if i + 1 < pairs:
      y, layers[i + 1] = lax.optimization_barrier((y, layers[i + 1]))
    x = x + lax.psum(y, axis_name)
  return x


def column_part(q, part, parts):
  """Output columns ``part``/``parts`` of a QArray kernel ``(K, N)`` blocked along K (logical
  layout, as ``make_params`` makes them): a slice of its values and scales, no requantization."""
  if q.layout is not None or q.ndim != 2 or q.axis != -2 or q.block_shape is not None:
    raise ValueError(f"column_part takes a (K, N) kernel blocked along K in the logical layout, got {q!r}")
  n = q.shape[1] // parts
  return fj.QArray(q.values[:, part * n:(part + 1) * n], q.scales[:, part * n:(part + 1) * n], q.global_scale,
                   q.fmt, q.axis, q.block_shape, q.layout)


def split_down_stack(params, x, d, ffn, pairs, axis_name, parts=2, dot_general=None):
  """The Stack's local shard with each down projection run as ``parts`` QDense layers on column
  parts of its weight, each part's all-reduce started as soon as its GEMM is done.

  One all-reduce per pair leaves the link idle during the GEMMs and the GEMMs waiting for it;
  here part ``j``'s all-reduce runs while part ``j + 1``'s GEMM does (and the last part's while
  the next pair's weights are dequantized). Every output column is the same sum as in ``Stack``
  (the parts split the output columns, not the contraction), so the output is the same.
  """
  pair = Pair(d, ffn, None, dot_general)
  down = QDense(d // parts, use_bias=False, dtype=jnp.bfloat16, preferred_element_type=jnp.bfloat16,
                dot_general=dot_general)
  for i in range(pairs):
    layer = params["params"][f"pair_{i}"]
    h = pair.apply({"params": layer}, rms_norm(x), method=Pair.hidden)
    kernel = layer["down"]["kernel"]
    sums = [lax.psum(down.apply({"params": {"kernel": column_part(kernel, j, parts)}}, h), axis_name)
            for j in range(parts)]
    x = x + jnp.concatenate(sums, axis=-1)
  return x


def interleaved_stack(params, x, d, ffn, pairs, axis_name, chunks, dot_general=None):
  """The Stack's local shard on ``chunks`` row chunks, pair by pair: each chunk's all-reduce can
  run while the next chunk's GEMMs of the same pair do (the weights dequantized once per pair)."""
  pair = Pair(d, ffn, None, dot_general)
  parts = jnp.split(x, chunks)
  for i in range(pairs):
    branch = functools.partial(pair.apply, {"params": params["params"][f"pair_{i}"]}, method=Pair.branch)
    parts = [c + lax.psum(branch(c), axis_name) for c in parts]
  return jnp.concatenate(parts)



def program(mesh, params, variant, d, ffn, pairs, m, options):
  tp = mesh.devices.size
  model = Stack(d, ffn // tp, pairs, "tp")

  def local(p, x):
    if variant == "sp":
      return sequence_parallel_stack(p, x, d, ffn // tp, pairs, "tp")
    if variant == "prefetch":
      return prefetch_stack(p, x, d, ffn // tp, pairs, "tp")
    if variant.startswith("split"):  # the down projection in column parts, an all-reduce each
      return split_down_stack(p, x, d, ffn // tp, pairs, "tp", int(variant[5:]))
    if variant.startswith("chunks"):  # each chunk through the whole stack, then concatenated
      return jnp.concatenate([model.apply(p, c) for c in jnp.split(x, int(variant[6:]))])
    if variant.startswith("loop"):  # N decode steps in one call, each step's output the next one's input
      return lax.fori_loop(0, int(variant[4:]), lambda i, y: model.apply(p, y), x)
    if variant.startswith("interleaved"):  # pair by pair over the chunks
      return interleaved_stack(p, x, d, ffn // tp, pairs, "tp", int(variant[11:]))
    return model.apply(p, x)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(param_specs(params), P()), out_specs=P(), check_vma=False)
  rep = NamedSharding(mesh, P())
  x = jax.device_put(jax.random.normal(jax.random.key(10), (m, d), jnp.bfloat16), rep)
  return Program(fn, (param_shardings(params, mesh), rep), rep, (params, x), options=options), x


def timeline(trace_dir, plane_name="/device:GPU:0"):
  """GPU 0's kernels of the traced calls in time order: (stream, start us, duration us, name)."""
  import glob
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  events = []
  for plane in data.planes:
    if plane.name == plane_name:
      for line in plane.lines:
        events += [(line.name, ev.start_ns, ev.duration_ns, ev.name[:60]) for ev in line.events if ev.duration_ns > 0]
  t0 = min(e[1] for e in events)
  return [(s, round((t - t0) / 1e3, 1), round(d / 1e3, 1), n) for s, t, d, n in sorted(events, key=lambda e: e[1])]


def host_enqueue_s(call, n=50):
  """Seconds the host takes to issue one call: the time to issue ``n`` back-to-back calls (each on
  the previous output, nothing awaited) over ``n``. Near the per-call wall time, the program is bound
  by dispatch, not by the GPUs. None on the CPU, whose runtime deadlocks on back-to-back collective
  programs over fake devices (see multi_gpu_support.bench)."""
  if jax.default_backend() == "cpu":
    return None
  jax.block_until_ready(call(0))
  t = time.perf_counter()
  for i in range(n):
    out = call(i + 1)
  issued = time.perf_counter() - t
  jax.block_until_ready(out)
  return issued / n


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--fmt", default="mxfp4")
  p.add_argument("--m", type=int, default=4096)
  p.add_argument("--layout", default="rows", choices=("rows", "logical"))
  p.add_argument("--variants", default="1:psum,2:psum,2:sp")
  p.add_argument("--timeline", action="store_true", help="keep GPU 0's kernel timeline in the JSON")
  p.add_argument("--pairs", type=int, default=4, help="MLP pairs in the stack (a call)")
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--no-profile", action="store_true", help="timing and host enqueue time only")
  p.add_argument("--compiler-options", default="{}", help="JSON: XLA options for every program's compile call")
  a = p.parse_args()
  d, ffn, pairs = a.d, a.ffn, a.pairs
  devs = jax.devices()
  meshes = {n: Mesh(np.array(devs[:n]), ("tp",), axis_types=(AxisType.Auto,)) for n in (1, 2)}
  base = make_params(d, ffn, pairs, fj.get_format(a.fmt), None if a.layout == "logical" else a.layout)
  params = {n: jax.device_put(base, param_shardings(base, meshes[n])) for n in (1, 2)}
  out = {}
  os.makedirs(a.out, exist_ok=True)
  for v in a.variants.split(","):
    n, _, variant = v.partition(":")
    n, pgle = int(n), variant.endswith("+pgle")
    variant = variant.removesuffix("+pgle")
    lhs = variant.endswith("+lhs")
    variant = variant.removesuffix("+lhs")
    # Profile-guided latency estimation: the first calls are profiled, then the program is compiled
    # again with the measured kernel and collective times for the latency-hiding scheduler.
    jax.config.update("jax_enable_pgle", pgle)
    jax.config.update("jax_pgle_profiling_runs", 2)
    chunked = variant[-1].isdigit() and not variant.startswith("loop")
    options = {**(LHS if lhs else {}), **(NO_COMBINE if chunked else {}),
               **json.loads(a.compiler_options)}
    prog, x = program(meshes[n], params[n], variant, d, ffn, pairs, a.m, options or None)
    state = {"x": x}

    run = prog.jitted if pgle else prog  # PGLE works through jit's calls, not an AOT executable

    def call(i, run=run, n=n, state=state):
      state["x"] = run(params[n], state["x"])
      return state["x"]

    t = bench(call, 5)
    enqueue = host_enqueue_s(call)
    prof = {}
    if not a.no_profile:
      trace_dir = tempfile.mkdtemp()
      prof = gpu_profile.profile(call, 3, trace_dir)
    out[v] = {"timing": t, "host_enqueue_s": enqueue, "profile": prof, "hlo_ops": [str(c) for c in prog.collectives],
              "pairs": pairs, "m": a.m}
    if a.timeline and prof:
      out[v]["timeline"] = timeline(trace_dir)
    print(v, f"{t['median_s'] * 1e3:.3f} ms; host enqueue a call:",
          "n/a" if enqueue is None else f"{enqueue * 1e3:.3f} ms", flush=True)
    for plane, r in prof.items():
      print(" ", plane, {k: r[k] for k in ("nccl_us", "other_us", "nccl_overlapped_us")}, flush=True)
      for name, us, c in r["top"][:12]:
        print("    ", f"{us:9.1f} us x{c:3d}", name, flush=True)
    with open(os.path.join(a.out, "tp_prefill_profile.json"), "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
