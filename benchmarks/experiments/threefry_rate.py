"""How fast a Pallas-Triton kernel can hash with threefry2x32 on the GPU (issue 15: the QAT step's stochastic
rounding, bound by the integer rate).

Three kernels over an (8192, 14336) grid of flat indices (the SwiGLU gradients' size), each reducing its tile's
hashes to one int32 so that almost nothing is written: ``jnp``, the fake-quantization kernel's own
``_threefry2x32`` (shifts and ors for the rotations, as LLVM sees them); ``asm``, the same 20 rounds as one PTX
block (``shf.l.wrap.b32`` rotations, ``elementwise_inline_asm``); ``none``, the index alone (the floor). Then the
fused stochastic-rounding fake quantization itself, along each axis. The bits of ``jnp`` and ``asm`` are compared
element for element on a smaller grid.

  PYTHONPATH=. python3 benchmarks/experiments/threefry_rate.py --out DIR   # GPU, ~1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fp4jax.formats import MXFP4
from fp4jax.kernels import common as C
from fp4jax.kernels import fake_quant as fk


def threefry_ptx() -> str:
  """One PTX block: ``$0 = b0 ^ b1`` for ``b0, b1 = threefry2x32((k1=$1, k2=$2), (0, $3))``, 20 rounds (the
  lowering takes one result; the xor is what the partitionable draws use)."""
  lines = ["{", ".reg .u32 x0, x1, k0, k1, k2;", "mov.u32 k0, $1;", "mov.u32 k1, $2;",
           "xor.b32 k2, k0, k1;", "xor.b32 k2, k2, 0x1BD11BDA;", "mov.u32 x0, k0;", "add.u32 x1, $3, k1;"]
  ks = ("k0", "k1", "k2")
  for i in range(5):
    for r in fk._ROTATIONS[i % 2]:
      lines += ["add.u32 x0, x0, x1;", f"shf.l.wrap.b32 x1, x1, x1, {r};", "xor.b32 x1, x1, x0;"]
    lines += [f"add.u32 x0, x0, {ks[(i + 1) % 3]};", f"add.u32 x1, x1, {ks[(i + 2) % 3]};", f"add.u32 x1, x1, {i + 1};"]
  lines += ["xor.b32 $0, x0, x1;", "}"]
  return "\n".join(lines)


def hash_asm(k1, k2, idx):
  # Triton's inline asm takes signless integers: int32 in and out, bitcast around it.
  i32 = lambda v: lax.bitcast_convert_type(v, jnp.int32)
  shape = jax.ShapeDtypeStruct(idx.shape, jnp.int32)
  (bits,) = plgpu.elementwise_inline_asm(
      threefry_ptx(), args=[jnp.broadcast_to(i32(k1), idx.shape), jnp.broadcast_to(i32(k2), idx.shape), i32(idx)],
      constraints="=r,r,r,r", pack=1, result_shape_dtypes=[shape])
  return lax.bitcast_convert_type(bits, jnp.uint32)


def _kernel(key_ref, o_ref, *, how, tile, n_cols, full):
  row = (pl.program_id(0) * tile[0] + lax.broadcasted_iota(jnp.int32, tile, 0)).astype(jnp.uint32)
  col = (pl.program_id(1) * tile[1] + lax.broadcasted_iota(jnp.int32, tile, 1)).astype(jnp.uint32)
  idx = row * np.uint32(n_cols) + col
  if how == "none":
    bits = idx
  else:
    if how == "jnp":
      b0, b1 = fk._threefry2x32(key_ref[0], key_ref[1], jnp.zeros_like(idx), idx)
      bits = b0 ^ b1
    else:
      bits = hash_asm(key_ref[0], key_ref[1], idx)
  if full:
    o_ref[...] = bits
  else:
    o_ref[0, 0] = jnp.sum(lax.bitcast_convert_type(bits, jnp.int32) & 0xFFFF)


def run(how, shape, tile, full=False, warps=4):
  grid = (shape[0] // tile[0], shape[1] // tile[1])
  out_shape = shape if full else grid
  out_block = tile if full else (1, 1)
  kernel = functools.partial(_kernel, how=how, tile=tile, n_cols=shape[1], full=full)
  f = pl.pallas_call(
      kernel, grid=grid, in_specs=[pl.BlockSpec((2,), lambda i, j: (0,))],
      out_specs=pl.BlockSpec(out_block, lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.uint32 if full else jnp.int32),
      compiler_params=C.compiler_params(warps, 1), name=f"threefry_{how}")
  return jax.jit(f)


def timed(fn, *args, calls=10, samples=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / calls * 1e6)
  return round(statistics.median(ts), 1)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  key = jnp.array([0x12345678, 0x9ABCDEF0], jnp.uint32)
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ptx": threefry_ptx()}
  small = (256, 512)
  ref = np.asarray(run("jnp", small, (32, 256), full=True)(key))
  got = np.asarray(run("asm", small, (32, 256), full=True)(key))
  res["asm_equals_jnp"] = bool((ref == got).all())
  shape = (8192, 14336)
  for how in ("none", "jnp", "asm"):
    for tile, warps in (((32, 256), 4), ((32, 256), 8), ((64, 256), 8)):
      name = f"{how}_{tile[0]}x{tile[1]}_w{warps}"
      try:
        us = timed(run(how, shape, tile, warps=warps), key)
        res[name] = {"us": us, "G_hash_per_s": round(shape[0] * shape[1] / us / 1e3, 1)}
      except Exception as e:  # recorded, not fatal
        res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(name, res[name], flush=True)
  x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
  k = jax.random.key(3)
  for axis in (0, 1):
    f = jax.jit(functools.partial(fk.fake_quantize_2d, fmt=MXFP4, rule="ceil", axis=axis, dtype=jnp.bfloat16))
    res[f"fake_quant_sr_axis{axis}"] = {"us": timed(f, x, k)}
    print(axis, res[f"fake_quant_sr_axis{axis}"], flush=True)
  with open(os.path.join(a.out, "threefry_rate.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  return 0


if __name__ == "__main__":
  main()
