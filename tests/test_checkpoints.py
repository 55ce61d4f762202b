"""fp4jax.checkpoints: safetensors files written by other tools (or by hand) in, bit-exact files out."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import fp4jax as fj
from fp4jax import checkpoints

# E2M1 by code (sign bit 3, exponent bits 2..1, mantissa bit 0), written out.
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def gpt_oss_decode(blocks, scales):
  """GPT-OSS MXFP4 -> float64 as the reference loaders do: low nibble first, ldexp by (scale - 127)."""
  lo, hi = E2M1_TABLE[blocks & 0x0F], E2M1_TABLE[blocks >> 4]
  vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], -1)  # (..., G, 32)
  out = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
  return out.reshape(*blocks.shape[:-2], -1)


def write_raw(path, tensors, metadata=None, cut=0):
  """A safetensors file by hand: {name: (dtype string, shape, bytes)}; drops ``cut`` trailing bytes."""
  header, data, off = {}, b"", 0
  for name, (dtype, shape, raw) in tensors.items():
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
    data += raw
    off += len(raw)
  if metadata is not None:
    header["__metadata__"] = metadata
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  content = struct.pack("<Q", len(blob)) + blob + data
  with open(path, "wb") as f:
    f.write(content[: len(content) - cut])


def random_bytes(shape, seed, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def leaf_bytes(a):
  return np.asarray(a).tobytes()  # float4 is stored one code a byte


def assert_qarrays_identical(a, b):
  assert a.fmt == b.fmt and a.axis == b.axis and a.shape == b.shape
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape == np.asarray(y).shape
    assert leaf_bytes(x) == leaf_bytes(y)
  assert (a.global_scale is None) == (b.global_scale is None)


@pytest.fixture
def gpt_oss_file(tmp_path):
  """A GPT-OSS-style MoE shard written by safetensors itself: (experts, rows, G, 16) blocks."""
  # Scale bytes 2..252 keep every decoded value a normal float32 (6 * 2**125 < f32 max).
  tensors = {
      "model.layers.0.mlp.experts.gate_up_proj_blocks": random_bytes((2, 6, 3, 16), seed=1),
      "model.layers.0.mlp.experts.gate_up_proj_scales": random_bytes((2, 6, 3), seed=2, low=2, high=253),
      "model.layers.0.mlp.experts.gate_up_proj_bias": np.linspace(-1, 1, 12).astype(ml_dtypes.bfloat16).reshape(2, 6),
      "model.norm.weight": np.arange(4, dtype=np.float32),
  }
  path = tmp_path / "gpt_oss.safetensors"
  save_file(tensors, str(path))
  return path, tensors


def test_gpt_oss_load_matches_numpy_decoder(gpt_oss_file):
  path, tensors = gpt_oss_file
  loaded = checkpoints.load(path)
  assert sorted(loaded) == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj_bias",
                            "model.norm.weight"]
  q = loaded["model.layers.0.mlp.experts.gate_up_proj"]
  assert isinstance(q, fj.QArray) and q.fmt == fj.MXFP4 and q.axis == -1 and q.shape == (2, 6, 96)
  want = gpt_oss_decode(tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                        tensors["model.layers.0.mlp.experts.gate_up_proj_scales"])
  got = np.asarray(fj.dequantize(q, jnp.float32))
  np.testing.assert_array_equal(got, want.astype(np.float32))
  bias = loaded["model.layers.0.mlp.experts.gate_up_proj_bias"]
  assert bias.dtype == ml_dtypes.bfloat16 and leaf_bytes(bias) == leaf_bytes(tensors["model.layers.0.mlp.experts.gate_up_proj_bias"])


def test_gpt_oss_round_trip_is_bit_exact(gpt_oss_file, tmp_path):
  path, tensors = gpt_oss_file
  out = tmp_path / "again.safetensors"
  checkpoints.save(out, checkpoints.load(path))
  again = load_file(str(out))  # safetensors' own reader: the GPT-OSS names and dtypes
  assert sorted(again) == sorted(tensors)
  for name, t in tensors.items():
    assert again[name].dtype == t.dtype and again[name].shape == t.shape and leaf_bytes(again[name]) == leaf_bytes(t), name


def test_gpt_oss_original_dot_names_load(tmp_path):
  blocks, scales = random_bytes((4, 2, 16), seed=3), random_bytes((4, 2), seed=4, low=100, high=150)
  path = tmp_path / "orig.safetensors"
  save_file({"block.0.mlp.mlp1_weight.blocks": blocks, "block.0.mlp.mlp1_weight.scales": scales}, str(path))
  q = checkpoints.load(path)["block.0.mlp.mlp1_weight"]
  np.testing.assert_array_equal(np.asarray(q.dequantize()), gpt_oss_decode(blocks, scales).astype(np.float32))


@pytest.mark.parametrize("weight_dtype,scale_dtype", [("U8", "U8"), ("I8", "F8_E8M0")])
def test_deepseek_fused_layout_loads(tmp_path, weight_dtype, scale_dtype):
  packed = random_bytes((3, 4, 32), seed=5)  # (..., K // 2) with K = 64
  scales = random_bytes((3, 4, 2), seed=6, low=90, high=160)  # (..., K // 32)
  path = tmp_path / "ds.safetensors"
  write_raw(path, {"layers.1.ffn.w1.weight": (weight_dtype, packed.shape, packed.tobytes()),
                   "layers.1.ffn.w1.scale": (scale_dtype, scales.shape, scales.tobytes()),
                   "layers.1.ffn.w1.bias": ("F32", (4,), np.ones(4, np.float32).tobytes())})
  loaded = checkpoints.load(path)
  assert sorted(loaded) == ["layers.1.ffn.w1.bias", "layers.1.ffn.w1.weight"]
  q = loaded["layers.1.ffn.w1.weight"]
  assert q.fmt == fj.MXFP4 and q.shape == (3, 4, 64)
  want = gpt_oss_decode(packed.reshape(3, 4, 2, 16), scales)  # same bytes, fused into the last axis
  np.testing.assert_array_equal(np.asarray(q.dequantize()), want.astype(np.float32))
  out = tmp_path / "ds_again.safetensors"
  checkpoints.save(out, loaded, layout="deepseek")
  with safe_open(str(out), "numpy") as f:
    assert leaf_bytes(f.get_tensor("layers.1.ffn.w1.weight")) == packed.tobytes()
    assert leaf_bytes(f.get_tensor("layers.1.ffn.w1.scale")) == scales.tobytes()


def special_qarrays():
  """QArrays holding every element code and every scale byte (NaN scales and -0 included)."""
  codes = np.arange(256, dtype=np.uint8)
  fp4 = (codes % 16).astype(ml_dtypes.uint4).view(ml_dtypes.float4_e2m1fn)
  fp4 = np.tile(fp4, (8, 1))  # (8, 256): each row every code 16 times
  rows = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8) * 4 + 3  # 64 different scale bytes, 0xFF (NaN) included
  out = {
      "mx4": fj.QArray(jnp.asarray(fp4), jnp.asarray(rows.view(ml_dtypes.float8_e8m0fnu)), None, fj.MXFP4, -1),
      "nv4": fj.QArray(jnp.asarray(fp4), jnp.asarray(random_bytes((8, 16), 7).view(ml_dtypes.float8_e4m3fn)),
                       jnp.float32(-0.0), fj.NVFP4, -1),
      "mx8": fj.QArray(jnp.asarray(np.tile(codes, (8, 1)).view(ml_dtypes.float8_e5m2)),
                       jnp.asarray((255 - rows).view(ml_dtypes.float8_e8m0fnu)), None, fj.MXFP8_E5M2, -1),
      "mx4_axis0": fj.QArray(jnp.asarray(fp4.T.copy()), jnp.asarray(rows.T.copy().view(ml_dtypes.float8_e8m0fnu)),
                             None, fj.MXFP4, -2),
  }
  for q in out.values():
    fj.validate_qarray(q)
  return out


@pytest.mark.parametrize("layout", checkpoints.LAYOUTS)
def test_every_format_round_trips_bit_exact(tmp_path, layout):
  x = jax.random.normal(jax.random.key(0), (2, 64, 96), jnp.float32)
  tree = dict(special_qarrays())
  tree["nv_x"] = fj.quantize(x, fj.NVFP4)
  tree["mx8_e4m3_axis1"] = fj.quantize(x, fj.MXFP8_E4M3, axis=1)
  tree["w.weight"] = fj.quantize(x, fj.MXFP4)
  tree["plain_bf16"] = np.asarray(x[0, :3, :5], ml_dtypes.bfloat16)
  tree["plain_f8"] = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # NaNs too
  tree["scalar"] = np.float32(3.5)
  path = tmp_path / f"{layout}.safetensors"
  checkpoints.save(path, tree, layout=layout, metadata={"note": "hello"})
  loaded = checkpoints.load(path)
  assert list(loaded) == list(tree)
  for name, t in tree.items():
    if isinstance(t, fj.QArray):
      assert_qarrays_identical(t, loaded[name])
    else:
      assert loaded[name].dtype == np.asarray(t).dtype and leaf_bytes(loaded[name]) == leaf_bytes(t), name
  with safe_open(str(path), "numpy") as f:
    meta = f.metadata()
    assert meta["note"] == "hello"
    described = json.loads(meta["fp4jax"])["tensors"]
    keys = set(f.keys())
  assert described["nv4"] == {"format": "nvfp4", "axis": -1, "layout": "fp4jax", "shape": [8, 256]}
  assert {"nv4.qvalues", "nv4.qscales", "nv4.qglobal_scale", "mx8.qvalues", "mx8.qscales"} <= keys
  mx4_names = {"gpt_oss": {"mx4_blocks", "mx4_scales"}, "deepseek": {"mx4", "mx4.scale", "w.weight", "w.scale"},
               "fp4jax": {"mx4.qvalues", "mx4.qscales"}}[layout]
  assert mx4_names <= keys
  assert {"mx4_axis0.qvalues", "mx4_axis0.qscales"} <= keys  # GPT-OSS cannot express axis 0


def test_fp4jax_layout_bytes_follow_the_documented_convention(tmp_path):
  """NVFP4 along axis 0: elements packed two a byte along axis 0 (low nibble = even row)."""
  x = jax.random.normal(jax.random.key(1), (32, 6), jnp.float32)
  q = fj.quantize(x, fj.NVFP4, axis=0)
  path = tmp_path / "nv.safetensors"
  checkpoints.save(path, {"w": q})
  raw = load_file(str(path))
  codes = np.asarray(q.values).view(ml_dtypes.uint4).astype(np.uint8)  # (32, 6)
  np.testing.assert_array_equal(raw["w.qvalues"], codes[0::2] | (codes[1::2] << 4))
  np.testing.assert_array_equal(raw["w.qscales"], np.asarray(q.scales).view(np.uint8))
  assert raw["w.qglobal_scale"].shape == () and raw["w.qglobal_scale"] == np.asarray(q.global_scale)


def test_iter_load_streams_one_tensor_at_a_time(gpt_oss_file):
  path, _ = gpt_oss_file
  it = checkpoints.iter_load(path)
  name, first = next(it)
  assert name == checkpoints.read_entries(path)[0].name
  assert [n for n, _ in checkpoints.iter_load(path, names=["model.norm.weight"])] == ["model.norm.weight"]
  with pytest.raises(ValueError, match="no tensors named"):
    list(checkpoints.iter_load(path, names=["nope"]))


# ---- malformed files ---------------------------------------------------------------


def _blocks_scales(blocks_shape=(4, 2, 16), scales_shape=(4, 2), bdtype="U8", sdtype="U8"):
  b = random_bytes(blocks_shape, 1)
  s = random_bytes(scales_shape, 2)
  return {"w_blocks": (bdtype, blocks_shape, b.tobytes()), "w_scales": (sdtype, scales_shape, s.tobytes())}


@pytest.mark.parametrize("case,tensors,pattern", [
    ("missing scales", {"w_blocks": _blocks_scales()["w_blocks"]}, "'w_blocks' has no matching 'w_scales'"),
    ("missing blocks", {"w_scales": _blocks_scales()["w_scales"]}, "'w_scales' has no matching 'w_blocks'"),
    ("scales shape", _blocks_scales(scales_shape=(4, 3)), r"tensor 'w' .*shapes do not agree.*'w_scales' should be \[4, 2\], got \[4, 3\]"),
    ("blocks shape", _blocks_scales(blocks_shape=(4, 2, 8), scales_shape=(4, 2)), r"'w_blocks' has shape \[4, 2, 8\], expected \(\.\.\., G, 16\)"),
    ("blocks dtype", {**_blocks_scales(), "w_blocks": ("I16", (4, 2, 8), random_bytes((4, 2, 16), 1).tobytes())},
     "'w_blocks' has dtype I16, expected U8"),
    ("scales dtype", {**_blocks_scales(), "w_scales": ("F16", (4, 2), random_bytes((4, 4), 1).tobytes())},
     "'w_scales' has dtype F16, expected U8 or F8_E8M0"),
    ("deepseek shape", {"p.weight": ("U8", (4, 16), bytes(64)), "p.scale": ("U8", (4, 2), bytes(8))},
     r"tensor 'p.weight' .*'p.scale' should be \[4, 1\]"),
])
def test_malformed_gpt_oss_files_name_the_tensor(tmp_path, case, tensors, pattern):
  path = tmp_path / "bad.safetensors"
  write_raw(path, tensors)
  with pytest.raises(ValueError, match=pattern):
    checkpoints.load(path)
  with pytest.raises(ValueError, match=pattern):
    checkpoints.read_entries(path)  # the header alone is enough to tell


def test_truncated_file_names_the_first_incomplete_tensor(tmp_path):
  tensors = {"a": ("F32", (4,), np.ones(4, np.float32).tobytes()), **_blocks_scales()}
  path = tmp_path / "cut.safetensors"
  write_raw(path, tensors, cut=3)  # w_scales is last in the data section
  with pytest.raises(ValueError, match=r"truncated: tensor 'w_scales' needs data bytes up to 152, the file holds 149"):
    checkpoints.load(path)
  write_raw(path, tensors, cut=10)  # now w_blocks (ends at byte 144) is cut as well
  with pytest.raises(ValueError, match="truncated: tensor 'w_blocks'"):
    checkpoints.load(path)
  path.write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match="truncated safetensors file"):
    checkpoints.load(path)


def test_malformed_fp4jax_parts_name_the_tensor(tmp_path):
  path = tmp_path / "nv.safetensors"
  q = fj.quantize(jnp.ones((2, 32)), fj.NVFP4)
  checkpoints.save(path, {"w": q})
  raw = load_file(str(path))
  meta = safe_open(str(path), "numpy").metadata()

  def rewrite(name, new):
    tensors = {n: ("U8" if a.dtype == np.uint8 else "F32", a.shape, a.tobytes()) for n, a in raw.items()}
    if new is None:
      del tensors[name]
    else:
      tensors[name] = new
    write_raw(path, tensors, metadata=meta)

  rewrite("w.qglobal_scale", None)
  with pytest.raises(ValueError, match="tensor 'w' .*global_scale tensor 'w.qglobal_scale' is missing"):
    checkpoints.load(path)
  rewrite("w.qglobal_scale", ("F32", (1,), np.ones(1, np.float32).tobytes()))
  with pytest.raises(ValueError, match=r"'w.qglobal_scale' must be a float32 scalar, got F32 \[1\]"):
    checkpoints.load(path)
  rewrite("w.qscales", ("U8", (2, 3), bytes(6)))
  with pytest.raises(ValueError, match=r"tensor 'w' .*'w.qscales' should be \[2, 2\], got \[2, 3\]"):
    checkpoints.load(path)
  rewrite("w.qvalues", ("F16", (2, 16), bytes(64)))
  with pytest.raises(ValueError, match="'w.qvalues' has dtype F16, expected U8"):
    checkpoints.load(path)


def test_bad_header_entries(tmp_path):
  path = tmp_path / "bad.safetensors"
  write_raw(path, {"x": ("F32", (3,), bytes(8))})
  with pytest.raises(ValueError, match=r"tensor 'x' has shape \[3\] and dtype F32 but data_offsets \[0, 8\]"):
    checkpoints.load(path)
  write_raw(path, {"x": ("F4", (2,), bytes(1))})
  with pytest.raises(ValueError, match="tensor 'x' has dtype F4, which fp4jax cannot read"):
    checkpoints.load(path)
  write_raw(path, {"x": ("F32", (1,), bytes(4))}, metadata={"fp4jax": "{not json"})
  with pytest.raises(ValueError, match="malformed 'fp4jax' header metadata"):
    checkpoints.load(path)


# ---- saving -------------------------------------------------------------------------


class _Exploding:
  """Looks like an array to the planner, fails when its bytes are needed."""

  dtype = np.dtype(np.float32)
  shape = (4,)

  def __array__(self, dtype=None, copy=None):
    raise RuntimeError("disk full")


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "model.safetensors"
  checkpoints.save(path, {"old": np.arange(3, dtype=np.float32)})
  before = path.read_bytes()
  q = fj.quantize(jnp.ones((2, 32)), fj.MXFP4)
  with pytest.raises(RuntimeError, match="disk full"):
    checkpoints.save(path, {"q": q, "boom": _Exploding()})  # fails after "q" is written
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["model.safetensors"]
  checkpoints.save(path, {"q": q})
  assert list(checkpoints.load(path)) == ["q"]
  assert os.listdir(tmp_path) == ["model.safetensors"]


def test_save_rejects_bad_input(tmp_path):
  path = tmp_path / "x.safetensors"
  with pytest.raises(ValueError, match="tensor 'a' is a list"):
    checkpoints.save(path, {"a": [1, 2]})
  with pytest.raises(ValueError, match="tensor 'f4' has dtype float4_e2m1fn, which safetensors cannot store"):
    checkpoints.save(path, {"f4": np.zeros(4, ml_dtypes.float4_e2m1fn)})
  with pytest.raises(ValueError, match="two tensors would be written as 'w_blocks'"):
    checkpoints.save(path, {"w": fj.quantize(jnp.ones((1, 32)), fj.MXFP4), "w_blocks": np.zeros(1, np.uint8)})
  with pytest.raises(ValueError, match="unknown layout 'onnx'"):
    checkpoints.save(path, {}, layout="onnx")
  assert not path.exists()


def test_convert_in_python(gpt_oss_file, tmp_path):
  """convert() quantizes float 2-D+ tensors only; existing QArrays pass through untouched."""
  src = tmp_path / "mixed.safetensors"
  x = np.asarray(jax.random.normal(jax.random.key(2), (16, 64)), np.float32)
  checkpoints.save(src, {"dense": x, "vec": x[0], "odd": x[:, :48], "q": fj.quantize(jnp.asarray(x), fj.MXFP8_E4M3)})
  dst = tmp_path / "out.safetensors"
  records = checkpoints.convert(src, dst, "mxfp4", include="dense|odd|q|vec")
  assert [(r.name, r.action.split(":")[0]) for r in records] == [
      ("dense", "quantized"), ("vec", "passed"), ("odd", "skipped"), ("q", "passed")]
  out = checkpoints.load(dst)
  assert_qarrays_identical(out["dense"], fj.quantize(jnp.asarray(x), fj.MXFP4))
  assert_qarrays_identical(out["q"], fj.quantize(jnp.asarray(x), fj.MXFP8_E4M3))
  deq = np.asarray(out["dense"].dequantize(), np.float64)
  want = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - deq) ** 2))
  assert records[0].sqnr_db == pytest.approx(want, abs=1e-3)
  assert records[0].bytes_after == 16 * 64 // 2 + 16 * 2 and records[0].bytes_before == x.nbytes
  with pytest.raises(ValueError, match="unknown scale_rule"):
    checkpoints.convert(src, dst, "mxfp4", scale_rule="best")
  assert records[2].action == "skipped: length 48 along axis -1 is not a multiple of 32"


def test_float_tensor_named_like_blocks_is_plain(tmp_path):
  path = tmp_path / "plain.safetensors"
  save_file({"pos_blocks": np.ones((2, 3), np.float32), "w.scale": np.ones(2, np.float32)}, str(path))
  loaded = checkpoints.load(path)
  assert sorted(loaded) == ["pos_blocks", "w.scale"] and loaded["pos_blocks"].dtype == np.float32
