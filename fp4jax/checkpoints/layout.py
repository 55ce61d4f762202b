"""How QArrays are named and encoded in a safetensors file (the three layouts), and reading the header.

See :mod:`fp4jax.checkpoints` for the layouts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax.checkpoints._safetensors import read_header
from fp4jax.formats import MXFP4, Format, get_format
from fp4jax.layouts import from_gpt_oss, to_gpt_oss
from fp4jax.packing import pack_fp4, unpack_fp4
from fp4jax.qarray import QArray, validate_qarray

__all__ = ["LAYOUTS", "METADATA_KEY", "FLOAT_INPUTS", "Entry", "read_entries", "part_names", "resolve_layout",
           "metadata_json", "encode_qarray", "decode_entry"]

LAYOUTS = ("gpt_oss", "deepseek", "fp4jax")
METADATA_KEY = "fp4jax"
_META_VERSION = 1

FLOAT_INPUTS = {"F16", "BF16", "F32", "F64"}

_GPT_BLOCKS, _GPT_SCALES = "_blocks", "_scales"
# Hugging Face GPT-OSS files use the first pair, OpenAI's original ones the second.
_GPT_SUFFIXES = ((_GPT_BLOCKS, _GPT_SCALES), (".blocks", ".scales"))
_DS_WEIGHT, _DS_SCALE = ".weight", ".scale"
_PART_SUFFIX = {"values": ".qvalues", "scales": ".qscales", "global_scale": ".qglobal_scale"}


# ---- tensor groups ("entries") ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  """One logical tensor of a file: a plain tensor or the parts of a QArray.

  Attributes:
    name: the logical name (``"w"`` for ``w_blocks`` + ``w_scales``).
    layout: ``None`` for a plain tensor, else one of :data:`LAYOUTS`.
    parts: role (``"tensor"``; or ``"values"``, ``"scales"``, ``"global_scale"``)
      -> the tensor's name in the file.
    fmt: the QArray's format (``None`` for a plain tensor).
    axis: the QArray's (negative) block axis.
    shape: logical shape (the QArray's ``shape``).
    dtype: plain tensor dtype, or the format's element dtype.
    nbytes: bytes the parts take in the file.
  """

  name: str
  layout: str | None
  parts: dict[str, str]
  fmt: Format | None
  axis: int
  shape: tuple[int, ...]
  dtype: np.dtype
  nbytes: int


def _deepseek_scale_name(name: str) -> str:
  if name.endswith(_DS_WEIGHT):
    return name[: -len(_DS_WEIGHT)] + _DS_SCALE
  return name + _DS_SCALE


def part_names(name: str, layout: str, fmt: Format) -> dict[str, str]:
  if layout == "gpt_oss":
    return {"values": name + _GPT_BLOCKS, "scales": name + _GPT_SCALES}
  if layout == "deepseek":
    return {"values": name, "scales": _deepseek_scale_name(name)}
  parts = {"values": name + _PART_SUFFIX["values"], "scales": name + _PART_SUFFIX["scales"]}
  if fmt.has_global_scale:
    parts["global_scale"] = name + _PART_SUFFIX["global_scale"]
  return parts


def _elem_per_byte(fmt: Format) -> int:
  return 8 // fmt.elem_bits


def _check_parts(path, name, layout, fmt: Format, axis, parts, tensors) -> tuple[int, ...]:
  """Checks the parts' dtypes and shapes from the header; returns the logical shape."""
  where = f"{path}: tensor {name!r} ({layout} layout)"
  for role, part in parts.items():
    if part not in tensors:
      raise ValueError(f"{where}: its {role} tensor {part!r} is missing from the file")
  v, s = tensors[parts["values"]], tensors[parts["scales"]]
  value_dtypes = ("U8", "I8") if layout == "deepseek" else ("U8",)
  scale_dtypes = ("U8",) if layout == "fp4jax" else ("U8", "F8_E8M0")
  if v.dtype_name not in value_dtypes:
    raise ValueError(f"{where}: {v.name!r} has dtype {v.dtype_name}, expected {' or '.join(value_dtypes)}")
  if s.dtype_name not in scale_dtypes:
    raise ValueError(f"{where}: {s.name!r} has dtype {s.dtype_name}, expected {' or '.join(scale_dtypes)}")
  if layout == "gpt_oss":
    byte_block = fmt.block_size // _elem_per_byte(fmt)
    if len(v.shape) < 2 or v.shape[-1] != byte_block:
      raise ValueError(f"{where}: {v.name!r} has shape {list(v.shape)}, expected (..., G, {byte_block})")
    shape = (*v.shape[:-2], v.shape[-2] * fmt.block_size)
  else:
    if not v.shape or not -len(v.shape) <= axis < 0:
      raise ValueError(f"{where}: {v.name!r} has shape {list(v.shape)}, which has no axis {axis}")
    shape = list(v.shape)
    shape[axis] *= _elem_per_byte(fmt)
    shape = tuple(shape)
  want = list(shape)
  want[axis] //= fmt.block_size
  if shape[axis] % fmt.block_size or tuple(s.shape) != tuple(want):
    raise ValueError(
        f"{where}: shapes do not agree: {v.name!r} {list(v.shape)} holds a QArray of shape "
        f"{list(shape)} blocked by {fmt.block_size} along axis {axis}, so {s.name!r} should be "
        f"{want}, got {list(s.shape)}"
    )
  if "global_scale" in parts:
    g = tensors[parts["global_scale"]]
    if g.dtype_name != "F32" or g.shape != ():
      raise ValueError(f"{where}: {g.name!r} must be a float32 scalar, got {g.dtype_name} {list(g.shape)}")
  return shape


def _fp4jax_metadata(metadata: Mapping[str, str], path) -> dict[str, dict]:
  raw = metadata.get(METADATA_KEY)
  if raw is None:
    return {}
  try:
    meta = json.loads(raw)
    entries = meta["tensors"]
    if not isinstance(entries, dict):
      raise TypeError
    return {name: {"format": get_format(e["format"]), "axis": int(e["axis"]), "layout": e["layout"],
                   "shape": e.get("shape")} for name, e in entries.items()}
  except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: malformed {METADATA_KEY!r} header metadata {raw[:200]!r} ({e})") from None


def read_entries(path) -> list[Entry]:
  """The logical tensors of a safetensors file, from its header only (no data read).

  QArrays are recognised from the ``"fp4jax"`` header metadata, then by name:
  ``X_blocks`` + ``X_scales`` or ``X.blocks`` + ``X.scales`` (GPT-OSS), and a
  uint8/int8 ``P.weight`` beside a uint8/E8M0 ``P.scale`` (DeepSeek fused
  MXFP4). Everything else is plain.

  Raises:
    ValueError naming the tensor, for a truncated file, a uint8 ``*_blocks``
    tensor without its ``*_scales`` (or the reverse), and parts whose shapes or
    dtypes do not agree.
  """
  path = os.fspath(path)
  tensors, metadata, _ = read_header(path)
  claimed: dict[str, str] = {}  # file tensor -> the logical tensor it belongs to
  found: dict[str, tuple[str, Format, int, dict[str, str], list | None]] = {}

  def claim(name, layout, fmt, axis, shape=None, parts=None):
    parts = parts or part_names(name, layout, fmt)
    for part in parts.values():
      if part in claimed:
        raise ValueError(f"{path}: tensor {part!r} belongs to both {claimed[part]!r} and {name!r}")
      claimed[part] = name
    found[name] = (layout, fmt, axis, parts, shape)

  for name, e in _fp4jax_metadata(metadata, path).items():
    layout, fmt, axis = e["layout"], e["format"], e["axis"]
    if layout not in LAYOUTS:
      raise ValueError(f"{path}: tensor {name!r} has unknown layout {layout!r} in the header metadata")
    if axis >= 0 or (layout != "fp4jax" and (fmt != MXFP4 or axis != -1)):
      raise ValueError(f"{path}: tensor {name!r}: the header metadata names {fmt!r} along axis {axis} "
                       f"in the {layout} layout, which cannot hold it")
    claim(name, layout, fmt, axis, e["shape"])
  for name, t in tensors.items():
    if name in claimed:
      continue
    suffixes = [(b, s) for b, s in _GPT_SUFFIXES if name.endswith(b)]
    if suffixes:
      blocks, scales = suffixes[0]
      base = name[: -len(blocks)]
      if base + scales in tensors:
        claim(base, "gpt_oss", MXFP4, -1, parts={"values": name, "scales": base + scales})
        continue
      if t.dtype_name == "U8":
        raise ValueError(f"{path}: tensor {name!r} has no matching {base + scales!r} "
                         "(GPT-OSS MXFP4 blocks need their scales)")
    if t.dtype_name in ("U8", "I8"):
      scale = tensors.get(_deepseek_scale_name(name))
      if scale is not None and scale.name not in claimed and scale.dtype_name in ("U8", "F8_E8M0"):
        claim(name, "deepseek", MXFP4, -1)
  for name, t in tensors.items():
    for blocks, scales in _GPT_SUFFIXES:
      if name not in claimed and name.endswith(scales) and t.dtype_name == "U8":
        raise ValueError(f"{path}: tensor {name!r} has no matching {name[: -len(scales)] + blocks!r} "
                         "(GPT-OSS MXFP4 scales without their blocks)")

  by_values = {}
  for name, (layout, fmt, axis, parts, meta_shape) in found.items():
    shape = _check_parts(path, name, layout, fmt, axis, parts, tensors)
    if meta_shape is not None and tuple(meta_shape) != shape:
      raise ValueError(f"{path}: tensor {name!r}: the header metadata says shape {list(meta_shape)}, "
                       f"its parts hold {list(shape)}")
    nbytes = sum(tensors[p].nbytes for p in parts.values())
    by_values[parts["values"]] = Entry(name, layout, parts, fmt, axis, shape, np.dtype(fmt.elem_dtype), nbytes)
  out = []
  for name, t in tensors.items():  # file order; a QArray sits where its values are
    if name in by_values:
      out.append(by_values[name])
    elif name not in claimed:
      out.append(Entry(name, None, {"tensor": name}, None, -1, t.shape, t.dtype, t.nbytes))
  return out


# ---- encoding and decoding QArrays ----------------------------------------------


def _as_bytes(x):
  return lax.bitcast_convert_type(x, jnp.uint8)


def encode_qarray(q: QArray, layout: str) -> dict[str, Any]:
  """QArray -> role -> array to store (jnp ops only, so ``jax.eval_shape`` gives the specs)."""
  if layout == "gpt_oss":
    blocks, scales = to_gpt_oss(q)
    return {"values": blocks, "scales": scales}
  if q.fmt.elem_bits == 4:
    values = pack_fp4(q.values, axis=q.axis)
  else:
    values = _as_bytes(q.values)
  out = {"values": values, "scales": _as_bytes(q.scales)}
  if q.global_scale is not None:
    out["global_scale"] = jnp.asarray(q.global_scale, jnp.float32)
  return out


def decode_entry(entry: Entry, arrays: Mapping[str, np.ndarray], path) -> QArray:
  fmt, axis = entry.fmt, entry.axis
  try:
    if entry.layout == "gpt_oss":
      return from_gpt_oss(arrays["values"], arrays["scales"])
    values, scales = arrays["values"], arrays["scales"]
    if scales.dtype != np.uint8:
      scales = scales.view(np.uint8)
    if fmt.elem_bits == 4:
      values = unpack_fp4(values.view(np.uint8), axis=axis)
    else:
      values = jnp.asarray(values.view(fmt.elem_dtype))
    g = arrays.get("global_scale")
    g = None if g is None else jnp.asarray(g, jnp.float32)
    return validate_qarray(QArray(values, jnp.asarray(scales.view(fmt.scale_dtype)), g, fmt, axis))
  except ValueError as e:
    raise ValueError(f"{path}: tensor {entry.name!r}: {e}") from None


def resolve_layout(fmt: Format, axis: int, layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  if layout != "fp4jax" and (fmt != MXFP4 or axis != -1):
    return "fp4jax"  # GPT-OSS and DeepSeek only express MXFP4 along the last axis
  return layout


def metadata_json(qentries: Mapping[str, tuple[Format, int, str, tuple[int, ...]]]) -> str:
  return json.dumps({
      "version": _META_VERSION,
      "tensors": {n: {"format": f.name, "axis": a, "layout": l, "shape": list(s)}
                  for n, (f, a, l, s) in qentries.items()},
  })
