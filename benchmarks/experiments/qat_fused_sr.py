"""Issue 15: times of the fused QAT fake-quantization kernel (fp4jax.kernels.fake_quant) per operand and tile.

The kernel began here (up to 0eeeccd this script held it, with its own threefry and bit checks); it is now
``fp4jax/kernels/fake_quant.py``, reached through ``QatConfig(backend="pallas")``, and its bit checks are
tests/test_kernels_fake_quant.py (interpret mode on the CPU, compiled on a GPU) and
tests/test_kernels_lowering.py. What is left here is what a benchmark row does not show:

* ``--out DIR``: each of the QAT step's operand kinds (8192 x 4096 blocked along d and along the tokens,
  8192 x 14336 along the tokens), stochastic and nearest, MXFP4 (ceil) and NVFP4 (nearest), the first three
  tiles of ``fake_quant.TILES`` (``--tiles N``), NVFP4 with its block factors from XLA and from the kernel
  (a table of the 127 codes' factors), against the XLA route and a copy; bits against the XLA route;
  ``--formats nvfp4`` for one format;
* ``--step``: benchmarks/qat_step.py's step with ``backend="xla"`` and ``"pallas"``, the latter once per
  ``--tile0`` (the tile of the operands blocked along axis 0, put first in ``TILES`` for that run), and
  with ``--step-in-kernel 01,1`` NVFP4 once more per group of block axes whose factors come from the kernel.

  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR             # GPU, ~2 min
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR --step --step-only \\
    --step-modes bf16,mxfp4 --tile0 64x128,256x32                                  # GPU, ~1 min
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR --small [--step]   # CPU, interpret mode
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fp4jax as fj
from fp4jax import kernels
from fp4jax.kernels import fake_quant as fk
from fp4jax.qat import OperandConfig
from fp4jax.qat.fake import fake_quantize_operand

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = [(fj.MXFP4, "ceil"), (fj.NVFP4, "nearest")]


def reference(x, key, fmt, rule, axis=1, dtype=jnp.bfloat16):
  """The XLA route of fp4jax.qat.dot._backward_operand for 2-D ``x`` (no padding, no Hadamard)."""
  op = OperandConfig(fmt, rule, "stochastic" if key is not None else "nearest")
  if axis == 0:
    xt = lax.optimization_barrier(jnp.moveaxis(x, 0, 1))
    return jnp.moveaxis(fake_quantize_operand(xt, op, 1, dtype, key), 1, 0)
  return fake_quantize_operand(x, op, axis, dtype, key)


def _inputs(shape, dtype, seed):
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32) * jnp.exp2(jax.random.randint(ks, shape[:1] + (1,), -20, 20))
  return x.astype(dtype)


def mismatches(a, b):
  a, b = np.asarray(a), np.asarray(b)
  same = (a.view(np.uint16) == b.view(np.uint16)) | (np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32)))
  return int(np.sum(~same))


def operand_section(a, key):
  import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)
  cases = [((256, 512), 1), ((512, 256), 0)] if a.small else [((8192, 4096), 1), ((8192, 4096), 0), ((8192, 14336), 0)]
  out = {}
  for shape, axis in cases:
    xs = [_inputs(shape, jnp.bfloat16, seed=s) for s in range(3)]
    row = {"copy_us": B.bench(lambda v: v + 1, [(v,) for v in xs]) * 1e6}
    for fmt, rule in [c for c in CASES if c[0].name in a.formats]:
      ref = jax.jit(reference, static_argnums=(2, 3, 4))
      for name, k in ((f"{fmt.name}_{rule}_stochastic", key), (f"{fmt.name}_{rule}_nearest", None)):
        # NVFP4: block scales and factors from XLA before the kernel and in it (a table of factors).
        for block_pass in (True, False) if fmt.has_global_scale else (False,):
          tag = "_in_kernel" if fmt.has_global_scale and not block_pass else ""
          row[name + tag + "_mismatches"] = mismatches(
              fk.fake_quantize_2d(xs[0], k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=a.small,
                                  block_pass=block_pass),
              ref(xs[0], k, fmt, rule, axis))
          for tile in fk.TILES[axis][:a.tiles]:
            f = jax.jit(lambda v, k, tile=tile, fmt=fmt, rule=rule, bp=block_pass: fk.fake_quantize_2d(
                v, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=a.small, tile=tile, block_pass=bp))
            row[f"{name}_kernel_{tile[0]}x{tile[1]}{tag}_us"] = B.bench(lambda v, f=f, k=k: f(v, k), [(v,) for v in xs]) * 1e6
        row[name + "_xla_us"] = B.bench(lambda v, k=k, fmt=fmt, rule=rule: ref(v, k, fmt, rule, axis),
                                        [(v,) for v in xs]) * 1e6
    out[f"{shape[0]}x{shape[1]}_axis{axis}"] = row
    print(shape, axis, json.dumps(row), flush=True)
  return out


def step_section(a):
  """benchmarks/qat_step.py's step, backend="xla" and "pallas" (once per --tile0), one process."""
  import qat_step
  d, ffn, tokens = (128, 256, 256) if a.small else (4096, 14336, 8192)
  samples, steps = (2, 2) if a.small else (5, 5)
  out, tiles0, block_pass_default = {}, fk.TILES[0], dict(fk.E4M3_BLOCK_PASS)
  for mode in a.step_modes.split(","):
    runs = [("xla", "xla", None, None)] + ([] if mode == "bf16" else
                                           [(f"pallas_axis0_{t[0]}x{t[1]}", "pallas", t, None) for t in a.tile0])
    if mode.startswith("nvfp4"):
      runs += [(f"pallas_in_kernel_axes{''.join(map(str, axes))}", "pallas", None,
                {ax: ax not in axes for ax in (0, 1)}) for axes in a.step_in_kernel]
    row = {}
    for name, backend, tile0, block_pass in runs:
      # The kernel picks its tile and block pass when traced: a new choice needs fresh traces.
      fk.TILES[0] = tiles0 if tile0 is None else (tile0,) + tuple(t for t in tiles0 if t != tile0)
      fk.E4M3_BLOCK_PASS = dict(block_pass_default if block_pass is None else block_pass)
      jax.clear_caches()
      with kernels.interpret_mode(a.small):
        med, lo, hi, comp, loss = qat_step.bench(mode, d, ffn, tokens, samples, steps, "threefry2x32", False,
                                                 backend)
      row[name] = {"ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3, "compile_s": comp, "loss": loss}
    fk.TILES[0], fk.E4M3_BLOCK_PASS = tiles0, block_pass_default
    out[mode] = row
    print(mode, json.dumps(row), flush=True)
  return out


def tiles_arg(s):
  """"64x128,128x64" -> [(64, 128), (128, 64)]"""
  return [tuple(int(n) for n in t.split("x")) for t in s.split(",") if t]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="results in OUT/qat_fused_sr.json")
  p.add_argument("--small", action="store_true", help="on a CPU: small shapes, interpret mode")
  p.add_argument("--step", action="store_true", help="also the QAT step, backend xla vs pallas")
  p.add_argument("--step-only", action="store_true", help="with --step: skip the per-operand times")
  p.add_argument("--step-modes", default="bf16,mxfp4,nvfp4", help="benchmarks/qat_step.py modes --step times")
  p.add_argument("--tile0", type=tiles_arg, default=[fk.TILES[0][0]],
                 help="--step: the kernel's first-choice tiles for operands blocked along axis 0 (64x128,...)")
  p.add_argument("--formats", default="mxfp4,nvfp4", help="per-operand times of these formats")
  p.add_argument("--tiles", type=int, default=3, help="per-operand times of the first N tiles of fake_quant.TILES")
  p.add_argument("--step-in-kernel", type=lambda v: [tuple(int(c) for c in t) for t in v.split(",") if t], default=[],
                 help="--step: NVFP4 also with its block factors in the kernel along these block axes, "
                      "one run each: '01,1' = both axes, then axis 1 alone (fake_quant.E4M3_BLOCK_PASS)")
  a = p.parse_args(argv)
  key = jax.random.fold_in(jax.random.key(7), 3)
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "qat_fused_sr.json")
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if not a.step_only:
    res["operands"] = operand_section(a, key)
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
  if a.step:
    res["step"] = step_section(a)
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
