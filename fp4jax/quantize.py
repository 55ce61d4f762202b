"""The public quantize / dequantize: validate once, choose the implementation once, run it.

The numerics live in :mod:`fp4jax.reference` (the XLA path) and
:mod:`fp4jax.kernels` (Pallas); :mod:`fp4jax.backend` picks between them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import backend as backends, qarray
from fp4jax.formats import Format, get_format
from fp4jax.prepared import with_layout
from fp4jax.qarray import (STORAGE_LAYOUTS, QArray, as_array, check_global_scale_shape, float_dtype, normalize_axis,
                           validate_qarray)
from fp4jax.reference import MAX_GLOBAL_ENCODE, dequantize_reference, finite_amax, global_factors, quantize_reference
from fp4jax.scales import check_rule, global_encode_numerator

__all__ = ["quantize", "dequantize", "global_scale_from_amax", "global_amax", "as_input"]

_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_INPUTS = "float32, bfloat16, float16 or float64"


def as_input(x, what: str = "quantize"):
  """``x`` as an array of a dtype quantize takes: float64 becomes float32, others are checked.

  numpy's default float64 (and a list of Python floats) is accepted wherever
  float32 is, converted as JAX converts it, and always quantized from its
  float32 values: the formats' scales and elements are defined from float32
  (with ``jax_enable_x64`` a float64 array stays float64 in JAX, and is still
  rounded to float32 first). Ints, bools, complex and float8 raise ValueError
  naming the dtype.
  """
  x = as_array(x, what)
  if x.dtype == np.float64:
    x = x.astype(np.float32)
  if x.dtype not in [np.dtype(d) for d in _INPUT_DTYPES]:
    raise ValueError(f"{what} expects {_INPUTS} input, got dtype {x.dtype} (shape {tuple(x.shape)})")
  return x


def _check_input(x, fmt: Format, axis: int, pad: bool):
  if x.ndim == 0:
    raise ValueError("quantize needs an array with at least one axis, got a scalar")
  given = axis
  axis = normalize_axis(axis, x.ndim, x.shape)
  n = x.shape[axis]
  if n % fmt.block_size and not pad:
    raise ValueError(
        f"quantize: shape {tuple(x.shape)} has length {n} along axis {given}, which is not a "
        f"multiple of {fmt!r}'s block size {fmt.block_size}; pass pad=True to zero-pad it"
    )
  return axis


def global_scale_from_amax(amax, fmt: Format, *, scale_rule: str | None = None):
  """NVFP4's tensor decode factor, about ``amax / (elem_max * scale_max)``, float32.

  Computed as FlashInfer and NVIDIA's recipe do: the encode factor
  ``6 * 448 / amax`` first, then its float32 reciprocal. A zero (or
  non-finite) amax gives 1; an amax below ``2688 * 2**-126`` gives ``2**-126``.
  ``amax`` may be an array (e.g. one per row from :func:`global_amax`): the
  result has its shape. With ``scale_rule="4over6"`` the numerator is
  ``6 * 256`` (:func:`fp4jax.scales.global_encode_numerator`), as
  ``quantize(..., scale_rule="4over6")`` computes it.
  """
  fmt = get_format(fmt)
  rule = fmt.default_scale_rule if scale_rule is None else scale_rule
  return global_factors(amax, fmt, global_encode_numerator(fmt, rule))[1]


def _keep_axes(granularity, ndim: int, block_axes: tuple[int, ...]) -> tuple[int, ...]:
  """The axes (non-negative, sorted) along which the global scale varies."""
  blocked = {a % ndim for a in block_axes}
  if isinstance(granularity, str):
    if granularity == "tensor":
      return ()
    if granularity == "row":
      if len(blocked) > 1:
        raise ValueError("granularity='row' needs 1-D blocks: a row global scale would split a 2-D tile; "
                         "use 'tensor', 'leading' or leading axes")
      return tuple(a for a in range(ndim) if a not in blocked)
    if granularity == "leading":
      keep = (0,)
    else:
      raise ValueError(f"unknown granularity {granularity!r}; expected 'tensor', 'row', 'leading' "
                       "or a tuple of axes")
  else:
    try:
      keep = tuple(normalize_axis(a, ndim) % ndim for a in granularity)
    except TypeError:
      raise ValueError(f"granularity must be 'tensor', 'row', 'leading' or a tuple of axes, "
                       f"got {granularity!r}") from None
    if len(set(keep)) != len(keep):
      raise ValueError(f"granularity {granularity!r} repeats an axis")
  bad = sorted(set(keep) & blocked)
  if bad:
    raise ValueError(f"granularity {granularity!r} keeps axis {bad[0]} of an array of rank {ndim}, which is a "
                     f"block axis (blocks along {sorted(blocked)}): a block must not straddle two global scales")
  return tuple(sorted(keep))


def global_amax(x, granularity="tensor", *, axis: int = -1, block_shape=None):
  """The amax NVFP4's global scale is computed from, at a granularity.

  Args:
    x: float32, bfloat16, float16 or float64 (its float32 values) array of shape ``S``.
    granularity: ``"tensor"`` (one value), ``"row"`` (one per index of every
      axis but the block axis), ``"leading"`` (one per index of axis 0, e.g.
      per expert) or a tuple of the axes to keep, as for :func:`quantize`.
    axis: the block axis (1-D blocks).
    block_shape: ``(B, B)`` for 2-D blocks over the last two axes, else None.

  Returns:
    float32: ``max |x|`` over the finite elements (NaN and Inf skipped, float32
    subnormals counted as 0), a scalar for ``"tensor"``, else with ``S``'s
    rank and length 1 on the reduced axes. ``global_scale_from_amax`` of it
    is the ``global_scale`` that ``quantize(x, NVFP4, granularity=...)`` stores.
  """
  x = as_array(x, "global_amax")
  if x.ndim == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"global_amax needs a floating array with at least one axis, got shape {tuple(x.shape)} "
                     f"dtype {x.dtype}")
  block_axes = (-2, -1) if block_shape is not None else (normalize_axis(axis, x.ndim, x.shape),)
  keep = _keep_axes(granularity, x.ndim, block_axes)
  if math.prod(x.shape) == 0:  # nothing to take the max of: amax 0, as for an all-zero tensor
    return jnp.zeros([x.shape[a] if a in keep else 1 for a in range(x.ndim)] if keep else (), jnp.float32)
  return finite_amax(jnp.asarray(x), keep)


def _check_global_scale(global_scale, fmt: Format, shape=None, block_axes=()):
  """float32 decode factor(s); concrete values must be normal and at most 2**126.

  A scalar, or (given the input ``shape``) an array of one factor per row /
  leading index (see :func:`fp4jax.qarray.check_global_scale_shape`).
  """
  if not fmt.has_global_scale:
    raise ValueError(f"{fmt!r} has no global scale; global_scale must be None")
  g = jnp.asarray(global_scale)
  if not jnp.issubdtype(g.dtype, jnp.floating):
    raise ValueError(f"global_scale must be a float scalar, got shape {g.shape} dtype {g.dtype}")
  if g.shape != ():
    if shape is None:
      raise ValueError(f"global_scale must be a float scalar, got shape {g.shape} dtype {g.dtype}")
    check_global_scale_shape(g.shape, shape, block_axes)
  g = g.astype(jnp.float32)
  try:
    v = np.asarray(g, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):  # traced: value unknown here
    return g
  # Both the decode factor and its reciprocal (the encode factor) must be
  # normal float32 numbers, or whole tensors would flush to zero.
  if not np.all((v >= 2.0**-126) & (v <= MAX_GLOBAL_ENCODE)):
    bad = v[~((v >= 2.0**-126) & (v <= MAX_GLOBAL_ENCODE))].flat[0]
    raise ValueError(f"global_scale (a decode factor) must lie in [2**-126, 2**126], got {bad}")
  return g


def quantize(
    x,
    fmt: Format | str,
    *,
    axis: int = -1,
    scale_rule: str | None = None,
    global_scale=None,
    hessian=None,
    pad: bool = False,
    backend: str = "auto",
    block_shape: tuple[int, int] | None = None,
    granularity="tensor",
    layout: str | None = None,
    axis_name=None,
) -> QArray:
  """Quantizes ``x`` to a block-scaled format along ``axis``.

  Args:
    x: float32, bfloat16 or float16 array of shape ``S``, any rank (a zero
      length included). float64 (numpy's default) is accepted too and
      quantized from its float32 values, on every JAX setting (see
      :func:`as_input`).
    fmt: a :class:`fp4jax.Format` (``fp4jax.MXFP4``, ``NVFP4``, ``MXFP8_E4M3``,
      ``MXFP8_E5M2``, ``MXFP6_E2M3``, ``MXFP6_E3M2``, ``MXINT8``) or its name.
    axis: the axis whose consecutive runs of ``fmt.block_size`` elements share
      a scale. ``S[axis]`` must be a multiple of the block size unless ``pad``.
    scale_rule: ``"floor"``, ``"ceil"``, ``"nearest"`` (E4M3 scales), ``"mse"``,
      ``"even"`` (E8M0 scales) or ``"4over6"`` (E4M3 scales); see
      :mod:`fp4jax.scales`. Default: ``fmt.default_scale_rule``.
    global_scale: NVFP4 only: the float32 decode factor to use instead of the
      one computed from the amax (``1 / (6 * 448 / amax)``), e.g. from
      calibration (:func:`global_scale_from_amax`, :class:`fp4jax.AmaxHistory`):
      a scalar, or one per row / leading index (an array of ``S``'s rank with
      length 1 or ``S[a]`` on each axis and 1 on the block axes). Block scales
      then target ``amax / global_scale / 6``. Every factor must lie in
      ``[2**-126, 2**126]`` (checked when not traced). Blocks whose scale would
      exceed E4M3's 448 saturate.
    hessian: ``(S[axis] // block_size, B, B)`` block Hessians (see
      :func:`fp4jax.block_hessians`); with ``scale_rule="mse"`` each block's
      scale minimises ``r^T H_j r``.
    pad: zero-pad ``axis`` up to a multiple of the block size. The QArray then
      has the padded shape.
    backend: ``"xla"`` (this reference), ``"pallas"`` (GPU kernel) or ``"auto"``
      (the kernel on a GPU where one exists for the case, else XLA). Results
      are bit-identical. The kernels take the formats of ``fp4jax.FORMATS``
      and the rules of ``fp4jax.SCALE_RULES`` with 1-D blocks and a
      tensor-wide global scale; ``"pallas"`` raises ValueError otherwise.
    block_shape: ``None`` (1-D blocks along ``axis``) or ``(B, B)`` with ``B =
      fmt.block_size``: one scale per ``B x B`` tile of the last two axes
      (``axis`` must be -1, ``S[-2]`` and ``S[-1]`` multiples of ``B``). A
      matrix and its transpose then quantize to transposed values and
      scales, bit for bit, under every rule.
    granularity: NVFP4 only, when ``global_scale`` is None: ``"tensor"`` (one
      global scale, the default), ``"row"`` (one per index of every axis but
      the block axis, 1-D blocks), ``"leading"`` (one per index of axis 0,
      e.g. per expert of an ``(E, K, N)`` weight) or a tuple of the axes to
      keep. Each is computed from that group's amax (:func:`global_amax`).
    layout: how the QArray stores its leaves: ``None`` (the logical array,
      as described below) or ``"rows"``, the matmul kernels' byte rows, for a
      2-D weight blocked along its contracting axis (see :class:`QArray`).
      The same numbers either way; ``"rows"`` saves a relayout on every
      matmul call.
    axis_name: inside ``jax.shard_map``, where ``x`` is one shard: the mesh
      axis name (or tuple of names) whose shards together form the tensor.
      NVFP4's amax (behind a global scale computed here) is then
      ``lax.pmax``-ed over them, one scalar (or one per group) per shard, so
      every shard gets the global scale, values and scales that quantizing
      the whole tensor gives, bit for bit. Naming an axis along which ``x``
      is replicated is harmless. ``None`` (the default): ``x`` alone, which is
      also right under ``jit`` with sharded inputs, where XLA inserts that
      all-reduce itself. Ignored by formats without a global scale and when
      ``global_scale`` is given. Runs on the XLA path.

  Returns:
    A :class:`QArray` with ``values`` of shape ``S`` in ``fmt.elem_dtype``,
    ``scales`` of shape ``S`` with ``S[axis] // block_size`` along ``axis`` (2-D
    blocks: ``(*S[:-2], S[-2] // B, S[-1] // B)``) in ``fmt.scale_dtype``,
    and ``global_scale`` (NVFP4: float32, a scalar for ``"tensor"``, else
    ``S``'s rank with length 1 on the reduced axes) or None.

  Raises:
    ValueError: naming the shape, dtype or axis at fault (unsupported dtype,
      axis out of range, axis length not a multiple of the block size without
      ``pad``, a hessian of the wrong shape, a rule the format lacks, a
      block_shape or granularity the input or format cannot take).

  Semantics: float32 subnormal inputs (``|x| < 2**-126``) count as zero on
  every backend. Elements round to nearest even on the element grid (ties to
  the even code, as ml_dtypes casts) and saturate at ``+-elem_max``. A block
  containing NaN or +-Inf gets the NaN scale, so it dequantizes to NaN over
  the whole block while other blocks are unaffected; an all-zero block
  dequantizes to exact zeros. With NVFP4 the tensor amax ignores non-finite
  elements (the finite elements of a NaN block still count).

  Mathematically (for the "floor" rule of MXFP4, along the last axis)::

    b = x.reshape(..., n // 32, 32)
    s = 2.0 ** (floor(log2(max(abs(b), -1))) - 2)
    values = round_to_e2m1(clip(b / s[..., None], -6, 6))
  """
  fmt = get_format(fmt)
  if layout not in STORAGE_LAYOUTS:
    raise ValueError(f"unknown QArray layout {layout!r}; expected one of {STORAGE_LAYOUTS}")
  x = as_input(x)
  tile = None
  if block_shape is not None:
    tile = _check_block_shape(block_shape, x, fmt, axis, pad)
    axis = -1
  else:
    axis = _check_input(x, fmt, axis, pad)
  scale_rule = fmt.default_scale_rule if scale_rule is None else scale_rule
  check_rule(fmt, scale_rule)
  backends.check_backend(backend)
  block_axes = (axis,) if tile is None else (-2, -1)
  keep = _keep_axes_for_quantize(granularity, global_scale, fmt, x.ndim, block_axes)
  if global_scale is not None:
    global_scale = _check_global_scale(global_scale, fmt, tuple(x.shape), block_axes)
  axis_name = _check_axis_name(axis_name)
  if not fmt.has_global_scale or global_scale is not None:
    axis_name = None  # no amax to reduce: every block is reduced within itself
  if hessian is not None:
    hessian = _check_hessian(hessian, x, fmt, axis, scale_rule, block_shape)

  obstacle = None
  if backend != "xla":
    obstacle = backends.quantize_obstacle(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale,
                                          hessian=hessian, pad=pad, block_shape=block_shape, keep=keep,
                                          axis_name=axis_name)
  if math.prod(x.shape) == 0:
    return _empty_qarray(x.shape, fmt, axis, tile, keep, global_scale, scale_rule, pad)
  plan = backends.choose("quantize", backend, obstacle,
                         verified=backends.gpu_verified("quantize", fmt, scale_rule, x.dtype))
  if plan.impl == "kernel":
    return _quantize_kernel(x, fmt, axis, scale_rule, global_scale, layout, plan.interpret)
  q = quantize_reference(x, global_scale, hessian, fmt=fmt, axis=axis, scale_rule=scale_rule, pad=pad,
                         tile=tile, keep=keep, axis_name=axis_name)
  return q if layout is None else with_layout(q, layout)


def _keep_axes_for_quantize(granularity, global_scale, fmt: Format, ndim: int, block_axes) -> tuple:
  """:func:`_keep_axes` for ``quantize``, which first checks that a granularity other than "tensor" has a global
  scale to vary (``fmt``) and is not also given as ``global_scale``'s shape."""
  if isinstance(granularity, str) and granularity == "tensor":
    return ()
  if not fmt.has_global_scale:
    raise ValueError(f"granularity={granularity!r} picks NVFP4-style global scales; {fmt!r} has no global scale")
  if global_scale is not None:
    raise ValueError("pass global_scale= or granularity=, not both: the shape of global_scale sets its granularity")
  return _keep_axes(granularity, ndim, block_axes)


def _check_hessian(hessian, x, fmt: Format, axis: int, scale_rule: str, block_shape):
  """``hessian`` as float32 ``(S[axis] // block_size, B, B)``, or a ValueError naming what is wrong."""
  hessian = jnp.asarray(hessian)
  if scale_rule != "mse":
    raise ValueError(f"hessian= needs scale_rule='mse', got {scale_rule!r}")
  if block_shape is not None:
    raise ValueError(f"hessian= weights 1-D blocks; block_shape={block_shape} is not supported with it")
  want = (-(-x.shape[axis] // fmt.block_size), fmt.block_size, fmt.block_size)
  if tuple(hessian.shape) != want:
    raise ValueError(
        f"hessian shape {tuple(hessian.shape)} does not match input shape {tuple(x.shape)} "
        f"along axis {axis}: expected {want}"
    )
  if not jnp.issubdtype(hessian.dtype, jnp.floating):
    raise ValueError(f"hessian must be floating, got dtype {hessian.dtype}")
  return jnp.asarray(hessian, jnp.float32)


def _quantize_kernel(x, fmt: Format, axis: int, scale_rule: str, global_scale, layout, interpret: bool) -> QArray:
  """The Pallas quantize kernel's QArray, stored in ``layout``."""
  from fp4jax.kernels import quantize_pack  # lazy: Pallas loads only when a kernel runs

  if layout == "rows" and x.ndim == 2:
    # The kernel's packed bytes are the byte rows, or their transpose: no float4 view and re-packing.
    if axis % 2 == 1:
      return quantize_pack.quantize_rows(x, fmt, scale_rule=scale_rule, global_scale=global_scale,
                                         interpret=interpret)
    return quantize_pack.quantize_columns_to_rows(x, fmt, axis=axis, scale_rule=scale_rule,
                                                  global_scale=global_scale, interpret=interpret)
  q = quantize_pack.quantize_qarray(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale,
                                    interpret=interpret)
  return q if layout is None else with_layout(q, layout)


def _check_axis_name(axis_name):
  """None, a mesh axis name, or a tuple of them (hashable: it is a static argument)."""
  if axis_name is None or isinstance(axis_name, str):
    return axis_name
  if isinstance(axis_name, (tuple, list)) and axis_name and all(isinstance(a, str) for a in axis_name):
    return tuple(axis_name)
  raise ValueError(f"axis_name must be None, a mesh axis name or a tuple of names, got {axis_name!r}")


def _empty_qarray(shape, fmt: Format, axis: int, tile, keep, global_scale, scale_rule: str, pad: bool) -> QArray:
  """The QArray of an input with no elements: no values, no scales, the global scale of an all-zero tensor."""
  b = fmt.block_size
  shape = list(shape)
  if pad and tile is None:
    shape[axis] = -(-shape[axis] // b) * b
  scale_shape = list(shape)
  if tile is None:
    scale_shape[axis] //= b
  else:
    scale_shape[-2:] = [shape[-2] // b, shape[-1] // b]
  if fmt.has_global_scale and global_scale is None:
    global_scale = global_scale_from_amax(jnp.zeros((), jnp.float32), fmt, scale_rule=scale_rule)
    if keep:
      global_scale = jnp.broadcast_to(global_scale, [shape[a] if a in keep else 1 for a in range(len(shape))])
  return QArray(jnp.zeros(shape, fmt.elem_dtype), jnp.zeros(scale_shape, fmt.scale_dtype), global_scale, fmt, axis,
                None if tile is None else (tile, tile))


def _check_block_shape(block_shape, x, fmt: Format, axis, pad: bool) -> int:
  """Validates 2-D blocks; returns the tile side ``B``."""
  b = fmt.block_size
  try:
    ok = tuple(int(v) for v in block_shape) == (b, b) and len(block_shape) == 2
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"block_shape must be None or ({b}, {b}) for {fmt!r} (one scale per {b}x{b} tile), "
                     f"got {block_shape!r}")
  if x.ndim < 2:
    raise ValueError(f"block_shape={block_shape} tiles the last two axes; got shape {tuple(x.shape)}")
  if normalize_axis(axis, x.ndim, x.shape) != -1:
    raise ValueError(f"block_shape={block_shape} tiles the last two axes and stores axis -1; got axis {axis}")
  if pad:
    raise ValueError(f"pad=True pads one axis; with block_shape={block_shape} the last two axes of shape "
                     f"{tuple(x.shape)} must already be multiples of {b}")
  if x.shape[-2] % b or x.shape[-1] % b:
    raise ValueError(f"quantize: shape {tuple(x.shape)} is not a whole number of {b}x{b} tiles along its "
                     f"last two axes (block_shape={block_shape})")
  return b


def dequantize(q: QArray, dtype=jnp.float32, *, backend: str = "auto"):
  """Returns ``q.values * q.scales * q.global_scale`` as ``dtype``, shape ``q.shape``.

  Args:
    q: a :class:`QArray` (any format, any rank and block axis, 1-D or 2-D
      blocks, scalar or per-group global scale, either storage layout).
    dtype: a floating output dtype.
    backend: ``"xla"``, ``"pallas"`` or ``"auto"``, as for :func:`quantize`.

  Computed in float32 (power-of-two scales by exponent arithmetic, so the
  whole E8M0 range is exact) and cast to ``dtype`` once. A NaN scale gives NaN
  over its block; results below float32's normal range (``2**-126``) are
  signed zeros on every backend; finite results beyond ``dtype``'s range
  saturate to its largest finite value instead of becoming Inf.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"dequantize expects a fp4jax.QArray, got {type(q).__name__}")
  dtype = float_dtype(dtype, "dequantize: dtype")
  backends.check_backend(backend)
  q = with_layout(validate_qarray(q), None)  # the kernels and the reference read the logical array
  if math.prod(q.shape) == 0:
    return jnp.zeros(q.shape, dtype)
  obstacle = None if backend == "xla" else backends.dequantize_obstacle(q, dtype)
  plan = backends.choose("dequantize", backend, obstacle, verified=backends.gpu_verified("dequantize", q.fmt))
  if plan.impl == "kernel":
    from fp4jax.kernels import dequantize as dequantize_kernel

    return dequantize_kernel.dequantize_qarray(q, dtype, interpret=plan.interpret)
  return dequantize_reference(q, dtype=dtype)


# QArray.dequantize calls this; the data type does not import the numerics above it.
qarray.set_dequantize(dequantize)
