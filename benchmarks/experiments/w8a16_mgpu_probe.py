"""Issue 11, prefill: can a Mosaic GPU mixed-input GEMM beat XLA's bf16 dot on the H200 at all?

The prefill goal (M >= 1024: at least the bf16 dot's speed) cannot be met by dequantizing first: the
dequantize pass alone costs what the goal leaves over. It needs a GEMM that widens the weight inside
the kernel at cuBLAS-class speed. jax ships one, for int8 weights: the warp-specialised, TMA-fed
`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu` (int8 LHS widened in registers,
wgmma with A from registers). Before writing an E2M1 variant of it, this probe times the example as
it is, as a W8A16 GEMM in the swap-AB orientation the weights need (``y.T = W.T @ x.T``: the weight
is the register operand), against XLA's bf16 dot of the same product in the same process.
An int8 weight has twice an MXFP4 weight's bytes and a cheaper widening, so at prefill, where the
GEMM is compute-bound, it bounds what an MXFP4 variant could reach. The transposed output (N, M) is
left transposed: a real kernel would store the tile transposed in its epilogue.

  PYTHONPATH=. python benchmarks/experiments/w8a16_mgpu_probe.py --lower     # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/w8a16_mgpu_probe.py --out DIR   # GPU: ~3 min
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import matmul as B  # noqa: E402  (benchmarks/matmul.py: the project's timing, inputs rotated beyond L2)

SHAPES = [(1024, 8192, 8192), (4096, 8192, 8192), (8192, 4096, 14336), (4096, 14336, 4096), (256, 8192, 8192)]


def example():
  from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm
  return mm


def configs(mm, m):
  """A few of the example's own sweep points; tile_n is the problem's M side (swap AB)."""
  dims = mm.MatmulDimension
  out = []
  for tile_m, tile_n, tile_k, wg, steps in ((128, 128, 64, dims.N, 4), (128, 128, 128, dims.N, 2),
                                            (128, 64, 128, dims.M, 4), (256, 64, 64, dims.N, 4),
                                            (128, 128, 64, dims.M, 4), (64, 128, 64, dims.N, 4)):
    if m % (tile_n * (1 + (wg == dims.N))):
      continue
    out.append(mm.TuningConfig(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps,
                               epi_tile_n=64, epi_tile_m=64, grid_minor_dim=dims.N, grid_tile_width=8,
                               wg_dimension=wg))
  return out


def run_kernel(mm, config, w_t, x_t):
  """``W.T @ x.T`` (N, M) in bf16: the example with the int8 weight as its register operand."""
  return mm.mixed_matmul_kernel(w_t, x_t, out_dtype=jnp.bfloat16, config=config)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lower", action="store_true", help="CPU: lower one config for CUDA")
  p.add_argument("--out", help="GPU: results in OUT/w8a16_mgpu_probe.json")
  p.add_argument("--budget-s", type=float, default=200, help="start no new shape after this many seconds")
  a = p.parse_args(argv)
  mm = example()
  if a.lower:
    m, k, n = 1024, 1024, 1024
    w_t = jnp.zeros((n, k), jnp.int8)
    x_t = jnp.zeros((k, m), jnp.bfloat16)
    # mixed_matmul_kernel asks the default device for its SM count, which a CPU device lacks.
    mm.backend = type("H200", (), {"get_default_device": staticmethod(
        lambda: type("Device", (), {"core_count": 132})())})
    for cfg in configs(mm, m):
      try:
        text = jax.jit(functools.partial(run_kernel, mm, cfg)).trace(w_t, x_t).lower(
            lowering_platforms=("cuda",)).as_text()
        print(f"lowered for CUDA: {cfg}: {len(text)} chars", flush=True)
      except ValueError as e:
        print(f"not lowered: {cfg}: {str(e)[:200]}", flush=True)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    t0, res = time.perf_counter(), {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    for m, k, n in SHAPES:
      if time.perf_counter() - t0 > a.budget_s:
        res[f"{m}x{k}x{n}"] = "skipped: budget"
        continue
      kw, kx = jax.random.split(jax.random.key(m + k + n))
      w_t = jax.random.randint(kw, (n, k), -128, 128, jnp.int8)
      x = jax.random.normal(kx, (m, k), jnp.bfloat16)
      ref = np.asarray(jnp.dot(w_t.astype(jnp.bfloat16), x.T, preferred_element_type=jnp.float32), np.float64)
      n_sets = B.n_sets(n * k)
      w_sets = [w_t] + [jax.random.randint(jax.random.key(9000 + i), (n, k), -128, 128, jnp.int8)
                        for i in range(1, n_sets)]
      row = {"weight_sets": n_sets}
      for cfg in configs(mm, m):
        name = (f"tm{cfg.tile_m}_tn{cfg.tile_n}_tk{cfg.tile_k}_wg{cfg.wg_dimension.name}"
                f"_s{cfg.max_concurrent_steps}")
        try:
          fn = jax.jit(functools.partial(run_kernel, mm, cfg))
          out = np.asarray(fn(w_t, x.T), np.float64)
          err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
          calls = [(w, x.T) for w in w_sets]
          us = B.bench(fn, calls) * 1e6
          row[name] = {"max_err_rel": err, "us": us, "tflops": 2 * m * k * n / us / 1e6}
        except Exception as e:  # noqa: BLE001 - record and go on (shared-memory limits, lowering gaps)
          row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"{m}x{k}x{n} {name}: {row[name]}", flush=True)
      # XLA's bf16 dot of the same product (x @ W, W bf16), and the two-pass W8A16 (widen, then dot).
      wb_sets = [w.T.astype(jnp.bfloat16) for w in w_sets]
      row["xla_bf16_us"] = B.bench(lambda x, w: x @ w, [(x, w) for w in wb_sets]) * 1e6
      row["xla_two_pass_us"] = B.bench(lambda x, w: x @ w.T.astype(jnp.bfloat16), [(x, w) for w in w_sets]) * 1e6
      del wb_sets
      print(f"{m}x{k}x{n}: bf16 {row['xla_bf16_us']:.1f} us, two-pass {row['xla_two_pass_us']:.1f} us", flush=True)
      res[f"{m}x{k}x{n}"] = row
      with open(os.path.join(a.out, "w8a16_mgpu_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
