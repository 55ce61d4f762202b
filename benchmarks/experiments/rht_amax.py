"""Issue 15: NVFP4's tensor amax of a Hadamard-transformed operand, the pass that NVFP4 + RHT16 adds per operand.

The NVFP4 + RHT16 step's profile at 5a0bb1a (results/qat_step_profile_5a0bb1a.json) has the transformed-amax
passes (``kernels.hadamard.transformed_amax``: one read, partial maxima per 16 x 16 cell) at 852 us a step, each
at 1.2-1.4 TB/s where the fake-quantization passes on the same operands move 4 TB/s. This times, on the step's
operands (bfloat16, 4 rotated, beyond L2):

* ``xla_abs_max``: ``jnp.max(jnp.abs(x))`` in XLA, the read rate to aim at;
* ``before``: the kernel body and tiles of 5a0bb1a (along the lanes, the transformed tile joined back from its
  lane planes, then split into cells; along the rows by pair splits; the fake-quantization kernel's nearest
  tiles and warps);
* ``library``: what ``fake_quant._global_amax`` runs now (along the lanes the cells' maxima straight from the
  planes, on the tile and warps of the passes transformed along the lanes; along the rows from row planes, the
  operand read through 16 block specs; a tile with no magnitude below 2**-102 by the butterfly's sums alone);
* ``library_exact_path``: the library's kernel with every tile on its exact path (the flushes and the scale on
  every element; the fast path takes tiles with no magnitude below 2**-102);
* ``n1``: the library's kernel with a 1-point transform (a sign flip), to see the read and the reduction alone;
* with ``--grid``, the library's kernel on each tile of ``TILES`` and each warp count.

Each result's bits are compared with ``before``'s. ``--step``: benchmarks/qat_step.py's NVFP4 + RHT16 step
with the library and with ``before`` patched in, against bf16 and NVFP4, in one process.

  PYTHONPATH=. python3 benchmarks/experiments/rht_amax.py --grid --step --out DIR  # GPU, ~3 min
  PYTHONPATH=. python3 benchmarks/experiments/rht_amax.py --small --out DIR        # CPU smoke run, interpret mode

The JSON is rewritten after every row, so a run cut short keeps what it measured.
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

from fp4jax import kernels
from fp4jax.hadamard import hadamard_signs
from fp4jax.kernels import common as C
from fp4jax.kernels import fake_quant as fk
from fp4jax.kernels import hadamard as kh

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: (name, shape, axis): the step's transformed operands (the gradients of the gate and up products, the
#: output gradient, W2, the input).
CASES = [("dh_axis0", (8192, 14336), 0), ("dh_axis1", (8192, 14336), 1), ("dy_axis1", (8192, 4096), 1),
         ("w2_axis1", (14336, 4096), 1), ("x_axis0", (8192, 4096), 0)]
TILES = {0: [(64, 128), (128, 128), (256, 128), (128, 256), (32, 256), (256, 64)],
         1: [(16, 256), (32, 256), (16, 512), (64, 128), (32, 128), (16, 1024)]}
WARPS = [4, 8]
N = 16
LIBRARY_KERNEL, LIBRARY_GLOBAL_AMAX, LIBRARY_ROW_PLANES_MAX = kh._amax_kernel, fk._global_amax, kh.ROW_PLANES_MAX


def _amax_kernel_before(x_ref, sign_ref, o_ref, *, axis: int, n: int):
  """5a0bb1a's kernel body: the tile transformed (along the lanes joined back from its planes), then its cells."""
  bits = C.f32_to_i32(kh.read_tile(x_ref, sign_ref, axis, n)) & 0x7FFFFFFF
  bits = jnp.where(bits < kh._F32_INF_BITS, bits, 0)
  rows = jnp.max(C.split_axis(bits, 1, kh.AMAX_CELL), axis=2)
  o_ref[...] = jnp.max(C.split_axis(rows, 0, kh.AMAX_CELL), axis=1)


def _global_amax_before(x, axis, hadamard, signs, interpret):
  """5a0bb1a's ``fake_quant._global_amax`` with a transform: its body, the fake-quantization kernel's nearest
  tiles and warps."""
  if not hadamard:
    return LIBRARY_GLOBAL_AMAX(x, axis, hadamard, signs, interpret)
  return kh.transformed_amax(x, axis, hadamard, signs, tiles=fk.TILES[axis], num_warps=fk.NUM_WARPS[axis, False],
                             interpret=interpret)


def before(f):
  """``f`` with 5a0bb1a's amax pass in the kernels and in ``fake_quant``."""
  def run(*args, **kw):
    kh._amax_kernel, fk._global_amax, kh.ROW_PLANES_MAX = _amax_kernel_before, _global_amax_before, 0
    try:
      return f(*args, **kw)
    finally:
      kh._amax_kernel, fk._global_amax, kh.ROW_PLANES_MAX = LIBRARY_KERNEL, LIBRARY_GLOBAL_AMAX, LIBRARY_ROW_PLANES_MAX
  return run


def exact_path(f):
  """``f`` with the library's amax kernel always on its exact path (every tile as if it held a tiny value)."""
  def run(*args, **kw):
    has_tiny, kh._has_tiny = kh._has_tiny, lambda v: jnp.int32(1)
    try:
      return f(*args, **kw)
    finally:
      kh._has_tiny = has_tiny
  return run


def pass_section(a, result, path):
  import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)

  signs = jnp.asarray(hadamard_signs(N, 0))
  for name, shape, axis in CASES:
    if a.cases and name not in a.cases:
      continue
    if a.small:
      shape = (256, 512)
    xs = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(2 if a.small else 4)]
    library = lambda v: fk._global_amax(v, axis, N, signs, a.small)  # noqa: E731
    variants = {"xla_abs_max": lambda v: jnp.max(jnp.abs(v)).astype(jnp.float32), "before": before(library),
                "library": library, "library_exact_path": exact_path(library),
                "n1": lambda v: kh.transformed_amax(v, axis, 1, jnp.ones(1), tiles=fk.TILES[axis],
                                                    num_warps=fk.NUM_WARPS[axis, False], interpret=a.small)}
    if a.grid:
      for tile in TILES[axis]:
        if all(n % t == 0 for n, t in zip(shape, tile)):
          for w in WARPS:
            variants[f"{tile[0]}x{tile[1]}_w{w}"] = functools.partial(
                lambda v, tile, w: kh.transformed_amax(v, axis, N, signs, tiles=(tile,), num_warps=w,
                                                       interpret=a.small), tile=tile, w=w)
    row, ref = {}, None
    for label, f in variants.items():
      jax.clear_caches()  # the patched kernel body is not part of any jit cache key
      try:
        with kernels.interpret_mode(a.small):
          row[label] = round(B.bench(f, [(v,) for v in xs]) * 1e6, 1)
          bits = np.asarray(jax.jit(f)(xs[0])).view(np.uint32)
        if label == "before":
          ref = bits
        elif label not in ("xla_abs_max", "n1") and ref is not None:
          row[f"{label}_differs"] = bool(bits != ref)
      except Exception as e:  # a tile the compiler refuses: recorded, not fatal
        row[label] = f"{type(e).__name__}: {str(e)[:160]}"
    row["read_GBps_library"] = round(2 * np.prod(shape) / row["library"] / 1e3, 1) if isinstance(
        row.get("library"), float) else None
    result.setdefault("passes", {})[name] = row
    print(name, json.dumps(row), flush=True)
    with open(path, "w") as fh:
      json.dump(result, fh, indent=1)


def step_section(a, result, path):
  import qat_step

  def save(out):
    result["step"] = out
    with open(path, "w") as fh:
      json.dump(result, fh, indent=1)

  save(qat_step.rounds(a.step_modes, a.repeats, a.small, on_row=save,
                       wrap=lambda name, f: before(f) if name.endswith("_before") else f))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", type=lambda v: v.split(","), help="only these passes (e.g. dh_axis0)")
  p.add_argument("--grid", action="store_true", help="also every tile of TILES and warp count of WARPS")
  p.add_argument("--no-passes", action="store_true", help="skip the per-pass times")
  p.add_argument("--step", action="store_true", help="also the QAT step, with the library's and the amax before")
  p.add_argument("--repeats", type=int, default=2, help="--step: rounds of bf16 then each mode")
  p.add_argument("--step-modes", type=lambda v: v.split(","),
                 default=["bf16", "nvfp4", "nvfp4+rht16", "nvfp4+rht16_before"])
  p.add_argument("--small", action="store_true", help="CPU smoke run: small shapes, interpret mode")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "rht_amax.json")
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if not a.no_passes:
    pass_section(a, result, path)
  if a.step:
    step_section(a, result, path)


if __name__ == "__main__":
  main()
