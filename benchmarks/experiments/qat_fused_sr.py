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
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --fuzz 1     # CPU: 12 random cases, vs XLA
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --lower      # CPU: lowers for CUDA
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR    # GPU: bits and times, ~2 min
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR --step   # GPU: + the QAT step, ~4 min
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR --step --step-only \
    --step-modes bf16,mxfp4 --tile0 64x128,128x64 --kernel-formats mxfp4    # GPU: the step alone, ~1 min
  PYTHONPATH=. python benchmarks/experiments/qat_fused_sr.py --out DIR --small [--step]  # CPU: that path, small
"""

from __future__ import annotations

import argparse
import contextlib
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
from fp4jax.qat import dot as qdot
from fp4jax.qat.fake import fake_quantize_operand
from fp4jax.qat.rounding import _stochastic_magnitude
from fp4jax.reference import global_factors, group_amax_bits
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


def _kernel(x_ref, key_ref, g_ref, o_ref, *, fmt, rule, stochastic: bool, axis: int, shape, tile):
  bs, rax = fmt.block_size, axis + 1  # rax: the within-block axis of the blocked tile
  x = C.split_axis(x_ref[...].astype(jnp.float32), axis, bs)  # (tr, nb, bs) or (nb, bs, tc)
  abits = C.f32_to_i32(x) & 0x7FFFFFFF
  amax_bits = jnp.max(abits, axis=rax, keepdims=True)
  nonfinite = amax_bits >= 0x7F800000
  amax_bits = jnp.where(nonfinite | (amax_bits < 0x00800000), 0, amax_bits)
  xf = C.flush_f32(x)
  if fmt.power_of_two_scales:
    e = _pow2_rule_exponent(amax_bits, fmt, rule)
    scale_code = e + fmt.scale_bias
    y = _bits.scale_by_pow2(xf, -e)  # as the reference's element_units
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
  # The draw's index is the element's in the array blocked along its last axis: (R, C) itself for
  # axis 1, its transpose (C, R) for axis 0 (fp4jax.qat.dot moves a leading block axis last).
  if stochastic:
    row = (pl.program_id(0) * tile[0] + lax.broadcasted_iota(jnp.int32, tile, 0)).astype(jnp.uint32)
    col = (pl.program_id(1) * tile[1] + lax.broadcasted_iota(jnp.int32, tile, 1)).astype(jnp.uint32)
    idx = row * np.uint32(shape[1]) + col if axis == 1 else col * np.uint32(shape[0]) + row
    u = C.split_axis(uniform_from_index(key_ref[0], key_ref[1], idx), axis, bs)
    r = _stochastic_magnitude(jnp.abs(y), u, fmt)
  else:  # the forward GEMMs' (and the backward's non-gradient operands') nearest-even rounding
    r = C.round_to_grid(jnp.abs(y), C.ElemCodec.of(fmt.elem_dtype))[1]
  sign = C.f32_to_i32(y) & jnp.int32(-(2**31))
  r = jnp.where(nonfinite, 0.0, r)  # quantize's zero codes in non-finite blocks (their scale is NaN)
  sbytes = jnp.where(nonfinite, fmt.scale_nan_byte, scale_code)
  out = _scaled(r, jnp.where(nonfinite, 0, sign), sbytes, fmt, gdec, jnp.float32)
  o_ref[...] = out.reshape(tile).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "rule", "axis", "dtype", "tile", "interpret"))
def fused_sr_fake_quant(x, key, *, fmt, rule, axis=1, dtype=jnp.bfloat16, tile=(32, 256), interpret=False):
  """``reference(x, key, fmt, rule, axis, dtype)`` for 2-D ``x`` in one pass: blocks along ``axis``,
  ``tile`` the (rows, columns) each program reads (the blocked side a multiple of the block);
  ``key`` None rounds to nearest even."""
  rows, cols = x.shape
  if rows % tile[0] or cols % tile[1] or tile[axis] % fmt.block_size or rows * cols >= 2**32:
    raise ValueError(f"qat_fused_sr: shape {x.shape} must tile by {tile} with whole blocks along axis {axis}, "
                     "under 2**32 elements")
  kd = jnp.zeros((2,), jnp.uint32) if key is None else jax.random.key_data(key).astype(jnp.uint32).reshape(2)
  if fmt.has_global_scale:
    # The reference's tensor amax (finite elements, subnormals flushed) and factors, in XLA: one read.
    bits = _bits.f32_bits(_bits.flush_subnormals(x.astype(jnp.float32))) & jnp.uint32(_bits.F32_ABS_MASK)
    amax = _bits.from_f32_bits(group_amax_bits(bits, ()).reshape(()))
    genc, gdec = global_factors(amax, fmt, global_encode_numerator(fmt, rule))
    g = jnp.stack([gdec, genc]).astype(jnp.float32)
  else:
    g = jnp.zeros((2,), jnp.float32)
  kernel = functools.partial(_kernel, fmt=fmt, rule=rule, stochastic=key is not None, axis=axis, shape=x.shape,
                             tile=tile)
  return pl.pallas_call(
      kernel,
      grid=(rows // tile[0], cols // tile[1]),
      in_specs=[pl.BlockSpec(tile, lambda i, j: (i, j)),
                pl.BlockSpec((2,), lambda i, j: (0,)),
                pl.BlockSpec((2,), lambda i, j: (0,))],
      out_specs=pl.BlockSpec(tile, lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct(x.shape, dtype),
      compiler_params=C.compiler_params(4, 2),
      interpret=interpret,
      name=f"fused_{'sr' if key is not None else 'rn'}_{fmt.name}_{rule}_axis{axis}",
  )(x, kd, g)


def reference(x, key, fmt, rule, axis=1, dtype=jnp.bfloat16):
  """The XLA route of fp4jax.qat.dot._backward_operand for 2-D ``x`` (no padding, no Hadamard)."""
  op = OperandConfig(fmt, rule, "stochastic" if key is not None else "nearest")
  if axis == 0:
    xt = lax.optimization_barrier(jnp.moveaxis(x, 0, 1))
    return jnp.moveaxis(fake_quantize_operand(xt, op, 1, dtype, key), 1, 0)
  return fake_quantize_operand(x, op, axis, dtype, key)


@contextlib.contextmanager
def kernels_in_qat(interpret=False, tiles=None, formats=None):
  """fp4jax.qat.dot with this kernel for every 2-D operand it takes (forward and backward), else as is.

  ``tiles``: {block axis: tile}, default each axis's first in TILES; ``formats``: names of the
  formats that take the kernel (default all).
  """
  orig_fq, orig_bwd = qdot.fake_quantize_operand, qdot._backward_operand
  tiles = {ax: (tiles or {}).get(ax, TILES[ax][0]) for ax in (0, 1)}

  def usable(x, op, axis, axis_name):
    return (x.ndim == 2 and op.fmt is not None and axis_name is None and op.rule in ("floor", "ceil", "nearest")
            and (formats is None or op.fmt.name in formats)
            and (op.rule != "nearest" or not op.fmt.power_of_two_scales) and x.dtype in (jnp.bfloat16, jnp.float32)
            and all(n % t == 0 for n, t in zip(x.shape, tiles[axis])) and x.size < 2**32)

  def fake_quantize_operand_(x, op, axis, dtype, key=None, axis_name=None):
    ax = axis % x.ndim
    if not usable(x, op, ax, axis_name):
      return orig_fq(x, op, axis, dtype, key, axis_name)
    draw = key if key is not None and op.stochastic else None
    return fused_sr_fake_quant(x, draw, fmt=op.fmt, rule=op.rule, axis=ax, dtype=dtype, tile=tiles[ax],
                               interpret=interpret)

  def backward_operand_(x, axis, op, cfg, key, dtype, multiple):
    ax = axis % x.ndim
    if cfg.hadamard or x.shape[ax] % multiple or not usable(x, op, ax, cfg.axis_name):
      return orig_bwd(x, axis, op, cfg, key, dtype, multiple)
    return fake_quantize_operand_(x, op, ax, dtype, key)  # read in place: no transpose pass

  # jax caches traces (custom_vjp's forward and backward among them) by function, not by the module
  # globals they read: without clearing, a step traced before the patch would run unpatched inside it.
  jax.clear_caches()
  qdot.fake_quantize_operand, qdot._backward_operand = fake_quantize_operand_, backward_operand_
  try:
    yield
  finally:
    qdot.fake_quantize_operand, qdot._backward_operand = orig_fq, orig_bwd
    jax.clear_caches()


def step_section(a):
  """benchmarks/qat_step.py's step with the XLA route and with the kernels, one process."""
  import qat_step
  d, ffn, tokens = (128, 256, 256) if a.small else (4096, 14336, 8192)
  samples, steps = (2, 2) if a.small else (5, 5)
  formats = a.kernel_formats.split(",") if a.kernel_formats else None
  variants = [("xla", None)] + [(f"kernels_axis0_{t[0]}x{t[1]}", t) for t in a.tile0]
  out = {}
  for mode in a.step_modes.split(","):
    row = {}
    for name, tile0 in variants:
      ctx = contextlib.nullcontext() if tile0 is None else kernels_in_qat(a.small, {0: tile0}, formats)
      with ctx:
        med, lo, hi, comp, loss = qat_step.bench(mode, d, ffn, tokens, samples, steps, "threefry2x32", False)
        # One step from the same state in both: how far the kernels' step is from the XLA route's.
        # Not bit-equal by default: XLA fuses the fake quantization of h = silu(x W1) * (x W3) into h's
        # producer and skips h's bf16 rounding there (xla_allow_excess_precision, on by default); the
        # kernel reads h as stored. With XLA_FLAGS=--xla_allow_excess_precision=false the CPU steps agree.
        cfg = qat_step.MODES[mode]() if qat_step.MODES[mode] else None
        k = jax.random.split(jax.random.key(0), 3)
        params = tuple(jax.random.normal(kk, sh) * sh[0]**-0.5 for kk, sh in zip(k, ((d, ffn), (d, ffn), (ffn, d))))
        x = jax.random.normal(jax.random.key(5), (tokens, d), jnp.bfloat16)
        t = jax.random.normal(jax.random.key(6), (tokens, d), jnp.float32)
        new, value = qat_step.make_step(cfg)(params, x, t, jax.random.key(9))
      row[name] = {"ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3, "compile_s": comp,
                   "one_step": (float(value), [np.asarray(p) for p in new])}
      if mode == "bf16":
        break  # no operand to quantize: the kernels change nothing
    lx, px = row["xla"].pop("one_step")
    for name, _ in variants[1:]:
      if name in row:
        lk, pk = row[name].pop("one_step")
        row[name]["loss_xla_vs_kernels"] = [lx, lk]
        row[name]["params_bits_equal"] = all(np.array_equal(u, v) for u, v in zip(px, pk))
        row[name]["params_max_rel_diff"] = max(float(np.max(np.abs(u - v)) / np.max(np.abs(u)))
                                               for u, v in zip(px, pk))
    out[mode] = row
    print(mode, json.dumps(row), flush=True)
  return out


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
#: Tiles timed per block axis: (rows, columns) a program reads; the blocked side holds whole blocks.
TILES = {1: ((32, 256), (16, 512), (64, 128)), 0: ((256, 32), (128, 64), (64, 128))}


def tiles_arg(s):
  """"64x128,128x64" -> [(64, 128), (128, 64)]"""
  return [tuple(int(n) for n in t.split("x")) for t in s.split(",") if t]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="CPU: interpret mode against the XLA route, bit for bit")
  p.add_argument("--lower", action="store_true", help="CPU: lower for CUDA")
  p.add_argument("--fuzz", type=int, default=0, help="CPU: 12 random cases from this seed, interpret mode")
  p.add_argument("--out", help="GPU: bits and times, OUT/qat_fused_sr.json")
  p.add_argument("--small", action="store_true", help="--out on a CPU: small shapes, interpret mode")
  p.add_argument("--step", action="store_true", help="with --out: also the QAT step, XLA route vs the kernels")
  p.add_argument("--formats", default="", help="--check only these formats (comma-separated names)")
  p.add_argument("--step-only", action="store_true", help="with --out --step: skip the per-operand times")
  p.add_argument("--step-modes", default="bf16,mxfp4,nvfp4", help="benchmarks/qat_step.py modes --step times")
  p.add_argument("--tile0", type=tiles_arg, default=[TILES[0][0]],
                 help="--step: the kernels' tiles for operands blocked along axis 0, each its own variant (64x128,...)")
  p.add_argument("--kernel-formats", default="", help="--step: only these formats take the kernel (names)")
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
      for dt, axis in ((jnp.bfloat16, 1), (jnp.float32, 1), (jnp.bfloat16, 0), (jnp.float32, 0)):
        x = _inputs((64, 512) if axis else (512, 64), dt, seed=1, specials=True)
        tile = (32, 256) if axis else (256, 32)
        got = fused_sr_fake_quant(x, key, fmt=fmt, rule=rule, axis=axis, tile=tile, interpret=True)
        want = reference(x, key, fmt, rule, axis)
        # Control: the draws matter (another key moves many elements), so equality above is not luck.
        other = reference(x, jax.random.fold_in(key, 1), fmt, rule, axis)
        near = fused_sr_fake_quant(x, None, fmt=fmt, rule=rule, axis=axis, tile=tile, interpret=True)
        print(f"{fmt.name} {rule} {jnp.dtype(dt).name} axis {axis}: {mismatches(got, want)} of {x.size} differ "
              f"(another key: {mismatches(other, want)} differ); nearest: "
              f"{mismatches(near, reference(x, None, fmt, rule, axis))} differ", flush=True)
  if a.fuzz:
    # Random formats, rules, axes, dtypes, tiles, scales spread over many binades, keys: bit for bit.
    rng = np.random.default_rng(a.fuzz)
    for trial in range(12):
      fmt, rule = CASES[rng.integers(len(CASES))]
      axis, dt = int(rng.integers(2)), (jnp.bfloat16, jnp.float32)[rng.integers(2)]
      tile = TILES[axis][rng.integers(3)]
      shape = tuple(int(t * rng.integers(1, 3)) for t in tile)
      x = _inputs(shape, dt, seed=int(rng.integers(2**31)), specials=bool(rng.integers(2)) and min(shape) >= 64)
      k = jax.random.key(int(rng.integers(2**31)))
      stochastic = bool(rng.integers(4))  # 3 in 4 stochastic
      got = fused_sr_fake_quant(x, k if stochastic else None, fmt=fmt, rule=rule, axis=axis, tile=tile,
                                interpret=True)
      want = reference(x, k if stochastic else None, fmt, rule, axis)
      print(f"fuzz {trial}: {fmt.name} {rule} axis {axis} {jnp.dtype(dt).name} {shape} tile {tile} "
            f"{'stochastic' if stochastic else 'nearest'}: {mismatches(got, want)} differ", flush=True)
  if a.lower:
    x = jnp.zeros((1024, 1024), jnp.bfloat16)
    for (fmt, rule), axis in zip(CASES, (1, 0, 1, 0)):
      fn = functools.partial(fused_sr_fake_quant, fmt=fmt, rule=rule, axis=axis, tile=TILES[axis][0])
      text = jax.jit(fn).trace(x, key).lower(lowering_platforms=("cuda",)).as_text()
      print(f"lowered for CUDA: {fmt.name} {rule} axis {axis}: {len(text)} chars", flush=True)
  if a.out:
    import matmul as B  # benchmarks/matmul.py's bench (one dispatch of many calls, median of samples)
    os.makedirs(a.out, exist_ok=True)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "threefry_equal": ok}
    # The backward's stochastic operands of benchmarks/qat_step.py (8192 tokens, d 4096, ffn 14336):
    # dy along d (axis 1), and dy, dh blocked along the tokens (axis 0).
    cases = [((8192, 4096), 1), ((8192, 4096), 0), ((8192, 14336), 0)]
    if a.small:
      cases = [((256, 512), 1), ((512, 256), 0)]
    if a.step_only:
      cases = []
    for shape, axis in cases:
      xs = [_inputs(shape, jnp.bfloat16, seed=s) for s in range(3)]
      row = {"copy_us": B.bench(lambda v: v + 1, [(v,) for v in xs]) * 1e6}
      for fmt, rule in CASES[::2]:
        name = f"{fmt.name}_{rule}"
        ref = jax.jit(reference, static_argnums=(2, 3, 4))
        got = fused_sr_fake_quant(xs[0], key, fmt=fmt, rule=rule, axis=axis, tile=TILES[axis][0],
                                  interpret=a.small)
        row[name + "_mismatches"] = mismatches(got, ref(xs[0], key, fmt, rule, axis))
        for tile in TILES[axis]:
          f = functools.partial(fused_sr_fake_quant, fmt=fmt, rule=rule, axis=axis, tile=tile, interpret=a.small)
          row[f"{name}_kernel_{tile[0]}x{tile[1]}_us"] = B.bench(lambda v, f=f: f(v, key), [(v,) for v in xs]) * 1e6
        row[name + "_xla_us"] = B.bench(lambda v, fmt=fmt, rule=rule: reference(v, key, fmt, rule, axis),
                                        [(v,) for v in xs]) * 1e6
        # Nearest rounding (forward operands, the backward's non-gradient ones): first tile only.
        f = functools.partial(fused_sr_fake_quant, fmt=fmt, rule=rule, axis=axis, tile=TILES[axis][0],
                              interpret=a.small)
        row[name + "_nearest_mismatches"] = mismatches(f(xs[0], None), ref(xs[0], None, fmt, rule, axis))
        row[name + "_nearest_kernel_us"] = B.bench(lambda v, f=f: f(v, None), [(v,) for v in xs]) * 1e6
        row[name + "_nearest_xla_us"] = B.bench(lambda v, fmt=fmt, rule=rule: reference(v, None, fmt, rule, axis),
                                                [(v,) for v in xs]) * 1e6
      res[f"{shape[0]}x{shape[1]}_axis{axis}"] = row
      print(shape, axis, json.dumps(row), flush=True)
      with open(os.path.join(a.out, "qat_fused_sr.json"), "w") as f:
        json.dump(res, f, indent=1)
    if a.step:
      res["step"] = step_section(a)
      with open(os.path.join(a.out, "qat_fused_sr.json"), "w") as f:
        json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
