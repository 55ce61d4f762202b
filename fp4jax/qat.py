"""Quantization-aware training: custom VJPs with the quantization in the loop.

* :func:`fake_quant`: ``dequantize(quantize(x))`` with a straight-through
  (optionally clipped) gradient.
* :func:`quantized_dot_general`: a ``lax.dot_general`` whose forward GEMM sees
  block-quantized operands and whose two backward GEMMs (``dlhs = g . rhs``,
  ``drhs = lhs . g``) each quantize their operands along *their own*
  contracting axis, with optional stochastic rounding and a random Hadamard
  transform, as NVIDIA's NVFP4 training recipe does.
* :func:`stochastic_quantize`, :func:`random_hadamard`: the two pieces above,
  usable on their own.

Configs nest: ``QatConfig(lhs=OperandConfig(...), rhs=..., grad=...)``; every
format-dependent choice is answered by the :class:`~fp4jax.Format` itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fp4jax import _bits
from fp4jax.formats import Format, get_format
from fp4jax.matmul import scaled_dot_general
from fp4jax.qarray import QArray, normalize_axis
from fp4jax.quantize import dequantize, quantize
from fp4jax.scales import SCALE_RULES, element_units, encode_units

__all__ = [
    "OperandConfig",
    "QatConfig",
    "fake_quant",
    "quantized_dot_general",
    "quantized_einsum",
    "einsum_dimension_numbers",
    "stochastic_quantize",
    "random_hadamard",
    "hadamard_matrix",
]

ROUNDINGS = ("nearest", "stochastic")
STES = ("identity", "clipped")


# ---- configs -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OperandConfig:
  """How one GEMM operand (or the output gradient) is quantized.

  Attributes:
    fmt: a :class:`fp4jax.Format` or its name; ``None`` keeps the operand in
      the compute dtype (no quantization).
    scale_rule: a key of :data:`fp4jax.SCALE_RULES`; ``None`` is
      ``fmt.default_scale_rule``.
    rounding: element rounding where the operand is quantized for a *backward*
      GEMM: ``"nearest"`` (even) or ``"stochastic"`` (unbiased wherever no
      element saturates, so pair it with ``scale_rule="ceil"``). Forward GEMMs
      always round to nearest.
  """

  fmt: Format | str | None = None
  scale_rule: str | None = None
  rounding: str = "nearest"

  def __post_init__(self):
    if self.fmt is not None:
      object.__setattr__(self, "fmt", get_format(self.fmt))
    if self.scale_rule is not None and self.scale_rule not in SCALE_RULES:
      raise ValueError(f"unknown scale_rule {self.scale_rule!r}; expected one of {sorted(SCALE_RULES)}")
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"unknown rounding {self.rounding!r}; expected one of {ROUNDINGS}")

  @property
  def rule(self) -> str | None:
    return None if self.fmt is None else (self.scale_rule or self.fmt.default_scale_rule)

  @property
  def stochastic(self) -> bool:
    return self.fmt is not None and self.rounding == "stochastic"


@dataclasses.dataclass(frozen=True)
class QatConfig:
  """Quantization of a ``dot_general`` in training, like ``jax.nn``'s three configs.

  Attributes:
    lhs, rhs: forward formats of the two operands; in the backward pass the
      same configs re-quantize the high-precision operands along the backward
      GEMMs' contracting axes.
    grad: format of the output gradient in both backward GEMMs. With
      ``grad.fmt=None`` the backward pass is the plain straight-through
      estimator: both backward GEMMs use the forward-quantized operands.
    hadamard: ``None``, or a power of two (16 or 32 in NVIDIA's recipe): apply
      an orthonormal random Hadamard transform of that size, block-diagonally
      along the contracting axis of both operands of each quantized backward
      GEMM before quantizing them. The product is unchanged in exact arithmetic;
      the transform spreads outliers over each block.
    seed: seeds the Hadamard signs, and stochastic rounding when the key given
      to :func:`quantized_dot_general` is an integer counter.
    compute_dtype: dtype of the dequantized GEMM operands; ``None`` is the
      promoted dtype of the inputs (bfloat16 inputs give bfloat16 GEMMs, in
      which E2M1/E4M3/E5M2 values times power-of-two scales are exact).
  """

  lhs: OperandConfig = OperandConfig()
  rhs: OperandConfig = OperandConfig()
  grad: OperandConfig = OperandConfig()
  hadamard: int | None = None
  seed: int = 0
  compute_dtype: Any = None

  def __post_init__(self):
    for name in ("lhs", "rhs", "grad"):
      if not isinstance(getattr(self, name), OperandConfig):
        raise ValueError(f"QatConfig.{name} must be an OperandConfig, got {getattr(self, name)!r}")
    h = self.hadamard
    if h is not None and (not isinstance(h, int) or h < 2 or h & (h - 1)):
      raise ValueError(f"QatConfig.hadamard must be None or a power of two >= 2 (16, 32), got {h!r}")
    if self.compute_dtype is not None:
      object.__setattr__(self, "compute_dtype", np.dtype(self.compute_dtype))

  @classmethod
  def uniform(cls, fmt, *, scale_rule=None, grad_rounding="stochastic", grad_scale_rule=None,
              backward=True, hadamard=None, **kwargs) -> "QatConfig":
    """Every operand in ``fmt``; the gradient in ``fmt`` too unless ``backward=False``.

    ``grad_scale_rule`` defaults to ``scale_rule``, except that stochastically
    rounded gradients of power-of-two formats get ``"ceil"``, the one rule
    under which no element saturates, so the rounding stays unbiased.
    """
    fmt = get_format(fmt)
    op = OperandConfig(fmt, scale_rule)
    if grad_scale_rule is None:
      unbiased = grad_rounding == "stochastic" and fmt.power_of_two_scales
      grad_scale_rule = "ceil" if unbiased else scale_rule
    grad = OperandConfig(fmt, grad_scale_rule, grad_rounding) if backward else OperandConfig()
    return cls(lhs=op, rhs=op, grad=grad, hadamard=hadamard, **kwargs)

  @property
  def needs_key(self) -> bool:
    """Whether the backward pass draws random numbers (stochastic rounding)."""
    return self.grad.fmt is not None and any(c.stochastic for c in (self.lhs, self.rhs, self.grad))


# ---- blocks --------------------------------------------------------------------
def _to_blocks(x, axis: int, block: int):
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _from_blocks(blocks, axis: int):
  return jnp.moveaxis(blocks.reshape(*blocks.shape[:-2], -1), -1, axis)


def _pad_axis(x, axis: int, multiple: int):
  n = x.shape[axis]
  if n % multiple == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, -n % multiple)
  return jnp.pad(x, widths)


# ---- stochastic rounding ----------------------------------------------------------
def _stochastic_round(y, fmt: Format, key):
  """Rounds float32 ``y`` (``|y| <= elem_max``) to one of its two grid neighbours.

  With ``t = |y| / ulp(y)`` (exact: ulp is a power of two), the result is
  ``floor(t) * ulp`` or ``(floor(t) + 1) * ulp``, the upper one with probability
  ``frac(t)``, so ``E[result] = y``. ``frac(t)`` has at most ``23 - nmant``
  fractional bits in a normal binade, and a uniform float32 in [0, 1) is a
  multiple of ``2**-23``, so ``P(u < frac) == frac`` exactly there; in the
  subnormal binade it is ``frac`` rounded up to a multiple of ``2**-23``.
  """
  a = jnp.abs(y)
  emin = int(fmt.elem_finfo.minexp)  # smallest normal exponent of the elements
  e = jnp.maximum(_bits.floor_log2(_bits.f32_bits(a)), emin)
  ulp_exp = e - fmt.elem_nmant
  t = _bits.scale_by_pow2(a, -ulp_exp)
  lo = jnp.floor(t)
  u = jax.random.uniform(key, y.shape, jnp.float32)
  r = lo + (u < t - lo).astype(jnp.float32)
  return jnp.copysign(_bits.scale_by_pow2(r, ulp_exp), y)


def stochastic_quantize(x, fmt: Format | str, key, *, axis: int = -1, scale_rule: str | None = None,
                        global_scale=None, pad: bool = False) -> QArray:
  """:func:`fp4jax.quantize` with stochastic instead of nearest element rounding.

  Args:
    x: float32, bfloat16 or float16 array of shape ``S``.
    fmt: the format (or its name).
    key: a ``jax.random`` key; each element draws one uniform number.
    axis, scale_rule, global_scale, pad: as in :func:`fp4jax.quantize`; block
      scales (and NVFP4's global scale) are exactly the ones it picks.

  Returns:
    A QArray like ``quantize``'s (``values`` shape ``S``, ``scales`` with
    ``S[axis] // block_size``), whose every element is one of the two grid
    neighbours of ``x / scale``: unbiased, ``E[dequantize(q)] == x``, wherever
    no element saturates at ``elem_max`` (always true for ``scale_rule="ceil"``).
  """
  nearest = quantize(x, fmt, axis=axis, scale_rule=scale_rule, global_scale=global_scale, pad=pad,
                     backend="xla")
  fmt, ax = nearest.fmt, nearest.axis
  xf = _bits.flush_subnormals(x.astype(jnp.float32))
  if pad:
    xf = _pad_axis(xf, ax % xf.ndim, fmt.block_size)
  blocks = _to_blocks(xf, ax, fmt.block_size)
  scales = jnp.moveaxis(nearest.scales, ax, -1)
  y = jnp.clip(element_units(blocks, scales, fmt, nearest.global_scale), -fmt.elem_max, fmt.elem_max)
  sr = encode_units(_stochastic_round(y, fmt, key), fmt)  # on the grid: encoding is exact
  # Non-finite blocks carry the NaN scale; keep quantize's (zero) values there.
  bad = jax.lax.bitcast_convert_type(scales, jnp.uint8) == fmt.scale_nan_byte
  values = jnp.where(bad[..., None], _to_blocks(nearest.values, ax, fmt.block_size), sr)
  return QArray(_from_blocks(values, ax), nearest.scales, nearest.global_scale, fmt, ax)


# ---- random Hadamard transform -------------------------------------------------------
@functools.cache
def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def hadamard_matrix(n: int, seed: int | None = 0) -> np.ndarray:
  """The orthonormal ``(n, n)`` float64 matrix ``H_n diag(s) / sqrt(n)``.

  ``H_n`` is Sylvester's Hadamard matrix, ``s`` random signs from ``seed``
  (``None``: all +1). ``Q @ Q.T == I``.
  """
  if n < 2 or n & (n - 1):
    raise ValueError(f"hadamard size must be a power of two >= 2, got {n}")
  signs = np.ones(n) if seed is None else np.random.default_rng(seed).choice([-1.0, 1.0], n)
  return _sylvester(n) * signs[None, :] / math.sqrt(n)


def random_hadamard(x, n: int, *, axis: int = -1, seed: int | None = 0):
  """Applies ``hadamard_matrix(n, seed)`` to every run of ``n`` elements along ``axis``.

  Args:
    x: floating array; ``x.shape[axis]`` must be a multiple of ``n``.

  Returns:
    float32, shape of ``x``: block ``b`` along ``axis`` becomes ``Q @ x_b``.
    Applied to both operands along a contracting axis it leaves their product
    unchanged (``Q.T @ Q = I``).
  """
  ax = normalize_axis(axis, x.ndim, x.shape)
  if x.shape[ax] % n:
    raise ValueError(f"random_hadamard: shape {tuple(x.shape)} has length {x.shape[ax]} along axis "
                     f"{axis}, not a multiple of the transform size {n}")
  q = jnp.asarray(hadamard_matrix(n, seed), jnp.float32)
  blocks = _to_blocks(x.astype(jnp.float32), ax, n)
  # HIGHEST: a TF32/bf16 transform would add its own rounding before quantization.
  out = jnp.einsum("...j,ij->...i", blocks, q, precision=lax.Precision.HIGHEST)
  return _from_blocks(out, ax)


# ---- fake quantization ------------------------------------------------------------
def _fake(x, op: OperandConfig, axis: int, dtype, key=None):
  """dequantize(quantize(x)) along ``axis`` (zero-padded to whole blocks), as ``dtype``."""
  if op.fmt is None:
    return x.astype(dtype)
  xin = x if x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)
  # The XLA path, on every backend: XLA fuses quantize and dequantize into one
  # pass over x, where a separate quantize kernel would write the QArray out.
  if key is not None and op.stochastic:
    q = stochastic_quantize(xin, op.fmt, key, axis=axis, scale_rule=op.rule, pad=True)
  else:
    q = quantize(xin, op.fmt, axis=axis, scale_rule=op.rule, pad=True, backend="xla")
  out = dequantize(q, jnp.float32, backend="xla")
  n = x.shape[axis]
  if out.shape[axis] != n:
    out = lax.slice_in_dim(out, 0, n, axis=axis)
  return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _fake_quant(x, fmt, axis, scale_rule, ste):
  return _fake_quant_fwd(x, fmt, axis, scale_rule, ste)[0]


def _fake_quant_fwd(x, fmt, axis, scale_rule, ste):
  q = quantize(x, fmt, axis=axis, scale_rule=scale_rule, backend="xla")
  out = dequantize(q, x.dtype, backend="xla")
  if ste == "identity":
    return out, None
  blocks = _to_blocks(_bits.flush_subnormals(x.astype(jnp.float32)), q.axis, fmt.block_size)
  y = element_units(blocks, jnp.moveaxis(q.scales, q.axis, -1), fmt, q.global_scale)
  return out, _from_blocks(jnp.abs(y) <= fmt.elem_max, q.axis)


def _fake_quant_bwd(fmt, axis, scale_rule, ste, inside, g):
  # Straight-through estimator: d fake_quant(x) / dx := I. The clipped variant
  # is I where |x| <= elem_max * scale and 0 where the element saturated.
  del fmt, axis, scale_rule
  if ste == "identity":
    return (g,)
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, fmt: Format | str, *, axis: int = -1, scale_rule: str | None = None,
               ste: str = "identity"):
  """``dequantize(quantize(x, fmt, axis=axis), x.dtype)`` with a straight-through gradient.

  Always the XLA reference path (bit-identical to the kernels), which XLA fuses
  into a single pass over ``x``.

  Args:
    x: float32, bfloat16 or float16 array of shape ``S``; ``S[axis]`` a
      multiple of ``fmt.block_size``.
    fmt: a :class:`fp4jax.Format` or its name.
    axis: the blocked axis.
    scale_rule: as in :func:`fp4jax.quantize` (default ``fmt.default_scale_rule``).
    ste: ``"identity"``: the gradient passes through unchanged;
      ``"clipped"``: zero where the element saturated (``|x| > elem_max * s``).

  Returns:
    Array of shape ``S`` and dtype ``x.dtype``. Works under ``jit``, ``vmap``,
    ``grad``, ``remat`` and ``scan``; ``fmt``/``axis``/``scale_rule``/``ste``
    are static.
  """
  fmt = get_format(fmt)
  if ste not in STES:
    raise ValueError(f"unknown ste {ste!r}; expected one of {STES}")
  if scale_rule is not None and scale_rule not in SCALE_RULES:
    raise ValueError(f"unknown scale_rule {scale_rule!r}; expected one of {sorted(SCALE_RULES)}")
  if not hasattr(x, "dtype") or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"fake_quant expects float32, bfloat16 or float16 input, got dtype "
                     f"{getattr(x, 'dtype', type(x))}")
  axis = normalize_axis(axis, x.ndim, x.shape)
  if x.shape[axis] % fmt.block_size:
    raise ValueError(f"fake_quant: shape {tuple(x.shape)} has length {x.shape[axis]} along axis {axis}, "
                     f"not a multiple of {fmt!r}'s block size {fmt.block_size}")
  return _fake_quant(x, fmt, axis, scale_rule or fmt.default_scale_rule, ste)


# ---- quantized dot_general -------------------------------------------------------
def _canonical_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int, lshape, rshape):
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(f"dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
                     f"got {dimension_numbers!r}") from None
  lc, lb = (tuple(normalize_axis(d, lhs_ndim, lshape) % lhs_ndim for d in t) for t in (lc, lb))
  rc, rb = (tuple(normalize_axis(d, rhs_ndim, rshape) % rhs_ndim for d in t) for t in (rc, rb))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers {dimension_numbers!r}: lhs and rhs need as many contracting "
                     "and batch dimensions")
  for a, b in zip(lc + lb, rc + rb):
    if lshape[a] != rshape[b]:
      raise ValueError(f"quantized_dot_general: lhs shape {tuple(lshape)} axis {a} and rhs shape "
                       f"{tuple(rshape)} axis {b} are paired but have different sizes")
  return (lc, rc), (lb, rb)


def _free(ndim: int, *used) -> tuple[int, ...]:
  taken = set().union(*used)
  return tuple(d for d in range(ndim) if d not in taken)


def _as_key(key, seed: int):
  """A typed key, a raw uint32[2] key or an integer counter -> a typed key."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single jax.random key, got shape {key.shape}")
    return key
  if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
    # Counter-based: the same (seed, counter) always draws the same numbers.
    return jax.random.fold_in(jax.random.key(seed), key)
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be a jax.random key, a uint32[2] raw key or an integer counter, "
                   f"got dtype {key.dtype} shape {key.shape}")


def _stream(key, i: int):
  return None if key is None else jax.random.fold_in(key, i)


def _backward_operand(x, axis: int, op: OperandConfig, cfg: QatConfig, key, dtype, multiple: int):
  """Pads ``axis`` to ``multiple``, applies the Hadamard transform, fake-quantizes along it."""
  x = _pad_axis(x, axis, multiple)
  if cfg.hadamard:
    x = random_hadamard(x, cfg.hadamard, axis=axis, seed=cfg.seed)
  return _fake(x, op, axis, dtype, key)


def _block_multiple(cfg: QatConfig, *ops: OperandConfig) -> int:
  sizes = [op.fmt.block_size for op in ops if op.fmt is not None]
  if cfg.hadamard:
    sizes.append(cfg.hadamard)
  return math.lcm(*sizes) if sizes else 1


def _backward_gemm(g, other, g_axes, other_axes, op_other, cfg, keys, dtype, transpose):
  """Quantizes ``g`` and ``other`` along one of their paired contracting axes, then transposes.

  ``transpose(g_q, other_q)`` is the linear transpose of the forward product in
  the missing operand. The blocks run along the axis this GEMM sums over; the
  forward blocks ran along another axis and cannot be reused (the scales
  would vary inside the sum).
  """
  if not g_axes:  # an outer product: no contraction, nothing to block
    return transpose(g.astype(dtype), other.astype(dtype))
  ga, oa = g_axes[-1], other_axes[-1]
  m = _block_multiple(cfg, cfg.grad, op_other)
  gq = _backward_operand(g, ga, cfg.grad, cfg, keys[0], dtype, m)
  oq = _backward_operand(other, oa, op_other, cfg, keys[1], dtype, m)
  return transpose(gq, oq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _qdot(lhs, rhs, key, dims, cfg, precision, out_dtype):
  return _qdot_fwd(lhs, rhs, key, dims, cfg, precision, out_dtype)[0]


def _forward_operands(lhs, rhs, dims, cfg, dtype):
  (lc, rc), _ = dims
  if not lc:
    return lhs.astype(dtype), rhs.astype(dtype)
  return _fake(lhs, cfg.lhs, lc[-1], dtype), _fake(rhs, cfg.rhs, rc[-1], dtype)


def _qdot_fwd(lhs, rhs, key, dims, cfg, precision, out_dtype):
  dtype = cfg.compute_dtype or jnp.result_type(lhs, rhs)
  lq, rq = _forward_operands(lhs, rhs, dims, cfg, dtype)
  out = lax.dot_general(lq, rq, dims, precision=precision, preferred_element_type=out_dtype)
  # The plain STE needs the forward-quantized operands; quantized backward
  # GEMMs need the high-precision ones, to re-block them along another axis.
  res = (lq, rq) if cfg.grad.fmt is None else (lhs, rhs)
  # Empty arrays carry the primal dtypes, which the cotangents must match.
  return out, (*res, key, jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))


def _qdot_bwd(dims, cfg, precision, out_dtype, res, g):
  a, b, key, lhs_tag, rhs_tag = res
  (lc, rc), (lb, rb) = dims
  dtype = cfg.compute_dtype or jnp.result_type(a, b)

  def dot(x, y):
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=dtype)

  def t_lhs(gq, rq):
    spec = jax.ShapeDtypeStruct(a.shape, dtype)
    return jax.linear_transpose(lambda x: dot(x, rq), spec)(gq)[0]

  def t_rhs(gq, lq):
    spec = jax.ShapeDtypeStruct(b.shape, dtype)
    return jax.linear_transpose(lambda y: dot(lq, y), spec)(gq)[0]

  g = g.astype(dtype)
  if cfg.grad.fmt is None:
    # Straight-through: the gradient of the unquantized op at the quantized inputs.
    return t_lhs(g, b.astype(dtype)).astype(lhs_tag.dtype), t_rhs(g, a.astype(dtype)).astype(rhs_tag.dtype), None

  lfree, rfree = _free(a.ndim, lc, lb), _free(b.ndim, rc, rb)
  nb = len(lb)
  # dlhs = g . rhs sums over rhs's free axes; drhs = lhs . g over lhs's.
  g_rfree = tuple(nb + len(lfree) + j for j in range(len(rfree)))
  g_lfree = tuple(nb + i for i in range(len(lfree)))
  keys = [_stream(key, i) for i in range(4)]
  dlhs = _backward_gemm(g, b, g_rfree, rfree, cfg.rhs, cfg, keys[0:2], dtype, t_lhs)
  drhs = _backward_gemm(g, a, g_lfree, lfree, cfg.lhs, cfg, keys[2:4], dtype, t_rhs)
  return dlhs.astype(lhs_tag.dtype), drhs.astype(rhs_tag.dtype), None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def _check_float(x, name: str):
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantized_dot_general: {name} must be a floating array, got dtype "
                     f"{getattr(x, 'dtype', type(x))}")


def _inference_dot(lhs, rhs, dims, cfg: QatConfig | None, out_dtype):
  """PTQ inference: stored QArray operand(s), the other quantized per ``cfg``, block-scaled matmul."""
  (lc, rc), _ = dims
  for x, c, name in ((lhs, lc, "lhs"), (rhs, rc, "rhs")):
    if isinstance(x, QArray) and x.axis % x.ndim not in c:
      raise ValueError(f"quantized_dot_general: {name} QArray of shape {x.shape} is blocked along axis "
                       f"{x.axis}, not along a contracting axis {c}")
  if not isinstance(lhs, QArray) and cfg is not None and cfg.lhs.fmt is not None:
    lhs = quantize(lhs, cfg.lhs.fmt, axis=lc[-1], scale_rule=cfg.lhs.rule)
  if not isinstance(rhs, QArray) and cfg is not None and cfg.rhs.fmt is not None:
    rhs = quantize(rhs, cfg.rhs.fmt, axis=rc[-1], scale_rule=cfg.rhs.rule)
  return scaled_dot_general(lhs, rhs, dims, preferred_element_type=out_dtype)


def quantized_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                          *, config: QatConfig | None = None, key=None, out_sharding=None):
  """``lax.dot_general`` with block-scaled quantization in the forward and backward GEMMs.

  Args:
    lhs, rhs: floating arrays (or, for inference, :class:`QArray` operands
      blocked along a contracting axis).
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``
      as in ``lax.dot_general``.
    precision, preferred_element_type: as in ``lax.dot_general``; the output
      dtype is ``preferred_element_type`` or the promoted input dtype.
    config: a :class:`QatConfig`; ``None`` is a plain ``lax.dot_general``.
    key: for stochastic rounding: a ``jax.random`` key, or an integer counter
      (e.g. the step) combined with ``config.seed``.
    out_sharding: accepted for ``flax`` compatibility; must be None.

  Returns:
    ``lax.dot_general``'s output shape: batch, lhs free, then rhs free axes.

  Forward: ``dot_general(fq(lhs), fq(rhs))`` where ``fq`` quantizes along the
  last contracting axis (zero-padded to whole blocks) and dequantizes.
  Backward, for ``g`` the output cotangent: ``dlhs`` is the transpose product
  of ``fq'(g)`` and ``fq'(rhs)``, both blocked along one of the axes that
  product sums over (an rhs free axis), ``drhs`` likewise over an lhs free
  axis; ``fq'`` uses ``config.grad`` for ``g`` and the operand's own config for
  ``lhs``/``rhs``, with their ``rounding`` and the optional Hadamard transform.
  With ``config.grad.fmt=None`` the backward pass is the straight-through
  gradient ``vjp(dot_general)(fq(lhs), fq(rhs))``.
  """
  if out_sharding is not None:
    raise ValueError("quantized_dot_general does not support out_sharding")
  if config is not None and not isinstance(config, QatConfig):
    raise ValueError(f"config must be a fp4jax.qat.QatConfig or None, got {type(config).__name__}")
  for x, name in ((lhs, "lhs"), (rhs, "rhs")):
    if not isinstance(x, QArray):
      _check_float(x, name)
  dims = _canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim, lhs.shape, rhs.shape)
  precision = lax.Precision(precision) if isinstance(precision, str) else precision
  if isinstance(lhs, QArray) or isinstance(rhs, QArray):
    out_dtype = np.dtype(preferred_element_type or jnp.float32)
    return _inference_dot(lhs, rhs, dims, config, out_dtype)
  out_dtype = np.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if config is None:
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=out_dtype)
  if config.needs_key and key is None:
    raise ValueError("this QatConfig rounds stochastically in the backward pass: pass key= "
                     "(a jax.random key or an integer step counter)")
  key = _as_key(key, config.seed) if config.needs_key else None
  return _qdot(lhs, rhs, key, dims, config, precision, out_dtype)


# ---- einsum ------------------------------------------------------------------------
def einsum_dimension_numbers(equation: str, lhs_ndim: int, rhs_ndim: int):
  """Parses a two-operand einsum into ``dot_general`` dimension numbers.

  Args:
    equation: explicit ``"lhs,rhs->out"``; ``...`` may appear in ``lhs`` and
      ``out`` (leading lhs axes), not in ``rhs``. Every index appears in at least
      two of the three terms (no traces, no summing within one operand).

  Returns:
    ``(dimension_numbers, perm, out_terms, rhs_terms)``:
    ``jnp.transpose(dot_general(lhs, rhs, dimension_numbers), perm)`` is the
    einsum; ``out_terms`` is the output term with ``...`` expanded and
    ``rhs_terms`` the kernel's (for bias shapes).
  """
  eq = equation.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"einsum equation {equation!r} must be explicit with two operands: 'ab,bc->ac'")
  ins, out = eq.split("->")
  lt, rt = ins.split(",")
  if "..." in rt:
    raise ValueError(f"einsum equation {equation!r}: '...' is only supported in the input and output")
  if "..." in lt:
    n_ell = lhs_ndim - (len(lt) - 3)
    used = set(eq)
    fill = "".join([c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used][:n_ell])
    lt, out = lt.replace("...", fill), out.replace("...", fill)
  if len(lt) != lhs_ndim or len(rt) != rhs_ndim:
    raise ValueError(f"einsum equation {equation!r} does not match operand ranks {lhs_ndim} and {rhs_ndim}")
  for c in set(lt + rt + out):
    if (c in lt) + (c in rt) + (c in out) < 2 or lt.count(c) > 1 or rt.count(c) > 1:
      raise ValueError(f"einsum equation {equation!r}: index {c!r} must appear once in two of the terms")
  contract = [c for c in lt if c in rt and c not in out]
  batch = [c for c in lt if c in rt and c in out]
  dims = ((tuple(lt.index(c) for c in contract), tuple(rt.index(c) for c in contract)),
          (tuple(lt.index(c) for c in batch), tuple(rt.index(c) for c in batch)))
  produced = batch + [c for c in lt if c not in rt] + [c for c in rt if c not in lt]
  return dims, tuple(produced.index(c) for c in out), out, rt


def quantized_einsum(equation: str, lhs, rhs, *, config: QatConfig | None = None, key=None,
                     precision=None, preferred_element_type=None):
  """A two-operand einsum through :func:`quantized_dot_general` (``rhs`` may be a QArray)."""
  dims, perm, _, _ = einsum_dimension_numbers(equation, lhs.ndim, rhs.ndim)
  y = quantized_dot_general(lhs, rhs, dims, precision, preferred_element_type, config=config, key=key)
  return jnp.transpose(y, perm)

