"""MXFP4 x MXFP4 through ``fj.scaled_matmul`` (the int8 path, issue 15) against XLA's bf16 dot.

On the GPU machine::

  PYTHONPATH=. python3 benchmarks/w4a4.py --out DIR [--shapes 8192x8192x8192,...]

Per shape ``M x K x N``, in one process (``benchmarks/matmul.py``'s method: one jitted dispatch of many
calls on distinct inputs rotating beyond the L2, median of 5 samples):

* ``bf16``: ``jnp.dot(x, w)``, x ``(M, K)`` and w ``(K, N)`` bfloat16 normal data (what a user runs
  today);
* ``qdense_w4a4``: ``fp4jax.flax.QDense.apply`` on bfloat16 ``x`` with ``w`` as its kernel and a config
  that quantizes the activations to MXFP4 (what a W4A4 model runs: quantize, then the int8 path);
* ``int8``: ``fj.scaled_matmul(a, w)``, a an MXFP4 QArray ``(M, K)`` (blocked along K), w an MXFP4
  QArray ``(K, N)`` stored ``layout="rows"`` (as ``quantize_params`` stores weights), bfloat16 out:
  ``backend="auto"``, which takes the int8 path above ``KERNEL_MAX_ROWS["mx"]`` rows; ``int8_a_rows``
  the same with ``a`` stored ``"rows"`` too;
* ``two_pass``: the bfloat16 two-pass path on the same operands (the previous default);
* parts of the int8 path: re-basing each operand (the Pallas pass; ``rebase_w_xla_ops`` XLA's ops), the
  weight's residual flags (since 777272f the re-basing pass's own, so the same pass), XLA's int8 GEMM
  alone, the finish pass alone, the Mosaic GPU GEMM with the finish as epilogue alone (``fused_gemm_alone``, on Hopper), and all steps without the
  ``lax.cond`` (to price the residual test) with XLA's GEMM + finish (``int8_no_cond``) or the fused
  kernel (``int8_no_cond_fused``);
* ``kernel_equals_xla_ops``: the Pallas pass's codes and flags against XLA's ops' on both operands (runs
  before 2026-11-30's ninth session compared a word pass with a byte pass: ``words_equal_bytes``);
* ``fallback``: ``scaled_matmul`` on heavy-tailed activations (Student t, 3 degrees of freedom), whose
  rows span more binades than the int8 values hold, so the cond takes the two-pass path.

Earlier runs also timed the bf16 dot with w stored ``(N, K)`` and on the quantized operands' values
(``w4a4/*.json`` before this commit).

``--stored`` times instead the weight stored with its int8 codes (``fj.int8_weight``, with the ``"cond"``
and the ``"tiles"`` fallback) against the ``"rows"`` QArray (see ``stored_case``).

``--check`` compares the int8 path's float32 output with the exact product rounded to float32 (float64
on the host), bit for bit, at a small shape, and the fallback against the reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matmul as mb  # noqa: E402  (benchmarks/matmul.py: bench, n_sets)

import fp4jax as fj  # noqa: E402
from fp4jax.flax import QDense  # noqa: E402
from fp4jax.qat import OperandConfig, QatConfig  # noqa: E402
from fp4jax import int8_matmul  # noqa: E402
from fp4jax.kernels import int8_gemm, int8_rebase  # noqa: E402
from fp4jax.prepared import byte_matrix  # noqa: E402

SHAPES = "8192x8192x8192,4096x4096x14336,1024x8192x8192,4096x14336x4096,256x8192x8192"
DN = (((1,), (1,)), ((), ()))


def operands(m, k, n, sets, heavy=False):
  keys = jax.random.split(jax.random.key(7), 2 * sets)
  draw = (lambda key, shape: jax.random.t(key, 3.0, shape, jnp.float32)) if heavy else \
         (lambda key, shape: jax.random.normal(key, shape, jnp.float32))
  quant_a = jax.jit(lambda key: fj.quantize(draw(key, (m, k)), fj.MXFP4, axis=-1))
  quant_w = jax.jit(lambda key: fj.quantize(jax.random.normal(key, (k, n), jnp.float32), fj.MXFP4, axis=0,
                                            layout="rows"))
  return [quant_a(keys[i]) for i in range(sets)], [quant_w(keys[sets + i]) for i in range(sets)]


INTERPRET = jax.default_backend() == "cpu"  # the CPU smoke run interprets the kernels
FUSED = int8_gemm.on_hopper()  # the Mosaic GPU GEMM + finish (fp4jax.kernels.int8_gemm) runs here


def rebase(q, kernel=True):
  """(codes, row exponent, NaN rows) of an MXFP4 QArray, as the int8 path makes them (``kernel``: the
  Pallas pass, else XLA's ops)."""
  codes, base, nan, _ = int8_matmul.rebased(*byte_matrix(q), kernels=kernel, interpret=INTERPRET)
  return codes, int8_matmul.row_exponent(base), nan


def residual(q):
  return int8_matmul.rebased(*byte_matrix(q), kernels=True, interpret=INTERPRET)[3]


def kernel_equals_xla_ops(q):
  """Whether the Pallas re-basing pass gives XLA's ops' codes and residual flags for ``q``."""
  data, scales = byte_matrix(q)
  base = int8_matmul.row_bases(scales)[0]
  mine = int8_matmul.rows_codes(data, scales, base, kernel=True, interpret=INTERPRET)
  theirs = int8_matmul.rebase_codes(data, scales, base)
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(mine, theirs))


def finish_alone(sums, tiles=None):
  """The finish pass on int32 sums with zero exponents and no NaN rows or columns."""
  (m, n), zero, clear = sums.shape, lambda r: jnp.zeros((r,), jnp.int32), lambda r: jnp.zeros((r,), bool)
  return int8_rebase.finish(sums, zero(m), zero(n), clear(m), clear(n), out_dtype=jnp.bfloat16, tiles=tiles,
                            interpret=INTERPRET)


def no_cond(a, w, fused=False):
  """The int8 path's steps without the residual test and cond (valid only when there is no residual):
  XLA's int8 GEMM and the finish pass, or (``fused``) the Mosaic GPU GEMM with the finish as its epilogue."""
  (ca, ea, na), (cb, eb, nb) = rebase(a), rebase(w)
  if fused:
    return int8_gemm.scaled_gemm(ca, cb, ea, eb, na, nb, out_dtype=jnp.bfloat16)
  s = lax.dot_general(ca, cb, DN, preferred_element_type=jnp.int32)
  return int8_rebase.finish(s, ea, eb, na, nb, out_dtype=jnp.bfloat16, interpret=INTERPRET)


def baseline(m, k, n):
  """``(sets, aq, wq, xb, t)`` for a shape: the number of operand sets, the MXFP4 activations and ``"rows"``
  weights, bfloat16 normal activations, and ``t`` holding the bf16 dot's time on bf16 normal data."""
  sets = mb.n_sets(m * k * 2 + k * n * 2, cap=8)
  aq, wq = operands(m, k, n, sets)
  keys = jax.random.split(jax.random.key(3), 2 * sets)
  xb = [jax.random.normal(keys[i], (m, k), jnp.bfloat16) for i in range(sets)]
  wb = [jax.random.normal(keys[sets + i], (k, n), jnp.bfloat16) for i in range(sets)]
  return sets, aq, wq, xb, {"bf16": mb.bench(lambda x, w: jnp.dot(x, w), mb.make_calls(xb, wb))}


def w4a4_qdense(n):
  """The W4A4 layer: a QDense that quantizes its activations to MXFP4 per call (its kernel stored)."""
  return QDense(n, use_bias=False, dtype=jnp.bfloat16, preferred_element_type=jnp.bfloat16,
                config=QatConfig(lhs=OperandConfig(fj.MXFP4), rhs=OperandConfig(None), grad=OperandConfig(None)))


def result_row(m, k, n, sets, t, **extra):
  """A shape's JSON row: the times ``t`` in us, ``extra``, and each time's ratio to the bf16 dot's."""
  return {"m": m, "k": k, "n": n, "sets": sets, "us": {name: v * 1e6 for name, v in t.items()}, **extra,
          "x_bf16": {name: t["bf16"] / v for name, v in t.items()}}


def case(m, k, n):
  sets, aq, wq, xb, t = baseline(m, k, n)
  calls = mb.make_calls(aq, wq)
  # What a W4A4 model runs: a QDense whose kernel quantize_params stored, activations quantized per call.
  layer = w4a4_qdense(n)
  t["qdense_w4a4"] = mb.bench(lambda x, w: layer.apply({"params": {"kernel": w}}, x), mb.make_calls(xb, wq))
  del xb
  dims = (((1,), (0,)), ((), ()))
  t["int8"] = mb.bench(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16), calls)
  # Activations stored as byte rows too (quantize(..., layout="rows")): no per-call packing of the codes.
  rows_calls = [(a.with_layout("rows"), w) for a, w in calls]
  t["int8_a_rows"] = mb.bench(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16), rows_calls)
  del rows_calls
  t["two_pass"] = mb.bench(lambda a, w: fj.matmul.run_two_pass("mx", a, w, dims, jnp.bfloat16), calls)
  t["rebase_a"] = mb.bench(lambda a, w: rebase(a), calls)
  t["rebase_w"] = mb.bench(lambda a, w: rebase(w), calls)
  t["residual_check_w"] = mb.bench(lambda a, w: residual(w), calls)
  # The Pallas pass (PTX byte permute) against XLA's ops, bits and time.
  kernel_ok = kernel_equals_xla_ops(aq[0]) and kernel_equals_xla_ops(wq[0])
  t["rebase_w_xla_ops"] = mb.bench(lambda a, w: rebase(w, kernel=False), calls)
  codes = [(rebase(a)[0], rebase(w)[0]) for a, w in calls]
  t["int8_gemm_alone"] = mb.bench(lambda x, y: lax.dot_general(x, y, DN, preferred_element_type=jnp.int32), codes)
  if FUSED:
    zeros = lambda r: jnp.zeros((r,), jnp.int32)
    t["fused_gemm_alone"] = mb.bench(lambda x, y: int8_gemm.scaled_gemm(
        x, y, zeros(m), zeros(n), zeros(m) != 0, zeros(n) != 0, out_dtype=jnp.bfloat16), codes)
  sums = [lax.dot_general(x, y, DN, preferred_element_type=jnp.int32) for x, y in codes[:2]]
  t["finish_alone"] = mb.bench(finish_alone, [(x,) for x in sums])
  del codes, sums
  t["int8_no_cond"] = mb.bench(no_cond, calls)
  if FUSED:
    t["int8_no_cond_fused"] = mb.bench(functools.partial(no_cond, fused=True), calls)
  has_residual = bool(jnp.any(residual(aq[0])))
  ah, _ = operands(m, k, n, sets, heavy=True)
  t["fallback_heavy_tails"] = mb.bench(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16),
                                       mb.make_calls(ah, wq))
  return result_row(m, k, n, sets, t, normal_data_has_residual=has_residual, kernel_equals_xla_ops=kernel_ok)


def stored_case(m, k, n):
  """The weight stored with its int8 codes (``fj.int8_weight``, both fallbacks) against the ``"rows"``
  QArray (the cond); normal activations (no residual) and heavy-tailed ones (t(3): most rows fall back).
  Bits: the stored weight's outputs against the QArray's, and the ``"tiles"`` fallback's against the
  cond's on the heavy tails (max relative difference)."""
  sets, aq, wq, xb, t = baseline(m, k, n)
  del xb
  ah, _ = operands(m, k, n, sets, heavy=True)
  weights = {"": wq, "_int8_weight_cond": [fj.int8_weight(w, "cond") for w in wq],
             "_int8_weight_tiles": [fj.int8_weight(w, "tiles") for w in wq]}
  product = lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16)
  outs = {}
  for data, a_list in (("a_rows", aq), ("heavy_tails", ah)):
    for suffix, w_list in weights.items():
      calls = [(a.with_layout("rows"), w) for a, w in mb.make_calls(a_list, w_list)]
      t[data + suffix] = mb.bench(product, calls)
      outs[data + suffix] = np.asarray(jax.jit(product)(*calls[0]), np.float32)
  same = lambda x, y: bool(np.array_equal(x, y, equal_nan=True))
  heavy_rel = float(np.max(np.abs(outs["heavy_tails_int8_weight_tiles"] - outs["heavy_tails"])
                           / np.maximum(np.abs(outs["heavy_tails"]), 1e-30)))
  bits = {"int8_weight_equals_qarray": all(same(outs["a_rows" + s], outs["a_rows"]) for s in weights)
          and same(outs["heavy_tails_int8_weight_cond"], outs["heavy_tails"]),
          "tiles_vs_cond_heavy_max_rel": heavy_rel,
          "heavy_rows_residual": float(jnp.mean(residual(ah[0])))}
  return result_row(m, k, n, sets, t, bits=bits)


def layer_case(m, k, n):
  """The W4A4 layer with the activations quantized to byte rows first, or straight into the int8 codes
  (``matmul.FUSED_ACTIVATION_QUANTIZE``), beside the bf16 dot, the product on stored rows, and the two
  quantize passes alone; plus the fused path's output bits against the byte-rows path's."""
  sets, aq, wq, xb, t = baseline(m, k, n)
  layer = w4a4_qdense(n)
  apply = lambda x, w: layer.apply({"params": {"kernel": w}}, x)
  t["qdense_w4a4"] = mb.bench(apply, mb.make_calls(xb, wq))
  before = np.asarray(jax.jit(apply)(xb[0], wq[0]), np.float32)
  fj.matmul.FUSED_ACTIVATION_QUANTIZE = True
  try:
    t["qdense_w4a4_fused"] = mb.bench(apply, mb.make_calls(xb, wq))
    fused_equal = bool(np.array_equal(np.asarray(jax.jit(apply)(xb[0], wq[0]), np.float32), before))
  finally:
    fj.matmul.FUSED_ACTIVATION_QUANTIZE = False
  rows_calls = [(a.with_layout("rows"), w) for a, w in mb.make_calls(aq, wq)]
  t["int8_a_rows"] = mb.bench(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.bfloat16), rows_calls)
  del rows_calls
  t["quantize_rows"] = mb.bench(lambda x: fj.quantize(x, fj.MXFP4, axis=-1, layout="rows"), [(x,) for x in xb])
  t["quantize_rows_and_rebase"] = mb.bench(
      lambda x: int8_matmul.rebased(*byte_matrix(fj.quantize(x, fj.MXFP4, axis=-1, layout="rows")), kernels=True,
                                    interpret=INTERPRET), [(x,) for x in xb])
  t["quantize_codes"] = mb.bench(lambda x: int8_matmul.activation_rows(x, kernels=True, interpret=INTERPRET),
                                 [(x,) for x in xb])
  return result_row(m, k, n, sets, t, fused_equals_rows_path=fused_equal)


REBASE_CANDIDATES = [(8, 256, 4), (4, 512, 4), (16, 256, 8), (8, 512, 8), (2, 1024, 4), (16, 128, 4), (32, 512, 4),
                     (8, 1024, 4), (16, 512, 4), (4, 2048, 8), (32, 256, 4)]
FINISH_CANDIDATES = [(16, 256, 4), (8, 512, 4), (32, 256, 8), (16, 512, 8), (4, 1024, 4), (32, 128, 4), (32, 512, 4)]


def sweep(size=8192):
  """Times the re-basing pass (an 8192 x 8192 weight) and the finish pass (8192 x 8192 sums) per tile
  candidate; makes the fastest of each the module default for the rest of the run."""
  aq, wq = operands(64, size, size, 4)
  mats = [byte_matrix(w) for w in wq]
  bases = [int8_matmul.row_bases(s)[0] for _, s in mats]
  out = {"rebase": {}, "finish": {}}
  for cand in REBASE_CANDIDATES:
    tiles = int8_rebase.Tiles(*cand)
    out["rebase"][str(cand)] = mb.bench(lambda d, s, b: int8_rebase.rebase(d, s, b, tiles=tiles, interpret=INTERPRET),
                                        [(d, s, b) for (d, s), b in zip(mats, bases)]) * 1e6
  sums = [jax.random.randint(jax.random.key(i), (size, size), -2**20, 2**20, jnp.int32) for i in range(2)]
  for cand in FINISH_CANDIDATES:
    tiles = int8_rebase.Tiles(*cand)
    out["finish"][str(cand)] = mb.bench(lambda s: finish_alone(s, tiles), [(x,) for x in sums]) * 1e6
  best_r = min(out["rebase"], key=out["rebase"].get)
  best_f = min(out["finish"], key=out["finish"].get)
  int8_rebase.REBASE_TILES = int8_rebase.Tiles(*eval(best_r))  # noqa: S307 (our own tuple repr)
  int8_rebase.FINISH_TILES = int8_rebase.Tiles(*eval(best_f))  # noqa: S307
  out["chosen"] = {"rebase": best_r, "finish": best_f}
  print(out, flush=True)
  return out


def check():
  """The int8 path's float32 output against the exact product rounded to float32, bit for bit."""
  out = []
  for heavy in (False, True):
    aq, wq = operands(256, 4096, 512, 1, heavy=heavy)
    got = np.asarray(jax.jit(lambda a, w: fj.scaled_matmul(a, w, preferred_element_type=jnp.float32))(aq[0], wq[0]))
    da = np.asarray(aq[0].dequantize(jnp.float32), np.float64)
    dw = np.asarray(fj.dequantize(wq[0].with_layout(None), jnp.float32), np.float64)
    exact = da @ dw
    bound = (4096 + 2) * 2.0**-24 * (np.abs(da) @ np.abs(dw))
    out.append({"heavy_tails": heavy, "bit_equal_to_rounded_exact": float(np.mean(got == exact.astype(np.float32))),
                "within_f32_bound": bool(np.all(np.abs(got - exact) <= bound)),
                "max_err_over_bound": float(np.max(np.abs(got - exact) / np.maximum(bound, 1e-300)))})
    print(out[-1], flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--shapes", default=SHAPES)
  p.add_argument("--check", action="store_true")
  p.add_argument("--sweep", action="store_true", help="tile sweep of the two passes first (sets the defaults)")
  p.add_argument("--budget-s", type=float, default=400)
  p.add_argument("--layer", action="store_true", help="only the W4A4 layer with and without the fused quantize")
  p.add_argument("--stored", action="store_true",
                 help="only the stored int8 weight (both fallbacks) against the rows QArray")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  t0 = time.time()
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}
  path = os.path.join(a.out, "w4a4.json")
  if a.sweep:
    res["sweep"] = sweep(8192 if not INTERPRET else 256)
  if a.check:
    res["check"] = check()
  for shape in a.shapes.split(","):
    if time.time() - t0 > a.budget_s:
      print("budget reached", flush=True)
      break
    m, k, n = map(int, shape.split("x"))
    run = layer_case if a.layer else stored_case if a.stored else case
    res["rows"].append(run(m, k, n))
    print(json.dumps(res["rows"][-1]), flush=True)
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
  with open(path, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
