"""W4A16 decode (M <= 16) as a Pallas Mosaic GPU kernel: the decoded weight is wgmma's register operand.

Issue 11. The Pallas-Triton kernel (fp4jax/kernels/w4a16_matmul.py, "bits" decode) stops at 24-25 us for
1 x 8192^2 MXFP4 against a 10.9 us HBM floor: ncu puts it latency- and issue-bound, 167 registers a thread,
and the decoded tile goes through shared memory (4.4-way bank conflicts) to reach the MMA. Here, per CTA
and K step (swap AB: the weight rows are the MMA's M side, the tokens its N side):

  TMA   weight bytes (64 rows x tile_k nibbles, viewed as int4), block scales (tile_k/32 x 64 bytes),
        x (Mpad x tile_k bf16) into shared memory, ``stages`` steps in flight;
  regs  per 32-deep K block: load the nibbles in WGMMA_UPCAST_4X, move them to the WGMMA layout (still
        4-bit: one shuffle), widen to int16, build the bfloat16 bits of E2M1 x 2^-126 (sign -> bit 15,
        exponent and mantissa -> bits 8..6, as fp4jax/kernels/e2m1_bits.py), multiply by 2^126 and by
        the block scale broadcast along the row;
  wgmma acc (64 x Mpad, float32) += A (64 x 32, registers) @ x^T (32 x Mpad, shared memory).

Status (2026-11-30): written on a machine without a GPU. It lowers for CUDA there on jax 0.10.2 and 0.11.2
(``--lower``), and Pallas' Mosaic GPU interpreter runs it against the float64 product (``--interpret``): the
"select" decode is exact (6e-8, float32 accumulation), the "mul" decode loses the +-0.5 codes there because
XLA on the CPU flushes bfloat16 subnormals. Not yet compiled, checked or timed on a GPU: ``--out`` does all
three (both decodes, three tile_k / depth settings, five shapes, XLA's bf16 dot for scale). Nothing here is
tuned: one warpgroup a CTA, a wgmma_wait after every 32-deep block; split-K by CTAs. Usage:

  PYTHONPATH=. python benchmarks/experiments/w4a16_mgpu.py --lower        # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/w4a16_mgpu.py --interpret    # CPU: small shapes, vs float64
  PYTHONPATH=. python benchmarks/experiments/w4a16_mgpu.py --out DIR      # GPU: exactness and timing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

import fp4jax as fj
from fp4jax.kernels import matmul_common as common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matmul as B  # noqa: E402  (benchmarks/matmul.py: the project's timing, inputs rotated beyond L2)

ROWS = 64  # weight rows a warpgroup owns (the wgmma M side)
KB = 32  # MXFP4's block: one scale per 32 weights along K


def _decode(v, decode):
  """Sign-extended int16 nibbles -> bfloat16 E2M1 values.

  ``"mul"``: the pattern of fp4jax/kernels/e2m1_bits.py, E2M1 x 2**-126 (sign -> bit 15, exponent and
  mantissa -> bits 8..6; the code 0.5 lands on bfloat16's subnormal 2**-127), times 2**126. Exact where
  the multiply keeps subnormals (PTX mul.rn.bf16x2 does; XLA on the CPU flushes them, so in interpret
  mode the +-0.5 codes come out 0). ``"select"``: no subnormal: exponent and mantissa bits plus the
  bias 126 << 7 for codes of magnitude >= 1, and a select for the codes 0 and 0.5.
  """
  sign = (v & 8) << 12
  mag = v & 7
  if decode == "mul":
    return lax.bitcast_convert_type(sign | (mag << 6), jnp.bfloat16) * jnp.asarray(2.0**126, jnp.bfloat16)
  normal = sign | ((mag << 6) + jnp.int16(126 << 7))
  small = sign | jnp.where(mag == 1, jnp.int16(126 << 7), jnp.int16(0))
  return lax.bitcast_convert_type(jnp.where(mag < 2, small, normal), jnp.bfloat16)


def w4a16_mgpu(x, w_i4, scales_kn, *, tile_k=128, stages=4, split_k=1, decode="mul", interpret=False):
  """``x (M, K) bf16 @ dequantize(w)`` for an MXFP4 weight given as ``w_i4 (N, K)`` int4 (the "rows" bytes
  viewed as nibbles: element k of a row in the low nibble of byte k // 2 when k is even) and ``scales_kn
  (K // 32, N)`` uint8 E8M0. Returns float32 ``(M, N)``. ``split_k`` CTAs share each 64-row tile along K
  (float32 partial sums, added by XLA): N / 64 CTAs alone leave most SMs one warpgroup."""
  m, k = x.shape
  n = w_i4.shape[0]
  mp = max(8, -(-m // 8) * 8)
  if mp > 256 or n % ROWS or k % (tile_k * split_k) or tile_k % KB:
    raise ValueError(f"w4a16_mgpu: shapes x {x.shape}, w {w_i4.shape} do not tile (rows {ROWS}, tile_k {tile_k}, "
                     f"split_k {split_k})")
  if mp != m:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
  k_steps = k // (tile_k * split_k)
  x_swizzle = 64  # bytes: 32 bf16, so each 32-deep K block of x is whole swizzle tiles
  x_transforms = (plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))

  def kernel(x_gmem, w_gmem, s_gmem, o_gmem):
    ni = lax.axis_index("n")
    si = lax.axis_index("k")

    def acc_scope(acc_ref):
      def step(_, x_smem, w_smem, s_smem):
        for j in range(tile_k // KB):
          # The interpreter takes plain loads (layouts do not change values there).
          if interpret:
            q, s = w_smem[:, pl.ds(j * KB, KB)], s_smem[j]
          else:
            q = plgpu.load(w_smem.at[:, pl.ds(j * KB, KB)], (), layout=plgpu.Layout.WGMMA_UPCAST_4X, optimized=False)
            # The relayout moves nibbles (8 to a 32-bit register, one shuffle); widening comes after.
            q = plgpu.layout_cast(q, plgpu.Layout.WGMMA)
            s = plgpu.load(s_smem.at[j], (), layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
          a = _decode(q.astype(jnp.int16), decode)
          # The kernels' own E8M0 rule (0xFF -> NaN, results below float32's normal range -> 0).
          scale = common.scale_to_f32(s, fj.MXFP4).astype(jnp.bfloat16)
          a = a * lax.broadcast_in_dim(scale, (ROWS, KB), (0,))
          if interpret:
            # The interpreter's wgmma reads A from shared memory only and takes no transposed ref:
            # stage the decoded block and the x block (transposed) in shared memory.
            def staged(a_smem, b_smem, a=a, j=j):
              a_smem[...] = a
              b_smem[...] = x_smem[:, pl.ds(j * KB, KB)].T
              plgpu.wgmma(acc_ref, a_smem, b_smem)
            pl.run_scoped(staged, plgpu.SMEM((ROWS, KB), jnp.bfloat16), plgpu.SMEM((KB, mp), jnp.bfloat16))
          else:
            plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_smem.at[:, pl.ds(j * KB, KB)], (1, 0)))
          plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step,
          grid=(k_steps,),
          in_specs=[
              plgpu.BlockSpec((mp, tile_k), lambda kk: (0, si * k_steps + kk), transforms=x_transforms),
              plgpu.BlockSpec((ROWS, tile_k), lambda kk: (ni, si * k_steps + kk)),
              plgpu.BlockSpec((tile_k // KB, ROWS), lambda kk: (si * k_steps + kk, ni)),
          ],
          max_concurrent_steps=stages,
      )(x_gmem, w_gmem, s_gmem)
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((ROWS, mp)))

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((ROWS, mp), jnp.float32))
    def _store(o_smem):
      o_smem[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * ROWS, ROWS)])
      plgpu.wait_smem_to_gmem(0)

  out_t = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((split_k, n, mp), jnp.float32),
      grid=(n // ROWS, split_k),
      grid_names=("n", "k"),
      interpret=_gpu_interpret_params() if interpret else None,
  )(x, w_i4, scales_kn)
  return out_t.sum(axis=0)[:, :m].T


def _gpu_interpret_params():
  # Pallas' Mosaic GPU interpreter (barriers, TMA, wgmma on the CPU); a private module in jax 0.10/0.11.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def make_inputs(m, k, n, seed=0):
  """Random E2M1 codes and E8M0 scales (exponents -8..8), x bf16; also the float64 product."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
  sbytes = rng.integers(119, 136, size=(k // KB, n), dtype=np.uint8)
  xs = rng.standard_normal((m, k)).astype(np.float32)
  x = jnp.asarray(xs, jnp.bfloat16)
  e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
  w64 = e2m1[codes] * np.repeat(2.0 ** (sbytes.astype(np.float64) - 127), KB, axis=0).T
  ref = np.asarray(x, np.float64) @ w64.T
  # int4 view: two's-complement nibble values; ml_dtypes packs element 2i in the low nibble.
  w_i4 = jnp.asarray(((codes.astype(np.int8) ^ 8) - 8).astype(np.int8)).astype(jnp.int4)
  return x, w_i4, jnp.asarray(sbytes), ref


def _weight_sets(w, s, nbytes):
  """``w``, ``s`` and enough distinct random copies that the sets exceed the L2 (timings rotate them)."""
  out = [(w, s)]
  for i in range(1, B.n_sets(nbytes)):
    kw, ks = jax.random.split(jax.random.key(1000 + i))
    out.append((jax.random.randint(kw, w.shape, -8, 8, jnp.int8).astype(jnp.int4),
                jax.random.randint(ks, s.shape, 119, 136, jnp.int32).astype(jnp.uint8)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--lower", action="store_true", help="lower both decodes for CUDA (works on a CPU)")
  p.add_argument("--interpret", action="store_true", help="Mosaic GPU interpret mode on a CPU, vs float64")
  p.add_argument("--out", help="GPU: exactness and timing, results in OUT/w4a16_mgpu.json")
  a = p.parse_args(argv)
  res = {}
  if a.lower:
    x, w, s, _ = make_inputs(1, 1024, 256)
    for decode in ("mul", "select"):
      text = jax.jit(functools.partial(w4a16_mgpu, decode=decode, split_k=4)).trace(x, w, s).lower(
          lowering_platforms=("cuda",)).as_text()
      print(f"lowered for CUDA ({decode}): {len(text)} chars", flush=True)
  if a.interpret:
    x, w, s, ref = make_inputs(3, 256, 128)
    for decode, split_k in (("mul", 1), ("select", 1), ("select", 2)):
      out = np.asarray(w4a16_mgpu(x, w, s, decode=decode, split_k=split_k, interpret=True), np.float64)
      err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
      print(f"interpret ({decode}, split_k {split_k}): max error / max |ref| = {err:.2e}", flush=True)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    for (m, k, n) in [(1, 8192, 8192), (16, 8192, 8192), (1, 4096, 14336), (1, 14336, 4096), (1, 4096, 4096)]:
      x, w, s, ref = make_inputs(m, k, n)
      sets = _weight_sets(w, s, n * k // 2 + s.size)
      calls = [(x, *ws) for ws in sets]
      row = {}
      for decode in ("mul", "select"):
        for tile_k, stages, split_k in ((128, 4, 1), (256, 4, 1), (128, 8, 1), (128, 4, 4), (256, 4, 4),
                                        (128, 4, 8)):
          name = f"{decode}_k{tile_k}_s{stages}_split{split_k}"
          try:
            fn = jax.jit(functools.partial(w4a16_mgpu, tile_k=tile_k, stages=stages, split_k=split_k,
                                           decode=decode))
            out = np.asarray(fn(x, w, s), np.float64)
            row[name] = {"rel_err": float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))),
                         "us": B.bench(fn, calls) * 1e6}
          except Exception as e:  # noqa: BLE001 - record and go on
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
      wbs = [jax.random.normal(jax.random.key(2000 + i), (k, n), jnp.bfloat16) for i in range(B.n_sets(k * n * 2))]
      row["xla_bf16_us"] = B.bench(lambda x, w: x @ w, B.make_calls([x] * len(wbs), wbs)) * 1e6
      # The kernel takes int4; a QArray holds uint8 bytes: does XLA's uint8 -> int4 view copy them?
      u8s = [(lax.bitcast_convert_type(wi.reshape(n, k // 2, 2), jnp.uint8),) for wi, _ in sets]
      as_i4 = jax.jit(lambda u: lax.bitcast_convert_type(u, jnp.int4).reshape(n, k))
      row["u8_to_int4_us"] = B.bench(as_i4, u8s) * 1e6
      hlo = as_i4.lower(*u8s[0]).compile().as_text()
      row["u8_to_int4_kernels"] = hlo.count(" copy(") + hlo.count(" fusion(")  # 0: a free view
      res[f"{m}x{k}x{n}"] = row
      print(f"{m}x{k}x{n}:", json.dumps(row), flush=True)
      with open(os.path.join(a.out, "w4a16_mgpu.json"), "w") as f:
        json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
