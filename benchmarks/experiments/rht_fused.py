"""Issue 15: the random Hadamard transform of QAT's backward operands inside the fake-quantization kernel.

Before, ``QatConfig(hadamard=16)`` sent every backward operand through XLA: a materialized transpose for the
ones blocked along the tokens, the transform (a float32 array written out), then the kernel reading it. Now the
kernel reads the operand in place and transforms each tile itself (``fake_quant._hadamard_tile``, the order of
``fp4jax.hadamard.butterfly``). This times, on an (8192, 14336) bfloat16 operand (4 rotated, beyond L2):

* per pass (``before_tree``: the XLA transform as one graph of slices, to see whether XLA fuses that form): the
  kernel with no transform, with the transform inside (NVFP4: its tensor amax from
  ``kernels.hadamard.transformed_amax``, its block factors from the kernel; along axis 0 also from XLA), and the
  route before (XLA transform, then the kernel), the bits of each against the route before; along axis 1 also
  ``fused_lanes_transposed``, the kernels' transform on the transposed tile, and ``fused_lane_split``, by pair
  splits along the lanes (the library's form before lane planes);
* ``--step``: benchmarks/qat_step.py's NVFP4 and NVFP4 + RHT16 steps against bf16, with the transform in the
  kernel and with it kept out (``fake_quant.supported`` refusing any transform: the route before), in one process
  (``--step-modes``).

  PYTHONPATH=. python3 benchmarks/experiments/rht_fused.py --step --out DIR     # GPU, ~3 min
  PYTHONPATH=. python3 benchmarks/experiments/rht_fused.py --small --out DIR    # CPU smoke run, interpret mode
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
from fp4jax import qat
from fp4jax.hadamard import flush_below_normal, grouped_shape
from fp4jax.kernels import fake_quant as fk
from fp4jax.kernels import hadamard as kh
from fp4jax.qat import rounding

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: (format, rule, stochastic, axis): the NVFP4 + RHT16 step's kinds of backward pass, and MXFP4's gradient.
CASES = [(fj.NVFP4, "nearest", True, 0), (fj.NVFP4, "nearest", True, 1), (fj.NVFP4, "nearest", False, 0),
         (fj.NVFP4, "nearest", False, 1), (fj.MXFP4, "ceil", True, 0)]
N = 16


def butterfly_tree(v, axis, n, signs):
  """``fp4jax.hadamard.butterfly`` as ``n`` separate slices per stage, stacked once at the end: the same
  operations, a graph XLA might fuse into one pass (the library's writes every stage out on a GPU)."""
  shape, axis = v.shape, axis % v.ndim
  g = v.reshape(grouped_shape(shape, axis, n))
  s = np.asarray(signs, np.float32)
  level = [flush_below_normal(lax.index_in_dim(g, j, axis + 1, keepdims=False) * s[j]) for j in range(n)]
  h = 1
  while h < n:
    level = [flush_below_normal(level[i] + level[i | h] if not i & h else level[i & ~h] - level[i])
             for i in range(n)]
    h *= 2
  c = np.float32(1 / np.sqrt(n))
  return jnp.stack([flush_below_normal(y * c) for y in level], axis=axis + 1).reshape(shape)


LIBRARY_TRANSFORM_TILE, LIBRARY_PLANES_MAX = kh.transform_tile, kh.LANE_PLANES_MAX


def transform_tile_lanes_transposed(v, axis, n, signs):
  """``kh.transform_tile`` with the transform along the lanes (axis 1) done on the transposed tile along its
  rows and transposed back: the same operations on the same values, two layout changes in Triton instead of the
  pair splits along the lanes at every stage. Slower on the H200 (rht_fused.json, run4)."""
  if axis == 1:
    return LIBRARY_TRANSFORM_TILE(v.T, 0, n, signs).T
  return LIBRARY_TRANSFORM_TILE(v, axis, n, signs)


def lanes_transposed(f):
  """``f`` with :func:`transform_tile_lanes_transposed` in the kernels."""
  def run(*args):
    kh.transform_tile, kh.LANE_PLANES_MAX = transform_tile_lanes_transposed, 0
    try:
      return f(*args)
    finally:
      kh.transform_tile, kh.LANE_PLANES_MAX = LIBRARY_TRANSFORM_TILE, LIBRARY_PLANES_MAX
  return run


def lane_split(f):
  """``f`` with the kernels' transform along the lanes by pair splits (``kh.LANE_PLANES_MAX = 0``), not planes."""
  def run(*args):
    kh.LANE_PLANES_MAX = 0
    try:
      return f(*args)
    finally:
      kh.LANE_PLANES_MAX = LIBRARY_PLANES_MAX
  return run


def before_tree(x, key, fmt, rule, axis, interpret):
  """:func:`before` with :func:`butterfly_tree` as the XLA transform."""
  library = rounding.butterfly
  rounding.butterfly = butterfly_tree
  try:
    return before(x, key, fmt, rule, axis, interpret)
  finally:
    rounding.butterfly = library


def before(x, key, fmt, rule, axis, interpret):
  """The route before: tokens moved last by a materialized transpose, the transform in XLA, the kernel."""
  if axis == 0:
    x = lax.optimization_barrier(jnp.moveaxis(x, 0, 1))
  t = qat.random_hadamard(x, N, axis=1, seed=0)
  out = fk.fake_quantize_2d(t, key, fmt=fmt, rule=rule, axis=1, dtype=jnp.bfloat16, interpret=interpret)
  return jnp.moveaxis(out, 1, 0) if axis == 0 else out


def pass_section(a):
  import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)

  shape = (256, 512) if a.small else (8192, 14336)
  xs = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(2 if a.small else 4)]
  key = jax.random.key(3)
  out = {}
  for fmt, rule, stochastic, axis in CASES:
    k = key if stochastic else None
    name = f"{fmt.name}_{'sr' if stochastic else 'rn'}_axis{axis}"
    if a.cases and name not in a.cases:
      continue
    fused = lambda v, bp=None, h=N: fk.fake_quantize_2d(v, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16,
                                                         interpret=a.small, hadamard=h, seed=0, block_pass=bp)
    variants = {"no_transform": lambda v: fused(v, h=0), "fused": fused,
                "before": lambda v: before(v, k, fmt, rule, axis, a.small),
                "before_tree": lambda v: before_tree(v, k, fmt, rule, axis, a.small)}
    if fmt.has_global_scale and axis == 0:
      variants["fused_xla_block_scales"] = lambda v: fused(v, bp=True)
    if axis == 1:
      variants["fused_lanes_transposed"] = lanes_transposed(fused)
      variants["fused_lane_split"] = lane_split(fused)
    row, bits = {}, {}
    for n, f in variants.items():
      jax.clear_caches()  # fake_quantize_2d's jit cache would keep the other transform (fused_lanes_transposed)
      g = jax.jit(f)
      row[n] = B.bench(g, [(v,) for v in xs]) * 1e6
      bits[n] = np.asarray(g(xs[0])).view(np.uint16)
    for n in variants:
      if n not in ("before", "no_transform"):
        row[f"{n}_vs_before_differing"] = int(np.sum(bits[n] != bits["before"]))
    out[name] = row
    print(name, json.dumps(row), flush=True)
  return out


def step_section(a):
  import qat_step

  supported = fk.supported
  keep_out = lambda *args, **kw: (supported(*args, **kw) or  # noqa: E731
                                  ("kept out (the route before)" if (kw.get("hadamard") or args[6:7] and args[6]) else None))

  def variant(name, f):
    """``f`` with the mode's suffix patched in: '_before', '_lanesT', '_split'."""
    def run(*args):
      fk.supported = keep_out if name.endswith("_before") else supported
      kh.transform_tile = transform_tile_lanes_transposed if name.endswith("_lanesT") else LIBRARY_TRANSFORM_TILE
      kh.LANE_PLANES_MAX = 0 if name.endswith(("_split", "_lanesT")) else LIBRARY_PLANES_MAX
      try:
        return f(*args)
      finally:
        fk.supported, kh.transform_tile, kh.LANE_PLANES_MAX = supported, LIBRARY_TRANSFORM_TILE, LIBRARY_PLANES_MAX
    return run

  return qat_step.rounds(a.step_modes, a.repeats, a.small, wrap=variant, samples_steps=(5, 4))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--step", action="store_true", help="also the QAT step, the transform in the kernel and kept out")
  p.add_argument("--no-passes", action="store_true", help="skip the per-pass times")
  p.add_argument("--repeats", type=int, default=2, help="--step: rounds of bf16 then each mode")
  p.add_argument("--step-modes", type=lambda v: v.split(","),
                 default=["bf16", "nvfp4", "nvfp4+rht16", "nvfp4+rht16_before"],
                 help="--step: bf16 first; qat_step.py modes, '_before' appended: the transform kept out of the "
                      "kernel, '_lanesT': the kernels' transform along the lanes on the transposed tile, '_split': "
                      "by pair splits along the lanes (not planes)")
  p.add_argument("--cases", type=lambda v: v.split(","), help="only these passes (e.g. nvfp4_sr_axis0)")
  p.add_argument("--small", action="store_true", help="CPU smoke run: small shapes, interpret mode")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if not a.no_passes:
    result["passes"] = pass_section(a)
  if a.step:
    result["step"] = step_section(a)
  with open(os.path.join(a.out, "rht_fused.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
