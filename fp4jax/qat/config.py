"""QAT configs: how each GEMM operand, and the output gradient, is quantized."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fp4jax.backend import check_backend
from fp4jax.formats import Format, get_format
from fp4jax.scales import SCALE_RULES

__all__ = ["OperandConfig", "QatConfig", "ROUNDINGS", "STES"]

ROUNDINGS = ("nearest", "stochastic")
STES = ("identity", "clipped")


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
    axis_name: for use inside ``jax.shard_map``: the mesh axis name (or tuple
      of names) whose shards together form each operand; NVFP4's tensor amax
      is ``lax.pmax``-ed over them (see :func:`fp4jax.quantize`), so the
      global scales are the unsharded ones. ``None`` under plain ``jit``,
      sharded or not.
    backend: how each 2-D operand is fake-quantized. ``"xla"`` (default): the
      reference ops, which XLA fuses. ``"pallas"``: the fused kernel
      (:mod:`fp4jax.kernels.fake_quant`: block scale, rounding with its own
      threefry draws, dequantize in one pass; the same bits), a ValueError
      where it cannot run. ``"auto"``: the kernel on a GPU where its bits are
      confirmed there (``fp4jax.backend.GPU_UNVERIFIED``) and it is the faster
      (``fp4jax.qat.fake.AUTO_FORMATS``: MXFP4, NVFP4), else the XLA ops. Operands the kernel does
      not take (blocked along a middle axis, float16, ``axis_name``, shapes no
      tile divides) stay on the XLA ops under ``"auto"``. Under ``jit`` with arrays sharded over
      an automatic (``Auto``) mesh each device runs the kernel on its shard
      (``custom_partitioning``; the draws are the whole array's).
  """

  lhs: OperandConfig = OperandConfig()
  rhs: OperandConfig = OperandConfig()
  grad: OperandConfig = OperandConfig()
  hadamard: int | None = None
  seed: int = 0
  compute_dtype: Any = None
  axis_name: Any = None
  backend: str = "xla"

  def __post_init__(self):
    for name in ("lhs", "rhs", "grad"):
      if not isinstance(getattr(self, name), OperandConfig):
        raise ValueError(f"QatConfig.{name} must be an OperandConfig, got {getattr(self, name)!r}")
    check_backend(self.backend)
    h = self.hadamard
    if h is not None and (not isinstance(h, int) or h < 2 or h & (h - 1)):
      raise ValueError(f"QatConfig.hadamard must be None or a power of two >= 2 (16, 32), got {h!r}")
    if self.compute_dtype is not None:
      object.__setattr__(self, "compute_dtype", np.dtype(self.compute_dtype))
    a = self.axis_name
    if isinstance(a, list):
      object.__setattr__(self, "axis_name", a := tuple(a))
    if not (a is None or isinstance(a, str) or (isinstance(a, tuple) and a and all(isinstance(n, str) for n in a))):
      raise ValueError(f"QatConfig.axis_name must be None, a mesh axis name or a tuple of names, got {a!r}")

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
