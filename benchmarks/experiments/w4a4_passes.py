"""The int8 path's per-call passes against their floors (issue 15): re-basing and the activation's quantize.

After the PTX byte permute (``fp4jax/kernels/int8_rebase.py``, ~7 int ops a byte) re-basing an 8192^2 MXFP4
weight took 50-58 us on the H200 where moving its bytes (34 MB in, 67 MB out) takes ~30: so it is bound
neither by its integer work nor by DRAM alone. Variants of the same tiling, timed side by side:

* ``library``: ``int8_rebase.rebase``, the int8 path's pass (since the run below, codes in block order:
  the two output words of each input word stored to the block's two contiguous halves);
* ``interleaved_stores``: the same work with the two output words interleaved (k order, the library's
  pass when the run was made, then named ``library``; the run's ``contiguous_stores`` column was this
  script's variant of what the library now does);
* ``no_stores``: the codes computed and folded into the flags (nothing but the flags written);
* ``copy``: a Pallas pass of the same tiles that writes each input word twice (the bytes' floor).

Then the activation's quantize (``quantize(x, MXFP4, axis=-1, layout="rows")``, the W4A4 layer's first step)
over tile candidates at the activation shapes of ``benchmarks/w4a4.py``, bits checked against the default.

  PYTHONPATH=. python3 benchmarks/experiments/w4a4_passes.py --out DIR
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
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matmul as mb  # noqa: E402  (benchmarks/matmul.py: bench)

import fp4jax as fj  # noqa: E402
from fp4jax import int8_matmul  # noqa: E402
from fp4jax.kernels import common as C  # noqa: E402
from fp4jax.kernels import int8_rebase as ik  # noqa: E402
from fp4jax.kernels import quantize_pack as qk  # noqa: E402
from fp4jax.prepared import byte_matrix  # noqa: E402

INTERPRET = jax.default_backend() == "cpu"


def _variant_kernel(data_ref, scales_ref, base_ref, out_ref, flags_ref, *, mode):
  w = data_ref[...]
  if mode == "copy":
    out_ref[:, :, pl.ds(0, 4, stride=2)] = w
    out_ref[:, :, pl.ds(1, 4, stride=2)] = w
    flags_ref[...] = jnp.zeros(flags_ref.shape, jnp.int32)
    return
  shift, main, other = ik._block_fields(scales_ref, base_ref)
  first, second = ik._word_values(w, shift, main, ik._prmt_emulated if INTERPRET else ik._prmt_ptx)
  outside = (other & ((w & jnp.uint32(0x77777777)) != 0)).astype(jnp.int32)
  if mode == "interleaved_stores":
    out_ref[:, :, pl.ds(0, 4, stride=2)] = first
    out_ref[:, :, pl.ds(1, 4, stride=2)] = second
  else:  # no_stores: keep the codes alive through the flags
    folded = jnp.max(jnp.max(((first ^ second) == jnp.uint32(0x12345678)).astype(jnp.int32), axis=2), axis=1)
    outside = outside | folded[:, None, None]
  flags_ref[...] = jnp.max(jnp.max(outside, axis=2), axis=1)[:, None]


@functools.partial(jax.jit, static_argnames=("mode", "tiles"))
def variant(data, scales, base, *, mode, tiles):
  r, nbytes = data.shape
  br, bk = ik.rebase_tiles(r, nbytes, tiles)
  nb, nbk = nbytes // 16, bk // 16
  return pl.pallas_call(
      functools.partial(_variant_kernel, mode=mode),
      grid=(r // br, nb // nbk),
      in_specs=[pl.BlockSpec((br, nbk, 4), lambda i, j: (i, j, 0)), pl.BlockSpec((br, nbk, 1), lambda i, j: (i, j, 0)),
                pl.BlockSpec((br,), lambda i, j: (i,))],
      out_specs=[pl.BlockSpec((br, nbk, 8), lambda i, j: (i, j, 0)), pl.BlockSpec((br, 1), lambda i, j: (i, j))],
      out_shape=[jax.ShapeDtypeStruct((r, nb, 8), jnp.uint32), jax.ShapeDtypeStruct((r, nbytes // bk), jnp.int32)],
      compiler_params=C.compiler_params(tiles.warps, 1),
      interpret=INTERPRET,
  )(jax.lax.bitcast_convert_type(data.reshape(r, nb, 4, 4), jnp.uint32), scales.reshape(r, nb, 1),
    base.astype(jnp.int32))


QUANTIZE_TILES = [  # (block_m, block_k, warps)
    (16, 512, 8), (8, 1024, 8), (32, 256, 4), (64, 256, 8), (16, 1024, 8), (32, 512, 8), (8, 512, 4),
    (4, 2048, 8), (16, 512, 4), (64, 128, 4), (32, 1024, 8)]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--size", type=int, default=8192)
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__}
  size = args.size
  ws = [fj.quantize(jax.random.normal(jax.random.key(i), (size, size), jnp.float32), fj.MXFP4, axis=0,
                    layout="rows") for i in range(4)]
  calls = []
  for w in ws:
    d, s = byte_matrix(w)
    calls.append((d, s, int8_matmul.row_bases(s)[0]))
  want = ik.rebase(*calls[0], interpret=INTERPRET)
  res["rebase"] = {}
  for tiles in (ik.Tiles(4, 512), ik.Tiles(2, 1024), ik.Tiles(8, 1024, 8)):
    row = {"library": mb.bench(lambda d, s, b: ik.rebase(d, s, b, tiles=tiles, interpret=INTERPRET), calls) * 1e6}
    for mode in ("interleaved_stores", "no_stores", "copy"):
      row[mode] = mb.bench(lambda d, s, b: variant(d, s, b, mode=mode, tiles=tiles), calls) * 1e6
    flags = variant(*calls[0], mode="interleaved_stores", tiles=tiles)[1]
    row["flags_equal"] = bool(jnp.array_equal(jnp.any(flags != 0, axis=1), want[1]))
    res["rebase"][str(tuple(tiles))] = row
    print(tiles, row, flush=True)
  res["quantize_rows"] = {}
  shapes = ((1024, 8192), (4096, 4096), (8192, 8192)) if not INTERPRET else ((64, 1024),)  # CPU: a smoke run
  for shape in shapes:
    xs = [(jax.random.normal(jax.random.key(10 + i), shape, jnp.bfloat16),) for i in range(4)]
    ref = fj.quantize(xs[0][0], fj.MXFP4, axis=-1, layout="rows")
    row = {}
    for t in QUANTIZE_TILES:
      cfg = qk.Config(block_m=t[0], block_k=t[1], num_warps=t[2], num_stages=1)
      try:
        fn = jax.jit(functools.partial(qk.quantize_rows, fmt=fj.MXFP4, scale_rule="floor", config=cfg,
                                       interpret=INTERPRET))
        got = fn(xs[0][0])
        same = bool(np.array_equal(np.asarray(got.values), np.asarray(ref.values))
                    and np.array_equal(np.asarray(got.scales), np.asarray(ref.scales)))
        row[str(t)] = {"us": mb.bench(fn, xs) * 1e6, "bits_equal_default": same}
      except Exception as e:  # noqa: BLE001 - a tile may not fit
        row[str(t)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    row["api_default"] = {"us": mb.bench(lambda x: fj.quantize(x, fj.MXFP4, axis=-1, layout="rows"), xs) * 1e6}
    res["quantize_rows"][f"{shape[0]}x{shape[1]}"] = row
    print(shape, row, flush=True)
  with open(os.path.join(args.out, "w4a4_passes.json"), "w") as f:
    json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
