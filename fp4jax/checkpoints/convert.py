"""``convert``: quantize the float tensors of a safetensors file into a new one, tensor by tensor."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.checkpoints._safetensors import DTYPE_NAMES, Writer
from fp4jax.checkpoints.files import CheckpointFile
from fp4jax.checkpoints.layout import (FLOAT_INPUTS, LAYOUTS, METADATA_KEY, Entry, encode_qarray, metadata_json,
                                       part_names, resolve_layout)
from fp4jax.formats import Format, get_format
from fp4jax.outfile import check_output
from fp4jax.qarray import normalize_axis
from fp4jax.quantize import dequantize, quantize
from fp4jax.scales import SCALE_RULES

__all__ = ["convert", "ConvertRecord", "sqnr_db"]


def sqnr_db(signal_power: float, error_power: float) -> float:
  """``10 log10(sum x^2 / sum (x - dq)^2)``; ``inf`` for an exact copy."""
  if error_power == 0:
    return math.inf
  if signal_power == 0:
    return -math.inf
  return 10.0 * math.log10(signal_power / error_power)


@dataclasses.dataclass(frozen=True)
class ConvertRecord:
  """What :func:`convert` did with one logical tensor of the input file."""

  name: str
  action: str  # "quantized", "passed" or "skipped: <why>"
  shape: tuple[int, ...]
  bytes_before: int
  bytes_after: int
  sqnr_db: float | None = None


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "scale_rule", "layout"))
def _quantizeencode_qarray(x, *, fmt, axis, scale_rule, layout):
  """Quantizes, encodes for the file, and sums ``x**2`` and the error's square for the SQNR."""
  q = quantize(x, fmt, axis=axis, scale_rule=scale_rule)
  xf = x.astype(jnp.float32)
  err = xf - dequantize(q, jnp.float32)
  return encode_qarray(q, layout), jnp.sum(xf * xf), jnp.sum(err * err)


def _pattern(pattern: str | None, what: str):
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def convert(src, dst, fmt: Format | str, *, scale_rule: str | None = None, axis: int = -1,
            include: str | None = None, exclude: str | None = None, layout: str = "gpt_oss",
            progress: Callable[[ConvertRecord], None] | None = None) -> list[ConvertRecord]:
  """Quantizes the float tensors of a safetensors file into a new one, one tensor at a time.

  A tensor is quantized when it is float (F16, BF16, F32; F64 is quantized
  from float32), has at least two axes, its name matches ``include`` and not
  ``exclude`` (``re.search``), and its length along ``axis`` is a multiple of
  the block size; others are copied unchanged (QArrays already in ``src``
  too). Peak memory is a small multiple of the largest tensor, not of the
  file: each tensor is read, quantized, written and dropped before the next.

  Returns one :class:`ConvertRecord` per logical tensor, in file order, with
  the SQNR (dB, sums in float32) of each quantized one. ``progress`` is called
  after each tensor.

  Before any work it raises ValueError for a bad pattern, or an output that
  cannot be written or is ``src`` itself (also through links); an existing
  ``dst`` is replaced, atomically, once the new file is complete.
  """
  fmt = get_format(fmt)
  if scale_rule is not None and scale_rule not in SCALE_RULES:
    raise ValueError(f"unknown scale_rule {scale_rule!r}; expected one of {sorted(SCALE_RULES)}")
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  include_re, exclude_re = _pattern(include, "include"), _pattern(exclude, "exclude")
  check_output(dst, inputs=(src,))

  def decide(e: Entry) -> str:
    if e.layout is not None or DTYPE_NAMES.get(e.dtype) not in FLOAT_INPUTS or len(e.shape) < 2:
      return "passed"
    if (include_re and not include_re.search(e.name)) or (exclude_re and exclude_re.search(e.name)):
      return "passed"
    n = e.shape[normalize_axis(axis, len(e.shape), e.shape)]
    if n % fmt.block_size:
      return f"skipped: length {n} along axis {axis} is not a multiple of {fmt.block_size}"
    return "quantized"

  def quantizer(e: Entry):
    ax = normalize_axis(axis, len(e.shape))
    lay = resolve_layout(fmt, ax, layout)
    run = functools.partial(_quantizeencode_qarray, fmt=fmt, axis=ax, scale_rule=scale_rule, layout=lay)
    return run, part_names(e.name, lay, fmt), (fmt, ax, lay, e.shape)

  def as_input(x):
    return x.astype(np.float32) if x.dtype == np.float64 else x

  plan, qmeta = [], {}
  with CheckpointFile(src) as source:
    entries = [(e, decide(e)) for e in source.entries]
    for e, action in entries:
      if action == "quantized":
        run, names, qmeta[e.name] = quantizer(e)
        dtype = np.float32 if e.dtype == np.float64 else e.dtype
        specs, _, _ = jax.eval_shape(run, jax.ShapeDtypeStruct(e.shape, dtype))
        plan += [(pn, specs[role].dtype, specs[role].shape) for role, pn in names.items()]
      else:
        plan += [(pn, source.tensors[pn].dtype, source.tensors[pn].shape) for pn in e.parts.values()]
        if e.layout is not None:
          qmeta[e.name] = (e.fmt, e.axis, e.layout, e.shape)

    records = []
    with Writer(dst, plan, {METADATA_KEY: metadata_json(qmeta)}) as w:
      for e, action in entries:
        if action == "quantized":
          run, names, _ = quantizer(e)
          parts, sig, err = run(as_input(source.read_raw(e.name)))
          after = 0
          for role, pn in names.items():
            after += parts[role].nbytes
            w.write(pn, np.asarray(parts.pop(role)))  # drop each part once written
          rec = ConvertRecord(e.name, action, e.shape, e.nbytes, after, sqnr_db(float(sig), float(err)))
        else:
          for pn in e.parts.values():
            w.write(pn, source.read_raw(pn))
          rec = ConvertRecord(e.name, action, e.shape, e.nbytes, e.nbytes)
        records.append(rec)
        if progress is not None:
          progress(rec)
  return records
