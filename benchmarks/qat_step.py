"""Train-step time of a SwiGLU MLP block: bf16 vs MXFP8 / MXFP4 / NVFP4 QAT.

The block is ``y = (silu(x W1) * (x W3)) W2`` with ``x (tokens, d)``,
``W1, W3 (d, ffn)``, ``W2 (ffn, d)``; one step is forward, backward and an SGD
update of float32 master weights, all in one ``jax.jit`` (weights donated).
By default the step differentiates the weights only, as for the first block
of a network: 7 GEMMs (3 forward, 3 weight gradients, 1 data gradient through
W2); ``--input-grad`` also returns ``dx`` (9 GEMMs), as for a middle block.
The bf16 step uses ``lax.dot_general`` on bf16 operands; a QAT step routes all
three products through :func:`fp4jax.qat.quantized_dot_general` with
``QatConfig.uniform(fmt)``: quantized forward operands, and both backward GEMMs
quantizing the output gradient (stochastic rounding) and re-quantizing the
other operand along their own contracting axis.

Timing: compile and 3 warm-up steps, then ``--samples`` samples of
``--steps`` back-to-back steps each (over 2 alternating input batches), a
device sync at the end of each sample; the table reports the median per-step
time. Usage::

  python benchmarks/qat_step.py                 # d=4096, ffn=14336, 8192 tokens (GPU)
  python benchmarks/qat_step.py --tiny          # CPU smoke test
  python benchmarks/qat_step.py --modes bf16,mxfp4 --backends xla,pallas   # + the fused fake-quant kernel
  python benchmarks/qat_step.py --out benchmarks/results/qat_step.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

import fp4jax as fj
from fp4jax.qat import QatConfig, quantized_dot_general

MM = (((1,), (0,)), ((), ()))

MODES = {
    "bf16": None,
    "mxfp8": lambda: QatConfig.uniform(fj.MXFP8_E4M3),
    "mxfp4": lambda: QatConfig.uniform(fj.MXFP4),
    "nvfp4": lambda: QatConfig.uniform(fj.NVFP4),
    "nvfp4+rht16": lambda: QatConfig.uniform(fj.NVFP4, hadamard=16),
    "mxfp4-fwd-only": lambda: QatConfig.uniform(fj.MXFP4, backward=False),
    # What stochastic rounding costs (one threefry hash per gradient element): the same steps rounding the
    # gradient to nearest.
    "mxfp4-grad-nearest": lambda: QatConfig.uniform(fj.MXFP4, grad_rounding="nearest"),
    "nvfp4-grad-nearest": lambda: QatConfig.uniform(fj.NVFP4, grad_rounding="nearest"),
    "mxfp8-grad-nearest": lambda: QatConfig.uniform(fj.MXFP8_E4M3, grad_rounding="nearest"),
}


def make_loss(config, dtype=jnp.bfloat16):
  """``loss(params, x, target, key)`` of the block, its GEMMs on ``dtype`` operands.

  ``params = (w1, w3, w2)`` (float32 masters, cast to ``dtype``); benchmarks/multi_gpu.py also
  runs it in float32, to compare gradients across device counts.
  """
  def dot(a, b, key, i):
    if config is None:
      return lax.dot_general(a, b, MM, preferred_element_type=dtype)
    return quantized_dot_general(a, b, MM, config=config, key=jax.random.fold_in(key, i))

  def loss(params, x, target, key):
    w1, w3, w2 = (w.astype(dtype) for w in params)
    h = jax.nn.silu(dot(x, w1, key, 0)) * dot(x, w3, key, 1)
    y = dot(h, w2, key, 2)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - target))

  return loss


def make_step(config, input_grad=False, lr=1e-3):
  loss = make_loss(config)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, x, target, key):
    if input_grad:
      value, (grads, dx) = jax.value_and_grad(loss, (0, 1))(params, x, target, key)
      value = value + 0 * jnp.sum(dx[0]).astype(jnp.float32)  # keep dx live
    else:
      value, grads = jax.value_and_grad(loss)(params, x, target, key)
    return tuple(p - lr * g for p, g in zip(params, grads)), value

  return step


def inputs(d, ffn, tokens):
  """float32 master weights ``(w1, w3, w2)``, two bf16 batches and two float32 targets."""
  k = jax.random.split(jax.random.key(0), 8)
  params = (jax.random.normal(k[0], (d, ffn)) * d**-0.5, jax.random.normal(k[1], (d, ffn)) * d**-0.5,
            jax.random.normal(k[2], (ffn, d)) * ffn**-0.5)
  xs = [jax.random.normal(k[3 + i], (tokens, d), jnp.bfloat16) for i in range(2)]
  ts = [jax.random.normal(k[5 + i], (tokens, d), jnp.float32) for i in range(2)]
  return params, xs, ts


def config_of(mode, backend="xla"):
  """``mode``'s QatConfig with ``backend`` (None for bf16)."""
  config = MODES[mode]() if MODES[mode] else None
  return None if config is None else dataclasses.replace(config, backend=backend)


def bench(mode, d, ffn, tokens, samples, steps, prng, input_grad, backend="xla"):
  """(median, min, max) seconds a step, compile seconds, last loss; ``backend``: QatConfig.backend."""
  params, xs, ts = inputs(d, ffn, tokens)
  step = make_step(config_of(mode, backend), input_grad)
  key = jax.random.key(1, impl=prng)

  t0 = time.perf_counter()
  params, v = step(params, xs[0], ts[0], jax.random.fold_in(key, 0))
  jax.block_until_ready(v)
  compile_s = time.perf_counter() - t0
  for i in range(3):
    params, v = step(params, xs[i % 2], ts[i % 2], jax.random.fold_in(key, i + 1))
  jax.block_until_ready((params, v))
  times = []
  n = 4
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(steps):
      params, v = step(params, xs[n % 2], ts[n % 2], jax.random.fold_in(key, n))
      n += 1
    jax.block_until_ready((params, v))
    times.append((time.perf_counter() - t0) / steps)
  if not bool(jnp.isfinite(v)):
    raise RuntimeError(f"{mode}: non-finite loss {v}")
  return statistics.median(times), min(times), max(times), compile_s, float(v)


def rounds(modes, repeats, small, wrap=None, samples_steps=(3, 4), on_row=None):
  """The experiments' comparison in one process: ``repeats`` rounds of each of ``modes`` (a mode of
  :func:`config_of`, ``bf16`` on XLA, the others with backend "pallas"; ``"<mode>_<label>"`` runs the mode with
  ``wrap(name, bench)`` in place of :func:`bench`, a variant patched in), fresh traces for each.

  Returns ``{f"{name}_{rep}": {ms, min_ms, max_ms, loss}, f"ratios_{rep}": {name: ms / that round's bf16 ms}}``
  (``modes`` holds ``"bf16"``); ``on_row(out)`` after each step. ``small``: CPU shapes, interpret mode."""
  d, ffn, tokens = (128, 256, 256) if small else (4096, 14336, 8192)
  samples, steps = (2, 2) if small else samples_steps
  out = {}
  for rep in range(repeats):
    for name in modes:
      run = wrap(name, bench) if wrap else bench
      jax.clear_caches()  # a patched variant is not part of any jit cache key
      with fj.kernels.interpret_mode(small):
        med, lo, hi, _, loss = run(name.split("_")[0], d, ffn, tokens, samples, steps, "threefry2x32", False,
                                   "xla" if name == "bf16" else "pallas")
      out[f"{name}_{rep}"] = {"ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3, "loss": loss}
      print(name, rep, json.dumps(out[f"{name}_{rep}"]), flush=True)
      if on_row:
        on_row(out)
  for rep in range(repeats):
    bf = out[f"bf16_{rep}"]["ms"]
    out[f"ratios_{rep}"] = {n: out[f"{n}_{rep}"]["ms"] / bf for n in modes if n != "bf16"}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--tiny", action="store_true", help="d=128, ffn=256, 256 tokens (CPU smoke test)")
  p.add_argument("--modes", default="bf16,mxfp8,mxfp4,nvfp4,nvfp4+rht16")
  p.add_argument("--samples", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="back-to-back steps per sample")
  p.add_argument("--prng", default="threefry2x32", help="PRNG impl for stochastic rounding")
  p.add_argument("--input-grad", action="store_true", help="also compute dx (9 GEMMs instead of 7)")
  p.add_argument("--backends", default="xla",
                 help="QatConfig.backend values, each a row per QAT mode (pallas without a GPU: interpret mode)")
  p.add_argument("--out", help="write the markdown table here")
  a = p.parse_args(argv)
  if a.tiny:
    a.d, a.ffn, a.tokens = 128, 256, 256
  modes = a.modes.split(",")
  for m in modes:
    if m not in MODES:
      raise ValueError(f"unknown mode {m!r}; expected some of {sorted(MODES)}")

  gemms = 9 if a.input_grad else 7
  flops = gemms * 2 * a.tokens * a.d * a.ffn
  dev = jax.devices()[0]
  lines = [f"SwiGLU MLP train step, d={a.d}, ffn={a.ffn}, tokens={a.tokens}; {dev.device_kind} "
           f"({jax.default_backend()}), jax {jax.__version__}; {gemms} GEMMs a step; PRNG {a.prng}; "
           f"median of {a.samples} samples x {a.steps} back-to-back steps.", "",
           "| mode | step ms (median) | min..max ms | x bf16 | GEMM TFLOP/s equiv. | compile s |",
           "|---|---|---|---|---|---|"]
  base = None
  backends = a.backends.split(",")
  for b in backends:
    fj.backend.check_backend(b)
  runs = [(m, b) for m in modes for b in (backends if MODES[m] else ["xla"])]
  for m, b in runs:
    with fj.kernels.interpret_mode(not fj.kernels.on_gpu()):
      med, lo, hi, comp, _ = bench(m, a.d, a.ffn, a.tokens, a.samples, a.steps, a.prng, a.input_grad, b)
    base = med if m == "bf16" else base
    ratio = f"{med / base:.2f}" if base else "-"
    label = m if b == "xla" else f"{m}, backend={b}"
    lines.append(f"| {label} | {med * 1e3:.2f} | {lo * 1e3:.2f}..{hi * 1e3:.2f} | {ratio} | "
                 f"{flops / med / 1e12:.0f} | {comp:.1f} |")
    print(lines[-1], flush=True)
    if a.out:  # after every mode, so a run cut short keeps what it measured
      with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
