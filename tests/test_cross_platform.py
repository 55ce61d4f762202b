"""The same input gives the same bits on every backend: CPU XLA, GPU XLA, GPU Pallas.

With a GPU (and the CPU platform, which ``tests/conftest.py`` adds to
``JAX_PLATFORMS=cuda``), every format and scale rule quantizes the same
tensors on the CPU (``jax.devices("cpu")``), on the GPU through XLA and, where
a kernel takes the case, through Pallas; codes, scale bytes and NVFP4 global
scales must be identical, and so must ``dequantize`` of one QArray on each.
Without a GPU the same test compares the XLA path with the kernels in Pallas
interpret mode, so that CI still asserts the property (small shapes there).
``scaled_matmul`` agrees to float32 rounding, its documented contract.

The tensors: Student-t (3 degrees of freedom) values, rows scaled over 12
binades, a zero block, NaN, +-Inf, a block at the bottom and one at the top of
the input dtype's range, float32 subnormals, odd row counts, both block-axis
layouts; float32, bfloat16 and float16 inputs.

Every comparison also records its mismatch counts (before asserting) as JSON
lines under ``$FP4JAX_CROSS_PLATFORM_DIR`` when that is set:
``benchmarks/gpu_check.py`` builds its cross-platform table from them.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
import reference as ref
from fp4jax import kernels
from fp4jax.kernels import dequantize as dqk
from fp4jax.qat import OperandConfig
from fp4jax.qat.fake import fake_quantize_operand
from fp4jax.scales import ALL_SCALE_RULES, SCALE_RULES, check_rule


def _devices(platform):
  try:
    return jax.devices(platform)
  except RuntimeError:  # the platform is not initialized (not in JAX_PLATFORMS) or absent
    return []


GPU = (_devices("gpu") or [None])[0]
CPU = (_devices("cpu") or [None])[0]
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def xla_rules(fmt):
  """Every rule ``fj.quantize`` takes for ``fmt``."""
  out = []
  for rule in ALL_SCALE_RULES:
    try:
      check_rule(fmt, rule)
    except ValueError:
      continue
    out.append(rule)
  return out


def kernel_case(fmt, rule) -> bool:
  return fmt.name in fj.FORMATS and rule in SCALE_RULES and not (rule == "nearest" and fmt.power_of_two_scales)


# Without a GPU only the kernel cases have a second path (interpret mode) to compare with.
CASES = [(f, r) for f in fj.ALL_FORMATS.values() for r in xla_rules(f) if GPU is not None or kernel_case(f, r)]


# ---- inputs ---------------------------------------------------------------------------------
def make_input(rng, shape, axis, dtype, block, top=True):
  """Student-t values, rows over 12 binades, and special blocks (see the module docstring).

  ``top=False`` leaves out the block just under the dtype's largest value: with it, an NVFP4
  tensor scale puts every other block of a float32 or bfloat16 input at the zero block scale.
  """
  fi = ml_dtypes.finfo(dtype)
  x = rng.standard_t(3, size=shape)
  rows = list(shape)
  rows[axis] = 1
  x = x * np.exp2(rng.uniform(-6, 6, rows))
  v = np.moveaxis(x, axis, -1).copy()
  blocks = v.reshape(-1, block)  # a view: writes land in v
  n = blocks.shape[0]
  pick = rng.permutation(n)
  specials = ["zero", "nan", "inf", "-inf", "tiny"] + (["huge"] if top else [])
  for kind, b in zip(specials, pick):
    j = rng.integers(block)
    if kind == "zero":
      blocks[b] = 0.0
    elif kind == "nan":
      blocks[b, j] = np.nan
    elif kind in ("inf", "-inf"):
      blocks[b, j] = np.inf if kind == "inf" else -np.inf
    elif kind == "tiny":  # at the bottom of the input's range (float16/bfloat16 subnormals too)
      blocks[b] = blocks[b] / np.abs(blocks[b]).max() * float(fi.tiny) * 4
    else:  # just under the input dtype's largest value
      blocks[b] = blocks[b] / np.abs(blocks[b]).max() * float(fi.max) * 0.98
  if np.dtype(dtype) == np.float32 and n > len(specials):
    b = pick[len(specials)]
    blocks[b, : block // 2] = rng.choice([-1, 1], block // 2) * 1e-40  # float32 subnormals
  x = np.moveaxis(v, -1, axis)
  with np.errstate(over="ignore"):
    return np.asarray(x, np.float32).astype(dtype)


def layouts(fmt, gpu: bool):
  """(shape, axis) pairs: rows with an odd count, columns, 3-D; larger ones with a GPU."""
  b = fmt.block_size
  if gpu:
    return [((257, 8 * b), -1), ((8 * b, 130), 0), ((5, 4 * b, 66), 1), ((3, 2 * b), -1)]
  return [((7, 2 * b), -1), ((2 * b, 6), 0)]


# ---- the paths ----------------------------------------------------------------------------
def _on(device, interpret=False):
  stack = contextlib.ExitStack()
  stack.enter_context(jax.default_device(device))
  if interpret:
    stack.enter_context(kernels.interpret_mode())
  return stack


def paths(kernel: bool):
  """name -> (device, backend, interpret): the reference path first."""
  if GPU is not None:
    out = {"gpu-xla": (GPU, "xla", False)}
    if CPU is not None:
      out = {"cpu-xla": (CPU, "xla", False), **out}
    if kernel:
      out["gpu-pallas"] = (GPU, "pallas", False)
    return out
  out = {"cpu-xla": (CPU, "xla", False)}
  if kernel:
    out["cpu-pallas-interpret"] = (CPU, "pallas", True)
  return out


def quantize_on(path, x, fmt, axis, rule, global_scale=None):
  device, backend, interpret = path
  with _on(device, interpret):
    g = None if global_scale is None else jax.device_put(jnp.float32(global_scale), device)
    return fj.quantize(jax.device_put(jnp.asarray(x), device), fmt, axis=axis, scale_rule=rule, backend=backend,
                       global_scale=g)


def dequantize_on(path, q, dtype):
  device, backend, interpret = path
  with _on(device, interpret):
    return fj.dequantize(jax.device_put(q, device), dtype, backend=backend)


# ---- comparing bits -----------------------------------------------------------------------------
def as_bits(a):
  """(integer view, NaN mask or None) of any array; NaN payloads are not part of the contract."""
  a = np.asarray(a)
  if a.dtype == ml_dtypes.float4_e2m1fn:  # no NaN; numpy holds one code a byte
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(a), jnp.uint4)).astype(np.uint8), None
  bits = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])
  if not jnp.issubdtype(a.dtype, jnp.floating):
    return bits, None
  nan = np.isnan(a.astype(np.float32))
  return np.where(nan, 0, bits), nan


def mismatches(a, b) -> int:
  """Elements whose bits differ (NaN equal to NaN)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
  (ba, na), (bb, nb) = as_bits(a), as_bits(b)
  bad = ba != bb
  if na is not None:
    bad |= na != nb
  return int(np.sum(bad))


def qarray_mismatches(q, r) -> dict:
  out = {"values": mismatches(q.values, r.values), "scales": mismatches(q.scales, r.scales)}
  if r.global_scale is not None:
    out["global"] = mismatches(q.global_scale, r.global_scale)
  return out


def record(row: dict) -> None:
  """One JSON line for benchmarks/gpu_check.py's table (a file per process: pytest-xdist)."""
  out_dir = os.environ.get("FP4JAX_CROSS_PLATFORM_DIR")
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"rows-{os.getpid()}.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")


def _name(dtype):
  return np.dtype(dtype).name


# ---- the tests ----------------------------------------------------------------------------------
def _seed(*parts) -> int:
  return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("fmt,rule", CASES, ids=[f"{f.name}-{r}" for f, r in CASES])
def test_quantize_and_dequantize_give_the_same_bits_on_every_path(fmt, rule):
  ps = paths(kernel_case(fmt, rule))
  assert len(ps) >= 2, f"nothing to compare for {fmt!r} {rule!r}: {list(ps)}"
  ref_name = next(iter(ps))
  rng = np.random.default_rng(_seed(fmt.name, rule))
  bad = []
  for i, (shape, axis) in enumerate(layouts(fmt, GPU is not None)):
    # Every input dtype with a GPU; one per layout in CI (interpret mode is slow).
    dtypes = DTYPES if GPU is not None else (DTYPES[(i + len(rule)) % 3],)
    for dtype in dtypes:
      # A tensor scale set by a block near float32's top zeroes every other block's scale,
      # so global-scale formats also get an input without that block.
      for top in (True, False) if fmt.has_global_scale else (True,):
        x = make_input(rng, shape, axis, dtype, fmt.block_size, top=top)
        label = _name(dtype) + ("" if top else " (no top block)")
        ref = quantize_on(ps[ref_name], x, fmt, axis, rule)
        for name, path in list(ps.items())[1:]:
          counts = qarray_mismatches(quantize_on(path, x, fmt, axis, rule), ref)
          record({"kind": "quantize", "fmt": fmt.name, "rule": rule, "dtype": label, "shape": list(shape),
                  "axis": axis, "pair": f"{ref_name} vs {name}", **counts})
          if any(counts.values()):
            bad.append((name, shape, axis, label, counts))
        if rule == xla_rules(fmt)[0]:  # dequantize once per format and input: every output dtype
          bad += _check_dequantize(ref, ref_name, shape, axis)
  if rule == "mse" and fmt.name in ("mxfp4", "nvfp4"):
    bad += _check_near_ties(fmt, ps, ref_name)
  assert not bad, f"{fmt!r} {rule!r}: bits differ from {ref_name}: {bad}"


def _check_near_ties(fmt, ps, ref_name):
  """"mse" on blocks whose two best scales' losses are a few float32 ulps apart
  (``reference.near_tie_blocks``): where a backend's own summation order or FMA use would pick
  the other scale."""
  gs = np.float32(1 / 2000) if fmt.has_global_scale else None
  n = 4096 if GPU is not None else 1024
  x = ref.near_tie_blocks(np.random.default_rng(_seed(fmt.name, "ties")), ref.SPECS[fmt.name], n, gs)
  want = quantize_on(ps[ref_name], x, fmt, -1, "mse", gs)
  bad = []
  for name, path in list(ps.items())[1:]:
    counts = qarray_mismatches(quantize_on(path, x, fmt, -1, "mse", gs), want)
    record({"kind": "quantize", "fmt": fmt.name, "rule": "mse", "dtype": "float32", "shape": list(x.shape),
            "axis": -1, "feature": "near ties", "pair": f"{ref_name} vs {name}", **counts})
    if any(counts.values()):
      bad.append((f"near ties {name}", x.shape, counts))
  return bad


def _check_dequantize(q, ref_name, shape, axis):
  """``dequantize`` of one QArray on every path (the kernel called directly: ``backend="pallas"``
  refuses a non-last block axis on a GPU until a run shows it exact, and this is that run)."""
  ps = paths(q.fmt.name in fj.FORMATS)
  bad = []
  for out_dtype in DTYPES:
    want = dequantize_on(ps[ref_name], q, out_dtype)
    for name, (device, backend, interpret) in list(ps.items())[1:]:
      with _on(device):
        qd = jax.device_put(q, device)
        got = (dqk.dequantize(qd, out_dtype, interpret=interpret) if backend == "pallas"
               else fj.dequantize(qd, out_dtype, backend=backend))
      n = mismatches(got, want)
      record({"kind": "dequantize", "fmt": q.fmt.name, "dtype": _name(out_dtype), "shape": list(shape),
              "axis": axis, "pair": f"{ref_name} vs {name}", "values": n})
      if n:
        bad.append((f"dequantize {name}", shape, axis, _name(out_dtype), n))
  return bad


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3], ids=lambda f: f.name)
def test_scaled_matmul_agrees_to_float32_rounding_on_every_path(fmt):
  """``scaled_matmul`` computes dequantize-then-float32-dot everywhere: paths may differ only in the
  float32 rounding of products and sums, so by at most ``(2 K + 4) u sum|x||w|`` (u = 2**-24) per
  output (each path's error is at most ``(K + 2) u sum|x||w|``)."""
  ps = paths(kernel=True)
  ref_name = next(iter(ps))
  rng = np.random.default_rng(_seed(fmt.name))
  m, k, n = (33, 8 * fmt.block_size, 96) if GPU is not None else (5, 4 * fmt.block_size, 32)
  x = (rng.standard_normal((m, k)) * np.exp2(rng.uniform(-3, 3, (m, 1)))).astype(np.float32)
  x = np.asarray(jnp.asarray(x, jnp.bfloat16))
  w = quantize_on(ps[ref_name], rng.standard_t(3, (k, n)).astype(np.float32), fmt, 0, fmt.default_scale_rule)
  wd = np.asarray(dequantize_on(ps[ref_name], w, jnp.float32), np.float64)
  bound = (2 * k + 4) * 2.0**-24 * (np.abs(np.asarray(x, np.float64)) @ np.abs(wd))
  outs = {}
  for name, (device, backend, interpret) in ps.items():
    with _on(device, interpret):
      outs[name] = np.asarray(fj.scaled_matmul(jax.device_put(jnp.asarray(x), device), jax.device_put(w, device),
                                               preferred_element_type=jnp.float32, backend=backend), np.float64)
  for name, out in outs.items():
    over = np.abs(out - outs[ref_name]) > bound
    record({"kind": "scaled_matmul", "fmt": fmt.name, "pair": f"{ref_name} vs {name}", "values": int(over.sum())})
    assert not over.any(), f"{name} vs {ref_name}: {over.sum()} outputs beyond float32 accumulation rounding"


_FAKE = [(fj.MXFP4, "ceil"), (fj.MXFP4, "floor"), (fj.NVFP4, "nearest"), (fj.NVFP4, "ceil"), (fj.MXFP8_E4M3, "ceil")]


@pytest.mark.parametrize("fmt,rule", _FAKE, ids=[f"{f.name}-{r}" for f, r in _FAKE])
def test_qat_fake_quantization_gives_the_same_bits_on_every_path(fmt, rule):
  """``fp4jax.qat``'s fake quantization of a 2-D operand, nearest and stochastic (one key), blocked
  along either axis: the XLA path on each platform and the fused kernel (``backend="pallas"``)."""
  ps = paths(kernel=True)
  ref_name = next(iter(ps))
  rng = np.random.default_rng(_seed(fmt.name, rule, "fake"))
  shape = (256, 512) if GPU is not None else (64, 256)
  bad = []
  for axis, dtype in ((1, jnp.bfloat16), (0, jnp.float32)) + (((1, jnp.float32), (0, jnp.bfloat16)) if GPU else ()):
    x = make_input(rng, shape, axis, dtype, fmt.block_size)
    for rounding in ("nearest", "stochastic"):
      op = OperandConfig(fmt, rule, rounding)
      outs = {}
      for name, (device, backend, interpret) in ps.items():
        with _on(device, interpret):
          key = jax.device_put(jax.random.key(11), device)
          outs[name] = fake_quantize_operand(jax.device_put(jnp.asarray(x), device), op, axis, jnp.bfloat16, key,
                                             backend=backend)
      for name in list(ps)[1:]:
        n = mismatches(outs[name], outs[ref_name])
        record({"kind": "qat fake quantize", "fmt": fmt.name, "rule": rule, "dtype": _name(dtype), "shape": list(shape),
                "axis": axis, "feature": rounding, "pair": f"{ref_name} vs {name}", "values": n})
        if n:
          bad.append((name, axis, _name(dtype), rounding, n))
  assert not bad, f"{fmt!r} {rule!r}: bits differ from {ref_name}: {bad}"


@pytest.mark.skipif(GPU is None or CPU is None, reason="compares the CPU's XLA with the GPU's: needs both platforms")
@pytest.mark.parametrize("fmt,rule", [(fj.NVFP4, "mse"), (fj.NVFP4, "4over6"), (fj.MXFP4, "mse"),
                                      (fj.MXFP8_E4M3, "floor")], ids=lambda c: str(c))
def test_xla_only_features_give_the_same_bits_on_cpu_and_gpu(fmt, rule):
  """2-D blocks and per-row global scales, which only the XLA path has."""
  rng = np.random.default_rng(5)
  b = fmt.block_size
  x = make_input(rng, (4 * b, 6 * b), -1, jnp.float32, b)
  for kwargs in ({"block_shape": (b, b)}, {"granularity": "row"} if fmt.has_global_scale else {}):
    got = {}
    for name, dev in (("cpu", CPU), ("gpu", GPU)):
      with jax.default_device(dev):
        got[name] = fj.quantize(jax.device_put(jnp.asarray(x), dev), fmt, scale_rule=rule, backend="xla", **kwargs)
    counts = qarray_mismatches(got["gpu"], got["cpu"])
    record({"kind": "quantize", "fmt": fmt.name, "rule": rule, "dtype": "float32", "feature": str(kwargs),
            "pair": "cpu-xla vs gpu-xla", **counts})
    assert not any(counts.values()), (kwargs, counts)
