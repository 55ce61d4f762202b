"""fp4jax past one GPU: tensor-parallel quantized inference and data/tensor-parallel QAT, 2 GPUs vs 1.

One process, one command. Every ratio compares programs compiled and timed in this process: on a
1-device mesh (the first device) and on a 2-device mesh (the first two). What it measures:

1. **Tensor-parallel inference** of a stack of ``--pairs`` MLP pairs of ``fp4jax.flax.QDense``
   layers holding MXFP4 / NVFP4 QArray weights stored as ``quantize_params`` stores them
   (``--layout rows``, its default; ``logical`` for the runs before 2026-11-30's fifth session)
   (``x + down(silu(up(rms(x))))``, up ``d -> ffn``,
   down ``ffn -> d``, bf16 activations), sharded Megatron-style under ``jax.shard_map``: up
   column-parallel (its output axis split), down row-parallel (its input axis, the block axis,
   split), one ``psum`` of the ``(M, d)`` activations per pair. ``check_vma=False``: fp4jax's Pallas
   kernels (which run on a GPU for small M) declare outputs without the varying-mesh-axes type
   that ``check_vma=True`` demands. Decode (``M`` of ``--decode-m``) and prefill
   (``--prefill-m``): tokens/s on 1 and 2 GPUs. Each timed call takes the previous call's output
   as its input (like decoding). The compiled HLO's collectives are listed; the script checks that
   there is no all-gather (of a weight or anything else) and that every all-reduce is at most one
   ``(M, d)`` activation. Prefill variants on 2 GPUs (``--prefill-variants``): XLA's
   latency-hiding scheduler (``xla_gpu_enable_latency_hiding_scheduler``, a per-program compile
   option); N chunks of tokens whose all-reduces XLA may not combine, so one chunk's all-reduce
   can overlap the other's GEMMs; and "exchange": each all-reduce replaced by two ``ppermute``
   exchanges of half the rows, each with independent GEMMs to hide behind
   (``multi_gpu_support.exchange_stack``; the same bytes, the same bf16 sums); and "sp": Megatron's
   sequence parallelism, each all-reduce as a reduce-scatter and an all-gather of activation rows
   with the norm on the device's rows only (``multi_gpu_support.sequence_parallel_stack``). For information (compiled, not timed or checked): the
   same stack under plain ``jit`` with NamedShardings (automatic partitioning), where XLA gathers
   the operands of what it cannot partition (the kernels' byte matrices).
2. **NVFP4's global amax** of a sharded tensor: one all-reduce (max) of a scalar, under ``jit``
   and under ``shard_map`` with ``quantize(..., axis_name=...)``; checked, with the bits of the
   unsharded quantize (bf16 input). ``backend="auto"`` is reported, not checked (on a GPU it may
   run the Pallas quantize kernel, which XLA cannot partition).
3. **QAT train step** of benchmarks/qat_step.py's SwiGLU block (its ``make_step``: bf16 GEMMs,
   float32 masters, weights donated), under ``jit`` with NamedShardings: data-parallel (batch
   split; the same global batch, and the same per-GPU batch), with and without the
   latency-hiding scheduler, and 2-way tensor-parallel (W1, W3 column-split, W2 row-split). Step
   time and tokens/s vs 1 GPU. The gradients of the same step in float32 on 1 and on 2 GPUs are
   compared (bound: ``grad_bound``); no all-gather in any HLO.
4. **Orbax**: the 2-GPU tensor-parallel parameter tree saved and restored onto the 1-GPU mesh, bit
   for bit.

Order of the run: TP of the first format, the amax checks, orbax, QAT of the first mode, then the
second format and mode. ``--budget-s`` stops starting cases (the rest is listed as skipped) and
the tables are written after every case, so a run cut short keeps what it measured.

Timing (as benchmarks/matmul.py and qat_step.py): compile, 3 warm-up calls, then ``--samples``
samples of back-to-back calls (enough for ~``--target-s`` each), a device sync per sample; the
median time per call is reported. Weights total ``2 * pairs * d * ffn`` elements (250 MB of MXFP4
at the defaults), beyond the 50 MB L2, so every call reads them from HBM.

Usage (the GPU run; ``$OUT`` receives multi_gpu.md and multi_gpu.json)::

  PYTHONPATH=. python benchmarks/multi_gpu.py --out $OUT
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      PYTHONPATH=. python benchmarks/multi_gpu.py --small --out /tmp/mg    # CPU smoke test

The process exits with status 1 if a check failed (after writing everything).
"""

from __future__ import annotations

import argparse
import contextlib
import math
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
from fp4jax import sharding

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qat_step  # noqa: E402  (benchmarks/qat_step.py: the QAT block and its step)
from multi_gpu_support import (  # noqa: E402  (the model, timing, HLO and report helpers)
    EPS_BF16, LHS, NO_COMBINE, Program, Run, Stack, backend_dot, bench, exchange_stack, grad_bound, is_q, log,
    make_params, param_shardings, param_specs, rel_err, render, same_bits, sequence_parallel_stack, summarize, tp_spec)


# ---- 0. the interconnect -----------------------------------------------------------------
def interconnect_section(run, meshes):
  """All-reduce (psum) time of bf16 arrays of the sizes the programs below all-reduce: how the
  GPUs are linked (NVLink or PCIe) decides every ratio here. Each call takes the previous result."""
  a = run.args
  mesh = meshes[2]
  rep = NamedSharding(mesh, P())
  shapes = sorted({(m, a.d) for m in a.decode_m + a.prefill_m} | {(a.d, a.ffn)}, key=lambda s: s[0] * s[1])
  for shape in shapes:
    def one(shape=shape):
      fn = jax.shard_map(lambda x: lax.psum(x, "tp") * 0.5, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
      x = jax.device_put(jnp.ones(shape, jnp.bfloat16), rep)
      prog = Program(fn, (rep,), rep, (x,))
      state = {"x": x}

      def call(i):
        state["x"] = prog(state["x"])
        return state["x"]

      t = bench(call, a.samples, a.target_s)
      nbytes = math.prod(shape) * 2
      row = {"shape": list(shape), "bytes": nbytes, **t, "algbw_GBps": nbytes / t["median_s"] / 1e9,
             "collectives": summarize(prog.collectives)}
      run.data["interconnect"].append(row)
      log(f"psum bf16{list(shape)}: {t['median_s'] * 1e6:.1f} us, {row['algbw_GBps']:.1f} GB/s, {row['collectives']}")
    run.guarded(f"psum {shape}", one)


# ---- 1. tensor-parallel inference --------------------------------------------------------
def tp_case(run, meshes, params_by_mesh, fmt, m, label, mesh_n, chunks=1, lhs=False):
  """``chunks``: 1, a number of row chunks (each its own all-reduces), or "exchange" (2 GPUs:
  ``exchange_stack``, the all-reduces replaced by ppermutes of half the rows)."""
  a = run.args
  mesh = meshes[mesh_n]
  params = params_by_mesh[mesh_n]
  tp = mesh.devices.size
  model = Stack(a.d, a.ffn // tp, a.pairs, "tp", backend_dot(a.backend))

  def local(p, x):
    if chunks == "exchange":
      return exchange_stack(p, x, a.d, a.ffn // tp, a.pairs, "tp", backend_dot(a.backend))
    if chunks == "sp":
      return sequence_parallel_stack(p, x, a.d, a.ffn // tp, a.pairs, "tp", backend_dot(a.backend))
    if chunks == 1:
      return model.apply(p, x)
    return jnp.concatenate([model.apply(p, c) for c in jnp.split(x, chunks)])

  fn = jax.shard_map(local, mesh=mesh, in_specs=(param_specs(params), P()), out_specs=P(),
                     check_vma=False)  # fp4jax's Pallas kernels' outputs carry no varying-axes type yet
  rep = NamedSharding(mesh, P())
  xs = [jax.device_put(jax.random.normal(jax.random.key(10 + i), (m, a.d), jnp.bfloat16), rep) for i in range(2)]
  options = {**(LHS if lhs else {}), **(NO_COMBINE if isinstance(chunks, int) and chunks > 1 else {})}
  compiled = Program(fn, (param_shardings(params, mesh), rep), rep, (params, xs[0]), options=options)
  compile_s, cols = compiled.compile_s, compiled.collectives
  state = {"x": xs[1]}

  def call(i):
    state["x"] = compiled(params, state["x"])
    return state["x"]

  first = compiled(params, xs[0])
  timing = bench(call, a.samples, a.target_s)
  row = {"fmt": fmt.name, "m": m, "label": label, "devices": tp, "chunks": chunks, "lhs": lhs,
         "compile_s": compile_s, "collectives": summarize(cols), **timing,
         "tokens_per_s": m / timing["median_s"], "finite": bool(jnp.all(jnp.isfinite(first)))}
  # Activations only: all-reduces / reduce-scatters of at most (M, d), exchanges of (M/2, d) rows,
  # and (sequence parallel) all-gathers of activation rows into at most (M, d): bf16 (XLA's CPU
  # runtime gathers them in f32); a weight's bytes are uint8 / float4 / float8.
  bad = [str(c) for c in cols if not ((c.op in ("all-reduce", "reduce-scatter") and c.elements <= m * a.d)
                                      or (c.op == "collective-permute" and c.elements <= m * a.d // 2)
                                      or (c.op == "all-gather" and chunks == "sp" and c.elements <= m * a.d
                                          and all(t in ("bf16", "f32") for t, _ in c.shapes)))]
  run.check(f"TP {fmt.name} M={m} {label}: only activation collectives, no all-gather of a weight",
            not bad, "; ".join(row["collectives"]) or "no collectives")
  run.check(f"TP {fmt.name} M={m} {label}: finite output", row["finite"])
  run.data["tp"].append(row)
  log(f"TP {fmt.name} M={m} {label}: {timing['median_s'] * 1e3:.3f} ms, {row['tokens_per_s']:.0f} tok/s, "
      f"compile {compile_s:.1f}s, {row['collectives']}")
  return first


def tp_auto_case(run, meshes, params_by_mesh, fmt, m):
  """The global model under plain jit with NamedShardings: what XLA's partitioner makes of it."""
  a = run.args
  mesh, params = meshes[2], params_by_mesh[2]
  model = Stack(a.d, a.ffn, a.pairs, None, backend_dot(a.backend))
  rep = NamedSharding(mesh, P())
  x = jax.device_put(jnp.ones((m, a.d), jnp.bfloat16), rep)
  compiled = Program(model.apply, (param_shardings(params, mesh), rep), rep, (params, x))
  compile_s, cols = compiled.compile_s, compiled.collectives
  row = {"fmt": fmt.name, "m": m, "collectives": summarize(cols), "compile_s": compile_s,
         "all_gathers": [str(c) for c in cols if c.op == "all-gather"]}
  run.data["tp_auto"].append(row)
  log(f"auto-partitioned {fmt.name} M={m}: {row['collectives']}")


def tp_section(run, meshes, fmt):
  a = run.args
  log(f"== tensor-parallel inference, {fmt.name}")
  base = make_params(a.d, a.ffn, a.pairs, fmt, a.layout)
  params_by_mesh = {n: jax.device_put(base, param_shardings(base, meshes[n])) for n in (1, 2)}
  del base
  ms = [(m, "decode") for m in a.decode_m] + [(m, "prefill") for m in a.prefill_m]
  for m, kind in ms:
    outs = {}
    for n in (1, 2):
      outs[n] = run.guarded(f"TP {fmt.name} M={m} {n} GPU", tp_case, run, meshes, params_by_mesh, fmt, m,
                            "1 GPU" if n == 1 else "2 GPUs", n)
    if outs[1] is not None and outs[2] is not None:
      # bf16 outputs; on 2 GPUs each pair's down product is rounded to bf16 per half before the
      # psum: about one bf16 rounding per pair more than on 1 GPU.
      err, tol = rel_err(outs[2], outs[1]), 2 * a.pairs * EPS_BF16
      run.check(f"TP {fmt.name} M={m}: 2-GPU output equals 1-GPU output to bf16 rounding",
                err <= tol, f"relative error {err:.2e}, bound {tol:.2e}")
    if kind == "prefill":
      for chunks, lhs in a.prefill_variants:
        if chunks == "exchange":
          label = f"2 GPUs, row exchanges instead of all-reduces{' + LHS' if lhs else ''}"
        elif chunks == "sp":
          label = f"2 GPUs, sequence parallel (reduce-scatter + all-gather){' + LHS' if lhs else ''}"
        else:
          label = (f"2 GPUs, {chunks} chunk{'s, GPU all-reduce combining off' if chunks > 1 else ''}"
                   f"{' + LHS' if lhs else ''}")
        out = run.guarded(f"TP {fmt.name} M={m} {label}", tp_case, run, meshes, params_by_mesh, fmt, m, label, 2,
                          chunks, lhs)
        if out is not None and outs[1] is not None:
          err, tol = rel_err(out, outs[1]), 2 * a.pairs * EPS_BF16
          run.check(f"TP {fmt.name} M={m} {label}: output equals 1-GPU output to bf16 rounding",
                    err <= tol, f"relative error {err:.2e}, bound {tol:.2e}")
  if fmt == a.formats[0]:
    for m in (min(a.decode_m), max(a.prefill_m)):
      run.guarded(f"auto-partitioned {fmt.name} M={m}", tp_auto_case, run, meshes, params_by_mesh, fmt, m)
  return params_by_mesh


# ---- 2. NVFP4 global amax ----------------------------------------------------------------
def amax_section(run, meshes):
  a = run.args
  mesh = meshes[2]
  shape = (a.d, a.ffn)
  # bf16 input: on a GPU, XLA's float32 reciprocal may be fused differently from one program to
  # another (see fp4jax.backend.gpu_verified), which would blur "bits equal" with rounding.
  x = jax.random.normal(jax.random.key(3), shape, jnp.bfloat16)
  ref = fj.quantize(x, fj.NVFP4, backend="xla")
  for label, spec in (("rows split", P("tp", None)), ("block axis split", P(None, "tp"))):
    s = NamedSharding(mesh, spec)
    xs = jax.device_put(x, s)
    qspec = sharding.qarray_sharding(ref, s)
    progs = {
        "jit, backend='xla'": (lambda v: fj.quantize(v, fj.NVFP4, backend="xla"), True),
        "shard_map, axis_name='tp'": (jax.shard_map(lambda v: fj.quantize(v, fj.NVFP4, axis_name="tp"), mesh=mesh,
                                                    in_specs=spec, out_specs=sharding.qarray_partition_spec(ref, spec)),
                                      True),
        # backend="auto" may pick the Pallas quantize kernel on a GPU: a custom call that XLA's
        # partitioner cannot split. Reported, not checked.
        "jit, backend='auto'": (lambda v: fj.quantize(v, fj.NVFP4), False),
    }
    for name, (fn, checked) in progs.items():
      def one(name=name, fn=fn, checked=checked):
        compiled = Program(fn, (s,), qspec, (xs,))
        cols = compiled.collectives
        q = compiled(xs)
        row = {"layout": label, "program": name, "collectives": summarize(cols), "checked": checked}
        if checked:
          row["bits_equal_unsharded"] = same_bits(q, ref)
          row["kept_sharding"] = (q.values.sharding.is_equivalent_to(s, 2) and q.scales.sharding.is_equivalent_to(s, 2)
                                  and q.global_scale.sharding.is_fully_replicated)
          ok = len(cols) == 1 and cols[0].op == "all-reduce" and cols[0].elements == 1
          run.check(f"NVFP4 amax, {label}, {name}: one all-reduce of a scalar", ok, "; ".join(row["collectives"]))
          run.check(f"NVFP4 amax, {label}, {name}: bits equal the unsharded quantize, shardings kept",
                    row["bits_equal_unsharded"] and row["kept_sharding"])
        run.data["amax"].append(row)
        log(f"amax {label} / {name}: {row['collectives']}")
      run.guarded(f"NVFP4 amax {label} {name}", one)


# ---- 3. QAT ------------------------------------------------------------------------------
def qat_layouts(meshes, tokens):
  """name -> (mesh, global tokens, param specs, batch spec)."""
  split = (P(None, "tp"), P(None, "tp"), P("tp", None))
  rep3 = (P(), P(), P())
  return {
      "1 GPU": (meshes[1], tokens, rep3, P("tp", None)),
      "2 GPUs DP, same global batch": (meshes[2], tokens, rep3, P("tp", None)),
      "2 GPUs DP, same per-GPU batch": (meshes[2], 2 * tokens, rep3, P("tp", None)),
      "2 GPUs TP (W1, W3 column-, W2 row-split)": (meshes[2], tokens, split, P()),
  }


def qat_params(d, ffn):
  """float32 masters as host arrays: every device_put copies them (the steps donate theirs)."""
  k = jax.random.split(jax.random.key(0), 3)
  return tuple(np.asarray(w) for w in (jax.random.normal(k[0], (d, ffn)) * d**-0.5,
                                       jax.random.normal(k[1], (d, ffn)) * d**-0.5,
                                       jax.random.normal(k[2], (ffn, d)) * ffn**-0.5))


def qat_batch(i, tokens, d, dtype):
  k = jax.random.split(jax.random.key(100 + i), 2)
  return jax.random.normal(k[0], (tokens, d), dtype), jax.random.normal(k[1], (tokens, d), jnp.float32)


def qat_case(run, mode, name, layout, base, lhs=False):
  a = run.args
  mesh, tokens, pspecs, bspec = layout
  config = qat_step.config_of(mode, a.qat_backend)
  step = qat_step.make_step(config)
  psh = tuple(NamedSharding(mesh, s) for s in pspecs)
  bsh, rep = NamedSharding(mesh, bspec), NamedSharding(mesh, P())
  params = jax.device_put(base, psh)
  batches = [jax.device_put(qat_batch(i, tokens, a.d, jnp.bfloat16), (bsh, bsh)) for i in range(2)]
  keys = [jax.device_put(jax.random.fold_in(jax.random.key(1), i), rep) for i in range(4 + a.samples * a.qat_steps)]
  compiled = Program(step, (psh, bsh, bsh, rep), (psh, rep), (params, *batches[0], keys[0]),
                     options=LHS if lhs else None, donate=(0,))
  compile_s, cols = compiled.compile_s, compiled.collectives
  state = {"p": params}

  def call(i):
    x, t = batches[i % 2]
    state["p"], loss = compiled(state["p"], x, t, keys[i])
    return loss

  timing = bench(call, a.samples, n=a.qat_steps)
  loss = float(call(len(keys) - 1))
  row = {"mode": mode, "qat_backend": a.qat_backend, "layout": name, "devices": mesh.devices.size, "tokens": tokens,
         "compile_s": compile_s,
         **timing, "tokens_per_s": tokens / timing["median_s"], "loss": loss, "collectives": summarize(cols)}
  gathers = [str(c) for c in cols if c.op == "all-gather"]
  run.check(f"QAT {mode} {name}: no all-gather", not gathers, "; ".join(row["collectives"]) or "no collectives")
  run.check(f"QAT {mode} {name}: finite loss", math.isfinite(loss), f"{loss}")
  run.data["qat"].append(row)
  log(f"QAT {mode} {name}: {timing['median_s'] * 1e3:.2f} ms/step, {row['tokens_per_s']:.0f} tok/s, "
      f"compile {compile_s:.1f}s, {row['collectives']}")


def qat_grad_check(run, mode, layouts, base):
  """Gradients of the float32 step on 1 GPU and on 2 (same global batch), relative errors; returns
  the gradients by layout name."""
  a = run.args
  config = qat_step.config_of(mode, a.qat_backend)
  grad = jax.grad(qat_step.make_loss(config, jnp.float32))
  x, t = qat_batch(0, a.qat_tokens, a.d, jnp.float32)
  key = jax.random.key(5)
  out = {}
  for name in ("1 GPU", "2 GPUs DP, same global batch", "2 GPUs TP (W1, W3 column-, W2 row-split)"):
    mesh, tokens, pspecs, bspec = layouts[name]
    psh = tuple(NamedSharding(mesh, s) for s in pspecs)
    bsh, rep = NamedSharding(mesh, bspec), NamedSharding(mesh, P())
    args = (jax.device_put(base, psh), jax.device_put(x, bsh), jax.device_put(t, bsh), jax.device_put(key, rep))
    # float32 products, as grad_bound assumes: a GPU's default float32 dot rounds its operands
    # (TF32-class), and TP splits the sums those rounded products feed differently.
    with jax.default_matmul_precision("highest"):
      out[name] = jax.device_get(Program(grad, (psh, bsh, bsh, rep), psh, args)(*args))
  for name, n in (("2 GPUs DP, same global batch", a.qat_tokens), ("2 GPUs TP (W1, W3 column-, W2 row-split)", a.ffn)):
    errs = [rel_err(g2, g1) for g2, g1 in zip(out[name], out["1 GPU"])]
    bound = grad_bound(n)
    row = {"mode": mode, "layout": name, "rel_err": {"dW1": errs[0], "dW3": errs[1], "dW2": errs[2]},
           "bound": bound, "n": n}
    run.data["qat_grads"].append(row)
    run.check(f"QAT {mode} {name}: float32 gradients equal 1 GPU's to float32 rounding",
              max(errs) <= bound, f"max relative error {max(errs):.2e}, bound 2*n*eps = {bound:.2e} (n={n})")
  return out


def qat_section(run, meshes, mode):
  a = run.args
  log(f"== QAT, {mode}")
  layouts = qat_layouts(meshes, a.qat_tokens)
  base = qat_params(a.d, a.ffn)
  for name, layout in layouts.items():
    run.guarded(f"QAT {mode} {name}", qat_case, run, mode, name, layout, base)
  if mode == a.qat_modes[0]:
    # XLA's latency-hiding scheduler may overlap W2's gradient all-reduce with the backward GEMMs
    # of W1 and W3 (on by default in neither jax 0.10 nor 0.11).
    for name in ("2 GPUs DP, same global batch", "2 GPUs DP, same per-GPU batch"):
      run.guarded(f"QAT {mode} {name} + LHS", qat_case, run, mode, name + " + LHS", layouts[name], base, lhs=True)
    run.guarded(f"QAT {mode} gradients", qat_grad_check, run, mode, layouts, base)


# ---- 4. orbax ----------------------------------------------------------------------------
def orbax_section(run, meshes, params_by_mesh):
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    run.data["orbax"] = {"skipped": f"orbax-checkpoint not importable: {e}"}
    log("orbax: skipped,", e)
    return
  tree = params_by_mesh[2]
  target = jax.tree_util.tree_map_with_path(
      lambda p, q: sharding.abstract_with_sharding(q, NamedSharding(meshes[1], tp_spec(p))), tree, is_leaf=is_q)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt")
    with ocp.StandardCheckpointer() as ckpt:
      t = time.perf_counter()
      ckpt.save(path, tree)
      ckpt.wait_until_finished()
      save_s = time.perf_counter() - t
      t = time.perf_counter()
      back = ckpt.restore(path, target)
      jax.block_until_ready(back)
      restore_s = time.perf_counter() - t
  leaves = jax.tree.leaves(back)
  row = {"saved_from": "2-device mesh (up split along ffn, down along ffn)", "restored_to": "1-device mesh",
         "bytes": int(sum(x.nbytes for x in jax.tree.leaves(tree))), "save_s": save_s, "restore_s": restore_s,
         "bits_equal": same_bits(back, tree), "all_qarrays": all(is_q(q) for q in jax.tree.leaves(back, is_leaf=is_q)),
         "on_one_device": all(len(x.sharding.device_set) == 1 for x in leaves)}
  run.data["orbax"] = row
  run.check("orbax: 2-GPU tree restored onto 1 GPU bit for bit, as QArrays",
            row["bits_equal"] and row["all_qarrays"] and row["on_one_device"])
  log(f"orbax: {row}")


# ---- main --------------------------------------------------------------------------------
def ints(s):
  return [int(v) for v in s.split(",") if v]


def variants(s):
  """``"1+lhs,2+lhs,exchange"`` -> [(1, True), (2, True), ("exchange", False)]."""
  out = []
  for v in s.split(","):
    if v:
      n, _, flag = v.partition("+")
      if flag not in ("", "lhs") or not (n.isdigit() or n in ("exchange", "sp")):
        raise ValueError(f"prefill variant {v!r}: expected CHUNKS, exchange or sp, each optionally +lhs")
      out.append((int(n) if n.isdigit() else n, flag == "lhs"))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--pairs", type=int, default=4)
  p.add_argument("--formats", default="mxfp4,nvfp4")
  p.add_argument("--decode-m", type=ints, default=[1, 16])
  p.add_argument("--prefill-m", type=ints, default=[4096])
  p.add_argument("--prefill-variants", type=variants, default=variants("1+lhs,sp"),
                 help="extra 2-GPU prefill programs: CHUNKS[+lhs], exchange[+lhs] or sp[+lhs], comma-separated")
  p.add_argument("--layout", default="rows", choices=("rows", "logical"),
                 help="storage layout of the TP weights: rows (quantize_params' default) or logical")
  p.add_argument("--qat-modes", default="nvfp4,mxfp4", help="modes of benchmarks/qat_step.py")
  p.add_argument("--qat-tokens", type=int, default=8192, help="tokens a step (1 GPU; DP's global batch)")
  p.add_argument("--qat-steps", type=int, default=5, help="back-to-back steps a sample")
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--target-s", type=float, default=0.1, help="seconds of back-to-back inference calls a sample")
  p.add_argument("--backend", default="auto", choices=("auto", "xla", "pallas"),
                 help="QDense matmul backend (pallas on a CPU: the kernels in interpret mode)")
  p.add_argument("--qat-backend", default="xla", choices=("auto", "xla", "pallas"),
                 help="QatConfig.backend of the QAT steps (pallas: the fused fake-quantization kernel, per shard)")
  p.add_argument("--budget-s", type=float, default=360, help="start no new case after this many seconds")
  p.add_argument("--small", action="store_true", help="d=256, ffn=512, 2 pairs, M=1,16 / 128 (CPU smoke test)")
  p.add_argument("--commit", default="", help="record this commit instead of asking git")
  p.add_argument("--out", help="directory for multi_gpu.md and multi_gpu.json")
  a = p.parse_args(argv)
  if a.small:
    a.d, a.ffn, a.pairs, a.decode_m, a.prefill_m, a.qat_tokens = 256, 512, 2, [1, 16], [128], 256
    a.samples, a.qat_steps, a.target_s = 2, 2, 0.02
  a.formats = [fj.get_format(f) for f in a.formats.split(",") if f]
  a.layout = None if a.layout == "logical" else a.layout
  a.qat_modes = [m for m in a.qat_modes.split(",") if m]
  for mode in a.qat_modes:
    if mode not in qat_step.MODES:
      raise ValueError(f"unknown QAT mode {mode!r}; expected some of {sorted(qat_step.MODES)}")
  a.devices = 2
  devs = jax.devices()
  if len(devs) < 2:
    raise SystemExit(f"need 2 devices, found {len(devs)}: {devs}")
  if a.ffn % 64 or a.qat_tokens % 64:
    raise SystemExit(f"ffn={a.ffn} and --qat-tokens={a.qat_tokens} must split into whole 32-blocks over 2 devices")
  # One mesh axis for every layout: "tp" splits the weights (TP) or the batch (DP).
  meshes = {n: Mesh(np.array(devs[:n]), ("tp",), axis_types=(AxisType.Auto,)) for n in (1, 2)}
  run = Run(a)
  log(f"{run.data['meta']['device_kind']} x{len(devs)}, jax {jax.__version__}, commit {run.data['meta']['commit']}")

  pallas = "pallas" in (a.backend, a.qat_backend)
  ctx = fj.kernels.interpret_mode() if pallas and devs[0].platform == "cpu" else contextlib.nullcontext()
  # Order: what the goals need first, so a budget stop loses the least.
  with ctx:
    interconnect_section(run, meshes)
    for i, fmt in enumerate(a.formats):
      if run.over_budget(f"TP {fmt.name}"):
        continue
      try:
        params = tp_section(run, meshes, fmt)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory placing the weights
        run.check(f"TP {fmt.name} ran", False, f"{type(e).__name__}: {str(e)[:600]}")
        params = None
      if i == 0:
        run.guarded("NVFP4 amax", amax_section, run, meshes)
        if params is not None:
          run.guarded("orbax", orbax_section, run, meshes, params)
      del params
      if i < len(a.qat_modes) and not run.over_budget(f"QAT {a.qat_modes[i]}"):
        qat_section(run, meshes, a.qat_modes[i])
    for mode in a.qat_modes[len(a.formats):]:
      if not run.over_budget(f"QAT {mode}"):
        qat_section(run, meshes, mode)
  run.write()
  print(render(run.data))
  fails = [x["name"] for x in run.data["checks"] if not x["ok"]]
  if fails:
    log(f"{len(fails)} check(s) failed:\n  " + "\n  ".join(fails))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
