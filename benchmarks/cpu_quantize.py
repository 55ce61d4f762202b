"""Wall time of jitted quantize + dequantize of a float32 matrix, every format and rule.

Run: ``JAX_PLATFORMS=cpu python benchmarks/cpu_quantize.py [--n 4096] [--reps 3]``.
Prints one line per (format, rule): compile+first-run seconds, and the best
warm wall time and process CPU time of ``--reps`` runs (each blocks until the
dequantized array is ready). On a shared machine the CPU time is the steadier
number: other processes stretch wall time, not this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import fp4jax as fj


def _rules(fmt):
  if fmt.power_of_two_scales:
    return ("floor", "ceil", "mse")
  return ("floor", "ceil", "nearest", "mse")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--n", type=int, default=4096, help="matrix is n x n float32")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--formats", default=",".join(fj.FORMATS))
  args = p.parse_args(argv)

  x = jax.random.normal(jax.random.key(0), (args.n, args.n), jnp.float32)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, x: {x.shape} float32")
  print(f"{'format':<12} {'rule':<8} {'compile+1st s':>14} {'warm s':>8} {'cpu s':>8}")
  for name in args.formats.split(","):
    fmt = fj.get_format(name)
    for rule in _rules(fmt):
      step = jax.jit(lambda x, fmt=fmt, rule=rule: fj.dequantize(fj.quantize(x, fmt, scale_rule=rule, backend="xla"), backend="xla"))
      t0 = time.perf_counter()
      step(x).block_until_ready()
      first = time.perf_counter() - t0
      warm, cpu = [], []
      for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x).block_until_ready()
        warm.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
      print(f"{fmt.name:<12} {rule:<8} {first:>14.2f} {min(warm):>8.3f} {min(cpu):>8.3f}", flush=True)


if __name__ == "__main__":
  main()
