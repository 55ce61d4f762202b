"""Format data: frozen dataclasses whose constants come from ml_dtypes.finfo."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp4jax as fj
import reference as ref

# Numbers from the OCP MX v1.0 spec (tables 1-2) and NVIDIA's NVFP4 description,
# typed here on purpose: an independent check of what formats.py derives.
SPEC_NUMBERS = {
    # name: (elem max, elem emax, elem nmant, block, scale max, bits per element)
    "mxfp4": (6.0, 2, 1, 32, 2.0**127, 4.25),
    "nvfp4": (6.0, 2, 1, 16, 448.0, 4.5),
    "mxfp8_e4m3": (448.0, 8, 3, 32, 2.0**127, 8.25),
    "mxfp8_e5m2": (57344.0, 15, 2, 32, 2.0**127, 8.25),
}


@pytest.mark.parametrize("name", sorted(fj.FORMATS))
def test_constants_match_spec_and_finfo(name):
  fmt = fj.FORMATS[name]
  m, emax, nmant, block, smax, bpe = SPEC_NUMBERS[name]
  fi = ml_dtypes.finfo(fmt.elem_dtype)
  assert fmt.elem_max == m == float(fi.max)
  assert fmt.elem_emax == emax == int(np.frexp(m)[1]) - 1
  assert fmt.elem_nmant == nmant == int(fi.nmant)
  assert fmt.elem_emin == int(fi.minexp)
  assert 2.0**fmt.elem_log2_smallest_subnormal == float(fi.smallest_subnormal)
  assert fmt.block_size == block
  assert fmt.scale_max == smax
  assert fmt.bits_per_element == bpe
  # elem_max / 2**emax as a float32 mantissa field, e.g. 1.5 -> 0x400000.
  frac = m / 2.0**emax - 1.0
  assert fmt.elem_max_significand_bits == int(frac * 2**23)
  nan = np.array([fmt.scale_nan_byte], np.uint8).view(fmt.scale_dtype).astype(np.float32)
  assert np.isnan(nan).all()
  top = np.array([fmt.scale_max_byte], np.uint8).view(fmt.scale_dtype).astype(np.float64)
  assert top[0] == smax
  assert fmt.has_global_scale == (name == "nvfp4")


def test_e8m0_exponent_range():
  for fmt in (fj.MXFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2):
    assert fmt.power_of_two_scales
    assert (fmt.scale_exp_min, fmt.scale_exp_max, fmt.scale_bias) == (-127, 127, 127)
  assert not fj.NVFP4.power_of_two_scales
  assert fj.NVFP4.global_encode_numerator == 6.0 * 448.0


@pytest.mark.parametrize("fmt", list(fj.FORMATS.values()), ids=str)
def test_formats_are_frozen_hashable_and_normalised(fmt):
  assert dataclasses.is_dataclass(fmt)
  with pytest.raises(dataclasses.FrozenInstanceError):
    fmt.block_size = 64
  # Built from ml_dtypes names instead of jnp ones, a format is the same key.
  same = fj.Format(fmt.name, np.dtype(fmt.elem_dtype).type, np.dtype(fmt.scale_dtype).type,
                   fmt.block_size, fmt.has_global_scale, fmt.default_scale_rule)
  assert same == fmt and hash(same) == hash(fmt)
  assert {fmt: 1}[same] == 1
  assert fmt.name.upper() in repr(fmt)


def test_default_rules():
  assert fj.MXFP4.default_scale_rule == "floor"
  assert fj.NVFP4.default_scale_rule == "nearest"


def test_get_format():
  assert fj.get_format("MXFP4") is fj.MXFP4
  assert fj.get_format(fj.NVFP4) is fj.NVFP4
  assert fj.get_format("mxfp8_e5m2") is fj.MXFP8_E5M2
  with pytest.raises(ValueError, match="unknown format 'fp3'"):
    fj.get_format("fp3")
  with pytest.raises(ValueError, match="block_size must be positive"):
    fj.Format("bad", jnp.float4_e2m1fn, jnp.float8_e8m0fnu, 0)


def test_all_16_e2m1_codes():
  """Every E2M1 code decodes to the spec table, and quantizing the table at
  scale 1 gives back exactly those codes."""
  codes = np.arange(16, dtype=np.uint8)
  decoded = codes.astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
  np.testing.assert_array_equal(decoded, ref.E2M1_TABLE)
  np.testing.assert_array_equal(np.signbit(decoded), np.signbit(ref.E2M1_TABLE))
  np.testing.assert_array_equal(fj.packing.E2M1_VALUES, ref.E2M1_TABLE.astype(np.float32))
  x = np.tile(ref.E2M1_TABLE, 2).astype(np.float32)  # amax 6: MXFP4 floor scale is 1
  q = fj.quantize(x, fj.MXFP4, scale_rule="floor")
  assert float(np.asarray(q.scales).astype(np.float32)[0]) == 1.0
  got = np.asarray(jnp.asarray(q.values).view(jnp.uint4)).astype(np.uint8)
  np.testing.assert_array_equal(got, np.tile(codes, 2))
