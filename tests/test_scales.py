"""Scale rules against the float64 references in tests/reference.py.

Exhaustive scale decoding, the exact floor / ceil exponents, E4M3 rounding of
NVFP4 block scales, and the "mse" rule (plain and Hessian-weighted) against a
brute force over every finite scale.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
import reference as ref

POW2_FORMATS = [fj.MXFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2]
ALL_FORMATS = list(fj.FORMATS.values())


def _spec(fmt):
  return ref.SPECS[fmt.name]


def _scale_bytes(q):
  return np.asarray(q.scales).view(np.uint8)


def _every_code_block(fmt):
  """One block holding every element code (cycled), as elem_dtype values."""
  bits = ml_dtypes.finfo(fmt.elem_dtype).bits
  codes = np.arange(fmt.block_size) % (1 << bits)
  if bits == 4:
    v = codes.astype(np.uint8).astype(ml_dtypes.uint4).view(fmt.elem_dtype)
  else:
    v = codes.astype(np.uint8).view(fmt.elem_dtype)
  return v


# ---- exhaustive scale decoding ------------------------------------------------
@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.MXFP8_E4M3], ids=str)
def test_every_e8m0_byte_dequantizes_exactly(fmt):
  """All 256 E8M0 bytes, each scaling a block of every element code."""
  vals = np.tile(_every_code_block(fmt), (256, 1))
  vals[:, 0] = 1.0
  sbytes = np.arange(256, dtype=np.uint8)[:, None]
  q = fj.QArray(jnp.asarray(vals), jnp.asarray(sbytes.view(fmt.scale_dtype)), None, fmt, -1)
  got = np.asarray(fj.dequantize(q))
  want = ref.dequantize(vals.astype(np.float64), sbytes, _spec(fmt))
  np.testing.assert_array_equal(got, want)
  assert np.isnan(got[0xFF]).all()  # the NaN scale poisons its whole block
  assert not np.isnan(got[:0xFF]).any()
  # 1.0 times the scale is 2**(e - 127) exactly wherever that is a normal float32.
  e = np.arange(1, 255)
  np.testing.assert_array_equal(got[e, 0], (2.0 ** (e - 127.0)).astype(np.float32))
  assert got[0, 0] == 0.0  # 2**-127 is a float32 subnormal: flushed


@pytest.mark.parametrize("decode", [1.0, 0.3712])
def test_every_e4m3_byte_as_nvfp4_block_scale(decode):
  vals = np.tile(_every_code_block(fj.NVFP4), (256, 1))
  sbytes = np.arange(256, dtype=np.uint8)[:, None]
  q = fj.QArray(jnp.asarray(vals), jnp.asarray(sbytes.view(jnp.float8_e4m3fn)),
                jnp.float32(decode), fj.NVFP4, -1)
  got = np.asarray(fj.dequantize(q))
  svals = sbytes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  want = (vals.astype(np.float64) * svals * np.float64(np.float32(decode))).astype(np.float32)
  want = ref.flush_f32_subnormals(want)
  np.testing.assert_array_equal(got, want)
  assert np.isnan(got[[0x7F, 0xFF]]).all()
  assert not np.isnan(np.delete(got, [0x7F, 0xFF], axis=0)).any()


# ---- floor and ceil: exact exponents ---------------------------------------------
def _adversarial_amax(fmt):
  m = fmt.elem_max
  k = np.arange(-126, 127, 7, dtype=np.float64)
  cands = [2.0**k, m * 2.0**k, 2.0 ** (k + 1) * 0.875]
  out = []
  for c in cands:
    c = c[(c >= 2.0**-126) & (c <= ref.F32_MAX / 2)].astype(np.float32)
    out += [c, np.nextafter(c, np.float32(0)), np.nextafter(c, np.float32(np.inf))]
  rng = np.random.default_rng(0)
  out.append(np.exp(rng.uniform(-87, 88, 200)).astype(np.float32))
  out.append(np.array([2.0**-126, np.finfo(np.float32).max, 0.0], np.float32))
  return np.concatenate(out)


@pytest.mark.parametrize("fmt", POW2_FORMATS, ids=str)
@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_pow2_exponent_is_exact(fmt, rule):
  """floor(log2 amax) - emax and the smallest fitting scale, at and next to every boundary."""
  amax = _adversarial_amax(fmt)
  x = np.zeros((amax.size, fmt.block_size), np.float32)
  x[:, 3] = amax
  x[:, 5] = -amax / 3
  q = fj.quantize(x, fmt, scale_rule=rule)
  want = ref.pow2_scale_exponent(amax.astype(np.float64), _spec(fmt), rule) + 127
  np.testing.assert_array_equal(_scale_bytes(q)[:, 0], want)
  if rule == "ceil":  # nothing clips: amax <= M * s, unless the range clamps
    s = ref.decode_scale_bytes(_scale_bytes(q)[:, 0], _spec(fmt))
    assert (amax <= fmt.elem_max * s).all()


@pytest.mark.parametrize("rule", ["floor", "ceil", "nearest"])
@pytest.mark.parametrize("decode", [None, 1.0, 2.0**-20, 1e5])
def test_e4m3_block_scales(rule, decode):
  """NVFP4 block scales: amax / 6 * encode rounded down / up / to nearest even,
  including exact E4M3 midpoints (ties to even) and the saturation at 448."""
  _, vals = ref.scale_table(ref.SPECS["nvfp4"])
  mids = (vals[1:] + vals[:-1]) / 2
  enc = 1.0 if decode is None else 1.0 / np.float32(decode)
  rng = np.random.default_rng(1)
  ideal = np.concatenate([vals, mids, mids * (1 + 2.0**-20), rng.uniform(0, 500, 64),
                          np.exp(rng.uniform(-16, 6, 64))])
  amax = (ideal * 6 / enc).astype(np.float32)
  x = np.zeros((amax.size, 16), np.float32)
  x[:, 0] = amax
  x[:, 1] = -amax / 5
  if decode is None:
    x[0, 2] = 2688.0  # pins the computed global scale to 1
  q = fj.quantize(x, fj.NVFP4, scale_rule=rule, global_scale=decode)
  want_v, want_s, want_d = ref.quantize(x, ref.SPECS["nvfp4"], rule, global_scale=decode)
  assert np.float32(q.global_scale) == want_d
  np.testing.assert_array_equal(_scale_bytes(q)[:, 0], want_s[:, 0])
  np.testing.assert_array_equal(np.asarray(q.values).astype(np.float64), want_v)


# ---- "mse": exact against a brute force over every scale -------------------------
def _adversarial_blocks(fmt, n, rng):
  """Blocks built to sit on the edges of the "mse" window proof."""
  b, m = fmt.block_size, fmt.elem_max
  grid = ref.elem_grid(_spec(fmt))
  mids = (grid[1:] + grid[:-1]) / 2
  out = []
  for i in range(n):
    s = 2.0 ** rng.integers(-30, 30)
    kind = i % 8
    if kind == 0:  # amax just above M s / 2; the rest where a finer scale gains most
      v = rng.choice(np.concatenate([mids, grid]) / 6.0 * m / 4, b) * s
      v[rng.integers(b)] = m / 2 * s * (1 + rng.uniform(1e-7, 0.1))
    elif kind == 1:
      v = rng.standard_normal(b) * s
    elif kind == 2:
      v = rng.laplace(size=b) * s
      v[0] *= 50
    elif kind == 3:
      v = np.full(b, 1.5 * s) * rng.choice([1, -1], b)
    elif kind == 4:
      v = rng.uniform(-1, 1, b) * s
    elif kind == 5:
      v = np.zeros(b)
      v[0] = s * rng.uniform(1, 2)
    elif kind == 6:  # exact grid midpoints at scale s
      v = rng.choice(mids, b) * s * rng.choice([1, -1], b)
    else:
      v = np.round(rng.standard_normal(b) * 4) / 4 * s
    out.append(v)
  return np.array(out, np.float32)


def _check_against_brute_force(got, decode, blocks, fmt, hessian=None, rtol=1e-5):
  """The chosen scale bytes ``got`` (one per row of ``blocks``) have the
  minimum float64 loss over every finite scale."""
  decode = None if decode is None else np.float32(decode)
  best, losses, codes = ref.brute_force_mse(blocks, _spec(fmt), decode, hessian)
  col = np.searchsorted(codes, got)
  assert (codes[col] == got).all()
  chosen = losses[np.arange(len(got)), col]
  floor = losses.min(axis=1)
  # float32 losses may order two near-equal float64 losses either way.
  np.testing.assert_array_less(chosen, floor * (1 + rtol) + 1e-30)
  return got, best


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_mse_equals_brute_force(fmt):
  rng = np.random.default_rng(hash(fmt.name) % 2**32)
  x = _adversarial_blocks(fmt, 400, rng)
  if fmt.has_global_scale:
    # Spread block maxima over 2**-20 .. 1 of the tensor's: small blocks get
    # subnormal E4M3 scales, where the window is widest.
    x = x / np.abs(x).max(1, keepdims=True) * np.exp(rng.uniform(-14, 0, (len(x), 1)))
    x = x.astype(np.float32)
  q = fj.quantize(x, fmt, scale_rule="mse")
  got, best = _check_against_brute_force(_scale_bytes(q)[:, 0], q.global_scale, x, fmt, rtol=1e-6)
  assert (got == best).mean() > 0.99


def test_mse_nvfp4_with_given_global_scale():
  """A calibrated decode factor pushes some ideal scales past 448 and some
  into the E4M3 subnormals; the search stays exact."""
  rng = np.random.default_rng(7)
  x = _adversarial_blocks(fj.NVFP4, 200, rng)
  x = (x / np.abs(x).max(1, keepdims=True) * np.exp(rng.uniform(-12, 3, (len(x), 1)))).astype(np.float32)
  q = fj.quantize(x, fj.NVFP4, scale_rule="mse", global_scale=np.float32(1.0 / 2000))
  _check_against_brute_force(_scale_bytes(q)[:, 0], q.global_scale, x, fj.NVFP4, rtol=1e-6)
  assert (_scale_bytes(q) == 0x7E).any() and (_scale_bytes(q) < 8).any()


def _half_spacing(grid, v):
  """Half the element-grid spacing just above magnitude ``v``."""
  i = np.searchsorted(grid, v, side="right")
  return (grid[i] - grid[i - 1]) / 2


@pytest.mark.parametrize("fmt", POW2_FORMATS, ids=str)
def test_mse_window_premise(fmt):
  """The inequality the E8M0 window proof rests on (scales.py docstring):
  (M/4)**2 - h(M/2)**2 > (B - 1) * h(M/4)**2, from the element grid itself."""
  grid = ref.elem_grid(_spec(fmt))
  m = grid[-1]
  lhs = (m / 4) ** 2 - _half_spacing(grid, m / 2) ** 2
  rhs = (fmt.block_size - 1) * _half_spacing(grid, m / 4) ** 2
  assert lhs > rhs


def _correlated_activations(rng, k, rho, common, n=256):
  z = rng.standard_normal((n, k))
  x = np.zeros_like(z)
  x[:, 0] = z[:, 0]
  for j in range(1, k):  # AR(1) along K plus a factor shared by every column
    x[:, j] = rho * x[:, j - 1] + np.sqrt(1 - rho**2) * z[:, j]
  return (x + rng.standard_normal((n, 1)) * common).astype(np.float32)


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3], ids=str)
def test_hessian_mse_equals_brute_force_on_correlated_activations(fmt):
  rng = np.random.default_rng(3)
  b = fmt.block_size
  k, n = 4 * b, 48
  found_above = 0
  for rho, common in [(0.9, 0.0), (0.99, 3.0)]:
    acts = _correlated_activations(rng, k, rho, common)
    h = np.asarray(fj.block_hessians(acts, b))
    xb = acts.reshape(-1, k // b, b).astype(np.float64)
    np.testing.assert_allclose(h, np.einsum("snb,snd->nbd", xb, xb), rtol=1e-5, atol=1e-3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = fj.quantize(w, fmt, axis=0, scale_rule="mse", hessian=h)
    blocks = np.moveaxis(w, 0, -1).reshape(-1, b)  # (n, k // b) blocks, block index minor
    hh = np.broadcast_to(h.astype(np.float64), (n, k // b, b, b)).reshape(-1, b, b)
    got, _ = _check_against_brute_force(np.moveaxis(_scale_bytes(q), 0, -1).reshape(-1),
                                        q.global_scale, blocks, fmt, hh)
    floor = fj.quantize(w, fmt, axis=0, scale_rule="floor", global_scale=q.global_scale)
    above = got.astype(int) - np.moveaxis(_scale_bytes(floor), 0, -1).reshape(-1)
    found_above += int((above >= (2 if fmt.power_of_two_scales else 8)).sum())
  # The weighted optimum can sit two E8M0 steps (an E4M3 octave) above the
  # floor rule, outside the unweighted window.
  assert found_above > 0


def test_hessian_changes_the_choice():
  rng = np.random.default_rng(4)
  acts = _correlated_activations(rng, 64, 0.99, 3.0)
  w = rng.standard_normal((64, 32)).astype(np.float32)
  h = fj.block_hessians(acts, 32)
  plain = _scale_bytes(fj.quantize(w, fj.MXFP4, axis=0, scale_rule="mse"))
  weighted = _scale_bytes(fj.quantize(w, fj.MXFP4, axis=0, scale_rule="mse", hessian=h))
  assert (plain != weighted).any()
  # The identity Hessian is the plain squared error.
  eye = np.broadcast_to(np.eye(32, dtype=np.float32), (2, 32, 32))
  np.testing.assert_array_equal(_scale_bytes(fj.quantize(w, fj.MXFP4, axis=0, scale_rule="mse", hessian=eye)), plain)


def test_block_hessians_errors():
  with pytest.raises(ValueError, match=r"K=40 \(shape \(3, 40\)\) is not a multiple of block size 32"):
    fj.block_hessians(np.ones((3, 40), np.float32), 32)
  with pytest.raises(ValueError, match="floating"):
    fj.block_hessians(np.ones((3, 32), np.int32), 32)
  with pytest.raises(ValueError, match="shape"):
    fj.block_hessians(np.float32(1.0), 32)


def test_hessian_argument_errors():
  w = np.ones((64, 4), np.float32)
  with pytest.raises(ValueError, match=r"hessian shape \(2, 32, 16\) .* expected \(2, 32, 32\)"):
    fj.quantize(w, fj.MXFP4, axis=0, scale_rule="mse", hessian=np.ones((2, 32, 16), np.float32))
  with pytest.raises(ValueError, match="needs scale_rule='mse'"):
    fj.quantize(w, fj.MXFP4, axis=0, scale_rule="floor", hessian=np.ones((2, 32, 32), np.float32))


def test_nearest_needs_e4m3_scales():
  with pytest.raises(ValueError, match="'nearest' rounds E4M3 block scales"):
    fj.quantize(np.ones(32, np.float32), fj.MXFP4, scale_rule="nearest")
  with pytest.raises(ValueError, match="unknown scale_rule 'round'"):
    fj.quantize(np.ones(32, np.float32), fj.MXFP4, scale_rule="round")


def test_search_window_sizes():
  """The windows the docstring proves: 2 E8M0 scales, 16 E4M3 codes."""
  for fmt in POW2_FORMATS:
    assert len(fj.scales.search_window(fmt, False)[0]) == 2
  offsets, zero = fj.scales.search_window(fj.NVFP4, False)
  assert (offsets.start, offsets.stop, zero) == (-8, 8, False)


def test_mse_ties_keep_smallest_scale_inside_and_outside_loop():
  # A block 3e37 times below the tensor amax: every candidate E4M3 scale
  # rounds it to zero, so all losses tie exactly and the search must keep the
  # smallest code (0) whichever candidate's loss is summed where (a kernel run
  # once saw the tie go to code 1 when one loss was summed outside the loop).
  blk = np.array([-1.43e-3, -1.09, -0.275, -0.0221, -1.87e-3, 6.44e-3, -0.0278, 0.0135,
                  1.71, 3.36, 0.0255, 3.97, -10.44, -0.684, -0.0233, -2.41], np.float32)
  x = np.zeros(32, np.float32)
  x[:16], x[16] = blk, 3e38
  q = fj.quantize(jnp.asarray(x, jnp.bfloat16), fj.NVFP4, scale_rule="mse")
  codes = np.asarray(jax.lax.bitcast_convert_type(q.scales, jnp.uint8))
  assert codes[0] == 0
  np.testing.assert_array_equal(np.asarray(q.values[:16], np.float32), 0.0)
