"""The int8 path's GEMM and finish pass as one Pallas Mosaic GPU kernel (issue 15).

Today (``fp4jax/int8_matmul.py``) the int8 product is XLA's s8 x s8 -> s32 dot (cuBLASLt) followed by a
finish pass that reads the int32 sums back and writes ``S * 2**(ea + eb)`` as bfloat16: at 8192^3 the
GEMM is 713-738 us and the finish 114 us (256 MB of int32 written and read again). Here the finish is
the GEMM's epilogue: a persistent, warp-specialised kernel (a TMA producer warpgroup, two wgmma
consumer warpgroups, int32 accumulators in registers) whose epilogue converts each accumulator tile to
float32, multiplies it by ``2**(ea[row] + eb[col])`` exactly as ``matmul_common.int8_finish`` does (two
normal power-of-two factors, the exponent clamped at -200), writes NaN where a row or column has a NaN
block, and stores bfloat16 through shared memory with TMA.

Operands as the int8 path has them: ``a (M, K)`` and ``b (N, K)`` int8, both K-major (what 8-bit wgmma
needs); ``ea (M,)``, ``eb (N,)`` int32 row exponents with NaN rows folded in (``NAN_EXPONENT``).

  PYTHONPATH=. python benchmarks/experiments/int8_gemm_mgpu.py --lower     # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/int8_gemm_mgpu.py --out DIR   # GPU: bits vs XLA, timings
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4jax.kernels.matmul_common import int8_finish

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matmul as B  # noqa: E402  (benchmarks/matmul.py: bench, n_sets)

#: A row exponent that marks a NaN row: any sum with it is far above every finite ``ea + eb`` (<= 246).
NAN_EXPONENT = 1 << 20
_F32_BIAS = 127


@dataclasses.dataclass(frozen=True)
class Config:
  tile_m: int = 128  # rows of one consumer warpgroup's accumulator
  tile_n: int = 128  # columns of one consumer warpgroup's accumulator
  tile_k: int = 128  # 128 int8 = one 128-byte swizzle row
  stages: int = 4
  wg_along_n: bool = True  # the two consumer warpgroups split the CTA tile along N (else M)
  epi: int = 64  # epilogue tile (epi x epi) through shared memory
  grid_minor_n: bool = True
  grid_tile_width: int = 8


def _pow2(e):
  """float32 2**e for int32 ``e`` in [-126, 127], from the bits (``_bits.exp2i``)."""
  return lax.bitcast_convert_type((e + _F32_BIAS) << 23, jnp.float32)


def _finish_tile(acc, ea, eb, out_dtype):
  """``int8_finish`` on an accumulator tile: ``acc * 2**max(ea + eb, -200)`` rounded once, NaN rows/columns."""
  e_raw = lax.broadcast_in_dim(ea, acc.shape, (0,)) + lax.broadcast_in_dim(eb, acc.shape, (1,))
  e = jnp.maximum(e_raw, -200)
  half = e >> 1
  y = acc.astype(jnp.float32) * _pow2(half) * _pow2(e - half)
  return jnp.where(e_raw >= NAN_EXPONENT // 2, jnp.float32(jnp.nan), y).astype(out_dtype)


def _num_sms():
  return jax.devices()[0].core_count if jax.default_backend() == "gpu" else 132


def int8_scaled_gemm(a, b, ea, eb, *, out_dtype=jnp.bfloat16, config: Config = Config()):
  """``where(nan, NaN, (a @ b.T) * 2**(ea[:, None] + eb[None, :]))`` as ``out_dtype``, one kernel."""
  m, k = a.shape
  n, k2 = b.shape
  c = config
  if a.dtype != jnp.int8 or b.dtype != jnp.int8 or k != k2:
    raise ValueError(f"int8_scaled_gemm: a {a.shape} {a.dtype}, b {b.shape} {b.dtype}: int8 (M, K) and (N, K)")
  cta_m = c.tile_m * (1 if c.wg_along_n else 2)
  cta_n = c.tile_n * (2 if c.wg_along_n else 1)
  if m % cta_m or n % cta_n or k % c.tile_k:
    raise ValueError(f"int8_scaled_gemm: ({m}, {k}) x ({n}, {k}) does not tile by {cta_m} x {cta_n} x {c.tile_k}")
  m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // c.tile_k
  swizzle = plgpu.find_swizzle(c.tile_k * 8)
  in_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_bytes = jnp.dtype(out_dtype).itemsize
  out_swizzle = plgpu.find_swizzle(c.epi * out_bytes * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_bytes)), plgpu.SwizzleTransform(out_swizzle))

  def kernel(a_gmem, b_gmem, ea_gmem, eb_gmem, out_gmem):
    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body,
          grid=(k_iters,),
          memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((cta_m, c.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, c.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                              memory_space=plgpu.SMEM),
          ],
          wg_axis="wg",
          num_compute_wgs=2,
          max_concurrent_steps=c.stages,
          compute_context=context,
      )

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM((2, 2, c.epi, c.epi), out_dtype, transforms=out_transforms),
        ea_smem=plgpu.SMEM((2, c.tile_m), jnp.int32),
        eb_smem=plgpu.SMEM((2, c.tile_n), jnp.int32),
        e_barrier=plgpu.Barrier(num_barriers=4),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, ea_smem, eb_smem, e_barrier):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters),
                                    1 if c.grid_minor_n else 0, c.grid_tile_width)
        m_sl, n_sl = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
        if c.wg_along_n:
          wg_m, wg_n = slice(None), pl.ds(wg * c.tile_n, c.tile_n)
        else:
          wg_m, wg_n = pl.ds(wg * c.tile_m, c.tile_m), slice(None)

        def context(eval_pipeline):
          # This tile's exponents land while the K loop runs; the previous tile's epilogue read them
          # into registers before its commit_smem (a warpgroup barrier), so overwriting is safe.
          plgpu.copy_gmem_to_smem(ea_gmem.at[m_sl].at[wg_m], ea_smem.at[wg], e_barrier.at[2 * wg])
          plgpu.copy_gmem_to_smem(eb_gmem.at[n_sl].at[wg_n], eb_smem.at[wg], e_barrier.at[2 * wg + 1])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((c.tile_m, c.tile_n), jnp.int32))
          def _acc(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...]
            plgpu.barrier_wait(e_barrier.at[2 * wg])
            plgpu.barrier_wait(e_barrier.at[2 * wg + 1])
            ea, eb = ea_smem[wg], eb_smem[wg]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for i in range(c.tile_m // c.epi):
              for j in range(c.tile_n // c.epi):
                rs, cs = slice(i * c.epi, (i + 1) * c.epi), slice(j * c.epi, (j + 1) * c.epi)
                slot = (i * (c.tile_n // c.epi) + j) % 2
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                out_smem[wg, slot] = _finish_tile(acc[rs, cs], ea[rs], eb[cs], out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                        out_gmem.at[m_sl, n_sl].at[wg_m, wg_n].at[rs, cs])

        def body(_, a_smem, b_smem, acc_ref):
          plgpu.wgmma(acc_ref, a_smem.at[wg_m], plgpu.transpose_ref(b_smem.at[wg_n], (1, 0)))
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(body, context)(a_gmem.at[m_sl, :], b_gmem.at[n_sl, :], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(_num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(a, b, ea.astype(jnp.int32), eb.astype(jnp.int32))


def reference(a, b, ea, eb, out_dtype=jnp.bfloat16):
  """XLA: the int8 dot and ``int8_finish`` (the int8 path's ops today)."""
  sums = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  nan = (ea[:, None] >= NAN_EXPONENT // 2) | (eb[None, :] >= NAN_EXPONENT // 2)
  return int8_finish(sums, ea[:, None], eb[None, :], nan).astype(out_dtype)


def make_inputs(m, k, n, seed=0, nan_rows=True):
  """int8 codes like the int8 path's (|v| <= 96), exponents over the whole range, a NaN row and column."""
  ks = jax.random.split(jax.random.key(seed), 4)
  vals = jnp.array([0, 1, 2, 3, 4, 6, 8, 12], jnp.int32)
  def codes(key, shape):
    kv, ksh, ksg = jax.random.split(key, 3)
    v = vals[jax.random.randint(kv, shape, 0, 8)] << jax.random.randint(ksh, shape, 0, 4)
    return jnp.where(jax.random.bernoulli(ksg, 0.5, shape), -v, v).astype(jnp.int8)
  a, b = codes(ks[0], (m, k)), codes(ks[1], (n, k))
  ea = jax.random.randint(ks[2], (m,), -128, 124)
  eb = jax.random.randint(ks[3], (n,), -128, 124)
  # Also the common case: exponents near 0 (most outputs finite and normal).
  ea = jnp.where(jnp.arange(m) % 2 == 0, ea // 16, ea)
  eb = jnp.where(jnp.arange(n) % 2 == 0, eb // 16, eb)
  if nan_rows:
    ea, eb = ea.at[3].set(NAN_EXPONENT), eb.at[5].set(NAN_EXPONENT)
  return a, b, ea.astype(jnp.int32), eb.astype(jnp.int32)


CONFIGS = {
    "m128n128k128s4": Config(),
    "m128n128k128s4_wgM": Config(wg_along_n=False),
    "m128n128k128s3": Config(stages=3),
    "m128n128k64s6": Config(tile_k=64, stages=6),
    "m128n256k64s4": Config(tile_n=256, tile_k=64, stages=4),
    "m128n128k128s4_minorM": Config(grid_minor_n=False),
    "m128n128k128s4_w4": Config(grid_tile_width=4),
    "m128n128k128s4_w16": Config(grid_tile_width=16),
}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--lower", action="store_true", help="lower every config for CUDA (works on a CPU)")
  p.add_argument("--out", help="GPU: bits against XLA and timings, OUT/int8_gemm_mgpu.json")
  p.add_argument("--shapes", default="8192x8192x8192,4096x4096x14336,1024x8192x8192,4096x14336x4096")
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--budget-s", type=float, default=300)
  args = p.parse_args(argv)
  names = args.configs.split(",")
  if args.lower:
    a, b, ea, eb = make_inputs(512, 1024, 512)
    for name in names:
      try:
        text = jax.jit(functools.partial(int8_scaled_gemm, config=CONFIGS[name])).trace(a, b, ea, eb).lower(
            lowering_platforms=("cuda",)).as_text()
        print(f"{name}: lowered for CUDA ({len(text)} chars)", flush=True)
      except Exception as e:  # noqa: BLE001 - report each config
        print(f"{name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
  if not args.out:
    return 0
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}

  def save():
    with open(os.path.join(args.out, "int8_gemm_mgpu.json"), "w") as f:
      json.dump(res, f, indent=1)

  # Bits first, at a small and a mid shape, every config (float32 and bfloat16 out).
  checks = {}
  for (m, k, n) in [(512, 1024, 512), (1024, 4096, 2048)]:
    a, b, ea, eb = make_inputs(m, k, n)
    for od in (jnp.bfloat16, jnp.float32):
      ref = np.asarray(jax.jit(functools.partial(reference, out_dtype=od))(a, b, ea, eb)).astype(np.float32)
      for name in names:
        key = f"{m}x{k}x{n}/{jnp.dtype(od).name}/{name}"
        try:
          out = np.asarray(jax.jit(functools.partial(int8_scaled_gemm, out_dtype=od, config=CONFIGS[name]))(
              a, b, ea, eb)).astype(np.float32)
          same = (out == ref) | (np.isnan(out) & np.isnan(ref))
          checks[key] = {"equal_fraction": float(same.mean()), "nan_out": int(np.isnan(out).sum()),
                         "nan_ref": int(np.isnan(ref).sum())}
        except Exception as e:  # noqa: BLE001
          checks[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(key, checks[key], flush=True)
  res["checks"] = checks
  save()
  good = [nm for nm in names if all(v.get("equal_fraction") == 1.0 for kk, v in checks.items() if kk.endswith("/" + nm))]
  res["exact_configs"] = good
  for shape in args.shapes.split(","):
    if time.time() - t0 > args.budget_s:
      res["stopped"] = f"budget reached before {shape}"
      break
    m, k, n = (int(v) for v in shape.split("x"))
    sets = B.n_sets(m * k + n * k)
    ins = [make_inputs(m, k, n, seed=s, nan_rows=False) for s in range(sets)]
    row = {"m": m, "k": k, "n": n, "sets": sets, "us": {}}
    xla = jax.jit(reference)
    row["us"]["xla_int8_dot_and_finish"] = B.bench(xla, ins) * 1e6
    dot = jax.jit(lambda a, b, ea, eb: lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.int32))
    row["us"]["xla_int8_dot_alone"] = B.bench(dot, ins) * 1e6
    xs = [(jax.random.normal(jax.random.key(100 + s), (m, k), jnp.bfloat16),
           jax.random.normal(jax.random.key(200 + s), (k, n), jnp.bfloat16)) for s in range(sets)]
    row["us"]["bf16_dot"] = B.bench(jax.jit(jnp.dot), xs) * 1e6
    for name in good:
      if time.time() - t0 > args.budget_s:
        break
      try:
        row["us"][name] = B.bench(jax.jit(functools.partial(int8_scaled_gemm, config=CONFIGS[name])), ins) * 1e6
      except Exception as e:  # noqa: BLE001
        row["us"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    row["x_bf16"] = {kk: row["us"]["bf16_dot"] / v for kk, v in row["us"].items() if isinstance(v, float)}
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    save()
  save()
  return 0


if __name__ == "__main__":
  sys.exit(main())
