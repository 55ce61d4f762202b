"""The int8 path's GEMM with its finish as the epilogue: one Pallas Mosaic GPU kernel (Hopper).

:func:`fp4jax.int8_matmul.int8_product` multiplies int8 codes ``A (M, K)`` and
``B (N, K)`` in int32 and finishes each sum ``S`` as ``S * 2**(ea + eb)``
(:func:`~fp4jax.kernels.matmul_common.int8_finish`). XLA does that as two
kernels, cuBLASLt's int8 GEMM and a finish pass that reads the int32 sums
back (at 8192^3: 713-772 + 114 us, 256 MB of int32 written and read). Here
the finish is the epilogue of a persistent, warp-specialised GEMM: a TMA
producer warpgroup feeds two wgmma consumer warpgroups (int32 accumulators in
registers, both operands K-major as 8-bit wgmma needs); each consumer turns
its ``tile_m x tile_n`` tile into the output dtype with the same float32
arithmetic as ``int8_finish`` (two normal power-of-two factors, the exponent
clamped at -200, NaN rows and columns) and stores it through shared memory.
Measured on the H200 (``benchmarks/experiments/int8_gemm_mgpu.py``): 698 us at
8192^3 where XLA's GEMM alone took 772, bit-equal to XLA's ops.

Wgmma and TMA as used here are Hopper's (sm_90): :func:`gemm_obstacle` keeps
other GPUs, the CPU and shapes no tile divides on XLA's two kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4jax._bits import F32_EXP_BIAS, F32_MANT_BITS

__all__ = ["Config", "CONFIG", "NAN_EXPONENT", "OUT_DTYPES", "gemm_obstacle", "on_hopper", "scaled_gemm"]

#: A row exponent marking a NaN row: its sum with any finite exponent (both >= -128, <= 123) stays
#: above NAN_EXPONENT // 2, where no finite pair reaches.
NAN_EXPONENT = 1 << 20
#: Output dtypes the epilogue writes (the float32 result rounded once more).
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
#: The lowest exponent the finish keeps: |S| < 2**31, so below it every product is 0 in float32.
_MIN_EXPONENT = -200


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiles: each consumer warpgroup owns ``tile_m x tile_n``; the two split the CTA's along N."""

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128  # 128 int8 = one 128-byte swizzle row
  stages: int = 3  # 4 leaves no room for a float32 epilogue tile in 227 KB of shared memory
  epi: int = 64  # the epilogue's square tile through shared memory
  grid_tile_width: int = 8  # the persistent loop's snake order (L2 reuse)
  # wgmma groups left in flight before a step's shared memory is released (0: each step waits for its
  # own, so the tensor cores idle while the next issues; 1 overlaps consecutive steps).
  delay_release: int = 0
  # Two CTAs a cluster sharing (TMA-multicasting) the operand tile they have in common: "n" (neighbours
  # along N share A's tile), "m" (along M, B's), or None.
  cluster: str | None = None

  def __post_init__(self):
    if self.cluster not in (None, "m", "n"):
      raise ValueError(f"Config.cluster must be None, 'm' or 'n', got {self.cluster!r}")
    if not 0 <= self.delay_release < self.stages:
      raise ValueError(f"Config.delay_release must be in [0, stages={self.stages}), got {self.delay_release}")


#: Measured on the H200 (benchmarks/experiments/int8_gemm_mgpu.py): 698 us at 8192^3, 320 at
#: 4096x4096x14336, 90 at 1024x8192^2; tile_k 64 with 6 stages 8-20% slower.
CONFIG = Config()


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (sm_90), where :func:`scaled_gemm` compiles."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def gemm_obstacle(m: int, n: int, k: int, out_dtype, config: Config = CONFIG) -> str | None:
  """Why :func:`scaled_gemm` does not take these shapes and output dtype, or None (any machine)."""
  if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
    return f"output dtype {jnp.dtype(out_dtype).name} is not one of bfloat16, float16, float32"
  cm, cn = _cluster_tile(config)
  if m % cm or n % cn or k % config.tile_k:
    return f"({m}, {k}) x ({n}, {k}) does not tile by {cm} x {cn} x {config.tile_k}"
  if k < config.stages * config.tile_k:
    return f"K={k} is shorter than the pipeline ({config.stages} steps of {config.tile_k})"
  return None


def _cluster_tile(c: Config) -> tuple[int, int]:
  """(rows, columns) of output a cluster computes: a CTA's ``tile_m x 2 tile_n``, doubled along ``c.cluster``."""
  return c.tile_m * (1 + (c.cluster == "m")), 2 * c.tile_n * (1 + (c.cluster == "n"))


def _sm_count() -> int:
  # The persistent grid: one CTA an SM. 132 (an H100 / H200) when lowering for CUDA on another machine.
  dev = jax.devices()[0]
  return dev.core_count if dev.platform == "gpu" else 132


def _pow2(e):
  """float32 ``2**e`` for int32 ``e`` in [-126, 127], from the bits (as ``_bits.exp2i``)."""
  return lax.bitcast_convert_type((e + F32_EXP_BIAS) << F32_MANT_BITS, jnp.float32)


def _finish_tile(acc, ea, eb, out_dtype):
  """``int8_finish`` of an int32 tile, rows ``ea`` and columns ``eb`` (NaN rows folded in), as ``out_dtype``."""
  e_raw = lax.broadcast_in_dim(ea, acc.shape, (0,)) + lax.broadcast_in_dim(eb, acc.shape, (1,))
  e = jnp.maximum(e_raw, _MIN_EXPONENT)
  half = e >> 1
  y = acc.astype(jnp.float32) * _pow2(half) * _pow2(e - half)
  return jnp.where(e_raw >= NAN_EXPONENT // 2, jnp.float32(jnp.nan), y).astype(out_dtype)


def _kernel(a_gmem, b_gmem, ea_gmem, eb_gmem, out_gmem, *, c: Config, k_iters: int, m_iters: int,
            n_iters: int):
  cta_m, cta_n = c.tile_m, 2 * c.tile_n
  swizzle = plgpu.find_swizzle(c.tile_k * 8)
  in_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_dtype = out_gmem.dtype
  out_bytes = jnp.dtype(out_dtype).itemsize
  out_swizzle = plgpu.find_swizzle(c.epi * out_bytes * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_bytes)), plgpu.SwizzleTransform(out_swizzle))

  shared = lambda along: ("cluster",) if c.cluster == along else ()

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec((cta_m, c.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                                  memory_space=plgpu.SMEM, delay_release=c.delay_release,
                                  collective_axes=shared("n")),
                  plgpu.BlockSpec((cta_n, c.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                                  memory_space=plgpu.SMEM, delay_release=c.delay_release,
                                  collective_axes=shared("m"))],
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
      mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, c.grid_tile_width)
      if c.cluster is not None:  # the cluster's two CTAs take neighbouring tiles
        cta = lax.axis_index("cluster")
        mi, ni = (mi * 2 + cta, ni) if c.cluster == "m" else (mi, ni * 2 + cta)
      m_sl, n_sl = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
      wg_n = pl.ds(wg * c.tile_n, c.tile_n)

      def context(eval_pipeline):
        # The tile's exponents land while the K loop runs. The previous tile's epilogue read them into
        # registers before its commit_smem (a warpgroup barrier), so the copy cannot overwrite a live read.
        plgpu.copy_gmem_to_smem(ea_gmem.at[m_sl], ea_smem.at[wg], e_barrier.at[2 * wg])
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
              plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem.at[m_sl, n_sl].at[:, wg_n].at[rs, cs])

      def body(_, a_smem, b_smem, acc_ref):
        # B's tile is (N, K) in shared memory: wgmma reads it K-major through the transposed view.
        plgpu.wgmma(acc_ref, a_smem, b_smem.at[wg_n].transpose((1, 0)))
        plgpu.wgmma_wait(c.delay_release)
        return acc_ref

      pipeline(body, context)(a_gmem.at[m_sl, :], b_gmem.at[n_sl, :], allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def scaled_gemm(codes_a, codes_b, ea, eb, nan_a, nan_b, *, out_dtype, config: Config = CONFIG):
  """``where(nan_a | nan_b, NaN, (A @ B.T) * 2**max(ea + eb, -200))`` as ``out_dtype``, one kernel.

  ``codes_a (M, K)``, ``codes_b (N, K)`` int8; ``ea (M,)``, ``eb (N,)`` integer row exponents; ``nan_a``,
  ``nan_b`` bool. The bits of XLA's int8 dot followed by ``int8_finish`` (tests check them on a GPU).
  """
  m, k = codes_a.shape
  n = codes_b.shape[0]
  if why := gemm_obstacle(m, n, k, out_dtype, config):
    raise ValueError(f"scaled_gemm: {why}")
  ea = jnp.where(nan_a, NAN_EXPONENT, ea.astype(jnp.int32))
  eb = jnp.where(nan_b, NAN_EXPONENT, eb.astype(jnp.int32))
  cm, cn = _cluster_tile(config)
  kernel = functools.partial(_kernel, c=config, k_iters=k // config.tile_k, m_iters=m // cm, n_iters=n // cn)
  clusters = {} if config.cluster is None else {"cluster": (2,), "cluster_names": ("cluster",)}
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(_sm_count() // (1 + (config.cluster is not None)),),
      grid_names=("sm",),
      **clusters,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(codes_a, codes_b, ea, eb)
