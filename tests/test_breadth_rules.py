"""The "even" and "4over6" scale rules against float64 references, and "mse" against every fixed rule."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
import reference as ref
from fp4jax import scales as S

E8M0_FORMATS = [fj.MXFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2, fj.MXFP6_E2M3, fj.MXFP6_E3M2, fj.MXINT8]


def _bytes(a):
  return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _edge_amaxes(elem):
  """Block maxima at and around EVEN's rounding threshold 2 - 2**-(nmant+1) in many binades,
  around the ceil threshold, at powers of two, and at float32's extremes."""
  sig = []
  for t in (2.0 - 2.0 ** -(elem.nmant + 1), elem.max / 2.0**elem.emax, 1.0, 1.5):
    t32 = np.float32(t)
    sig += [t32, np.nextafter(t32, np.float32(0)), np.nextafter(t32, np.float32(3))]
  sig = np.array(sig, np.float32)
  exps = np.array([-126, -100, -3, 0, 1, 7, 60, 126, 127])
  a = (sig[:, None] * np.ldexp(np.float32(1), exps)[None]).astype(np.float32).reshape(-1)
  a = a[np.isfinite(a) & (a >= np.float32(2.0**-126))]
  return np.concatenate([a, [np.finfo(np.float32).max, np.float32(2.0**-126), 0.0]]).astype(np.float32)


@pytest.mark.parametrize("fmt", E8M0_FORMATS, ids=str)
def test_even_matches_torchao_formula_at_every_threshold(fmt):
  elem = ref.ELEMS[fmt.name]
  amax = _edge_amaxes(elem)
  rng = np.random.default_rng(1)
  # Blocks whose largest |element| is amax (with either sign), the rest smaller.
  x = rng.uniform(-1, 1, (amax.size, 32)).astype(np.float32) * amax[:, None] * np.float32(0.5)
  x[np.arange(amax.size), rng.integers(0, 32, amax.size)] = amax * rng.choice([-1, 1], amax.size).astype(np.float32)
  q = fj.quantize(x, fmt, scale_rule="even")
  e = _bytes(q.scales)[:, 0].astype(int) - 127
  np.testing.assert_array_equal(e, ref.even_exponent(amax.astype(np.float64), elem))
  v, s = ref.quantize_mx(x, elem, "even")
  np.testing.assert_array_equal(_bytes(q.scales), s)
  np.testing.assert_array_equal(np.asarray(S.decode_elements(q.values, fmt)), v)
  # Between the other two rules, and strictly inside where it differs from "floor".
  lo = _bytes(fj.quantize(x, fmt, scale_rule="floor").scales)[:, 0].astype(int) - 127
  hi = _bytes(fj.quantize(x, fmt, scale_rule="ceil").scales)[:, 0].astype(int) - 127
  assert np.all(lo <= e) and np.all(e <= hi)
  assert np.any(e > lo) and np.any(e < hi)  # the thresholds above make both happen


def test_even_clips_less_than_floor_on_gaussian_data():
  x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
  for fmt in (fj.MXFP4, fj.MXFP6_E2M3, fj.MXINT8):
    floor = fj.stats(x, fj.quantize(x, fmt, scale_rule="floor")).clipped_fraction
    even = fj.stats(x, fj.quantize(x, fmt, scale_rule="even")).clipped_fraction
    ceil = fj.stats(x, fj.quantize(x, fmt, scale_rule="ceil")).clipped_fraction
    assert ceil == 0 <= even < floor, (fmt, floor, even)


def _check_four_over_six(x, global_scale=None):
  q = fj.quantize(x, fj.NVFP4, scale_rule="4over6", global_scale=global_scale)
  v, s, dec, sse6, sse4 = ref.nvfp4_four_over_six(np.asarray(x), global_scale=global_scale)
  assert np.float32(q.global_scale) == dec
  got = _bytes(q.scales).reshape(-1)
  # The kernel of the rule compares float32 losses: only blocks whose two
  # candidates are within float32 rounding of each other may be ordered
  # differently; there are none in these data, so the comparison is exact.
  near_tie = np.abs(sse4 - sse6) <= 1e-5 * np.maximum(sse4, sse6)
  assert not near_tie[(sse4 != sse6)].any()
  np.testing.assert_array_equal(got, s.reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.values).astype(np.float64), v)
  return q, sse6, sse4


def test_four_over_six_matches_the_recipe():
  rng = np.random.default_rng(3)
  for x in (rng.standard_normal((32, 256)), rng.standard_t(4, (16, 128)) * 1e-3):
    q, sse6, sse4 = _check_four_over_six(x.astype(np.float32))
    four = sse4 < sse6
    assert 0.05 < four.mean() < 0.95  # both candidates are used
    # "4" maps the amax to 4: the scale is about 1.5x the "6" scale.
    six_q = fj.quantize(x.astype(np.float32), fj.NVFP4, scale_rule="4over6",
                        global_scale=q.global_scale)
    np.testing.assert_array_equal(_bytes(six_q.scales), _bytes(q.scales))
  # A calibrated (given) global scale, and the tensor factor with 256 in place of 448.
  x = rng.standard_normal((8, 64)).astype(np.float32)
  _check_four_over_six(x, global_scale=np.float32(0.004))
  amax = float(np.abs(x).max())
  want = np.float32(1.0) / np.float32(np.float32(6.0 * 256.0) / np.float32(amax))
  assert np.float32(fj.global_scale_from_amax(amax, fj.NVFP4, scale_rule="4over6")) == want
  assert S.global_encode_numerator(fj.NVFP4, "4over6") == 6.0 * 256.0
  assert S.global_encode_numerator(fj.NVFP4, "nearest") == 6.0 * 448.0


def test_four_over_six_nonfinite_and_zero_blocks():
  x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
  x[0, :16] = 0.0
  x[1, 20] = np.inf
  q = fj.quantize(x, fj.NVFP4, scale_rule="4over6")
  dq = np.asarray(fj.dequantize(q))
  assert (dq[0, :16] == 0).all() and np.isnan(dq[1, 16:32]).all() and np.isfinite(dq[1, 32:]).all()
  # The other blocks are as if the Inf were a 0 (the tensor amax skips it).
  y = x.copy()
  y[1, 20] = 0.0
  other = np.ones((2, 4), bool)
  other[1, 1] = False
  np.testing.assert_array_equal(_bytes(fj.quantize(y, fj.NVFP4, scale_rule="4over6").scales)[other],
                                _bytes(q.scales)[other])


def _rel_mse(x, q):
  dq = np.asarray(fj.dequantize(q)).astype(np.float64)
  return float(np.sum((dq - x) ** 2) / np.sum(x.astype(np.float64) ** 2))


def test_mse_is_at_least_as_good_as_every_fixed_rule_on_gaussian_data():
  """Relative MSE on N(0, 1), 64 x 512 float32, blocks along the last axis (printed: pytest -s)."""
  x = np.random.default_rng(5).standard_normal((64, 512)).astype(np.float32)
  print("\nrelative MSE on N(0,1), 64x512, 1-D blocks:")
  for fmt in fj.ALL_FORMATS.values():
    pow2 = fmt.power_of_two_scales  # "nearest" and "4over6" round E4M3 scales, "even" E8M0 ones
    rules = ["floor", "ceil", "mse"] + (["even"] if pow2 else ["nearest", "4over6"])
    errs = {r: _rel_mse(x, fj.quantize(x, fmt, scale_rule=r)) for r in rules}
    print(f"  {fmt.name:<11}" + "  ".join(f"{r} {e:.4e}" for r, e in errs.items()))
    for r, e in errs.items():
      assert errs["mse"] <= e * (1 + 1e-6), (fmt, r, errs)


def test_mse_beats_four_over_six_block_by_block_with_one_global_scale():
  """With the same global scale, "mse" searches every E4M3 scale, the two of "4over6" included."""
  x = np.random.default_rng(6).standard_normal((64, 256)).astype(np.float32)
  g = fj.global_scale_from_amax(np.abs(x).max(), fj.NVFP4, scale_rule="4over6")
  losses = {}
  for rule in ("mse", "4over6", "nearest", "floor", "ceil"):
    dq = np.asarray(fj.dequantize(fj.quantize(x, fj.NVFP4, scale_rule=rule, global_scale=g))).astype(np.float64)
    losses[rule] = np.sum(((dq - x) ** 2).reshape(-1, 16), axis=-1)
  for rule, loss in losses.items():
    assert np.all(losses["mse"] <= loss * (1 + 1e-5) + 1e-30), rule
  assert np.mean(losses["4over6"]) < np.mean(losses["nearest"])  # the point of the recipe


def test_rule_applicability():
  x = jnp.ones((2, 32), jnp.float32)
  with pytest.raises(ValueError, match="'even' rounds a power-of-two.*fp4jax.NVFP4 has E4M3 scales"):
    fj.quantize(x, fj.NVFP4, scale_rule="even")
  with pytest.raises(ValueError, match="'4over6' chooses between two E4M3 block scales; fp4jax.MXFP4"):
    fj.quantize(x, fj.MXFP4, scale_rule="4over6")
  # The kernels implement SCALE_RULES only; the new rules run on the XLA path.
  assert set(fj.ALL_SCALE_RULES) - set(fj.SCALE_RULES) == {"even", "4over6"}
  with pytest.raises(ValueError, match="no Pallas quantize kernel.*scale_rule 'even'"):
    fj.quantize(x, fj.MXFP4, scale_rule="even", backend="pallas")
  q = fj.quantize(x.astype(jnp.bfloat16), fj.NVFP4, scale_rule="4over6", backend="auto")
  assert np.float32(q.global_scale) == np.float32(1.0) / np.float32(np.float32(1536.0) / np.float32(1.0))
  assert ml_dtypes.float8_e4m3fn(0).dtype == q.scales.dtype
