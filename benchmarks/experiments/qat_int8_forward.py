"""What the int8 path would buy the MXFP4 QAT step (issue 15): forward GEMMs on the int8 tensor cores.

`benchmarks/qat_step.py`'s SwiGLU step (d=4096, ffn=14336, 8192 tokens, 7 GEMMs) with `QatConfig.uniform(MXFP4)`
fake-quantizes each forward operand to bfloat16 and runs a bf16 GEMM. An MXFP4 x MXFP4 forward product can instead
run on the int8 path (`fj.scaled_dot_general` of two MXFP4 QArrays: exact int32 sums, 1.5-1.9x the bf16 dot at these
sizes) when no row spans more binades than int8 holds; `benchmarks/results/qat_int8_residual.json` counted the
step's operands: the gate/up products' x and W1/W3 never do, the down product's h does in 79% of rows (so its
product would take the two-pass fallback). Here the forward of the chosen products (`--int8 gate,up[,down]`) is
``scaled_dot_general(quantize(x, rows), quantize(W, rows))`` while the backward stays the library's (the VJP of
``quantized_dot_general``, whose residuals are the unquantized operands, so its own forward GEMM is dead code).
The forward values differ from the fake-quantized bf16 GEMM's only by float32 rounding (exact sum rounded once
against float32 accumulation), checked here on the block's output ``y`` (relative difference, bf16). The loss and the
gradients are reported too, but they are no test of the forward: the backward quantizes the output gradient to
MXFP4, and a last-bit change in ``y`` moves some elements (or a block's scale) across a rounding boundary of
E2M1's 3 bits, so the gradients differ by a few % (CPU smoke run, nearest rounding for the comparison) from any
reordering of the forward's float32 sums.

``library``: the same step with ``fp4jax.qat.dot.INT8_FORWARD`` on (the library's own wiring of this forward,
every MXFP4 product where the int8 path runs), which should time as ``gate+up+down``; ``library_backward``:
``INT8_BACKWARD`` (the backward's dlhs products: dx of gate and up, dh of down); ``library_both``: the two.
The gradients of the backward variants differ from the shipped step's by float32 rounding in the dlhs products
(exact int32 sums against bfloat16 GEMMs), which the next quantization can move by a rounding step
(``grad_rel`` then measures that, not an error).

  PYTHONPATH=. python3 benchmarks/experiments/qat_int8_forward.py --out DIR   # GPU
  PYTHONPATH=. python benchmarks/experiments/qat_int8_forward.py --tiny --out DIR   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qat_step  # noqa: E402  (benchmarks/qat_step.py: inputs, MM)

import fp4jax as fj  # noqa: E402
from fp4jax.qat import QatConfig, quantized_dot_general  # noqa: E402
from fp4jax.qat import dot as qdot  # noqa: E402

MM = qat_step.MM
PRODUCTS = ("gate", "up", "down")
#: Variants through the library's own switches: name, (qat.dot.INT8_FORWARD, qat.dot.INT8_BACKWARD).
LIBRARY = {"library": ("mxfp4, qat.dot.INT8_FORWARD", (True, False)),
           "library_backward": ("mxfp4, qat.dot.INT8_BACKWARD", (False, True)),
           "library_both": ("mxfp4, qat.dot.INT8_FORWARD + INT8_BACKWARD", (True, True))}


def int8_forward_dot(config):
  """``quantized_dot_general(a, b, MM, config, key)`` whose forward runs as an MXFP4 x MXFP4 product."""

  def product(a, b):
    qa = fj.quantize(a, fj.MXFP4, axis=-1, scale_rule=config.lhs.rule, layout="rows")
    qb = fj.quantize(b, fj.MXFP4, axis=0, scale_rule=config.rhs.rule, layout="rows")
    return fj.scaled_dot_general(qa, qb, MM, preferred_element_type=a.dtype)

  @jax.custom_vjp
  def dot(a, b, key):
    return product(a, b)

  def fwd(a, b, key):
    _, vjp = jax.vjp(lambda a, b: quantized_dot_general(a, b, MM, config=config, key=key), a, b)
    return product(a, b), vjp

  def bwd(vjp, g):
    return (*vjp(g), None)

  dot.defvjp(fwd, bwd)
  return dot


def make_forward(config, int8_products=(), dtype=jnp.bfloat16):
  """The block's output ``y(params, x, key)``, the chosen products' forwards on the int8 path."""
  fast = int8_forward_dot(config) if int8_products else None

  def dot(a, b, key, i):
    if config is None:
      return lax.dot_general(a, b, MM, preferred_element_type=dtype)
    key = jax.random.fold_in(key, i)
    if PRODUCTS[i] in int8_products:
      return fast(a, b, key)
    return quantized_dot_general(a, b, MM, config=config, key=key)

  def forward(params, x, key):
    w1, w3, w2 = (w.astype(dtype) for w in params)
    h = jax.nn.silu(dot(x, w1, key, 0)) * dot(x, w3, key, 1)
    return dot(h, w2, key, 2)

  return forward


def make_step(config, int8_products=(), lr=1e-3, dtype=jnp.bfloat16):
  forward = make_forward(config, int8_products, dtype)

  def loss(params, x, target, key):
    return jnp.mean(jnp.square(forward(params, x, key).astype(jnp.float32) - target))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, x, target, key):
    value, grads = jax.value_and_grad(loss)(params, x, target, key)
    return tuple(p - lr * g for p, g in zip(params, grads)), value, grads

  return step


def time_step(step, d, ffn, tokens, samples, steps):
  params, xs, ts = qat_step.inputs(d, ffn, tokens)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  out = step(params, xs[0], ts[0], key)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  params = out[0]
  for i in range(3):
    params = step(params, xs[i % 2], ts[i % 2], jax.random.fold_in(key, i + 1))[0]
  jax.block_until_ready(params)
  times, n = [], 4
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(steps):
      params, v, _ = step(params, xs[n % 2], ts[n % 2], jax.random.fold_in(key, n))
      n += 1
    jax.block_until_ready((params, v))
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times), compile_s


def first_step(config, products, d, ffn, tokens):
  """Output, loss and gradients of one step from the same start (weights are donated: fresh inputs)."""
  params, xs, ts = qat_step.inputs(d, ffn, tokens)
  y = jax.jit(make_forward(config, products))(params, xs[0], jax.random.key(1))
  _, v, grads = make_step(config, products)(params, xs[0], ts[0], jax.random.key(1))
  return y, float(v), grads


def rel(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--tiny", action="store_true", help="d=128, ffn=256, 256 tokens (CPU smoke run)")
  p.add_argument("--variants", default="gate+up,library,library_backward,library_both",
                 help="products whose forward takes the int8 path here (e.g. gate+up+down), or the library's "
                      "switches: " + ", ".join(LIBRARY))
  p.add_argument("--backend", default="pallas", help="QatConfig.backend of the fake quantization")
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args(argv)
  d, ffn, tokens = (128, 256, 256) if a.tiny else (4096, 14336, 8192)
  os.makedirs(a.out, exist_ok=True)
  cfg = dataclasses.replace(QatConfig.uniform(fj.MXFP4), backend=a.backend)
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": [d, ffn, tokens], "ms": {}, "vs_mxfp4": {}}
  variants = a.variants.split(",")
  runs = [("bf16", None, ()), ("mxfp4", cfg, ())] + [
      (f"mxfp4, int8 forward: {v}", cfg, tuple(v.split("+"))) for v in variants if v not in LIBRARY]
  runs += [(LIBRARY[v][0], cfg, v) for v in variants if v in LIBRARY]
  ref = None
  switches = qdot.INT8_FORWARD, qdot.INT8_BACKWARD
  try:
    with fj.kernels.interpret_mode(not fj.kernels.on_gpu()):
      for name, c, products in runs:
        library = products in LIBRARY
        qdot.INT8_FORWARD, qdot.INT8_BACKWARD = LIBRARY[products][1] if library else (False, False)
        step = make_step(c, () if library else products)
        med, comp = time_step(step, d, ffn, tokens, a.samples, a.steps)
        res["ms"][name] = med * 1e3
        if c is not None:
          nearest = dataclasses.replace(c, grad=dataclasses.replace(c.grad, rounding="nearest"))
          y, loss, grads = first_step(nearest, () if library else products, d, ffn, tokens)
          if not products:
            ref = (y, loss, grads)
          else:
            res["vs_mxfp4"][name] = {"y_rel": rel(y, ref[0]), "loss_rel": abs(loss - ref[1]) / abs(ref[1]),
                                     "grad_rel": [rel(g, r) for g, r in zip(grads, ref[2])]}
        print(name, f"{med * 1e3:.2f} ms", f"x bf16 {med * 1e3 / res['ms']['bf16']:.3f}", f"compile {comp:.1f} s",
              res["vs_mxfp4"].get(name, ""), flush=True)
        with open(os.path.join(a.out, "qat_int8_forward.json"), "w") as f:
          json.dump(res, f, indent=1)
  finally:
    qdot.INT8_FORWARD, qdot.INT8_BACKWARD = switches
  return 0


if __name__ == "__main__":
  sys.exit(main())
