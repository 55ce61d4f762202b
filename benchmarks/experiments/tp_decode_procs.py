"""2-GPU tensor-parallel decode with one process per GPU (issue 12).

One process driving both GPUs issues the decode stack's work for the two devices: its call takes
0.28-0.45 ms where one GPU takes 0.19 ms, and its host enqueue time a call equals its wall time
(``tp_decode_flags.py``, benchmarks/results/tp_decode_flags.json), under every XLA runtime option
tried. With one process per GPU (``jax.distributed.initialize``, the multi-host way of running
the same code) each host thread issues one device's work, as the one-GPU program does.

This launcher runs, for each (M, pairs) case, the single-process program
(``tp_prefill_profile.py --no-profile``: 1 and 2 GPUs) and then two worker processes that join
through ``jax.distributed`` and time the same shard_map stack over the same 2-device mesh; process
0 also times the 1-device stack on its GPU first, and compares the 2-process output with it.

  PYTHONPATH=. python benchmarks/experiments/tp_decode_procs.py --out DIR [--cases 1x4,16x4,1x16]
  # on the CPU (2 processes of one CPU device each, gloo): add --cpu --d 256 --ffn 512
  # the all-reduces as tp_decode_peer's Mosaic GPU kernel: ... --peer --no-single (on the H200 x2 machine,
  # jax 0.11.2, it failed in XLA's ncclGetPeerDevicePointer; --xla_gpu_experimental_enable_nvshmem, the
  # jax example's other route, is not a flag of that XLA)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from tp_decode_flags import timed_variants  # noqa: E402


def worker(a):
  import jax

  if a.cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{a.port}", num_processes=2, process_id=a.process,
                             local_device_ids=None if a.cpu else [a.process])
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

  sys.path[:0] = [HERE, os.path.dirname(HERE)]
  import fp4jax as fj
  from multi_gpu_support import Stack, bench, make_params, param_shardings, param_specs, rel_err
  from tp_prefill_profile import host_enqueue_s

  d, ffn, pairs, m = a.d, a.ffn, a.pairs, a.m
  base = make_params(d, ffn, pairs, fj.get_format(a.fmt))  # the same bits in both processes (fixed keys)
  host = jax.tree.map(np.asarray, base)
  xh = np.asarray(jax.random.normal(jax.random.key(10), (m, d), jnp.bfloat16))
  res = {"process": a.process, "devices": [str(dv) for dv in jax.devices()], "m": m, "pairs": pairs}

  def stack(mesh):
    tp = mesh.devices.size
    local = lambda p, x: Stack(d, ffn // tp, pairs, "tp").apply(p, x)
    if a.peer and tp == 2:  # each psum as tp_decode_peer's Mosaic GPU kernel (peer memory between processes)
      from tp_decode_peer import peer_stack
      local = lambda p, x: peer_stack(p, x, d, ffn // tp, pairs, "tp")
    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(param_specs(base), P()), out_specs=P(), check_vma=False)
    rep = NamedSharding(mesh, P())
    shardings = param_shardings(base, mesh)
    params = jax.tree.map(lambda arr, s: jax.make_array_from_callback(arr.shape, s, lambda i: arr[i]), host,
                          shardings)
    x = jax.make_array_from_callback(xh.shape, rep, lambda i: xh[i])
    run = jax.jit(fn, in_shardings=(shardings, rep), out_shardings=rep).lower(params, x).compile()
    state = {"x": x}

    def call(i):
      state["x"] = run(params, state["x"])
      return state["x"]

    first = np.asarray(run(params, x).addressable_data(0), np.float32)
    return call, first

  one_out = None
  if a.process == 0:  # the 1-GPU stack on this process's GPU, while the other process waits
    call, one_out = stack(Mesh(np.array(jax.local_devices()[:1]), ("tp",), axis_types=(AxisType.Auto,)))
    res["1gpu"] = bench(call, a.samples, n=a.calls)
    res["1gpu"]["host_enqueue_s"] = host_enqueue_s(call)
  multihost_utils.sync_global_devices("one gpu done")
  call, two_out = stack(Mesh(np.array(jax.devices()[:2]), ("tp",), axis_types=(AxisType.Auto,)))
  multihost_utils.sync_global_devices("compiled")
  # A fixed number of calls in both processes: each call's all-reduces wait for the other's.
  res["2proc"] = bench(call, a.samples, n=a.calls)
  res["2proc"]["host_enqueue_s"] = host_enqueue_s(call)
  if one_out is not None:
    res["2proc_vs_1gpu_rel_err"] = rel_err(two_out, one_out)
  multihost_utils.sync_global_devices("timed")
  print("RESULT", json.dumps(res), flush=True)
  jax.distributed.shutdown()


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(a):
  os.makedirs(a.out, exist_ok=True)
  results, t0 = {}, time.time()
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if a.cpu:
    env.update(JAX_PLATFORMS="cpu")
  if a.xla_flags:  # for the single-process programs and the workers alike
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
  for case in a.cases.split(","):
    if time.time() - t0 > a.budget_s:
      results[case] = {"skipped": "budget"}
      continue
    m, pairs = (int(v) for v in case.split("x"))
    entry = {}
    size = ["--d", str(a.d), "--ffn", str(a.ffn), "--fmt", a.fmt]
    if not a.cpu and not a.no_single:  # the single-process programs, for comparison in the same session
      rc, log, timed = timed_variants(os.path.join(a.out, f"single_{case}"), m, pairs, "1:psum,2:psum", env,
                                      a.timeout_s, size)
      entry["single_rc"] = rc
      entry.update({f"single_{v}": r for v, r in timed.items()})
      if not timed:
        entry["single_log"] = log[-1500:]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(i), "--port", port,
                               "--m", str(m), "--pairs", str(pairs), "--samples", str(a.samples),
                               "--calls", str(a.calls), *size, *(["--cpu"] if a.cpu else []),
                               *(["--peer"] if a.peer else [])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for i, p in enumerate(procs):
      try:
        log = p.communicate(timeout=a.timeout_s)[0]
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        log = "timeout"
      got = [json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")]
      entry[f"proc{i}"] = got[0] if got else {"rc": p.returncode, "log": log[-2000:]}
    entry["xla_flags"] = a.xla_flags
    results[case] = entry
    print(case, json.dumps(entry), flush=True)
    with open(os.path.join(a.out, "tp_decode_procs.json"), "w") as f:
      json.dump(results, f, indent=1)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out")
  p.add_argument("--cases", default="1x4,16x4,1x16", help="MxPAIRS, comma-separated")
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--fmt", default="mxfp4")
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--calls", type=int, default=300, help="calls a sample (the same in both processes)")
  p.add_argument("--cpu", action="store_true")
  p.add_argument("--xla-flags", default="", help="added to XLA_FLAGS of every process it starts")
  p.add_argument("--no-single", action="store_true", help="only the 2-process runs")
  p.add_argument("--peer", action="store_true",
                 help="the 2-process stack all-reduces with tp_decode_peer.peer_allreduce (a Mosaic GPU kernel "
                      "writing to the peer GPU)")
  p.add_argument("--timeout-s", type=int, default=180)
  p.add_argument("--budget-s", type=float, default=400)
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--port", default=None, help=argparse.SUPPRESS)
  p.add_argument("--m", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--pairs", type=int, default=4, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker is not None:
    a.process = a.worker
    return worker(a)
  if not a.out:
    p.error("--out is required")
  launch(a)


if __name__ == "__main__":
  main()
