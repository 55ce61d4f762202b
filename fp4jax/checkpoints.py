"""safetensors checkpoints of QArrays: read and written one tensor at a time, replaced atomically.

A QArray is stored as plain integer/float tensors under one of three naming
conventions ("layouts"). Every file fp4jax writes also records each QArray's
format and axis in the header's ``__metadata__`` under the key ``"fp4jax"``
(JSON: ``{"version": 1, "tensors": {name: {"format", "axis", "layout",
"shape"}}}``); other tools ignore it, and files without it load by the tensor
names alone.

``"gpt_oss"`` (MXFP4 blocked along the last axis; the default for those)
  ``{name}_blocks``: uint8 ``(..., G, 16)``, two E2M1 codes a byte (low nibble
  = even element); ``{name}_scales``: uint8 ``(..., G)`` E8M0 bytes. The
  QArray has shape ``(..., G * 32)``. As in Hugging Face's GPT-OSS
  checkpoints; OpenAI's original ``{name}.blocks`` / ``{name}.scales`` load
  too. Scale byte 0xFF is E8M0's NaN in a QArray, where GPT-OSS's ``ldexp``
  decoders give +-Inf (no trained checkpoint holds it).
``"deepseek"`` (MXFP4 blocked along the last axis)
  ``{name}``: uint8 ``(..., K // 2)`` packed as above; the scales, uint8 E8M0
  ``(..., K // 32)``, are ``{prefix}.scale`` when ``name`` is
  ``{prefix}.weight`` and ``{name}.scale`` otherwise (DeepSeek's fused
  layout). On load, int8 bytes and ``float8_e8m0fnu`` scales are accepted too.
``"fp4jax"`` (any format and axis; used for whatever the layouts above cannot
  express: NVFP4, MXFP8, MXFP4 along another axis)
  ``{name}.qvalues``: uint8; 4-bit elements packed two a byte along the block
  axis (so that axis is halved), 8-bit elements as their bytes, same shape.
  ``{name}.qscales``: uint8, the scale bytes (E8M0 or E4M3), the QArray's scale
  shape. ``{name}.qglobal_scale``: float32 scalar (NVFP4 only).

Quantized payloads are always written as uint8 so that every safetensors
reader can open the file (safetensors' numpy API cannot return float8 arrays as
of 0.8.0); plain float8 tensors passing through keep their ``F8_*`` dtype, and
fp4jax reads those bytes itself.

Reading checks the header before any data: a missing partner tensor, shapes
or dtypes that do not agree, and a truncated file raise ValueError naming the
tensor. Writing streams: the header is computed up front (shapes come from
``jax.eval_shape``), then each tensor is encoded, written and dropped, into a
temporary file in the destination directory that ``os.replace`` moves into
place only once complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax._safetensors import DTYPE_NAMES, Reader, Writer, read_header
from fp4jax.formats import MXFP4, Format, get_format
from fp4jax.layouts import from_gpt_oss, to_gpt_oss
from fp4jax.packing import pack_fp4, unpack_fp4
from fp4jax.qarray import QArray, normalize_axis, validate_qarray
from fp4jax.quantize import dequantize, quantize
from fp4jax.scales import SCALE_RULES

__all__ = [
    "LAYOUTS",
    "METADATA_KEY",
    "Entry",
    "CheckpointFile",
    "read_entries",
    "iter_load",
    "load",
    "save",
    "convert",
    "ConvertRecord",
    "sqnr_db",
]

LAYOUTS = ("gpt_oss", "deepseek", "fp4jax")
METADATA_KEY = "fp4jax"
_META_VERSION = 1

_FLOAT_INPUTS = {"F16", "BF16", "F32", "F64"}

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


def _part_names(name: str, layout: str, fmt: Format) -> dict[str, str]:
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
    parts = parts or _part_names(name, layout, fmt)
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


def _encode(q: QArray, layout: str) -> dict[str, Any]:
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


def _decode(entry: Entry, arrays: Mapping[str, np.ndarray], path) -> QArray:
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


def _resolve_layout(fmt: Format, axis: int, layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  if layout != "fp4jax" and (fmt != MXFP4 or axis != -1):
    return "fp4jax"  # GPT-OSS and DeepSeek only express MXFP4 along the last axis
  return layout


# ---- reading ---------------------------------------------------------------------


class CheckpointFile:
  """An open safetensors file, read one logical tensor at a time.

  ``entries`` (from :func:`read_entries`) describes every logical tensor
  without reading data; ``load(name)`` reads one. Use as a context manager.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self.entries = read_entries(self.path)
    self._by_name = {e.name: e for e in self.entries}
    self._reader = Reader(self.path)
    self.tensors = self._reader.tensors  # file tensor name -> dtype, shape, byte range

  def load(self, name: str) -> QArray | np.ndarray:
    """The logical tensor ``name``: a QArray (jax array leaves) or a numpy array."""
    if name not in self._by_name:
      raise ValueError(f"{self.path}: no tensor named {name!r}")
    entry = self._by_name[name]
    arrays = {role: self._reader.read(part) for role, part in entry.parts.items()}
    if entry.layout is None:
      return arrays["tensor"]
    return _decode(entry, arrays, self.path)

  def read_raw(self, file_tensor: str) -> np.ndarray:
    """One tensor of the file as stored (e.g. ``"w_blocks"``)."""
    return self._reader.read(file_tensor)

  def close(self):
    self._reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def iter_load(path, names: Iterable[str] | None = None) -> Iterator[tuple[str, QArray | np.ndarray]]:
  """Yields ``(name, tensor)`` one logical tensor at a time, in file order.

  QArrays come back with jax arrays as leaves (``values`` in the element dtype,
  ``scales`` in the scale dtype: the stored bytes reinterpreted, not
  converted); plain tensors as numpy arrays of their stored dtype. ``names``
  restricts the output to those logical names.
  """
  with CheckpointFile(path) as f:
    wanted = [e.name for e in f.entries]
    if names is not None:
      names = set(names)
      missing = names - set(wanted)
      if missing:
        raise ValueError(f"{f.path}: no tensors named {sorted(missing)}")
      wanted = [n for n in wanted if n in names]
    for name in wanted:
      yield name, f.load(name)


def load(path, names: Iterable[str] | None = None) -> dict[str, QArray | np.ndarray]:
  """Loads a safetensors file into ``{name: QArray or numpy array}``; see :func:`iter_load`.

  Example: a GPT-OSS file with ``mlp1_weight_blocks`` uint8 ``(E, N, G, 16)``
  and ``mlp1_weight_scales`` uint8 ``(E, N, G)`` gives ``{"mlp1_weight":
  QArray(MXFP4, shape (E, N, G * 32), axis -1)}``.
  """
  return dict(iter_load(path, names))


# ---- writing ---------------------------------------------------------------------


def _metadata_json(qentries: Mapping[str, tuple[Format, int, str, tuple[int, ...]]]) -> str:
  return json.dumps({
      "version": _META_VERSION,
      "tensors": {n: {"format": f.name, "axis": a, "layout": l, "shape": list(s)}
                  for n, (f, a, l, s) in qentries.items()},
  })


def save(path, tensors: Mapping[str, QArray | Any], *, layout: str = "gpt_oss",
         metadata: Mapping[str, str] | None = None) -> None:
  """Writes QArrays and plain arrays to a safetensors file, atomically.

  Args:
    path: destination; written as a temporary file in the same directory and
      renamed over ``path`` once complete, so a failure leaves no partial file.
    tensors: flat ``{name: QArray or array}`` (for a nested param tree, flatten
      it first, e.g. ``flax.traverse_util.flatten_dict(tree, sep=".")``).
    layout: how MXFP4 QArrays blocked along the last axis are stored:
      ``"gpt_oss"`` (``name_blocks``/``name_scales``), ``"deepseek"`` (packed
      ``name`` + ``.scale``) or ``"fp4jax"``. Other QArrays always use
      ``"fp4jax"`` (see the module docstring).
    metadata: extra string pairs for the header's ``__metadata__``.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  items = []
  for name, t in tensors.items():
    if not isinstance(name, str):
      raise ValueError(f"tensor names must be strings, got {name!r}")
    if isinstance(t, QArray):
      validate_qarray(t)
      if t.block_shape is not None or (t.global_scale is not None and np.ndim(t.global_scale) > 0):
        # The header metadata records format, axis and shape only: refuse now
        # rather than write a file that load() would reject.
        raise ValueError(
            f"tensor {name!r}: QArrays with 2-D blocks or a per-group global scale cannot be saved yet "
            f"(block_shape={t.block_shape}, global_scale shape {np.shape(t.global_scale)})")
      items.append((name, t, _resolve_layout(t.fmt, t.axis, layout)))
    elif hasattr(t, "dtype") and hasattr(t, "shape"):
      items.append((name, t, None))
    else:
      raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not an array or QArray")

  plan = []
  for name, t, lay in items:
    if lay is None:
      plan.append((name, np.dtype(t.dtype), tuple(t.shape)))
    else:
      specs = jax.eval_shape(functools.partial(_encode, layout=lay), t)
      plan += [(pn, specs[role].dtype, specs[role].shape) for role, pn in _part_names(name, lay, t.fmt).items()]
  meta = dict(metadata or {})
  meta[METADATA_KEY] = _metadata_json({n: (t.fmt, t.axis, lay, t.shape) for n, t, lay in items if lay})
  with Writer(path, plan, meta) as w:
    for name, t, lay in items:
      if lay is None:
        w.write(name, np.asarray(t))
        continue
      encoded = _encode(t, lay)
      for role, pn in _part_names(name, lay, t.fmt).items():
        w.write(pn, np.asarray(encoded[role]))


# ---- convert: quantize a file tensor by tensor -------------------------------------


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
def _quantize_encode(x, *, fmt, axis, scale_rule, layout):
  """Quantizes, encodes for the file, and sums ``x**2`` and the error's square for the SQNR."""
  q = quantize(x, fmt, axis=axis, scale_rule=scale_rule)
  xf = x.astype(jnp.float32)
  err = xf - dequantize(q, jnp.float32)
  return _encode(q, layout), jnp.sum(xf * xf), jnp.sum(err * err)


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
  """
  fmt = get_format(fmt)
  if scale_rule is not None and scale_rule not in SCALE_RULES:
    raise ValueError(f"unknown scale_rule {scale_rule!r}; expected one of {sorted(SCALE_RULES)}")
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  include_re = re.compile(include) if include else None
  exclude_re = re.compile(exclude) if exclude else None

  def decide(e: Entry) -> str:
    if e.layout is not None or DTYPE_NAMES.get(e.dtype) not in _FLOAT_INPUTS or len(e.shape) < 2:
      return "passed"
    if (include_re and not include_re.search(e.name)) or (exclude_re and exclude_re.search(e.name)):
      return "passed"
    n = e.shape[normalize_axis(axis, len(e.shape), e.shape)]
    if n % fmt.block_size:
      return f"skipped: length {n} along axis {axis} is not a multiple of {fmt.block_size}"
    return "quantized"

  def quantizer(e: Entry):
    ax = normalize_axis(axis, len(e.shape))
    lay = _resolve_layout(fmt, ax, layout)
    run = functools.partial(_quantize_encode, fmt=fmt, axis=ax, scale_rule=scale_rule, layout=lay)
    return run, _part_names(e.name, lay, fmt), (fmt, ax, lay, e.shape)

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
    with Writer(dst, plan, {METADATA_KEY: _metadata_json(qmeta)}) as w:
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
