"""MXFP8 x MXFP8 on the FP8 tensor cores with a per-block rescale, as a Pallas Mosaic GPU kernel (issue 15).

Issue 15 asks for the best exact method for MXFP8 x MXFP8 (E4M3 elements, one power-of-two scale per 32 along
K): the re-basing that puts MXFP4 on one scale per row does not hold for E4M3 elements (3 mantissa bits and a
full exponent range in every block). What is left on the FP8 tensor cores is a rescale per K-block: each 32-wide
block's product ``T = A_blk @ B_blk.T`` (float32, exact: 4-bit significands, 32 terms) is added to the
accumulator as ``acc += T * fa[row] * fb[col]``. The earlier Pallas-Triton version (`mx_matmul.Config(mma=
"fp8")`) ran at 0.15x the bf16 dot on the H100. This one is the int8 path's kernel (`fp4jax.kernels.int8_gemm`:
persistent, a TMA producer warpgroup, two wgmma consumer warpgroups) with float8_e4m3fn operands, the two
scale vectors of each K-step pipelined with them as float32 factors, and the rescale in registers.

The rescale's price, by arithmetic: per 32 terms an output element takes 32 FP8 MACs on the tensor cores
(4096 a clock an SM) and at least 2 FP32 operations (128 a clock an SM): 1/128 against 1/128 clocks for the
bf16 MMA of the same 32 terms. So even perfectly overlapped the rescale caps the kernel near the bf16 rate.
This script measures where it lands, and two variants that bound it (wrong results, timed only):
``rescale="add"`` (the block products added unscaled: the read-out without the multiplies) and
``rescale="none"`` (one accumulator over all of K: the kernel's FP8 MMA ceiling).

  PYTHONPATH=. python benchmarks/experiments/mxfp8_rescale_mgpu.py --lower     # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/mxfp8_rescale_mgpu.py --out DIR   # GPU: errors, timings
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matmul as B  # noqa: E402  (benchmarks/matmul.py: bench, n_sets)

BLOCK = 32  # MX block along K


@dataclasses.dataclass(frozen=True)
class Config:
  tile_m: int = 128  # each consumer warpgroup owns tile_m x tile_n; the two split the CTA's along N
  tile_n: int = 128
  tile_k: int = 128  # K-step of the pipeline: tile_k // 32 blocks
  stages: int = 3
  swizzle: int = 32  # bytes; a 32-wide K slice of a tile is one swizzle atom
  epi: int = 64
  grid_tile_width: int = 8
  rescale: str = "block"  # "block" (exact), "add" (unscaled, timing bound), "none" (one accumulator)


def _sm_count():
  dev = jax.devices()[0]
  return dev.core_count if dev.platform == "gpu" else 132


def _kernel(a_gmem, b_gmem, fa_gmem, fb_gmem, out_gmem, *, c: Config, k_iters, m_iters, n_iters):
  cta_m, cta_n = c.tile_m, 2 * c.tile_n
  nb = c.tile_k // BLOCK
  in_transforms = (plgpu.TilingTransform((8, c.swizzle)), plgpu.SwizzleTransform(c.swizzle))
  out_dtype = out_gmem.dtype
  out_bytes = jnp.dtype(out_dtype).itemsize
  out_swizzle = plgpu.find_swizzle(c.epi * out_bytes * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_bytes)), plgpu.SwizzleTransform(out_swizzle))

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec((cta_m, c.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((cta_n, c.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((nb, cta_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((nb, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM)],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=c.stages,
        compute_context=context,
    )

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, fa_gmem, fb_gmem),
      out_smem=plgpu.SMEM((2, 2, c.epi, c.epi), out_dtype, transforms=out_transforms),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tiles(info):
      (lin,) = info.index
      mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, c.grid_tile_width)
      m_sl, n_sl = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
      wg_n = pl.ds(wg * c.tile_n, c.tile_n)

      def epilogue(acc):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for i in range(c.tile_m // c.epi):
          for j in range(c.tile_n // c.epi):
            rs, cs = slice(i * c.epi, (i + 1) * c.epi), slice(j * c.epi, (j + 1) * c.epi)
            slot = (i * (c.tile_n // c.epi) + j) % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[wg, slot] = acc[rs, cs].astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem.at[m_sl, n_sl].at[:, wg_n].at[rs, cs])

      if c.rescale == "none":
        def context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((c.tile_m, c.tile_n), jnp.float32))
          def _acc(acc_ref):
            eval_pipeline(acc_ref)
            epilogue(acc_ref[...])

        def body(_, a_smem, b_smem, fa_smem, fb_smem, acc_ref):
          del fa_smem, fb_smem
          plgpu.wgmma(acc_ref, a_smem, b_smem.at[wg_n].transpose((1, 0)))
          plgpu.wgmma_wait(0)
          return acc_ref
      else:
        def context(eval_pipeline):
          epilogue(eval_pipeline(jnp.zeros((c.tile_m, c.tile_n), jnp.float32)))

        def body(_, a_smem, b_smem, fa_smem, fb_smem, acc):
          for j in range(nb):
            ks = pl.ds(j * BLOCK, BLOCK)

            def block_product(t_ref):
              plgpu.wgmma(t_ref, a_smem.at[:, ks], b_smem.at[wg_n, ks].transpose((1, 0)))
              plgpu.wgmma_wait(0)
              return t_ref[...]

            t = pl.run_scoped(block_product, plgpu.ACC((c.tile_m, c.tile_n), jnp.float32))
            if c.rescale == "add":
              acc = acc + t
            else:
              fa = fa_smem[j]
              fb = fb_smem[j, wg_n]
              f = lax.broadcast_in_dim(fa, t.shape, (0,)) * lax.broadcast_in_dim(fb, t.shape, (1,))
              acc = acc + t * f
          return acc

      pipeline(body, context)(a_gmem.at[m_sl, :], b_gmem.at[n_sl, :], fa_gmem.at[:, m_sl],
                              fb_gmem.at[:, n_sl], allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def mxfp8_gemm(a, b, fa, fb, *, out_dtype=jnp.bfloat16, config: Config = Config()):
  """``sum_k A[:, k] B[:, k] fa[k // 32, :] fb[k // 32, :]``: codes ``a (M, K)``, ``b (N, K)`` float8_e4m3fn,
  factors ``fa (K/32, M)``, ``fb (K/32, N)`` float32 (powers of two)."""
  m, k = a.shape
  n = b.shape[0]
  c = config
  if m % c.tile_m or n % (2 * c.tile_n) or k % c.tile_k or k < c.stages * c.tile_k:
    raise ValueError(f"mxfp8_gemm: ({m}, {k}) x ({n}, {k}) does not tile by {c}")
  kernel = functools.partial(_kernel, c=c, k_iters=k // c.tile_k, m_iters=m // c.tile_m,
                             n_iters=n // (2 * c.tile_n))
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(_sm_count(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(a, b, fa, fb)


def make_inputs(m, k, n, seed=0, spread=8):
  """E4M3 codes of normal data and block exponents in [-spread, spread] (factors 2**e)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  a = (jax.random.normal(ks[0], (m, k), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
  b = (jax.random.normal(ks[1], (n, k), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
  # ldexp on the host: jnp.exp2 on the GPU is not exact at integers (exp2(-3) = 0.12499999).
  pow2 = lambda key, rows: jnp.asarray(np.ldexp(np.float32(1), np.asarray(
      jax.random.randint(key, (k // BLOCK, rows), -spread, spread + 1))).astype(np.float32))
  return a, b, pow2(ks[2], m), pow2(ks[3], n)


def dequantized(a, fa):
  """bfloat16 ``A * fa`` (exact: E4M3 times a power of two within bfloat16's range)."""
  return (a.astype(jnp.float32) * jnp.repeat(fa.T, BLOCK, axis=1)).astype(jnp.bfloat16)


def two_pass(a, b, fa, fb, out_dtype=jnp.bfloat16):
  """What the library runs for MXFP8 x MXFP8 on a GPU today: exact bfloat16 dequantization, a bf16 GEMM."""
  return lax.dot_general(dequantized(a, fa), dequantized(b, fb), (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(out_dtype)


def reference64(a, b, fa, fb):
  """float64 numpy."""
  da = np.asarray(a, np.float64) * np.repeat(np.asarray(fa, np.float64).T, BLOCK, axis=1)
  db = np.asarray(b, np.float64) * np.repeat(np.asarray(fb, np.float64).T, BLOCK, axis=1)
  return da @ db.T


def diagnose(config):
  """Where the block kernel's error comes from: which inputs it sums exactly (float64 reference)."""
  out = {}
  m, k, n = 256, 512, 512
  ks = jax.random.split(jax.random.key(3), 4)
  ones = lambda rows: jnp.ones((k // BLOCK, rows), jnp.float32)
  wide = lambda key, shape: (jax.random.normal(key, shape, jnp.float32) * 64).astype(jnp.float8_e4m3fn)
  small = lambda key, shape: jax.random.randint(key, shape, -8, 9).astype(jnp.float8_e4m3fn)
  only_first = (jnp.arange(k) < BLOCK)[None, :]  # one block of 32 nonzero: one wgmma's own sum
  cases = {
      "normal_e4m3_unit_scales": (wide(ks[0], (m, k)), wide(ks[1], (n, k)), ones(m), ones(n)),
      # sums of at most 512 * 64: exact in float32 and in any accumulator of 15 bits or more
      "small_integers_unit_scales": (small(ks[0], (m, k)), small(ks[1], (n, k)), ones(m), ones(n)),
      "small_integers_spread8": (small(ks[0], (m, k)), small(ks[1], (n, k))) + make_inputs(m, k, n, 5)[2:],
      "normal_e4m3_one_block": (jnp.where(only_first, wide(ks[0], (m, k)), 0).astype(jnp.float8_e4m3fn),
                                wide(ks[1], (n, k)), ones(m), ones(n)),
  }
  for name, (a, b, fa, fb) in cases.items():
    ref = reference64(a, b, fa, fb)
    # The largest single product of each output: the scale a truncating accumulator keeps bits against.
    da = np.asarray(a, np.float64) * np.repeat(np.asarray(fa, np.float64).T, BLOCK, axis=1)
    db = np.asarray(b, np.float64) * np.repeat(np.asarray(fb, np.float64).T, BLOCK, axis=1)
    top = np.max(np.abs(da)[:, None, :] * np.abs(db)[None, :, :], axis=2)
    row = {}
    for label, fn in (("kernel", lambda: mxfp8_gemm(a, b, fa, fb, out_dtype=jnp.float32, config=config)),
                      ("two_pass", lambda: two_pass(a, b, fa, fb, jnp.float32))):
      got = np.asarray(fn(), np.float64)
      err = np.abs(got - ref)
      row[label] = {"max_abs_err": float(err.max()), "exact_fraction": float((err == 0).mean()),
                    "max_err_over_top_product": float(np.max(err / np.maximum(top, 1e-300)))}
    out[name] = row
    print(name, row, flush=True)
  return out


CONFIGS = {
    "block_k128": Config(),
    "block_k64": Config(tile_k=64, stages=4),
    # Two float32 tiles of 128 x 128 (accumulator and block product) exceed a consumer's ~236 registers a
    # thread: halve one side. (64 x 128 with 4 stages needs 250 KB of shared memory: it does not run.)
    "block_n64": Config(tile_n=64, stages=4),
    "block_m64": Config(tile_m=64, stages=4),
    "add_k128": Config(rescale="add"),
    "none_k128": Config(rescale="none"),
    "none_k128_sw128": Config(rescale="none", swizzle=128),
}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--lower", action="store_true", help="lower every config for CUDA (works on a CPU)")
  p.add_argument("--out", help="GPU: errors against float64 and timings, OUT/mxfp8_rescale_mgpu.json")
  p.add_argument("--shapes", default="8192x8192x8192,4096x4096x14336,1024x8192x8192")
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--budget-s", type=float, default=240)
  p.add_argument("--diagnose", action="store_true", help="GPU: which inputs the block kernel sums exactly")
  args = p.parse_args(argv)
  names = args.configs.split(",")
  if args.lower:
    a, b, fa, fb = make_inputs(256, 1024, 512)
    for name in names:
      try:
        text = jax.jit(functools.partial(mxfp8_gemm, config=CONFIGS[name])).trace(a, b, fa, fb).lower(
            lowering_platforms=("cuda",)).as_text()
        print(f"{name}: lowered for CUDA ({len(text)} chars)", flush=True)
      except Exception as e:  # noqa: BLE001 - report each config
        print(f"{name}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
  if not args.out:
    return 0
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}

  def save():
    with open(os.path.join(args.out, "mxfp8_rescale_mgpu.json"), "w") as f:
      json.dump(res, f, indent=1)

  if args.diagnose:
    res["diagnose"] = diagnose(CONFIGS["block_n64"])
    save()
    return 0
  checks = {}
  a, b, fa, fb = make_inputs(512, 2048, 512)
  ref = reference64(a, b, fa, fb)
  norm = np.linalg.norm(ref)
  tp = np.asarray(two_pass(a, b, fa, fb, jnp.float32), np.float64)
  checks["two_pass"] = {"rel_err": float(np.linalg.norm(tp - ref) / norm), "max_abs": float(np.abs(tp - ref).max())}
  for name in names:
    try:
      out = np.asarray(mxfp8_gemm(a, b, fa, fb, out_dtype=jnp.float32, config=CONFIGS[name]), np.float64)
      checks[name] = {"rel_err": float(np.linalg.norm(out - ref) / norm), "max_abs": float(np.abs(out - ref).max()),
                      "max_rel_elem": float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)))}
    except Exception as e:  # noqa: BLE001
      checks[name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
    print(name, checks[name], flush=True)
  res["checks"] = checks
  save()
  ran = [nm for nm in names if "error" not in checks[nm]]
  for shape in args.shapes.split(","):
    if time.time() - t0 > args.budget_s:
      res["stopped"] = f"budget reached before {shape}"
      break
    m, k, n = (int(v) for v in shape.split("x"))
    sets = B.n_sets(m * k + n * k)
    ins = [make_inputs(m, k, n, seed=s) for s in range(sets)]
    row = {"m": m, "k": k, "n": n, "sets": sets, "us": {}}
    xs = [(jax.random.normal(jax.random.key(100 + s), (m, k), jnp.bfloat16),
           jax.random.normal(jax.random.key(200 + s), (n, k), jnp.bfloat16)) for s in range(sets)]
    row["us"]["bf16_dot_nk"] = B.bench(lambda x, y: lax.dot_general(x, y, (((1,), (1,)), ((), ()))), xs) * 1e6
    row["us"]["two_pass"] = B.bench(two_pass, ins) * 1e6
    for name in ran:
      if time.time() - t0 > args.budget_s:
        break
      try:
        row["us"][name] = B.bench(functools.partial(mxfp8_gemm, config=CONFIGS[name]), ins) * 1e6
      except Exception as e:  # noqa: BLE001
        row["us"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    row["x_bf16"] = {kk: row["us"]["bf16_dot_nk"] / v for kk, v in row["us"].items() if isinstance(v, float)}
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    save()
  save()
  return 0


if __name__ == "__main__":
  sys.exit(main())
