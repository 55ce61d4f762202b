"""2-GPU decode with the all-reduce as a Pallas Mosaic GPU kernel that writes to the peer GPU (issue 12).

The tensor-parallel decode is host-bound (benchmarks/results/multi_gpu_experiments.md, section 9): XLA's
host spends 25-45 us on each all-reduce, NCCL's or its own one-shot kernel's, more than a layer pair's
kernels on one of two GPUs. Here each pair's all-reduce is one Mosaic GPU kernel instead: it copies its
partial sums into the peer GPU's receive buffer (``plgpu.remote_ref``, TMA over NVLink, no multicast),
signals the peer's semaphore, waits for the peer's signal, and adds the peer's partial sums to its own in
float32 with one rounding to bfloat16 (for two devices the same value as ``psum``'s, on both devices).
Question: is the host cost of this kernel a plain launch's (then two GPUs would decode faster than one),
or does XLA rendezvous for it as for its collectives?

  PYTHONPATH=. python benchmarks/experiments/tp_decode_peer.py --out DIR      # 2 GPUs, one process
  ... --lower-only: trace and lower for CUDA on the CPU (2 fake devices), no run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import fp4jax as fj  # noqa: E402
from multi_gpu_support import Pair, Stack, bench, make_params, param_specs, param_shardings, rel_err  # noqa: E402

COLS = 256  # the (rows, COLS) view each TMA copy moves (TMA: at most 256 elements a dimension)
ROWS = 16  # rows a copy: 8 KB


def peer_allreduce(x, axis_name):
  """``psum(x, axis_name)`` over exactly two devices, for bf16 ``x`` of a size divisible by ROWS * COLS."""
  shape = x.shape
  flat = x.reshape(-1, COLS)
  r = flat.shape[0]
  if r % ROWS or x.dtype != jnp.bfloat16:
    raise ValueError(f"peer_allreduce: bf16 with a size divisible by {ROWS * COLS}, got {x.dtype}{shape}")
  steps = r // ROWS

  def body(x_ref, y_ref, recv_ref, own, peer_in, bars, bar_in):
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
    peer = 1 - lax.axis_index(axis_name)
    remote = plgpu.remote_ref(recv_ref, peer)
    for s in range(steps):  # own partial sums into shared memory
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(s * ROWS, ROWS)], own.at[s], bars.at[s])
    for s in range(steps):  # and on to the peer's receive buffer
      plgpu.barrier_wait(bars.at[s])
      plgpu.copy_smem_to_gmem(own.at[s], remote.at[pl.ds(s * ROWS, ROWS)])
    plgpu.wait_smem_to_gmem(0, wait_read_only=False)  # written, not only read
    pl.semaphore_signal(sem, device_id=peer)
    pl.semaphore_wait(sem, 1)  # the peer's partial sums are in recv_ref
    for s in range(steps):
      plgpu.copy_gmem_to_smem(recv_ref.at[pl.ds(s * ROWS, ROWS)], peer_in, bar_in)
      plgpu.barrier_wait(bar_in)
      own[s] = (own[s].astype(jnp.float32) + peer_in[...].astype(jnp.float32)).astype(jnp.bfloat16)
    plgpu.commit_smem()
    for s in range(steps):
      plgpu.copy_smem_to_gmem(own.at[s], y_ref.at[pl.ds(s * ROWS, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  out, _ = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct(flat.shape, flat.dtype), jax.ShapeDtypeStruct(flat.shape, flat.dtype)],
      scratch_types=[plgpu.SMEM((steps, ROWS, COLS), jnp.bfloat16), plgpu.SMEM((ROWS, COLS), jnp.bfloat16),
                     plgpu.Barrier(num_barriers=steps), plgpu.Barrier()],
      grid=(1,), grid_names=("g",),
  )(flat)
  return out.reshape(shape)


def peer_stack(params, x, d, ffn, pairs, axis_name):
  """The Stack's local shard with each pair's psum replaced by ``peer_allreduce``."""
  pair = Pair(d, ffn, None)
  for i in range(pairs):
    y = pair.apply({"params": params["params"][f"pair_{i}"]}, x, method=Pair.branch)
    x = x + peer_allreduce(y, axis_name)
  return x


def programs(mesh, base, d, ffn, pairs, variant):
  tp = mesh.devices.size
  if variant == "peer":
    local = functools.partial(peer_stack, d=d, ffn=ffn // tp, pairs=pairs, axis_name="tp")
  else:
    local = lambda p, x: Stack(d, ffn // tp, pairs, "tp").apply(p, x)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(param_specs(base), P()), out_specs=P(), check_vma=False)
  rep = NamedSharding(mesh, P())
  shardings = param_shardings(base, mesh)
  return jax.jit(fn, in_shardings=(shardings, rep), out_shardings=rep), shardings, rep


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out")
  p.add_argument("--cases", default="1x4,16x4,16x16", help="MxPAIRS")
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--lower-only", action="store_true")
  a = p.parse_args()
  from tp_prefill_profile import host_enqueue_s

  devs = jax.devices()
  meshes = {n: Mesh(np.array(devs[:n]), ("tp",), axis_types=(AxisType.Auto,)) for n in (1, 2)}
  res = {"device": devs[0].device_kind, "jax": jax.__version__, "cases": {}}
  for case in a.cases.split(","):
    m, pairs = (int(v) for v in case.split("x"))
    base = make_params(a.d, a.ffn, pairs, fj.MXFP4, "rows")
    x0 = jax.random.normal(jax.random.key(10), (m, a.d), jnp.bfloat16)
    out, entry = {}, {}
    for name, n, variant in (("1gpu", 1, "psum"), ("2gpu_psum", 2, "psum"), ("2gpu_peer", 2, "peer")):
      prog, shardings, rep = programs(meshes[n], base, a.d, a.ffn, pairs, variant)
      if a.lower_only:
        prog.trace(base, x0).lower(lowering_platforms=("cuda",))
        entry[name] = "lowered"
        continue
      params = jax.device_put(base, shardings)
      x = jax.device_put(x0, rep)
      try:
        run = prog.lower(params, x).compile()
        out[name] = np.asarray(run(params, x), np.float32)
        state = {"x": x}

        def call(i, run=run, params=params, state=state):
          state["x"] = run(params, state["x"])
          return state["x"]

        t = bench(call, a.samples)
        # 20 chained calls (compared below with the psum program's chain): the peer kernel's
        # semaphores and buffers reused across calls.
        entry[name] = {**t, "host_enqueue_s": host_enqueue_s(call)}
        chain = x
        for _ in range(20):
          chain = run(params, chain)
        out[name + "_chain20"] = np.asarray(chain, np.float32)
      except Exception as e:  # noqa: BLE001 -- an experiment: record and go on
        entry[name] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
      print(case, name, {k: v for k, v in entry[name].items() if k in ("median_s", "host_enqueue_s", "error")}
            if isinstance(entry[name], dict) else entry[name], flush=True)
    for name in ("2gpu_psum", "2gpu_peer"):
      for suffix in ("", "_chain20"):
        if name + suffix in out and "1gpu" + suffix in out:
          entry[f"{name}{suffix}_vs_1gpu_rel_err"] = rel_err(out[name + suffix], out["1gpu" + suffix])
    if "2gpu_peer" in out and "2gpu_psum" in out:
      entry["peer_equals_psum_bits"] = bool(np.array_equal(out["2gpu_peer"], out["2gpu_psum"]))
      entry["peer_equals_psum_bits_chain20"] = bool(np.array_equal(out.get("2gpu_peer_chain20"),
                                                                   out.get("2gpu_psum_chain20")))
    res["cases"][case] = entry
    print(case, json.dumps({k: v for k, v in entry.items() if not isinstance(v, dict)}), flush=True)
    if a.out:
      os.makedirs(a.out, exist_ok=True)
      with open(os.path.join(a.out, "tp_decode_peer.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
