"""Issue 15: QAT's stochastically rounded fake quantization as one Pallas pass, threefry inside.

The 8192-token NVFP4 QAT step spends ~10 ms a step outside its GEMMs (H200 profile in
benchmarks/results/dp_qat/run1_variants.json: one XLA fusion alone, the stochastic codes of a
gradient operand, 2.3 ms), where the bf16 step takes 11.2 ms in all. The gradient operands are
fake-quantized with stochastic rounding: per element one float32 uniform from
``jax.random.uniform(key, blocked_shape)`` (partitionable threefry: the hash of the element's flat
index), the block scale, the rounding and the dequantize back to bf16. This kernel does all of it in
one pass over a 2-D operand blocked along its last axis (what fp4jax.qat.dot hands the backward GEMMs
since cf70679): threefry2x32 of the flat index computed in the kernel, the scale rules and element
arithmetic of fp4jax.kernels.quantize_pack / dequantize. It must equal
``fp4jax.qat.fake.fake_quantize_operand`` (the stochastic route) bit for bit, draws included.

  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --check      # CPU: interpret mode, vs XLA
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --lower      # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR    # GPU: bits and times, ~2 min
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR --small  # CPU: that path, small
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

import fp4jax as fj
from fp4jax import _bits
from fp4jax.kernels import common as C
from fp4jax.kernels.dequantize import _scaled
from fp4jax.kernels.quantize_pack import _e4m3_scale_code, _pow2_rule_exponent
from fp4jax.qat import OperandConfig
from fp4jax.qat.fake import fake_quantize_operand
from fp4jax.qat.rounding import _stochastic_magnitude
from fp4jax.reference import global_factors
from fp4jax.scales import global_encode_numerator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(v, r: int):
  return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(k1, k2, x0, x1):
  """The Threefry-2x32 block (20 rounds) of jax.random's default PRNG, on uint32 arrays."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def uniform_from_index(k1, k2, idx):
  """``jax.random.uniform(key, shape)[i]`` for flat indices ``idx < 2**32`` (uint32), threefry partitionable."""
  b0, b1 = threefry2x32(k1, k2, jnp.zeros_like(idx), idx)
  bits = (b0 ^ b1) >> np.uint32(9) | np.uint32(0x3F800000)
  return lax.bitcast_convert_type(bits, jnp.float32) - np.float32(1.0)


def _kernel(x_ref, key_ref, g_ref, o_ref, *, fmt, rule, ncols: int, block_m: int, block_k: int):
  bs = fmt.block_size
  x = C.split_axis(x_ref[...].astype(jnp.float32), 1, bs)  # (block_m, nb, bs)
  abits = C.f32_to_i32(x) & 0x7FFFFFFF
  amax_bits = jnp.max(abits, axis=2, keepdims=True)
  nonfinite = amax_bits >= 0x7F800000
  amax_bits = jnp.where(nonfinite | (amax_bits < 0x00800000), 0, amax_bits)
  xf = C.flush_f32(x)
  if fmt.power_of_two_scales:
    e = _pow2_rule_exponent(amax_bits, fmt, rule)
    scale_code = e + fmt.scale_bias
    a = (-e) >> 1  # the reference's scale_by_pow2(x, -e): two normal factors
    y = xf * C.i32_to_f32((a + 127) << 23) * C.i32_to_f32((-e - a + 127) << 23)
    gdec = None
  else:
    gdec, genc = g_ref[0], g_ref[1]
    scale_code = _e4m3_scale_code(amax_bits, genc, fmt, rule)
    s = C.flush_f32(C.decode_magnitude(scale_code, C.ElemCodec.of(fmt.scale_dtype)) * gdec)
    pos = s > 0
    # compute_once, as quantize_pack: unfenced, jax 0.11's CPU compiler takes minutes on interpret mode.
    y = xf * _bits.compute_once(jnp.where(pos, _bits.div_rn(1.0, jnp.where(pos, s, 1.0)), 0.0))
  y = jnp.clip(y, -fmt.elem_max, fmt.elem_max)

  # fp4jax.qat.rounding's rounding, its uniform drawn here from the element's flat index; the sign
  # stays an integer (Triton may drop the sign of a zero in float arithmetic, kernels/dequantize.py).
  row = pl.program_id(0) * block_m + lax.broadcasted_iota(jnp.int32, (block_m, block_k), 0)
  col = pl.program_id(1) * block_k + lax.broadcasted_iota(jnp.int32, (block_m, block_k), 1)
  idx = (row.astype(jnp.uint32) * np.uint32(ncols) + col.astype(jnp.uint32))
  u = C.split_axis(uniform_from_index(key_ref[0], key_ref[1], idx), 1, bs)
  r = _stochastic_magnitude(jnp.abs(y), u, fmt)
  sign = C.f32_to_i32(y) & jnp.int32(-(2**31))
  r = jnp.where(nonfinite, 0.0, r)  # quantize's zero codes in non-finite blocks (their scale is NaN)
  sbytes = jnp.where(nonfinite, fmt.scale_nan_byte, scale_code)
  out = _scaled(r, jnp.where(nonfinite, 0, sign), sbytes, fmt, gdec, jnp.float32)
  o_ref[...] = out.reshape(block_m, block_k).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "rule", "dtype", "block_m", "block_k", "interpret"))
def fused_sr_fake_quant(x, key, *, fmt, rule, dtype=jnp.bfloat16, block_m=32, block_k=256, interpret=False):
  """fake_quantize_operand(x, OperandConfig(fmt, rule, 'stochastic'), -1, dtype, key) for 2-D ``x``."""
  rows, cols = x.shape
  if rows % block_m or cols % block_k or block_k % fmt.block_size or rows * cols >= 2**32:
    raise ValueError(f"qat_fused_sr: shape {x.shape} must tile by ({block_m}, {block_k}), under 2**32 elements")
  kd = jax.random.key_data(key).astype(jnp.uint32).reshape(2)
  if fmt.has_global_scale:
    # The reference's tensor amax (finite elements, subnormals flushed) and factors, in XLA: one read.
    bits = _bits.f32_bits(_bits.flush_subnormals(x.astype(jnp.float32))) & jnp.uint32(0x7FFFFFFF)
    amax = _bits.from_f32_bits(jnp.max(jnp.where(bits < jnp.uint32(0x7F800000), bits, 0)))
    genc, gdec = global_factors(amax, fmt, global_encode_numerator(fmt, rule))
    g = jnp.stack([gdec, genc]).astype(jnp.float32)
  else:
    g = jnp.zeros((2,), jnp.float32)
  kernel = functools.partial(_kernel, fmt=fmt, rule=rule, ncols=cols, block_m=block_m, block_k=block_k)
  return pl.pallas_call(
      kernel,
      grid=(rows // block_m, cols // block_k),
      in_specs=[pl.BlockSpec((block_m, block_k), lambda i, j: (i, j)),
                pl.BlockSpec((2,), lambda i, j: (0,)),
                pl.BlockSpec((2,), lambda i, j: (0,))],
      out_specs=pl.BlockSpec((block_m, block_k), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct(x.shape, dtype),
      compiler_params=C.compiler_params(4, 2),
      interpret=interpret,
      name=f"fused_sr_{fmt.name}_{rule}",
  )(x, kd, g)


def reference(x, key, fmt, rule, dtype=jnp.bfloat16):
  op = OperandConfig(fmt, rule, "stochastic")
  return fake_quantize_operand(x, op, -1, dtype, key)


def _inputs(shape, dtype, seed, specials=False):
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32) * jnp.exp2(jax.random.randint(ks, shape[:1] + (1,), -20, 20))
  if specials:
    x = x.at[0, 3].set(jnp.nan).at[1, 40].set(jnp.inf).at[2, :32].set(0.0).at[3, 5].set(1e-40)
  return x.astype(dtype)


def mismatches(a, b):
  a, b = np.asarray(a), np.asarray(b)
  same = (a.view(np.uint16) == b.view(np.uint16)) | (np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32)))
  return int(np.sum(~same))


CASES = [(fj.MXFP4, "ceil"), (fj.MXFP4, "floor"), (fj.NVFP4, "nearest"), (fj.NVFP4, "ceil")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="CPU: interpret mode against the XLA route, bit for bit")
  p.add_argument("--lower", action="store_true", help="CPU: lower for CUDA")
  p.add_argument("--out", help="GPU: bits and times, OUT/qat_fused_sr.json")
  p.add_argument("--small", action="store_true", help="--out on a CPU: small shapes, interpret mode")
  p.add_argument("--formats", default="", help="--check only these formats (comma-separated names)")
  a = p.parse_args(argv)
  key = jax.random.fold_in(jax.random.key(7), 3)
  kd = jax.random.key_data(key).astype(jnp.uint32)
  idx = jnp.arange(4096, dtype=jnp.uint32)
  ok = np.array_equal(np.asarray(uniform_from_index(kd[0], kd[1], idx)),
                      np.asarray(jax.random.uniform(key, (4096,), jnp.float32)))
  print(f"in-kernel threefry uniforms equal jax.random.uniform: {ok}", flush=True)
  if a.check:
    for fmt, rule in CASES:
      if a.formats and fmt.name not in a.formats.split(","):
        continue
      for dt in (jnp.bfloat16, jnp.float32):
        x = _inputs((64, 512), dt, seed=1, specials=True)
        got = fused_sr_fake_quant(x, key, fmt=fmt, rule=rule, interpret=True)
        want = reference(x, key, fmt, rule)
        # Control: the draws matter (another key moves many elements), so equality above is not luck.
        other = reference(x, jax.random.fold_in(key, 1), fmt, rule)
        print(f"{fmt.name} {rule} {jnp.dtype(dt).name}: {mismatches(got, want)} of {x.size} differ "
              f"(another key: {mismatches(other, want)} differ)", flush=True)
  if a.lower:
    x = jnp.zeros((256, 1024), jnp.bfloat16)
    for fmt, rule in CASES:
      text = jax.jit(functools.partial(fused_sr_fake_quant, fmt=fmt, rule=rule)).trace(x, key).lower(
          lowering_platforms=("cuda",)).as_text()
      print(f"lowered for CUDA: {fmt.name} {rule}: {len(text)} chars", flush=True)
  if a.out:
    import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)
    os.makedirs(a.out, exist_ok=True)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "threefry_equal": ok}
    shapes = ((128, 512),) if a.small else ((8192, 4096), (8192, 14336), (4096, 14336))
    for shape in shapes:
      xs = [_inputs(shape, jnp.bfloat16, seed=s) for s in range(3)]
      row = {"copy_us": B.bench(lambda v: v + 1, [(v,) for v in xs]) * 1e6}
      for fmt, rule in CASES[::2]:
        name = f"{fmt.name}_{rule}"
        got = fused_sr_fake_quant(xs[0], key, fmt=fmt, rule=rule, interpret=a.small)
        row[name + "_mismatches"] = mismatches(got, jax.jit(reference, static_argnums=(2, 3))(xs[0], key, fmt, rule))
        for bm, bk in ((32, 256), (16, 512), (64, 128)):
          f = functools.partial(fused_sr_fake_quant, fmt=fmt, rule=rule, block_m=bm, block_k=bk,
                                interpret=a.small)
          row[f"{name}_kernel_{bm}x{bk}_us"] = B.bench(lambda v, f=f: f(v, key), [(v,) for v in xs]) * 1e6
        row[name + "_xla_us"] = B.bench(lambda v, fmt=fmt, rule=rule: reference(v, key, fmt, rule),
                                        [(v,) for v in xs]) * 1e6
      res["x".join(map(str, shape))] = row
      print(shape, json.dumps(row), flush=True)
      with open(os.path.join(a.out, "qat_fused_sr.json"), "w") as f:
        json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
