"""Minimal safetensors file I/O for fp4jax: a checked header reader, a streaming writer.

safetensors' own Python API needs every tensor in memory to write a file, and
its numpy API cannot return float8 tensors (0.8.0); the format is simple (an
8-byte little-endian header length, a JSON header of dtype/shape/byte offsets,
then the data), so fp4jax writes it itself, one tensor at a time, and reads
through ``safetensors.safe_open`` where numpy has the dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from fp4jax.outfile import AtomicOutput, check_output

# safetensors dtype names; F8 ones come from ml_dtypes because numpy has none.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# What safetensors' numpy API returns itself; the rest is read as raw bytes.
NUMPY_NATIVE = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 << 20  # the limit safetensors itself enforces


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor's header entry: dtype, shape and byte range within the data section."""

  name: str
  dtype_name: str
  shape: tuple[int, ...]
  begin: int  # byte offsets into the data section
  end: int

  @property
  def dtype(self) -> np.dtype:
    return DTYPES[self.dtype_name]

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
  """Parses and checks a safetensors header: (tensors in file order, metadata, data start)."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise ValueError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise ValueError(f"{path}: the header's __metadata__ must map strings to strings, got {metadata!r:.200}")
  data_start, data_size = 8 + n, size - 8 - n
  tensors = {}
  for name, info in header.items():
    try:
      dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    if dtype_name not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name}, which fp4jax cannot read")
    t = TensorInfo(name, dtype_name, shape, int(begin), int(end))
    if any(not isinstance(d, int) or d < 0 for d in shape) or t.nbytes != math.prod(shape) * t.dtype.itemsize:
      raise ValueError(
          f"{path}: tensor {name!r} has shape {list(shape)} and dtype {dtype_name} but data_offsets "
          f"[{begin}, {end}] ({t.nbytes} bytes)"
      )
    tensors[name] = t
  for t in sorted(tensors.values(), key=lambda t: t.end):
    if t.end > data_size:
      raise ValueError(
          f"{path}: file is truncated: tensor {t.name!r} needs data bytes up to {t.end}, "
          f"the file holds {data_size}"
      )
  return tensors, metadata, data_start


class Reader:
  """Reads single tensors: safetensors' ``safe_open`` where numpy has the dtype, raw bytes otherwise."""

  def __init__(self, path):
    from safetensors import safe_open  # an optional dependency: fp4jax[checkpoints]

    self.path = os.fspath(path)
    self.tensors, self.metadata, self.data_start = read_header(self.path)
    try:
      self._file = safe_open(self.path, framework="numpy", backend="pread")
    except Exception as e:  # safetensors raises its own SafetensorError
      raise ValueError(f"{self.path}: safetensors cannot open the file: {e}") from None

  def read(self, name: str) -> np.ndarray:
    t = self.tensors[name]
    if t.dtype_name in NUMPY_NATIVE:
      return self._file.get_tensor(name)
    raw = np.fromfile(self.path, dtype=np.uint8, count=t.nbytes, offset=self.data_start + t.begin)
    return raw.view(t.dtype).reshape(t.shape)

  def close(self):
    self._file.__exit__(None, None, None)  # safe_open's only way to release its mmap

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Writer:
  """Writes a safetensors file tensor by tensor from a plan fixed up front.

  The header lists every tensor's shape, dtype and offsets, so the plan is
  needed first; then each ``write`` appends one tensor's bytes. The file
  appears at ``path`` only on a clean exit, complete and with the permissions
  ``open()`` would give it (:class:`fp4jax.outfile.AtomicOutput`); the
  destination is checked (:func:`fp4jax.outfile.check_output`) before the
  plan is.
  """

  def __init__(self, path, plan: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str]):
    self.path = os.fspath(path)
    check_output(self.path)
    seen, header, offset = set(), {}, 0
    if metadata:
      header["__metadata__"] = dict(metadata)
    for name, dtype, shape in plan:
      if name in seen or name == "__metadata__":
        raise ValueError(f"{self.path}: two tensors would be written as {name!r}")
      if np.dtype(dtype) not in DTYPE_NAMES:
        raise ValueError(f"{self.path}: tensor {name!r} has dtype {np.dtype(dtype)}, which safetensors cannot store")
      seen.add(name)
      n = math.prod(shape) * np.dtype(dtype).itemsize
      header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
      offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    self._header = blob + b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    self._plan = list(plan)
    self._next = 0
    self._out = AtomicOutput(self.path)

  def __enter__(self):
    self._f = self._out.__enter__()
    try:
      self._f.write(struct.pack("<Q", len(self._header)) + self._header)
    except BaseException as e:
      self._out.__exit__(type(e), e, e.__traceback__)
      raise
    return self

  def write(self, name: str, array) -> None:
    if self._next == len(self._plan):
      raise ValueError(f"{self.path}: tensor {name!r} was not in the planned header")
    want_name, dtype, shape = self._plan[self._next]
    array = np.asarray(array)
    if name != want_name or array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
      raise ValueError(
          f"{self.path}: expected tensor {want_name!r} {np.dtype(dtype)} {tuple(shape)} next, "
          f"got {name!r} {array.dtype} {array.shape}"
      )
    if array.dtype.byteorder == ">":
      array = array.byteswap().view(array.dtype.newbyteorder("<"))
    self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self._next += 1

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None and self._next != len(self._plan):
      err = ValueError(f"{self.path}: only {self._next} of {len(self._plan)} planned tensors were written")
      self._out.__exit__(ValueError, err, None)
      raise err
    self._out.__exit__(exc_type, exc, tb)
