"""quantize/dequantize on 8 CPU devices keep values and scales sharded, with no all-gather.

Everything device-dependent runs in one subprocess (XLA fixes the device count
at start-up); the tests below check what it reports.
"""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fp4jax as fj
from fp4jax import sharding

from fake_devices import run_script

# One worker runs this module: its module fixture is a subprocess of many seconds, which
# pytest-xdist would otherwise start again on every worker that gets one of its tests.
pytestmark = pytest.mark.xdist_group("sharding")

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")

# name: (format, scale rule, shape, mesh shape, mesh axes, axis type, partition spec, block axis)
CASES = {
    "mxfp4 rows sharded": ("mxfp4", "floor", (64, 256), (8,), ("d",), "Explicit", ("d", None), -1),
    "mxfp4 block axis, one block a shard": ("mxfp4", "floor", (64, 256), (8,), ("d",), "Explicit", (None, "d"), -1),
    "mxfp4 block axis, auto mesh": ("mxfp4", "mse", (64, 256), (8,), ("d",), "Auto", (None, "d"), -1),
    "nvfp4 block axis 0": ("nvfp4", "nearest", (256, 64), (8,), ("d",), "Explicit", ("d", None), 0),
    "nvfp4 rows, auto mesh": ("nvfp4", "floor", (64, 128), (8,), ("d",), "Auto", ("d", None), -1),
    "mxfp8 2-d mesh, block axis 1": ("mxfp8_e4m3", "floor", (4, 128, 64), (4, 2), ("a", "b"), "Explicit", ("a", "b", None), 1),
    "mxfp8_e5m2 2-d mesh, both axes": ("mxfp8_e5m2", "ceil", (2, 64, 512), (4, 2), ("a", "b"), "Auto", (None, "b", "a"), -1),
}

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import orbax.checkpoint as ocp
    import fp4jax as fj
    from fp4jax import sharding

    cases, ckpt_dir = json.loads(sys.argv[1]), sys.argv[2]
    COLLECTIVES = %r

    def collectives(hlo):
      return sorted(c for c in COLLECTIVES if c in hlo)

    def same_bits(a, b):
      return np.asarray(a).tobytes() == np.asarray(b).tobytes()

    out = {}
    for name, (fmt, rule, shape, mesh_shape, axes, axis_type, spec, axis) in cases.items():
      mesh = jax.make_mesh(tuple(mesh_shape), tuple(axes), axis_types=(getattr(AxisType, axis_type),) * len(axes))
      s = NamedSharding(mesh, P(*spec))
      x = jax.random.normal(jax.random.key(0), tuple(shape), jnp.float32)
      xs = jax.device_put(x, s)
      quant = jax.jit(lambda x: fj.quantize(x, fmt, axis=axis, scale_rule=rule))
      dequant = jax.jit(lambda q: fj.dequantize(q, jnp.bfloat16))
      q = quant(xs)
      y = dequant(q)
      ref = fj.quantize(x, fmt, axis=axis, scale_rule=rule)
      sharding.check_block_sharding(shape, s, fmt, axis)
      out[name] = {
          "quantize_collectives": collectives(quant.lower(xs).compile().as_text()),
          "dequantize_collectives": collectives(dequant.lower(q).compile().as_text()),
          "values_sharding_kept": q.values.sharding.is_equivalent_to(s, len(shape)),
          "scales_sharding_kept": q.scales.sharding.is_equivalent_to(s, len(shape)),
          "global_scale_replicated": q.global_scale is None or q.global_scale.sharding.is_fully_replicated,
          "output_sharding_kept": y.sharding.is_equivalent_to(s, len(shape)),
          "bits_equal_unsharded": all(same_bits(a, b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref)))
                                  and same_bits(y, fj.dequantize(ref, jnp.bfloat16)),
          "qarray_sharding_matches": jax.tree.leaves(sharding.qarray_sharding(ref, s))[:2] == [s, s],
      }

    # A shard boundary inside a block: XLA must gather the block axis.
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    s = NamedSharding(mesh, P(None, "d"))
    xs = jax.device_put(jnp.ones((16, 128), jnp.float32), s)
    split = {"quantize_collectives": collectives(jax.jit(lambda x: fj.quantize(x, fj.MXFP4)).lower(xs).compile().as_text())}
    try:
      sharding.check_block_sharding((16, 128), s, fj.MXFP4)
      split["check_error"] = None
    except ValueError as e:
      split["check_error"] = str(e)
    out["split block"] = split

    # orbax: a sharded QArray tree saved and restored onto the same shardings.
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    s = NamedSharding(mesh, P("a", "b"))
    x = jax.random.normal(jax.random.key(1), (64, 128), jnp.float32)
    tree = {"w": sharding.shard_qarray(fj.quantize(x, fj.NVFP4), s), "u": sharding.shard_qarray(fj.quantize(x, fj.MXFP4), s)}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(ckpt_dir, tree)
    ckpt.wait_until_finished()
    target = {k: sharding.abstract_with_sharding(q, s) for k, q in tree.items()}
    back = ckpt.restore(ckpt_dir, target)
    out["orbax"] = {
        "bits_equal": all(same_bits(a, b) and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back))),
        "shardings_equal": all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back))),
        "types": sorted({type(v).__name__ for v in back.values()}),
    }
    print("RESULT " + json.dumps(out))
''') % (COLLECTIVES,)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("orbax") / "ckpt"
  return run_script(SCRIPT, json.dumps(CASES), str(ckpt), timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_quantize_keeps_sharding_without_all_gather(report, case):
  r = report[case]
  fmt = fj.get_format(CASES[case][0])
  # NVFP4's tensor amax (its global scale) is one all-reduce of a scalar; nothing else moves.
  assert r["quantize_collectives"] == (["all-reduce"] if fmt.has_global_scale else [])
  assert r["dequantize_collectives"] == []
  assert r["values_sharding_kept"] and r["scales_sharding_kept"] and r["global_scale_replicated"]
  assert r["output_sharding_kept"]
  assert r["bits_equal_unsharded"]
  assert r["qarray_sharding_matches"]


def test_shard_boundary_inside_a_block_gathers_and_is_refused(report):
  r = report["split block"]
  assert "all-gather" in r["quantize_collectives"]  # the HLO check above can see a gather
  assert "shards of length 16 along block axis -1, not a multiple of fp4jax.MXFP4's block size 32" in r["check_error"]


def test_orbax_restores_a_sharded_qarray_tree(report):
  r = report["orbax"]
  assert r == {"bits_equal": True, "shardings_equal": True, "types": ["QArray"]}


def test_qarray_sharding_helpers_on_one_device():
  mesh = jax.make_mesh((1,), ("d",))
  s = NamedSharding(mesh, P(None, "d"))
  q = fj.quantize(jnp.ones((4, 64)), fj.NVFP4)
  shardings = sharding.qarray_sharding(q, s)
  assert isinstance(shardings, fj.QArray) and shardings.values == s and shardings.scales == s
  assert shardings.global_scale.is_fully_replicated
  placed = sharding.shard_qarray(q, s)
  assert placed.values.sharding == s and placed.fmt == q.fmt
  with pytest.raises(ValueError, match="expects a NamedSharding"):
    sharding.qarray_sharding(q, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  with pytest.raises(ValueError, match="expects a fp4jax.QArray"):
    sharding.qarray_sharding(jnp.ones(3), s)


def test_qarray_partition_spec():
  q = jax.eval_shape(lambda: fj.quantize(jnp.ones((4, 64)), fj.NVFP4))
  spec = sharding.qarray_partition_spec(q, P(None, "d"))
  assert isinstance(spec, fj.QArray) and spec.values == P(None, "d") and spec.scales == P(None, "d")
  assert spec.global_scale == P() and spec.fmt == fj.NVFP4 and spec.axis == q.axis
  assert sharding.qarray_partition_spec(fj.quantize(jnp.ones((4, 64)), fj.MXFP4), P("d")).global_scale is None
  with pytest.raises(ValueError, match="expects a PartitionSpec"):
    sharding.qarray_partition_spec(q, ("d",))


def test_partition_spec_of_rows_layout_follows_the_byte_rows():
  # A (K, N) weight blocked along K stores (N, K/2) byte rows: the logical spec is reversed for its
  # leaves, the layout kept, as qarray_sharding does (shard_map's in_specs must match the pytree).
  w = fj.quantize(jnp.ones((64, 8)), fj.MXFP4, axis=0).with_layout("rows")
  spec = sharding.qarray_partition_spec(w, P(None, "d"))
  assert spec.layout == "rows" and spec.values == P("d", None) and spec.scales == P("d", None)
  assert jax.tree.structure(spec) == jax.tree.structure(jax.tree.map(lambda _: P(), w))
  x = fj.quantize(jnp.ones((8, 64)), fj.NVFP4).with_layout("rows")  # (N, K) blocked along K: as is
  assert sharding.qarray_partition_spec(x, P("d")).values == P("d", None)


def test_hlo_collectives_reads_sync_and_async_forms():
  text = """
  %all-reduce = f32[] all-reduce(f32[] %reduce.5), channel_id=1, replica_groups={{0,1}}, to_apply=%max
  all-reduce-start.3 = (bf16[16,4096]{1,0}, f32[]) all-reduce-start(bf16[16,4096]{1,0} fusion.2, f32[] x)
  all-reduce-done.3 = (bf16[16,4096]{1,0}, f32[]) all-reduce-done(all-reduce-start.3)
  %fusion.3 = bf16[16,4096]{1,0} fusion(%all-reduce.1, x), kind=kLoop, calls=%fused
  %ag = (u8[2048,14336]{1,0}, u8[4096,14336]{1,0}) all-gather-start(u8[2048,14336]{1,0} %p), dimensions={0}
  ROOT %reduce-scatter.1 = bf16[8,4096]{1,0} reduce-scatter(bf16[16,4096]{1,0} %x), dimensions={0}
  %gte = f32[] get-tuple-element(%all-reduce-start.3), index=1
  """
  found = sharding.hlo_collectives(text)
  assert [(c.op, c.elements) for c in found] == [("all-reduce", 1), ("all-reduce", 16 * 4096),
                                                 ("all-gather", 4096 * 14336), ("reduce-scatter", 8 * 4096)]
  assert str(found[1]) == "all-reduce bf16[16,4096], f32[]"
  x = jnp.ones((8, 64))
  assert sharding.hlo_collectives(jax.jit(lambda x: fj.quantize(x, fj.NVFP4)).lower(x).compile().as_text()) == []


def test_quantize_axis_name_is_checked_and_needs_a_mesh_axis():
  x = jnp.ones((4, 64))
  with pytest.raises(ValueError, match="axis_name must be None, a mesh axis name"):
    fj.quantize(x, fj.NVFP4, axis_name=3)
  with pytest.raises(NameError):  # no shard_map (or vmap) binds the axis
    fj.quantize(x, fj.NVFP4, axis_name="d")
  # Formats without a global scale, and a given global scale, have no amax to reduce.
  assert fj.quantize(x, fj.MXFP4, axis_name="d").fmt == fj.MXFP4
  assert fj.quantize(x, fj.NVFP4, global_scale=1.0, axis_name="d").fmt == fj.NVFP4
  # Under vmap the named axis is the batch: the global scale is the amax over the whole batch.
  xs = jnp.stack([x, 4 * x])
  per_row = jax.vmap(lambda r: fj.quantize(r, fj.NVFP4).global_scale)(xs)
  shared = jax.vmap(lambda r: fj.quantize(r, fj.NVFP4, axis_name="b").global_scale, axis_name="b")(xs)
  assert per_row[0] != per_row[1] and shared[0] == shared[1] == fj.quantize(xs, fj.NVFP4).global_scale
  with pytest.raises(ValueError, match="QatConfig.axis_name"):
    fj.QatConfig(axis_name=1)


def test_kernels_step_aside_for_explicitly_sharded_operands(monkeypatch):
  """pallas_call raises on types that carry a mesh axis: on a GPU, "auto" takes the XLA path for
  them and "pallas" says why (checked here with on_gpu forced, on a 1-device Explicit mesh)."""
  import fp4jax.kernels as kernels_pkg
  from fp4jax import backend

  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  x = jax.random.normal(jax.random.key(0), (64, 128), jnp.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
  q, qs = fj.quantize(x, fj.NVFP4, backend="xla"), fj.quantize(xs, fj.NVFP4, backend="xla")
  assert backend.sharded_reason(x, q) is None
  why = backend.sharded_reason(qs)
  assert why is not None and "(64, 128)" in why and "shard_map" in why

  monkeypatch.setattr(kernels_pkg, "on_gpu", lambda: True)
  kw = dict(axis=-1, scale_rule="nearest", global_scale=None, hessian=None, pad=False, block_shape=None, keep=())
  assert backend.quantize_obstacle(x, fj.NVFP4, **kw) is None
  assert "Explicit" in backend.quantize_obstacle(xs, fj.NVFP4, **kw)
  assert backend.dequantize_obstacle(q, jnp.float32) is None
  assert "Explicit" in backend.dequantize_obstacle(qs, jnp.float32)
  dims = (((1,), (1,)), ((), ()))
  a = jnp.ones((4, 128), jnp.bfloat16)
  assert backend.dot_kernel(a, q.with_layout("rows"), dims, jnp.float32) == ("w4a16", "")
  assert "Explicit" in backend.dot_kernel(a, qs.with_layout("rows"), dims, jnp.float32)[1]
  # "auto" runs the XLA path on the sharded QArray and keeps its bits; "pallas" refuses, naming why.
  np.testing.assert_array_equal(np.asarray(fj.dequantize(qs, jnp.float32)),
                                np.asarray(fj.dequantize(q, jnp.float32, backend="xla")))
  with pytest.raises(ValueError, match="Explicit mesh axes"):
    fj.dequantize(qs, jnp.float32, backend="pallas")
