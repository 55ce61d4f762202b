"""Is the 2-GPU tensor-parallel decode bound by the host, and do XLA's runtime options change it? (issue 12)

The 2-GPU M = 1 decode of benchmarks/multi_gpu.py's stack takes 0.39 ms a call where one GPU takes
0.19 ms, with ~0.2 ms of kernels on each GPU (benchmarks/results/tp_prefill_profile/decode_m1.json).
This runs ``tp_prefill_profile.py --m 1 --no-profile`` (1- and 2-GPU programs: wall time and host
enqueue time a call) once per setting, each in a fresh process because XLA reads ``XLA_FLAGS`` once:
the defaults, more layers a call, CUDA graphs (command buffers) with and without the collectives in
them, NCCL instead of XLA's one-shot all-reduce kernel, all-reduces on the compute stream, PDL, and
16 decode steps in one call (a ``fori_loop``). Results: benchmarks/results/tp_decode/, read in
benchmarks/results/multi_gpu_experiments.md section 9.

  PYTHONPATH=. python benchmarks/experiments/tp_decode_flags.py --out DIR [--settings a,b] [--m 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CMDBUF = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
CMDBUF_COLL = CMDBUF.replace("CUSTOM_CALL", "CUSTOM_CALL,COLLECTIVES")
NCCL = "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
# Not flags of jax 0.11.2's XLA (its runs stop at start; kept so the record says what was asked):
PERSISTENT = "--xla_gpu_collectives_use_persistent_cliques=true"
# The same as NCCL + CMDBUF_COLL, given to each program's compile call instead of the environment.
OPTIONS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES",
           "xla_gpu_graph_min_graph_size": 1, "xla_gpu_unsupported_use_all_reduce_one_shot_kernel": False}
SETTINGS = {  # name: XLA_FLAGS, and optionally pairs (4), m (--m), compiler options
    "default": {"flags": ""},
    "default_16pairs": {"flags": "", "pairs": 16},
    "cmdbuf": {"flags": CMDBUF},
    "cmdbuf_collectives": {"flags": CMDBUF_COLL},
    "no_cmdbuf": {"flags": "--xla_gpu_enable_command_buffer="},
    "nccl": {"flags": NCCL},
    "sync_allreduce": {"flags": "--xla_gpu_disable_async_collectives=ALLREDUCE"},
    "cmdbuf_collectives_sync": {"flags": CMDBUF_COLL + " --xla_gpu_disable_async_collectives=ALLREDUCE"},
    # second round, after the first showed the 2-GPU call bound by the host's issue time
    "nccl_cmdbuf_collectives": {"flags": NCCL + " " + CMDBUF_COLL},
    "nccl_cmdbuf_collectives_16pairs": {"flags": NCCL + " " + CMDBUF_COLL, "pairs": 16},
    "cmdbuf_collectives_16pairs": {"flags": CMDBUF_COLL, "pairs": 16},
    "default_m16": {"flags": "", "m": 16},
    "nccl_cmdbuf_collectives_m16": {"flags": NCCL + " " + CMDBUF_COLL, "m": 16},
    "nccl_cmdbuf_collectives_va": {"flags": NCCL + " " + CMDBUF_COLL + " --xla_gpu_enable_command_buffer_va_remapping=true"},
    "nccl_cmdbuf_collectives_pdl": {"flags": NCCL + " " + CMDBUF_COLL + " --xla_gpu_enable_pdl=true"},
    "options_nccl_cmdbuf_collectives": {"flags": "", "options": OPTIONS},
    # third round: a fixed host cost per 2-GPU call (~0.14 ms over one GPU's) besides ~18 us per all-reduce
    "persistent": {"flags": PERSISTENT},
    "persistent_16pairs": {"flags": PERSISTENT, "pairs": 16},
    "persistent_m16": {"flags": PERSISTENT, "m": 16},
    "persistent_cmdbuf_collectives": {"flags": PERSISTENT + " " + CMDBUF_COLL},
    "persistent_cmdbuf_collectives_16pairs": {"flags": PERSISTENT + " " + CMDBUF_COLL, "pairs": 16},
    # fourth round: 16 decode steps in one call (a fori_loop), so the host issues a loop, not 16 calls
    "loop16": {"flags": "", "variants": "1:loop16,2:loop16"},
    "loop16_cmdbuf_while": {"flags": CMDBUF_COLL.replace("CUSTOM_CALL", "CUSTOM_CALL,WHILE,CONDITIONAL"),
                            "variants": "1:loop16,2:loop16"},
    "prefill_default": {"flags": "", "m": 4096},
    "prefill_nccl_cmdbuf_collectives": {"flags": NCCL + " " + CMDBUF_COLL, "m": 4096},
}


def timed_variants(out, m, pairs, variants, env, timeout_s, extra=()):
  """``tp_prefill_profile.py --no-profile`` in a fresh process with ``env``: ``(rc, log, {variant: ms a call,
  host enqueue ms a call, collectives})``, the dict empty where it wrote no results."""
  cmd = [sys.executable, os.path.join(HERE, "tp_prefill_profile.py"), "--out", out, "--m", str(m),
         "--pairs", str(pairs), "--variants", variants, "--no-profile", *extra]
  try:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    log, rc = r.stdout + r.stderr, r.returncode
  except subprocess.TimeoutExpired as e:
    log, rc = f"timeout: {e}", "timeout"
  timed = {}
  path = os.path.join(out, "tp_prefill_profile.json")
  if os.path.exists(path):
    with open(path) as f:
      for v, got in json.load(f).items():
        timed[v] = {"ms_per_call": got["timing"]["median_s"] * 1e3,
                    "host_enqueue_ms": None if got["host_enqueue_s"] is None else got["host_enqueue_s"] * 1e3,
                    "collectives": got["hlo_ops"]}
  return rc, log, timed


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--m", type=int, default=1)
  p.add_argument("--fmt", default="mxfp4")
  p.add_argument("--timeout-s", type=int, default=150)
  p.add_argument("--extra", default="", help="more arguments for tp_prefill_profile.py (--d 256 --ffn 512 on the CPU)")
  p.add_argument("--budget-s", type=float, default=500, help="start no setting after this many seconds")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  results, t0 = {}, time.time()
  for name in a.settings.split(","):
    if time.time() - t0 > a.budget_s:
      results[name] = {"skipped": "budget"}
      continue
    setting = SETTINGS[name]
    flags, pairs, m = setting["flags"], setting.get("pairs", 4), setting.get("m", a.m)
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
    variants = setting.get("variants", "1:psum,2:psum")
    extra = [*a.extra.split(), *(["--compiler-options", json.dumps(setting["options"])] if "options" in setting else [])]
    t = time.time()
    rc, log, timed = timed_variants(os.path.join(a.out, name), m, pairs, variants, env, a.timeout_s,
                                    ["--fmt", a.fmt, *extra])
    entry = {"variants": variants, "xla_flags": flags, "options": setting.get("options"), "pairs": pairs, "m": m,
             "rc": rc, "wall_s": round(time.time() - t, 1), "log_tail": log[-1500:], **timed}
    results[name] = entry
    print(name, {k: v for k, v in entry.items() if k != "log_tail"}, flush=True)
    with open(os.path.join(a.out, "tp_decode_flags.json"), "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
