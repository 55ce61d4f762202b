"""Reading and writing safetensors checkpoints of QArrays, one logical tensor at a time."""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

from fp4jax.checkpoints._safetensors import Reader, Writer
from fp4jax.checkpoints.layout import (LAYOUTS, METADATA_KEY, decode_entry, encode_qarray, metadata_json,
                                       part_names, read_entries, resolve_layout)
from fp4jax.prepared import with_layout
from fp4jax.qarray import STORAGE_LAYOUTS, QArray, rows_obstacle, validate_qarray

__all__ = ["CheckpointFile", "iter_load", "load", "save"]


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
    return decode_entry(entry, arrays, self.path)

  def read_raw(self, file_tensor: str) -> np.ndarray:
    """One tensor of the file as stored (e.g. ``"w_blocks"``)."""
    return self._reader.read(file_tensor)

  def close(self):
    self._reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def iter_load(path, names: Iterable[str] | None = None, *,
              qarray_layout: str | None = None) -> Iterator[tuple[str, QArray | np.ndarray]]:
  """Yields ``(name, tensor)`` one logical tensor at a time, in file order.

  QArrays come back with jax arrays as leaves (``values`` in the element dtype,
  ``scales`` in the scale dtype: the stored bytes reinterpreted, not
  converted); plain tensors as numpy arrays of their stored dtype. ``names``
  restricts the output to those logical names. ``qarray_layout="rows"``
  stores every QArray that the kernels' ``"rows"`` layout can hold (2-D, see
  :class:`fp4jax.QArray`) that way, the others as they are; the default
  ``None`` gives the logical storage.
  """
  if qarray_layout not in STORAGE_LAYOUTS:
    raise ValueError(f"unknown QArray layout {qarray_layout!r}; expected one of {STORAGE_LAYOUTS}")
  with CheckpointFile(path) as f:
    wanted = [e.name for e in f.entries]
    if names is not None:
      names = set(names)
      missing = names - set(wanted)
      if missing:
        raise ValueError(f"{f.path}: no tensors named {sorted(missing)}")
      wanted = [n for n in wanted if n in names]
    for name in wanted:
      t = f.load(name)
      if qarray_layout is not None and isinstance(t, QArray) and rows_obstacle(t) is None:
        t = with_layout(t, qarray_layout)
      yield name, t


def load(path, names: Iterable[str] | None = None, *,
         qarray_layout: str | None = None) -> dict[str, QArray | np.ndarray]:
  """Loads a safetensors file into ``{name: QArray or numpy array}``; see :func:`iter_load`.

  Example: a GPT-OSS file with ``mlp1_weight_blocks`` uint8 ``(E, N, G, 16)``
  and ``mlp1_weight_scales`` uint8 ``(E, N, G)`` gives ``{"mlp1_weight":
  QArray(MXFP4, shape (E, N, G * 32), axis -1)}``.
  """
  return dict(iter_load(path, names, qarray_layout=qarray_layout))


def save(path, tensors: Mapping[str, QArray | Any], *, layout: str = "gpt_oss",
         metadata: Mapping[str, str] | None = None) -> None:
  """Writes QArrays and plain arrays to a safetensors file, atomically.

  Args:
    path: destination; written as a temporary file in the same directory and
      renamed over ``path`` once complete, so a failure leaves no partial file.
    tensors: flat ``{name: QArray or array}`` (for a nested param tree, flatten
      it first, e.g. ``flax.traverse_util.flatten_dict(tree, sep=".")``).
      QArrays of either storage layout are written in the logical one, so
      the file does not depend on how the weights were held.
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
      t = with_layout(validate_qarray(t), None)
      if t.block_shape is not None or (t.global_scale is not None and np.ndim(t.global_scale) > 0):
        # The header metadata records format, axis and shape only: refuse now
        # rather than write a file that load() would reject.
        raise ValueError(
            f"tensor {name!r}: QArrays with 2-D blocks or a per-group global scale cannot be saved yet "
            f"(block_shape={t.block_shape}, global_scale shape {np.shape(t.global_scale)})")
      items.append((name, t, resolve_layout(t.fmt, t.axis, layout)))
    elif hasattr(t, "dtype") and hasattr(t, "shape"):
      items.append((name, t, None))
    else:
      raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not an array or QArray")

  plan = []
  for name, t, lay in items:
    if lay is None:
      plan.append((name, np.dtype(t.dtype), tuple(t.shape)))
    else:
      specs = jax.eval_shape(functools.partial(encode_qarray, layout=lay), t)
      plan += [(pn, specs[role].dtype, specs[role].shape) for role, pn in part_names(name, lay, t.fmt).items()]
  meta = dict(metadata or {})
  meta[METADATA_KEY] = metadata_json({n: (t.fmt, t.axis, lay, t.shape) for n, t, lay in items if lay})
  with Writer(path, plan, meta) as w:
    for name, t, lay in items:
      if lay is None:
        w.write(name, np.asarray(t))
        continue
      encoded = encode_qarray(t, lay)
      for role, pn in part_names(name, lay, t.fmt).items():
        w.write(pn, np.asarray(encoded[role]))
