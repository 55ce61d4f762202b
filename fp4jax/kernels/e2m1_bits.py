"""Packed E2M1 bytes -> scaled bfloat16 in a few PTX integer ops (GPU only).

The jnp decode of :mod:`fp4jax.kernels.matmul_common` (nibble -> E4M3 byte ->
float32 -> times the scale -> bfloat16) costs about 11 instructions a weight in
the W4A16 kernel (ncu, ``benchmarks/results/w4a16_ncu.txt``), and the kernel is
issue-bound on them. Here the nibble goes straight into a bfloat16 bit pattern:
its sign to bit 15, its exponent and mantissa bits to bits 8..6, which reads as
``E2M1(code) * 2**-126`` (E2M1's subnormal 0.5 lands on bfloat16's subnormal
``2**-127``, so one pattern fits every code). Two ``mul.rn.bf16x2`` by
``2**126`` and by the block scale finish it, both exact while the product is in
bfloat16's range. Per two bytes (four weights): a byte permute, about nine
shifts and masks, four packed multiplies; in the kernel, 4.7 instructions a
weight in all (ncu, ``benchmarks/results/w4a16_bits_ncu.txt``).

Why two multiplies: one by ``2**126 * scale`` would overflow bfloat16 for E8M0
scales above ``2**1``, and E2M1's subnormal needs the ``2**-126`` pattern.

Inline PTX runs only on NVIDIA GPUs (sm_90 for the bfloat16 multiply); Pallas
interpret mode uses a jnp twin (``interpret=True``). Tests check both, bit for
bit, over every byte and every scale byte against numpy float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp4jax.kernels import matmul_common as common

__all__ = ["decode_scaled"]

# One instance sees four packed bytes ($2: byte j is element j) and four bf16
# scales ($3: elements 0, 1; $4: elements 2, 3) and writes four values ($0:
# elements 0, 1; $1: 2, 3; element j in the low half of its register when j is
# even). prmt puts byte j at bits 8..15 of a 16-bit lane, so its high nibble
# sits at the top of the lane (sign bit 15, magnitude bits 14..12 -> shift right
# 6) and its low nibble four bits lower (sign: shift left 4; magnitude: right 2).
# Two asm blocks (low, high) because Pallas lowers only single-result inline
# asm; ptxas shares their byte permutes.
_PAIR = {
    "high": """shr.b32 u, t, 6;
and.b32 u, u, 0x01C001C0;
and.b32 v, t, 0x80008000;""",
    "low": """shr.b32 u, t, 2;
and.b32 u, u, 0x01C001C0;
shl.b32 v, t, 4;
and.b32 v, v, 0x80008000;""",
}


def _asm(nibble: str) -> str:
  pair = _PAIR[nibble]
  return f"""{{
.reg .b32 z, k, t, u, v;
mov.b32 z, 0;
mov.b32 k, 0x7E807E80;
prmt.b32 t, $2, z, 0x1404;
{pair}
or.b32 v, v, u;
mul.rn.bf16x2 v, v, k;
mul.rn.bf16x2 $0, v, $3;
prmt.b32 t, $2, z, 0x3424;
{pair}
or.b32 v, v, u;
mul.rn.bf16x2 v, v, k;
mul.rn.bf16x2 $1, v, $4;
}}"""


def decode_scaled(data, scales, *, interpret: bool = False):
  """Packed E2M1 bytes and per-byte bfloat16 scales -> ``(low, high)`` bfloat16.

  ``low[i] = E2M1(data[i] & 0xF) * scales[i]`` and ``high[i]`` the same for the
  high nibble, both rounded once to bfloat16 (exact unless the product leaves
  bfloat16's range). ``data`` uint8 and ``scales`` bfloat16 of one shape, whose
  size per GPU thread is a multiple of four (any tile of 512 or more bytes).
  Inside a Pallas-Triton kernel; ``interpret=True`` computes the same values
  with jnp (float32 product, one rounding to bfloat16) for interpret mode.
  """
  if data.dtype != jnp.uint8 or scales.dtype != jnp.bfloat16 or data.shape != scales.shape:
    raise ValueError(f"decode_scaled: expected uint8 data and bfloat16 scales of one shape, got "
                     f"{data.dtype}{data.shape} and {scales.dtype}{scales.shape}")
  if interpret:
    # The element's float32 value from its bits, times the scale: one multiply, which XLA cannot
    # re-associate into a factor that overflows (an E4M3 value times 2**6 times the scale could).
    s = scales.astype(jnp.float32)
    b = data.astype(jnp.int32)
    return tuple((common.e2m1_to_f32(n) * s).astype(jnp.bfloat16) for n in (b & 0xF, b >> 4))
  from jax.experimental.pallas import triton as plt  # lazy: GPU-only

  out = jax.ShapeDtypeStruct(data.shape, jnp.bfloat16)
  return tuple(plt.elementwise_inline_asm(_asm(nibble), args=[data, scales], constraints="=r,=r,r,r,r",
                                          pack=4, result_shape_dtypes=[out])[0]
               for nibble in ("low", "high"))


