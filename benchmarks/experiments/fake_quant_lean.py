"""Issue 15: the fake-quantization kernel's power-of-two route on magnitude bits, against the signed route it
replaced, per operand and in the QAT step.

``--baseline FILE`` is a copy of ``fp4jax/kernels/fake_quant.py`` before the change (e.g. ``git show
6dc03fd:fp4jax/kernels/fake_quant.py > /tmp/fq_before.py``), loaded as its own module. For each case on an
(8192, 14336) bfloat16 operand (the SwiGLU gradients' size; 4 of them rotated, beyond L2) it times the baseline
and the current kernel at each ``--warps`` (``fake_quant.NUM_WARPS``) and counts the elements whose bits differ
from the baseline's. ``--step`` then times benchmarks/qat_step.py's MXFP4 step with the current kernel and with the
baseline's (its ``_pallas`` swapped in), between bf16 steps, all in one process; ``--tiles0`` first picks the
fastest tile and warps of the stochastic pass along axis 0 for that step (``--warps1``: axis 1's warps).

  git show 6dc03fd:fp4jax/kernels/fake_quant.py > fq_before.py
  PYTHONPATH=. python3 benchmarks/experiments/fake_quant_lean.py --baseline fq_before.py --step --out DIR  # GPU
  PYTHONPATH=. python3 benchmarks/experiments/fake_quant_lean.py --baseline fq_before.py --no-kernels --warps1 8 \
      --tiles0 32x256,64x128,128x64 --step --out DIR  # GPU: axis-0 tiles, then the step with the fastest
  PYTHONPATH=. python3 benchmarks/experiments/fake_quant_lean.py --no-kernels --nvfp4 --out DIR  # GPU: NVFP4's tiles
  git show main:fp4jax/kernels/fake_quant.py > fq_main.py   # on a branch: its kernel against main's in the step
  PYTHONPATH=. python3 benchmarks/experiments/fake_quant_lean.py --baseline fq_main.py --no-kernels --step \
      --step-modes nvfp4,mxfp8 --out DIR
  PYTHONPATH=. python3 benchmarks/experiments/fake_quant_lean.py --baseline fq_before.py --small --out DIR  # CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fp4jax as fj
from fp4jax.kernels import fake_quant as fk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: (format, rule, stochastic, axis): the MXFP4 step's four kinds of pass, MXFP8's gradient and NVFP4's three.
CASES = [(fj.MXFP4, "ceil", True, 0), (fj.MXFP4, "ceil", True, 1), (fj.MXFP4, "floor", False, 0),
         (fj.MXFP4, "floor", False, 1), (fj.MXFP8_E4M3, "ceil", True, 0), (fj.NVFP4, "nearest", True, 0),
         (fj.NVFP4, "nearest", True, 1), (fj.NVFP4, "nearest", False, 1)]


def load_baseline(path):
  spec = importlib.util.spec_from_file_location("fake_quant_baseline", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def differing(a, b) -> int:
  a, b = np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16)
  return int(np.sum(a != b))


def gradients(a):
  """The operands the sweeps rotate through: standard normal bfloat16 of the SwiGLU gradients' size."""
  shape = (256, 512) if a.small else (8192, 14336)
  return [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(2 if a.small else 4)]


def kernel_section(a, base):
  import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)

  shape = (256, 512) if a.small else (8192, 14336)
  xs = [(jax.random.normal(jax.random.key(i), shape, jnp.float32)
         * jnp.exp2(jax.random.randint(jax.random.key(100 + i), shape[:1] + (1,), -8, 8))).astype(jnp.bfloat16)
        for i in range(2 if a.small else 4)]
  key = jax.random.key(3)
  out, warps0 = {}, dict(fk.NUM_WARPS)
  for fmt, rule, stochastic, axis in CASES:
    k = key if stochastic else None
    name = f"{fmt.name}_{rule}_{'sr' if stochastic else 'rn'}_axis{axis}"
    row = {}
    call = lambda mod: jax.jit(lambda v, mod=mod: mod.fake_quantize_2d(
        v, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16, interpret=a.small))
    ref = call(base)
    want = ref(xs[0])
    row["baseline_us"] = B.bench(ref, [(v,) for v in xs]) * 1e6
    for w in a.warps:
      fk.NUM_WARPS = {**warps0, (axis, stochastic): w}
      jax.clear_caches()
      f = call(fk)
      row[f"warps{w}_differing"] = differing(f(xs[0]), want)
      row[f"warps{w}_us"] = B.bench(f, [(v,) for v in xs]) * 1e6
    fk.NUM_WARPS = warps0
    out[name] = row
    print(name, json.dumps(row), flush=True)
  return out


def tile_section(a):
  """The current kernel's stochastic MXFP4 pass along axis 0 over ``--tiles0`` x ``--warps``; the fastest is
  put in ``fake_quant.STOCHASTIC_TILE[0]`` / ``NUM_WARPS[0, True]`` for the step (returned with the
  times)."""
  import matmul as B

  xs = gradients(a)
  key = jax.random.key(3)
  times = {}
  for tile in a.tiles0:
    for w in a.warps:
      fk.NUM_WARPS = {**fk.NUM_WARPS, (0, True): w}
      jax.clear_caches()
      f = jax.jit(lambda v, tile=tile: fk.fake_quantize_2d(v, key, fmt=fj.MXFP4, rule="ceil", axis=0,
                                                           dtype=jnp.bfloat16, interpret=a.small, tile=tile))
      times[f"{tile[0]}x{tile[1]}_warps{w}_us"] = B.bench(f, [(v,) for v in xs]) * 1e6
      print(tile, w, times[f"{tile[0]}x{tile[1]}_warps{w}_us"], flush=True)
  best = min(times, key=times.get)
  tile = tuple(int(n) for n in best.split("_")[0].split("x"))
  fk.STOCHASTIC_TILE = {**fk.STOCHASTIC_TILE, 0: tile}
  fk.NUM_WARPS = {**fk.NUM_WARPS, (0, True): int(best.split("_")[1][5:])}
  return {"us": times, "chosen_tile0": tile, "chosen_warps": {str(k): v for k, v in fk.NUM_WARPS.items()}}


NVFP4_TILES = {0: ((64, 128), (32, 256), (32, 128), (128, 64)), 1: ((32, 256), (16, 512), (64, 128))}


def nvfp4_section(a):
  """NVFP4's stochastic passes along each axis over :data:`NVFP4_TILES` x ``--warps``, with the block scales
  from an XLA pass before the kernel and from the kernel itself (``block_pass``)."""
  import matmul as B

  xs = gradients(a)
  key = jax.random.key(3)
  times, warps0 = {}, dict(fk.NUM_WARPS)
  for axis, tiles in NVFP4_TILES.items():
    for tile in tiles:
      for w in a.warps:
        for bp in (True, False):
          fk.NUM_WARPS = {**warps0, (axis, True): w}
          jax.clear_caches()
          f = jax.jit(lambda v, tile=tile, axis=axis, bp=bp: fk.fake_quantize_2d(
              v, key, fmt=fj.NVFP4, rule="nearest", axis=axis, dtype=jnp.bfloat16, interpret=a.small, tile=tile,
              block_pass=bp))
          name = f"axis{axis}_{tile[0]}x{tile[1]}_warps{w}_{'xla' if bp else 'kernel'}_block_scales_us"
          times[name] = B.bench(f, [(v,) for v in xs]) * 1e6
          print(name, times[name], flush=True)
  fk.NUM_WARPS = warps0
  return times


def step_section(a, base):
  import qat_step

  current = fk._pallas

  def variant(name, f):
    """``f`` with the baseline's kernel for a '_baseline' mode."""
    def run(*args):
      fk._pallas = base._pallas if name.endswith("_baseline") else current
      try:
        return f(*args)
      finally:
        fk._pallas = current
    return run

  modes = ("bf16",) + tuple(m for mode in a.step_modes for m in (mode, f"{mode}_baseline"))
  return qat_step.rounds(modes, a.repeats, a.small, wrap=variant, samples_steps=(5, 4))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--baseline", help="a copy of fake_quant.py from before the change (the per-case times, --step)")
  p.add_argument("--warps", type=lambda s: [int(w) for w in s.split(",")], default=[4, 8])
  p.add_argument("--tiles0", type=lambda s: [tuple(int(n) for n in t.split("x")) for t in s.split(",")],
                 help="time these tiles of the stochastic axis-0 pass and run the step with the fastest")
  p.add_argument("--warps1", type=int, help="fake_quant.NUM_WARPS[1, True] for the tile sweep and the step")
  p.add_argument("--nvfp4", action="store_true", help="NVFP4's stochastic passes over tiles x --warps")
  p.add_argument("--step", action="store_true", help="also the QAT step, current vs baseline kernel")
  p.add_argument("--step-modes", type=lambda v: v.split(","), default=["mxfp4"],
                 help="--step: benchmarks/qat_step.py modes, each with the current and the baseline kernel")
  p.add_argument("--repeats", type=int, default=2, help="--step: rounds of bf16 then each mode, current, baseline")
  p.add_argument("--no-kernels", action="store_true", help="skip the per-case times")
  p.add_argument("--small", action="store_true", help="CPU smoke run: small shapes, interpret mode")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  if (a.step or not a.no_kernels) and not a.baseline:
    p.error("--baseline is needed for the per-case times and --step")
  base = load_baseline(a.baseline) if a.baseline else None
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if not a.no_kernels:
    result["kernels"] = kernel_section(a, base)
  if a.warps1:
    fk.NUM_WARPS = {**fk.NUM_WARPS, (1, True): a.warps1}
  if a.tiles0:
    result["tiles0"] = tile_section(a)
  if a.nvfp4:
    result["nvfp4"] = nvfp4_section(a)
  if a.step:
    result["step"] = step_section(a, base)
  with open(os.path.join(a.out, "fake_quant_lean.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
