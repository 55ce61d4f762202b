"""QArray storage layouts: ``"rows"`` (the kernels' byte rows) and its exact inverse."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import fp4jax as fj
from fp4jax import kernels, sharding
from fp4jax.prepared import byte_matrix, with_layout
from fp4jax.qarray import rows_obstacle
from kernel_operands import eqns_outside_kernels

FORMATS = list(fj.FORMATS.values())


def quantized(shape, fmt, axis, seed=0):
  return fj.quantize(jax.random.normal(jax.random.key(seed), shape, jnp.float32), fmt, axis=axis)


def raw(a):
  """Bit patterns of a 4- or 8-bit array as uint8, independent of fp4jax."""
  a = np.asarray(a)
  if a.dtype == ml_dtypes.float4_e2m1fn:
    return a.view(ml_dtypes.uint4).astype(np.uint8)
  return a.view(np.uint8)


def assert_bit_identical(a: fj.QArray, b: fj.QArray):
  assert (a.fmt, a.axis, a.block_shape, a.layout) == (b.fmt, b.axis, b.block_shape, b.layout)
  assert a.values.dtype == b.values.dtype and a.scales.dtype == b.scales.dtype
  np.testing.assert_array_equal(raw(a.values), raw(b.values))
  np.testing.assert_array_equal(raw(a.scales), raw(b.scales))
  assert (a.global_scale is None) == (b.global_scale is None)
  if a.global_scale is not None:
    assert np.asarray(a.global_scale).tobytes() == np.asarray(b.global_scale).tobytes()


# ---- the layout and its inverse --------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("k_axis", [0, 1], ids=["KN_axis0", "NK_axis1"])
@pytest.mark.parametrize("n", [7, 40])
def test_rows_round_trip_is_bit_exact(fmt, k_axis, n):
  k = 3 * fmt.block_size
  shape = (k, n) if k_axis == 0 else (n, k)
  w = quantized(shape, fmt, k_axis, seed=n)
  r = w.with_layout("rows")
  assert r.layout == "rows" and r.shape == shape and r.ndim == 2 and r.axis == w.axis
  chex.assert_shape(r.values, (n, k * fmt.elem_bits // 8))
  chex.assert_shape(r.scales, (n, k // fmt.block_size))
  chex.assert_type([r.values, r.scales], [jnp.uint8, jnp.uint8])
  assert r.global_scale is w.global_scale and r.nbytes == w.nbytes
  fj.validate_qarray(r)
  back = r.with_layout(None)
  assert back.layout is None
  assert_bit_identical(back, w)
  assert with_layout(w, None) is w and with_layout(r, "rows") is r  # already so: no op
  for backend in ("xla", "auto"):
    np.testing.assert_array_equal(fj.dequantize(r, backend=backend), fj.dequantize(w, backend="xla"))
  np.testing.assert_array_equal(r.dequantize(jnp.bfloat16), w.dequantize(jnp.bfloat16))


def test_rows_are_output_channels_packed_along_k():
  """Row n of ``values`` holds column n of a (K, N) weight, low nibble = even k (pack_fp4's rule)."""
  w = quantized((64, 8), fj.MXFP4, 0)
  r = w.with_layout("rows")
  codes = raw(w.values)
  np.testing.assert_array_equal(np.asarray(r.values), codes[0::2, :].T | (codes[1::2, :].T << 4))
  np.testing.assert_array_equal(np.asarray(r.scales), raw(w.scales).T)
  # byte_matrix of a "rows" QArray is its leaves themselves; of a plain one, the same bytes.
  data, scales = byte_matrix(r)
  assert data is r.values and scales is r.scales
  np.testing.assert_array_equal(byte_matrix(w)[0], r.values)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 5), kb=st.integers(1, 4), k_axis=st.sampled_from([0, 1]), fmt=st.sampled_from(FORMATS))
def test_rows_round_trip_any_shape(n, kb, k_axis, fmt):
  k = kb * fmt.block_size
  w = quantized((k, n) if k_axis == 0 else (n, k), fmt, k_axis, seed=n * 7 + kb)
  assert_bit_identical(w.with_layout("rows").with_layout(None), w)


def test_quantize_stores_rows_when_asked():
  x = jax.random.normal(jax.random.key(0), (64, 24), jnp.bfloat16)
  for fmt in (fj.MXFP4, fj.NVFP4):
    assert_bit_identical(fj.quantize(x, fmt, axis=0, layout="rows"), fj.quantize(x, fmt, axis=0).with_layout("rows"))
  with pytest.raises(ValueError, match="unknown QArray layout 'cols'"):
    fj.quantize(x, fj.MXFP4, layout="cols")
  with pytest.raises(ValueError, match="2-D"):
    fj.quantize(x.reshape(2, 32, 24), fj.MXFP4, axis=1, layout="rows")


@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3, fj.MXFP8_E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("axis", [-1, 1, 0, -2])
def test_the_quantize_kernel_writes_rows_directly(fmt, axis):
  # A 2-D array blocked along either axis: the kernel's packed bytes become the leaves as they are
  # (quantize_pack.quantize_rows) or transposed as bytes (quantize_columns_to_rows, a weight (K, N) blocked
  # along K), equal to the reference's QArray relaid out; no pack op outside the kernel.
  x = jax.random.normal(jax.random.key(1), (64, 256) if axis % 2 else (256, 96), jnp.float32) * 4
  with kernels.interpret_mode():
    got = fj.quantize(x, fmt, axis=axis, layout="rows", backend="pallas")
    jaxpr = jax.make_jaxpr(lambda v: fj.quantize(v, fmt, axis=axis, layout="rows", backend="pallas"))(x)
  want = fj.quantize(x, fmt, axis=axis, backend="xla")
  assert_bit_identical(got, want.with_layout("rows"))
  assert got.layout == "rows" and got.axis == want.axis
  # No value outside the kernels in the element dtype: the codes are never viewed as float4 / float8.
  assert jnp.dtype(fmt.elem_dtype) not in dtypes_outside_kernels(jaxpr.jaxpr)


def dtypes_outside_kernels(jaxpr):
  """Dtypes of the values a jaxpr and its nested jit calls make, not looking inside Pallas kernels."""
  return {v.aval.dtype for eqn in eqns_outside_kernels(jaxpr) for v in eqn.outvars}


def test_transpose_of_rows_moves_no_data():
  w = quantized((96, 40), fj.NVFP4, 0)
  r = w.with_layout("rows")
  t = r.T
  assert t.layout == "rows" and t.shape == (40, 96) and t.axis == -1
  assert t.values is r.values and t.scales is r.scales
  assert_bit_identical(t, w.T.with_layout("rows"))
  np.testing.assert_array_equal(fj.dequantize(t), fj.dequantize(w).T)
  assert_bit_identical(t.T, r)


def test_rows_is_a_pytree_and_jit_stable():
  r = quantized((64, 16), fj.NVFP4, 0).with_layout("rows")
  leaves, tree = jax.tree_util.tree_flatten(r)
  assert len(leaves) == 3 and all(leaf.dtype in (jnp.uint8, jnp.float32) for leaf in leaves)
  again = jax.tree_util.tree_unflatten(tree, leaves)
  assert again.layout == "rows" and again.fmt == r.fmt and again.axis == r.axis
  # The layout is static: a plain and a rows QArray are different tree structures.
  assert tree != jax.tree_util.tree_structure(r.with_layout(None))
  x = jnp.ones((2, 64), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, w):
    return fj.scaled_matmul(x, w, preferred_element_type=jnp.float32, backend="xla")

  f(x, r)
  f(x + 1, quantized((64, 16), fj.NVFP4, 0, seed=3).with_layout("rows"))
  # Stacked (e.g. scanned layers): the logical shape keeps the stack axis in front.
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), r)
  assert stacked.shape == (2, 64, 16)
  np.testing.assert_array_equal(jax.vmap(fj.dequantize)(stacked)[1], fj.dequantize(r))


# ---- what "rows" cannot hold, and validation ---------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: quantized((2, 32, 8), fj.MXFP4, 1), "2-D"),
    (lambda: fj.quantize(jnp.ones((64, 64)), fj.NVFP4, block_shape=(16, 16)), "2-D blocks"),
    (lambda: fj.quantize(jnp.ones((64, 16)), fj.NVFP4, axis=0, granularity="row"), "per-group global scale"),
    (lambda: quantized((64, 16), "mxfp6_e2m3", 0), "XLA path only"),
    (lambda: quantized((64, 16), "mxint8", 0), "XLA path only"),
], ids=["3d", "2d_blocks", "per_row_global", "mxfp6", "mxint8"])
def test_rows_refuses_what_it_cannot_hold(make, match):
  q = make()
  assert rows_obstacle(q) is not None
  with pytest.raises(ValueError, match=f"cannot store .* as 'rows': .*{match}"):
    q.with_layout("rows")


def test_unknown_layout_and_non_qarray_are_refused():
  w = quantized((64, 16), fj.MXFP4, 0)
  with pytest.raises(ValueError, match=r"unknown QArray layout 'nk'; expected one of \(None, 'rows'\)"):
    w.with_layout("nk")
  with pytest.raises(ValueError, match="expects a fp4jax.QArray"):
    with_layout(jnp.ones((64, 16)), "rows")


@pytest.mark.parametrize("change,match", [
    (dict(layout="cols"), r"layout must be one of \(None, 'rows'\), got 'cols'"),
    (dict(values=jnp.zeros((16, 32), jnp.int8)), r"uint8 values .* got values int8 \(16, 32\)"),
    (dict(scales=jnp.zeros((16, 2, 1), jnp.uint8)), r"got values uint8 \(16, 32\) and scales uint8 \(16, 2, 1\)"),
    (dict(scales=jnp.zeros((16, 3), jnp.uint8)), r"scales should be \(16, 2\) .* got \(16, 3\)"),
    (dict(values=jnp.zeros((16, 24), jnp.uint8), scales=jnp.zeros((16, 1), jnp.uint8)), "multiple of 32"),
    (dict(axis=-3), "axis -2 .* got -3"),
    (dict(block_shape=(32, 32)), "1-D blocks"),
    (dict(fmt=fj.get_format("mxfp6_e2m3")), "native 4- or 8-bit"),
    (dict(global_scale=jnp.float32(1.0)), "has no global scale"),
])
def test_validate_rows_names_what_is_wrong(change, match):
  r = quantized((64, 16), fj.MXFP4, 0).with_layout("rows")
  fields = dict(values=r.values, scales=r.scales, global_scale=None, fmt=r.fmt, axis=r.axis,
                block_shape=None, layout="rows")
  fields.update(change)
  with pytest.raises(ValueError, match=match):
    fj.validate_qarray(fj.QArray(**fields))


def test_validate_rows_global_scale():
  r = quantized((64, 16), fj.NVFP4, 0).with_layout("rows")
  with pytest.raises(ValueError, match="needs a float32 scalar"):
    fj.validate_qarray(fj.QArray(r.values, r.scales, None, r.fmt, r.axis, layout="rows"))
  with pytest.raises(ValueError, match=r"scalar global scale, got shape \(1, 16\)"):
    fj.validate_qarray(fj.QArray(r.values, r.scales, jnp.ones((1, 16)), r.fmt, r.axis, layout="rows"))


# ---- everything that takes a QArray takes "rows" ------------------------------------------------
@pytest.mark.parametrize("fmt", [fj.MXFP4, fj.NVFP4, fj.MXFP8_E4M3], ids=lambda f: f.name)
def test_dequantize_kernel_and_stats_take_rows(fmt):
  x = jax.random.normal(jax.random.key(4), (96, 24), jnp.float32)
  w = fj.quantize(x, fmt, axis=0)
  r = w.with_layout("rows")
  with kernels.interpret_mode():
    np.testing.assert_array_equal(fj.dequantize(r, backend="pallas"), fj.dequantize(w, backend="pallas"))
  assert fj.stats(x, r) == fj.stats(x, w)


def test_qarray_sharding_of_rows_shards_output_channels():
  mesh = jax.make_mesh((1,), ("d",))
  for k_axis in (0, 1):
    w = quantized((64, 16) if k_axis == 0 else (16, 64), fj.NVFP4, k_axis)
    spec = P(None, "d") if k_axis == 0 else P("d", None)  # N sharded, K whole
    s = sharding.qarray_sharding(w.with_layout("rows"), NamedSharding(mesh, spec))
    assert s.layout == "rows" and s.values.spec == P("d", None) and s.scales.spec == P("d", None)
    assert s.global_scale.is_fully_replicated
  k_sharded = sharding.qarray_sharding(quantized((64, 16), fj.MXFP4, 0).with_layout("rows"),
                                       NamedSharding(mesh, P("d")))  # a short spec: K sharded
  assert k_sharded.values.spec == P(None, "d")
  target = sharding.abstract_with_sharding(w.with_layout("rows"), NamedSharding(mesh, P("d", None)))
  assert target.layout == "rows" and target.values.sharding.spec == P("d", None)  # an orbax restore target
  placed = sharding.shard_qarray(w.with_layout("rows"), NamedSharding(mesh, P("d", None)))
  assert placed.layout == "rows" and placed.values.sharding.spec == P("d", None)
  np.testing.assert_array_equal(fj.dequantize(placed), fj.dequantize(w))


def test_gpt_oss_layout_of_rows_is_its_bytes():
  w = quantized((40, 96), fj.MXFP4, 1)  # (N, K) blocked along K, GPT-OSS's orientation
  blocks, scales = fj.layouts.to_gpt_oss(w.with_layout("rows"))
  want = fj.layouts.to_gpt_oss(w)
  np.testing.assert_array_equal(blocks, want[0])
  np.testing.assert_array_equal(scales, want[1])


@pytest.mark.parametrize("ckpt_layout", ["gpt_oss", "fp4jax"])
def test_checkpoint_save_writes_the_logical_layout_and_load_can_give_rows(tmp_path, ckpt_layout):
  from fp4jax import checkpoints

  tensors = {"a": quantized((40, 96), fj.MXFP4, 1), "b": quantized((64, 24), fj.NVFP4, 0),
             "e": quantized((2, 64, 8), fj.MXFP8_E4M3, 1), "bias": np.arange(5, dtype=np.float32)}
  rows = {k: v.with_layout("rows") if k in "ab" else v for k, v in tensors.items()}
  checkpoints.save(tmp_path / "plain.safetensors", tensors, layout=ckpt_layout)
  checkpoints.save(tmp_path / "rows.safetensors", rows, layout=ckpt_layout)
  # The file does not depend on how the weights were held.
  assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "rows.safetensors").read_bytes()
  plain = checkpoints.load(tmp_path / "rows.safetensors")
  assert all(plain[k].layout is None for k in "abe")
  assert_bit_identical(plain["b"], tensors["b"])
  back = checkpoints.load(tmp_path / "rows.safetensors", qarray_layout="rows")
  assert back["a"].layout == back["b"].layout == "rows" and back["e"].layout is None  # 3-D stays plain
  for k in "ab":
    assert_bit_identical(back[k], rows[k])
  with pytest.raises(ValueError, match="unknown QArray layout"):
    checkpoints.load(tmp_path / "rows.safetensors", qarray_layout="cols")
