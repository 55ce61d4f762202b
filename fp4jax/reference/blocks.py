"""Block and tile views of an array, shared by the reference numerics and QAT.

A 1-D block layout moves the block axis last and splits it into
``(n // B, B)``; 2-D ``b x b`` tiles of the last two axes are flattened
row-major. Each view has its inverse here.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["to_blocks", "from_blocks", "to_tiles", "from_tiles", "pad_axis", "blocked_global"]


def to_blocks(x, axis: int, block_size: int):
  """(..., n, ...) with n along ``axis`` -> (rest..., n // B, B)."""
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def from_blocks(blocks, axis: int):
  x = blocks.reshape(*blocks.shape[:-2], -1)
  return jnp.moveaxis(x, -1, axis)


def to_tiles(x, b: int):
  """(..., M, N) -> (..., M // b, N // b, b * b): tile (i, j) flattened row-major."""
  *lead, m, n = x.shape
  t = x.reshape(*lead, m // b, b, n // b, b)
  return jnp.swapaxes(t, -3, -2).reshape(*lead, m // b, n // b, b * b)


def from_tiles(tiles, b: int):
  *lead, mb, nb, _ = tiles.shape
  t = jnp.swapaxes(tiles.reshape(*lead, mb, nb, b, b), -3, -2)
  return t.reshape(*lead, mb * b, nb * b)


def blocked_global(g, axis: int, tile):
  """A global factor in the values' layout (scalar or per group) -> broadcastable against the block scales."""
  if g is None or jnp.ndim(g) == 0 or tile is not None:
    return g  # 2-D blocks keep the leading axes in place; (..., 1, 1) lines up with the tiles
  return jnp.moveaxis(g, axis, -1)


def pad_axis(x, axis: int, multiple: int):
  """Zero-pads ``axis`` up to a multiple of ``multiple`` (no copy when it already is one)."""
  n = x.shape[axis]
  if n % multiple == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, -n % multiple)
  return jnp.pad(x, widths)
