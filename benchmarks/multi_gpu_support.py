"""The pieces of benchmarks/multi_gpu.py that are not its measurements.

The tensor-parallel model (a stack of QDense pairs) and its shardings, timing and HLO helpers,
the ``Run`` record (checks, errors, the budget; it writes multi_gpu.json and multi_gpu.md after
every case) and the report with its goal lines. The measurements are in multi_gpu.py.
"""

from __future__ import annotations

import collections
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import fp4jax as fj
from fp4jax import sharding
from fp4jax.flax import QDense

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS32 = float(np.finfo(np.float32).eps)
EPS_BF16 = float(jnp.finfo(jnp.bfloat16).eps)
LHS = {"xla_gpu_enable_latency_hiding_scheduler": True}
# Chunked prefill overlaps one chunk's all-reduce with the other chunk's GEMMs, unless XLA combines
# the chunks' all-reduces into one (it does below its combine threshold): keep them apart.
NO_COMBINE = {"xla_gpu_all_reduce_combine_threshold_bytes": 0}
T0 = time.perf_counter()


def log(*a):
  print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


# ---- the inference model -----------------------------------------------------------------
def rms_norm(x):
  xf = x.astype(jnp.float32)
  return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)


class Pair(nn.Module):
  """``x + down(silu(up(rms(x))))``; with ``axis_name`` the local shard of a Megatron pair."""

  d: int
  ffn: int
  axis_name: str | None = None
  dot_general: object = None

  def setup(self):
    kw = dict(use_bias=False, dtype=jnp.bfloat16, preferred_element_type=jnp.bfloat16,
              dot_general=self.dot_general)
    self.up = QDense(self.ffn, **kw)
    self.down = QDense(self.d, **kw)

  def branch(self, x):
    """``down(silu(up(rms(x))))``: on a shard of ``ffn``, the pair's partial sums."""
    return self.project(rms_norm(x))

  def hidden(self, h):
    """``silu(up(h))`` of normalized rows ``h``: on a shard of ``ffn``, the pair's hidden activations."""
    return nn.silu(self.up(h))

  def project(self, h):
    """``down(silu(up(h)))`` of normalized rows ``h``."""
    return self.down(self.hidden(h))

  def __call__(self, x):
    y = self.branch(x)
    if self.axis_name is not None:  # row-parallel down: partial sums over the split ffn axis
      y = lax.psum(y, self.axis_name)
    return x + y


class Stack(nn.Module):
  d: int
  ffn: int
  pairs: int
  axis_name: str | None = None
  dot_general: object = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.pairs):
      x = Pair(self.d, self.ffn, self.axis_name, self.dot_general, name=f"pair_{i}")(x)
    return x


def exchange_stack(params, x, d, ffn, pairs, axis_name, dot_general=None):
  """The Stack's local shard on 2 devices, each all-reduce replaced by two exchanges of half the rows.

  Device ``r`` keeps the rows ``R_r`` (its half of the tokens) current. Per pair it computes the up
  projection of its own rows, then of the peer's (received meanwhile); the down projection of the
  peer's rows first, sent with ``ppermute`` while it computes its own rows' down projection; adds the
  peer's partial sums for its rows; and sends its updated rows to the peer, which needs them for the
  next pair. Bytes as the all-reduce (two exchanges of ``M/2 x d``), but each one has independent
  GEMMs to hide behind. With 2 devices the partial sums add in one bfloat16 rounding, as ``psum``.
  """
  pair = Pair(d, ffn, None, dot_general)
  r = lax.axis_index(axis_name)
  swap = [(0, 1), (1, 0)]
  halves = x.reshape(2, x.shape[0] // 2, d)
  own = lax.dynamic_index_in_dim(halves, r, keepdims=False)
  other = lax.dynamic_index_in_dim(halves, 1 - r, keepdims=False)
  for i in range(pairs):
    branch = functools.partial(pair.apply, {"params": params["params"][f"pair_{i}"]}, method=Pair.branch)
    received = lax.ppermute(branch(other), axis_name, swap)
    own = own + (branch(own) + received)
    other = lax.ppermute(own, axis_name, swap)
  first, second = jnp.where(r == 0, own, other), jnp.where(r == 0, other, own)
  return jnp.concatenate([first, second])


def sequence_parallel_stack(params, x, d, ffn, pairs, axis_name, dot_general=None):
  """The Stack's local shard with Megatron's sequence parallelism: each all-reduce split in two.

  The residual stream stays split by rows (tokens) between the pairs: each pair's partial sums
  are reduce-scattered (``psum_scatter``), the device adds its rows' sums to its rows and
  normalizes only them, and the normalized rows are all-gathered for the next pair's up
  projection (an all-gather of activations, never of a weight). The same bytes cross the link
  as with one all-reduce per pair, but the row-wise work between the GEMMs (the residual add, the
  RMS norm) runs on ``M / n`` rows per device instead of all ``M``. The sums are those of
  ``psum`` (one bfloat16 rounding of the partial sums' total), so the output equals ``Stack``'s.
  """
  pair = Pair(d, ffn, None, dot_general)
  n = lax.psum(1, axis_name)
  rows = x.shape[0] // n
  own = lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * rows, rows)
  h = rms_norm(x)
  for i in range(pairs):
    project = functools.partial(pair.apply, {"params": params["params"][f"pair_{i}"]}, method=Pair.project)
    own = own + lax.psum_scatter(project(h), axis_name, scatter_dimension=0, tiled=True)
    if i + 1 < pairs:
      h = lax.all_gather(rms_norm(own), axis_name, axis=0, tiled=True)
  return lax.all_gather(own, axis_name, axis=0, tiled=True)


def make_params(d, ffn, pairs, fmt, layout="rows"):
  """A linen ``{"params": ...}`` tree of QArray kernels blocked along their input axis, stored in
  ``layout`` (``"rows"``, what ``quantize_params`` stores by default, or None, the logical
  layout), made on the default device one weight at a time."""
  quant = jax.jit(lambda k, shape, scale: fj.quantize(jax.random.normal(k, shape, jnp.float32) * scale, fmt,
                                                      axis=0).with_layout(layout), static_argnums=(1, 2))
  tree = {}
  for i in range(pairs):
    ku, kd = jax.random.split(jax.random.fold_in(jax.random.key(1), i))
    tree[f"pair_{i}"] = {"up": {"kernel": quant(ku, (d, ffn), d**-0.5)},
                         "down": {"kernel": quant(kd, (ffn, d), 0.5 * ffn**-0.5)}}
  return {"params": tree}


def tp_spec(path) -> P:
  """Megatron: the up kernel ``(d, ffn)`` split along ffn, the down kernel ``(ffn, d)`` along ffn."""
  names = [str(getattr(k, "key", k)) for k in path]
  return P(None, "tp") if "up" in names else P("tp", None)


def is_q(x):
  return isinstance(x, fj.QArray)


def param_specs(params):
  return jax.tree_util.tree_map_with_path(lambda p, q: sharding.qarray_partition_spec(q, tp_spec(p)), params,
                                          is_leaf=is_q)


def param_shardings(params, mesh):
  return jax.tree_util.tree_map_with_path(
      lambda p, q: sharding.qarray_sharding(q, NamedSharding(mesh, tp_spec(p))), params, is_leaf=is_q)


def backend_dot(backend):
  """A ``dot_general`` for QDense that runs ``fj.scaled_dot_general`` with ``backend=`` (for
  ``--backend pallas``: the kernels, in interpret mode on a CPU); None keeps QDense's own path."""
  if backend == "auto":
    return None

  def dot(x, w, dims, precision=None, preferred_element_type=None):
    del precision
    return fj.scaled_dot_general(x, w, dims, preferred_element_type=preferred_element_type or jnp.float32,
                                 backend=backend)
  return dot


# ---- timing and HLO ------------------------------------------------------------------------
def bench(call, samples, target_s=0.1, n=None, max_calls=400):
  """Median, min and max seconds per call of ``call(i)`` (each returns what to block on).

  3 warm-up calls, one timed call to size the samples, then ``samples`` samples of ``n`` calls
  (default: enough for ``target_s`` seconds, 3 to ``max_calls``), a sync at the end of each.
  """
  # On the CPU (the --small smoke test, whose times mean nothing) wait for every call: back-to-back
  # programs with collectives on fake devices deadlock XLA's CPU runtime on a 2-core host (a
  # rendezvous waits for a device thread busy with the next program).
  wait = jax.default_backend() == "cpu"
  out = None
  for i in range(3):
    out = call(i)
    if wait:
      jax.block_until_ready(out)
  jax.block_until_ready(out)
  t = time.perf_counter()
  jax.block_until_ready(call(3))
  one = max(time.perf_counter() - t, 1e-6)
  if n is None:
    n = int(min(max_calls, max(3, math.ceil(target_s / one))))
  times, i = [], 4
  for _ in range(samples):
    t = time.perf_counter()
    for _ in range(n):
      out = call(i)
      i += 1
      if wait:
        jax.block_until_ready(out)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / n)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "calls": n}


def summarize(cols):
  """``["all-reduce bf16[16,4096] x4", ...]``: each distinct collective with its count."""
  counts = collections.Counter(str(c) for c in cols)
  return [f"{k} x{v}" if v > 1 else k for k, v in sorted(counts.items())]


class Program:
  """A jitted program, compiled once (its HLO text inspected) and then called.

  ``compiler_options`` go to ``jax.jit``, so the lowering and every call use them. Calls go to
  the compiled executable; where it refuses the arguments' layouts (jax 0.10.2 on the CPU does for
  float4 arrays), they go through the jitted function, which lays them out (and compiles again).
  """

  def __init__(self, fn, in_shardings, out_shardings, args, options=None, donate=()):
    self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate,
                          compiler_options=options or None)
    t = time.perf_counter()
    self.compiled = self.jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - t
    self.collectives = sharding.hlo_collectives(self.compiled.as_text())
    self._run = self.compiled

  def __call__(self, *args):
    try:
      return self._run(*args)
    except ValueError as e:
      if self._run is self.jitted or "layouts" not in str(e):
        raise
      self._run = self.jitted
      return self._run(*args)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def same_bits(a, b):
  return all(np.asarray(u).tobytes() == np.asarray(v).tobytes() and u.dtype == v.dtype
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def grad_bound(n: int) -> float:
  """Relative (Frobenius) error allowed between gradients from 1 and 2 GPUs, ``n`` the length of
  the sum whose order differs.

  Data-parallel, ``n`` is the tokens of the batch: each weight gradient is a sum over them; on 2
  GPUs each sums half and an all-reduce adds the halves, a different order of float32 additions
  of the same products (every GEMM operand is fake-quantized, so at float32 precision, which the
  check asks for, the products are exact).
  Tensor-parallel, ``n`` is ``ffn``: the forward output sums over the split ffn axis (halves, then
  an all-reduce). Any order of ``n`` float32 additions is within ``gamma_n = n * eps / (1 - n * eps)``
  of the exact sum, relative to the sum of magnitudes; two orders differ by at most twice that. We
  allow ``2 * n * eps`` relative to the gradient's norm: far above the float32 noise actually seen
  (about ``sqrt(n) * eps``; a rounding difference that moves an element across a rounding
  boundary of a later quantization flips one code, about ``1 / sqrt(elements)`` of the norm
  each), far below what a wrong global scale, a missing all-reduce or different random bits give
  (1e-2 or more).
  """
  return 2 * n * EPS32


# ---- the run -----------------------------------------------------------------------------
class Run:
  """Results, checks and output files, written after every case."""

  def __init__(self, args):
    self.args = args
    self.data = {"meta": meta(args), "interconnect": [], "tp": [], "tp_auto": [], "amax": [], "qat": [], "qat_grads": [],
                 "orbax": None, "checks": [], "skipped": [], "errors": []}

  def check(self, name, ok, detail=""):
    self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    log("CHECK", "ok  " if ok else "FAIL", name, detail)

  def over_budget(self, what):
    if time.perf_counter() - T0 > self.args.budget_s:
      self.data["skipped"].append(what)
      log("budget: skipping", what)
      return True
    return False

  def guarded(self, what, fn, *a, **kw):
    """Runs one case; an exception is recorded as a failed check, and the run goes on."""
    if self.over_budget(what):
      return None
    try:
      return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - a case that fails is a result; the others still run
      msg = f"{type(e).__name__}: {str(e)[:600]}"
      self.data["errors"].append({"case": what, "error": msg, "traceback": traceback.format_exc()[-3000:]})
      self.check(f"{what} ran", False, msg)
      return None
    finally:
      self.write()

  def write(self):
    if not self.args.out:
      return
    os.makedirs(self.args.out, exist_ok=True)
    with open(os.path.join(self.args.out, "multi_gpu.json"), "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    with open(os.path.join(self.args.out, "multi_gpu.md"), "w") as f:
      f.write(render(self.data) + "\n")


def meta(args):
  def version(mod):
    try:
      return __import__(mod).__version__
    except Exception:  # noqa: BLE001
      return "not installed"

  commit = args.commit
  if not commit:
    try:
      commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown (no git)"
      dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
      commit += " (with uncommitted changes)" if dirty else ""
    except Exception:  # noqa: BLE001
      commit = "unknown (no git)"
  devs = jax.devices()
  return {"device_kind": devs[0].device_kind, "platform": devs[0].platform, "device_count": len(devs),
          "devices_used": args.devices, "jax": jax.__version__, "jaxlib": version("jaxlib"),
          "flax": version("flax"), "orbax": version_orbax(), "python": platform.python_version(),
          "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": "python " + " ".join(sys.argv), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "config": {k: v for k, v in vars(args).items() if k not in ("out",)}}


def version_orbax():
  try:
    import orbax.checkpoint as ocp
    return getattr(ocp, "__version__", "installed")
  except Exception:  # noqa: BLE001
    return "not installed"


# ---- report ------------------------------------------------------------------------------
def render(data):
  m = data["meta"]
  c = m["config"]
  out = [f"# fp4jax across GPUs: {c['devices']} vs 1 (benchmarks/multi_gpu.py)", "",
         f"Device: {m['device_kind']} x{m['device_count']} ({m['platform']}), {c['devices']} used; jax {m['jax']}, "
         f"jaxlib {m['jaxlib']}, flax {m['flax']}, orbax {m['orbax']}, Python {m['python']}. Commit {m['commit']}. "
         f"{m['date']}. Command: `{m['command']}`" + (f"; XLA_FLAGS={m['xla_flags']!r}" if m["xla_flags"] else "") + ".",
         "", f"Model: d={c['d']}, ffn={c['ffn']}, {c['pairs']} pairs (up, down) of QDense; QAT tokens {c['qat_tokens']} "
         f"per step (per GPU for 'same per-GPU batch'); median of {c['samples']} samples.", ""]
  if data["interconnect"]:
    out += ["## Interconnect: psum (all-reduce) of bf16 arrays across the 2 devices", "",
            "| shape | bytes | us / all-reduce | bytes / time (GB/s) | collectives |", "|---|---|---|---|---|"]
    for r in data["interconnect"]:
      out.append(f"| {r['shape']} | {r['bytes']:,} | {r['median_s'] * 1e6:.1f} | {r['algbw_GBps']:.1f} | "
                 f"{'; '.join(r['collectives'])} |")
    out.append("")
  tp = data["tp"]
  if tp:
    out += ["## Tensor-parallel inference (shard_map, Megatron: up column-, down row-parallel, one psum per pair)", "",
            "| fmt | M | program | ms / call | tokens/s | x 1 GPU | compile s | collectives in the HLO |",
            "|---|---|---|---|---|---|---|---|"]
    one = {(r["fmt"], r["m"]): r for r in tp if r["devices"] == 1}
    for r in tp:
      b = one.get((r["fmt"], r["m"]))
      ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
      prog = "1 GPU" if r["devices"] == 1 else r["label"]
      out.append(f"| {r['fmt']} | {r['m']} | {prog} | {r['median_s'] * 1e3:.3f} | {r['tokens_per_s']:,.0f} | {ratio} | "
                 f"{r['compile_s']:.1f} | {'; '.join(r['collectives']) or 'none'} |")
    out.append("")
  if data["tp_auto"]:
    out += ["For information: the same stack under plain `jit` with NamedShardings (XLA's automatic partitioning, "
            "no shard_map), compiled only. All-gathers here are what XLA does around ops it cannot partition "
            "(on a GPU: fp4jax's Pallas kernels).", "", "| fmt | M | collectives | all-gathers |", "|---|---|---|---|"]
    for r in data["tp_auto"]:
      out.append(f"| {r['fmt']} | {r['m']} | {'; '.join(r['collectives']) or 'none'} | "
                 f"{'; '.join(r['all_gathers']) or 'none'} |")
    out.append("")
  if data["amax"]:
    out += ["## NVFP4 global amax of a sharded tensor", "", "| layout | program | collectives | checked |",
            "|---|---|---|---|"]
    for r in data["amax"]:
      out.append(f"| {r['layout']} | {r['program']} | {'; '.join(r['collectives']) or 'none'} | "
                 f"{'yes' if r['checked'] else 'no (reported)'} |")
    out.append("")
  if data["qat"]:
    backend = data["qat"][0].get("qat_backend", "xla")
    out += [f"## QAT train step (benchmarks/qat_step.py's SwiGLU block; jit with NamedShardings; "
            f"QatConfig.backend={backend!r})", "",
            "| mode | layout | tokens / step | ms / step | tokens/s | x 1 GPU | compile s | collectives |",
            "|---|---|---|---|---|---|---|---|"]
    one = {r["mode"]: r for r in data["qat"] if r["devices"] == 1}
    for r in data["qat"]:
      b = one.get(r["mode"])
      ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
      out.append(f"| {r['mode']} | {r['layout']} | {r['tokens']} | {r['median_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} | "
                 f"{ratio} | {r['compile_s']:.1f} | {'; '.join(r['collectives']) or 'none'} |")
    out.append("")
  if data["qat_grads"]:
    out += ["Gradients of the same step in float32, 2 GPUs vs 1 (same batch), relative Frobenius error; bound "
            "`2 * n * eps32`, n the length of the sum split across the GPUs (DP: tokens, TP: ffn; see "
            "`grad_bound`):", "",
            "| mode | layout | dW1 | dW3 | dW2 | n | bound |", "|---|---|---|---|---|---|---|"]
    for r in data["qat_grads"]:
      e = r["rel_err"]
      out.append(f"| {r['mode']} | {r['layout']} | {e['dW1']:.2e} | {e['dW3']:.2e} | {e['dW2']:.2e} | {r['n']} | "
                 f"{r['bound']:.2e} |")
    out.append("")
  if data["orbax"]:
    out += ["## Orbax", "", "```text", json.dumps(data["orbax"], indent=1), "```", ""]
  out += ["## Goals", ""] + goals(data) + [""]
  fails = [x for x in data["checks"] if not x["ok"]]
  out += [f"## Checks: {len(data['checks']) - len(fails)} passed, {len(fails)} failed", ""]
  out += [f"- {'ok' if x['ok'] else '**FAILED**'}: {x['name']}" + (f" ({x['detail']})" if x["detail"] else "")
          for x in data["checks"]]
  if data["skipped"]:
    out += ["", "Skipped at the time budget: " + ", ".join(data["skipped"])]
  if data["errors"]:
    out += ["", "Errors:", ""] + [f"- {e['case']}: {e['error']}" for e in data["errors"]]
  return "\n".join(out)


def goals(data):
  lines = []
  one = {(r["fmt"], r["m"]): r for r in data["tp"] if r["devices"] == 1}
  best = {}
  for r in data["tp"]:
    if r["devices"] > 1 and (r["fmt"], r["m"]) in one:
      ratio = r["tokens_per_s"] / one[(r["fmt"], r["m"])]["tokens_per_s"]
      k = (r["fmt"], r["m"])
      plain = r["chunks"] == 1 and not r["lhs"]
      best.setdefault(k, {})["plain" if plain else r["label"]] = ratio
  dm = set(data["meta"]["config"]["decode_m"])
  for (fmt, m), ratios in sorted(best.items()):
    decode = m in dm
    what = "decode: faster than 1 GPU (> 1.0x)" if decode else "prefill: >= 1.8x one GPU's tokens/s"
    plain = ratios.get("plain")
    if plain is None:
      lines.append(f"- TP {fmt} M={m}: no plain 2-GPU number")
      continue
    met = plain > 1.0 if decode else plain >= 1.8
    line = f"- TP {fmt} M={m}, {what}: {plain:.2f}x with the default compile -> {'met' if met else 'NOT met'}"
    others = {k: v for k, v in ratios.items() if k != "plain"}
    if others:
      k, v = max(others.items(), key=lambda kv: kv[1])
      line += f"; best variant ({k}): {v:.2f}x"
    lines.append(line)
  qone = {r["mode"]: r for r in data["qat"] if r["devices"] == 1}
  for r in data["qat"]:
    if r["devices"] > 1 and r["mode"] in qone:
      ratio = r["tokens_per_s"] / qone[r["mode"]]["tokens_per_s"]
      tag = " (goal >= 1.85x: " + ("met)" if ratio >= 1.85 else "NOT met)") if "DP" in r["layout"] else ""
      lines.append(f"- QAT {r['mode']} {r['layout']}: {ratio:.2f}x one GPU's tokens/s{tag}")
  gathers = [x for x in data["checks"] if "all-gather" in x["name"] and "no all-gather" in x["name"]]
  if gathers:
    ok = all(x["ok"] for x in gathers)
    lines.append(f"- No all-gather in any benchmarked program's HLO: {'met' if ok else 'NOT met'} "
                 f"({len(gathers)} programs checked)")
  return lines or ["- nothing measured"]
