"""scaled_matmul, QAT gradients and NVFP4's global amax on 8 CPU devices: under ``jit`` with
NamedShardings (automatic partitioning) and under ``shard_map``; orbax restores onto another mesh.

Everything device-dependent runs in one subprocess (XLA fixes the device count at start-up); the
tests below check what it reports. Shapes are small: every shard still holds whole blocks.

Float32 bound used for results whose reduction order differs from the unsharded run (a contracting
axis split across devices, then an all-reduce): summing ``n`` float32 terms in any order is within
``gamma_n = n * eps / (1 - n * eps)`` of the exact sum relative to the sum of magnitudes; two orders
differ by at most twice that. Relative to the result's norm we allow ``2 * n * eps`` (the terms here
are not cancelling to many orders of magnitude; a wrong global scale or a missing all-reduce is
off by 1e-2 or more).
"""

import textwrap

import numpy as np
import pytest

from fake_devices import run_script

# One worker runs this module: its module fixture is a subprocess of many seconds, which
# pytest-xdist would otherwise start again on every worker that gets one of its tests.
pytestmark = pytest.mark.xdist_group("sharding_spmd")

EPS32 = float(np.finfo(np.float32).eps)


def bound(n):
  return 2 * n * EPS32


SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import fp4jax as fj
    from fp4jax import sharding
    from fp4jax.qat import QatConfig, quantized_dot_general

    out = {}
    MM = (((1,), (0,)), ((), ()))

    def cols(f, *args):
      return [[c.op, c.elements] for c in sharding.hlo_collectives(f.lower(*args).compile().as_text())]

    def rel(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def same_bits(a, b):
      return all(np.asarray(u).tobytes() == np.asarray(v).tobytes() and u.dtype == v.dtype
                 for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    ns = lambda *s: NamedSharding(mesh, P(*s))
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (256, 256), jnp.float32)
    w = jax.random.normal(k[1], (256, 512), jnp.float32) / 16
    matmul = jax.jit(lambda x, q: fj.scaled_matmul(x, q, preferred_element_type=jnp.float32))

    # ---- automatic partitioning: jit of sharded operands -------------------------------------
    for fmt in (fj.MXFP4, fj.NVFP4):
      q = fj.quantize(w, fmt, axis=0)
      xb = x.astype(jnp.bfloat16)
      ref = matmul(xb, q)
      r = {}
      # column-parallel: weight split along N (not the block axis); rows of x along "a"
      qs, xs = sharding.shard_qarray(q, ns(None, "b")), jax.device_put(xb, ns("a", None))
      y = matmul(xs, qs)
      r["col"] = {"collectives": cols(matmul, xs, qs), "spec": str(y.sharding.spec), "bits": same_bits(y, ref)}
      # row-parallel: weight split along K, the block axis, so the product is an all-reduce
      qs, xs = sharding.shard_qarray(q, ns("b", None)), jax.device_put(xb, ns("a", "b"))
      y = matmul(xs, qs)
      r["row"] = {"collectives": cols(matmul, xs, qs), "spec": str(y.sharding.spec), "rel": rel(y, ref)}
      # block-scaled lhs too (MX x MX / NVFP4 x NVFP4), rows sharded
      qx = jax.jit(lambda x: fj.quantize(x, fmt))(jax.device_put(x, ns("a", None)))
      y = matmul(qx, sharding.shard_qarray(q, ns(None, "b")))
      r["qq"] = {"collectives": cols(matmul, qx, sharding.shard_qarray(q, ns(None, "b"))),
                 "spec": str(y.sharding.spec), "bits": same_bits(y, matmul(fj.quantize(x, fmt), q)),
                 "lhs_specs": [str(qx.values.sharding.spec), str(qx.scales.sharding.spec)]}
      # QAT: gradients of a quantized product, data- and (2-D) tensor-parallel
      cfg = QatConfig.uniform(fmt)
      def loss(w, x):
        return jnp.sum(quantized_dot_general(x, w, MM, config=cfg, key=7) ** 2)
      grad = jax.jit(jax.grad(loss, (0, 1)))
      gref = grad(w, x)
      for name, wspec, xspec in (("dp", (), (("a", "b"), None)), ("tp", (None, "b"), ("a", None))):
        ws, xs = jax.device_put(w, ns(*wspec)), jax.device_put(x, ns(*xspec))
        dw, dx = grad(ws, xs)
        r["qat_" + name] = {"collectives": cols(grad, ws, xs), "rel": [rel(dw, gref[0]), rel(dx, gref[1])],
                            "dw_kept": dw.sharding.is_equivalent_to(ws.sharding, 2),
                            "dx_kept": dx.sharding.is_equivalent_to(xs.sharding, 2)}
      out["auto " + fmt.name] = r

    # ---- shard_map: each device runs fp4jax on its shard --------------------------------------
    mesh1 = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    xs = jax.device_put(x, NamedSharding(mesh1, P(None, "d")))   # 32 columns a shard: whole blocks
    spec = sharding.qarray_partition_spec(jax.eval_shape(lambda: fj.quantize(x, fj.NVFP4)), P(None, "d"))
    quant = lambda **kw: jax.jit(jax.shard_map(lambda x: fj.quantize(x, fj.NVFP4, **kw), mesh=mesh1,
                                               in_specs=P(None, "d"), out_specs=spec))
    r = {}
    q = quant(axis_name="d")(xs)
    r["quantize_bits"] = same_bits(q, fj.quantize(x, fj.NVFP4))
    r["quantize_specs"] = [str(q.values.sharding.spec), str(q.scales.sharding.spec), str(q.global_scale.sharding.spec)]
    r["quantize_collectives"] = cols(quant(axis_name="d"), xs)
    try:
      quant()(xs)
      r["no_axis_name_error"] = None
    except Exception as e:  # a per-shard global scale is not replicated: shard_map says so
      r["no_axis_name_error"] = f"{type(e).__name__}: {e}"
    deq = jax.jit(jax.shard_map(lambda q: fj.dequantize(q, jnp.bfloat16), mesh=mesh1, in_specs=(spec,),
                                out_specs=P(None, "d")))
    y = deq(q)
    r["dequantize_bits"] = same_bits(y, fj.dequantize(fj.quantize(x, fj.NVFP4), jnp.bfloat16))
    r["dequantize_spec"] = str(y.sharding.spec)

    # Megatron MLP: column-parallel up (N split), row-parallel down (K split) and one psum.
    up = fj.quantize(w, fj.MXFP4, axis=0)
    down = fj.quantize(jax.random.normal(k[2], (512, 256)) / 23, fj.NVFP4, axis=0)
    def mlp(x, up, down, axis_name=None):
      h = jax.nn.silu(fj.scaled_matmul(x, up, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
      y = fj.scaled_matmul(h, down, preferred_element_type=jnp.float32)
      return y if axis_name is None else lax.psum(y, axis_name)
    tp = jax.jit(jax.shard_map(lambda x, u, d: mlp(x, u, d, "d"), mesh=mesh1,
                               in_specs=(P(), sharding.qarray_partition_spec(up, P(None, "d")),
                                         sharding.qarray_partition_spec(down, P("d", None))),
                               out_specs=P()))
    xr = x.astype(jnp.bfloat16)
    upm = sharding.shard_qarray(up, NamedSharding(mesh1, P(None, "d")))
    downm = sharding.shard_qarray(down, NamedSharding(mesh1, P("d", None)))
    y = tp(xr, upm, downm)
    r["megatron_rel"] = rel(y, jax.jit(mlp)(xr, up, down))
    r["megatron_collectives"] = cols(tp, xr, upm, downm)
    # The same with the weights in the "rows" layout (what quantize_params stores): the specs of
    # the logical shapes, reordered for the byte rows by qarray_partition_spec / qarray_sharding.
    upr, downr = up.with_layout("rows"), down.with_layout("rows")
    tpr = jax.jit(jax.shard_map(lambda x, u, d: mlp(x, u, d, "d"), mesh=mesh1,
                                in_specs=(P(), sharding.qarray_partition_spec(upr, P(None, "d")),
                                          sharding.qarray_partition_spec(downr, P("d", None))),
                                out_specs=P()))
    uprm = sharding.shard_qarray(upr, NamedSharding(mesh1, P(None, "d")))
    downrm = sharding.shard_qarray(downr, NamedSharding(mesh1, P("d", None)))
    r["megatron_rows_bits"] = same_bits(tpr(xr, uprm, downrm), y)
    r["megatron_rows_collectives"] = cols(tpr, xr, uprm, downrm)

    # QAT, data-parallel under shard_map. The weight enters replicated (P()), so its gradient
    # comes back summed over the mesh axis already (shard_map's check_vma transposes the implicit
    # broadcast into a psum): no explicit psum.
    for fmt in (fj.MXFP4, fj.NVFP4):
      for axis_name in ("d", None):
        cfg = QatConfig.uniform(fmt, grad_rounding="nearest", axis_name=axis_name)
        def loss(w, x, cfg=cfg):
          return jnp.sum(quantized_dot_general(x, w, MM, config=cfg) ** 2)
        dp = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh1, in_specs=(P(), P("d", None)), out_specs=P()))
        dw = dp(w, jax.device_put(x, NamedSharding(mesh1, P("d", None))))
        ref_cfg = QatConfig.uniform(fmt, grad_rounding="nearest")
        dref = jax.jit(jax.grad(lambda w, x: jnp.sum(quantized_dot_general(x, w, MM, config=ref_cfg) ** 2)))(w, x)
        r[f"qat_dp {fmt.name} axis_name={axis_name}"] = rel(dw, dref)
    out["shard_map"] = r

    # ---- orbax: saved from a 2-device mesh, restored onto 1 device and onto a 4x2 mesh ------
    try:
      import orbax.checkpoint as ocp
    except ImportError as e:
      out["orbax"] = {"skipped": str(e)}
    else:
      ckpt_dir = sys.argv[1]
      devs = jax.devices()
      m2 = jax.sharding.Mesh(np.array(devs[:2]), ("tp",))
      tree = {"up": sharding.shard_qarray(fj.quantize(w, fj.NVFP4, axis=0), NamedSharding(m2, P(None, "tp"))),
              "down": sharding.shard_qarray(fj.quantize(w.T, fj.MXFP4, axis=0), NamedSharding(m2, P("tp", None))),
              "bias": jax.device_put(jnp.arange(512.0), NamedSharding(m2, P("tp")))}
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(ckpt_dir, tree)
        ckpt.wait_until_finished()
        res = {}
        for name, mesh_to, specs in (
            ("one device", jax.sharding.Mesh(np.array(devs[2:3]), ("tp",)), {"up": P(None, "tp"), "down": P("tp", None), "bias": P()}),
            ("4x2 mesh", jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2),
             {"up": P("x", "y"), "down": P("y", "x"), "bias": P("x")})):
          target = {k: (sharding.abstract_with_sharding(v, NamedSharding(mesh_to, specs[k])) if isinstance(v, fj.QArray)
                        else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh_to, specs[k])))
                    for k, v in tree.items()}
          back = ckpt.restore(ckpt_dir, target)
          res[name] = {"bits": same_bits(back, tree),
                       "types": sorted({"QArray" if isinstance(v, fj.QArray) else "jax.Array" for v in back.values()}),
                       "on_target": all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(target)))}
      out["orbax"] = res
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("orbax") / "ckpt"
  return run_script(SCRIPT, str(ckpt), timeout=600)


def ops(collectives):
  return sorted({op for op, _ in collectives})


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_auto_partitioned_matmul_keeps_shardings_and_gathers_nothing(report, fmt):
  r = report[f"auto {fmt}"]
  # Column-parallel: no collective at all, output sharded (rows, columns), bits of the unsharded product.
  assert r["col"] == {"collectives": [], "spec": "P('a', 'b')", "bits": True}
  # Row-parallel: the partial products are all-reduced (64 rows x 512 columns a shard), nothing else.
  assert r["row"]["collectives"] == [["all-reduce", 128 * 512]]
  assert r["row"]["spec"] == "P('a',)" and r["row"]["rel"] <= bound(256)
  # A block-scaled lhs (quantized under jit, sharded rows) keeps its sharding on values and scales.
  assert r["qq"]["collectives"] == [] and r["qq"]["bits"] and r["qq"]["spec"] == "P('a', 'b')"
  assert r["qq"]["lhs_specs"] == ["P('a', None)", "P('a', None)"]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("mode", ["dp", "tp"])
def test_auto_partitioned_qat_gradients(report, fmt, mode):
  r = report[f"auto {fmt}"]["qat_" + mode]
  assert "all-gather" not in ops(r["collectives"]) and set(ops(r["collectives"])) <= {"all-reduce"}
  # NVFP4 all-reduces scalar amaxes (one per quantized tensor), never a tensor: the only big
  # all-reduces are the weight gradient (summed over the batch shards) and, 2-D, the input gradient.
  big = sorted(n for _, n in r["collectives"] if n > 1)
  assert big == ([256 * 512] if mode == "dp" else [128 * 256, 256 * 128])
  assert r["dw_kept"] and r["dx_kept"]
  dw_rel, dx_rel = r["rel"]
  assert dw_rel <= bound(256) and dx_rel <= bound(512)


def test_shard_map_quantize_with_axis_name_equals_unsharded(report):
  r = report["shard_map"]
  assert r["quantize_bits"]
  assert r["quantize_specs"] == ["P(None, 'd')", "P(None, 'd')", "P()"]
  assert r["quantize_collectives"] == [["all-reduce", 1]]  # NVFP4's amax: one scalar, never the tensor
  # Without axis_name each shard has its own global scale, which out_specs P() refuses.
  assert r["no_axis_name_error"] is not None and "out_specs" in r["no_axis_name_error"]
  assert r["dequantize_bits"] and r["dequantize_spec"] == "P(None, 'd')"


def test_shard_map_megatron_mlp(report):
  r = report["shard_map"]
  assert r["megatron_rel"] <= bound(512)
  assert r["megatron_collectives"] == [["all-reduce", 256 * 256]]  # one psum of the activations
  assert r["megatron_rows_bits"]  # "rows" weights: the same program's bits
  assert r["megatron_rows_collectives"] == [["all-reduce", 256 * 256]]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_shard_map_qat_gradients(report, fmt):
  r = report["shard_map"]
  assert r[f"qat_dp {fmt} axis_name=d"] <= bound(256)
  if fmt == "nvfp4":  # per-shard global scales quantize differently: far outside float32 rounding
    assert r[f"qat_dp {fmt} axis_name=None"] > 100 * bound(256)
  else:  # MX formats have no global scale: axis_name changes nothing
    assert r[f"qat_dp {fmt} axis_name=None"] == r[f"qat_dp {fmt} axis_name=d"]


def test_orbax_restores_onto_another_mesh(report):
  r = report["orbax"]
  if "skipped" in r:
    pytest.skip(r["skipped"])
  for name in ("one device", "4x2 mesh"):
    assert r[name] == {"bits": True, "types": ["QArray", "jax.Array"], "on_target": True}, name
