"""The fused QAT fake-quantization kernel under ``jit`` with sharded operands, on 8 CPU devices.

XLA cannot split a ``pallas_call``; ``fp4jax.kernels.fake_quant`` gives it a partitioning rule
(``custom_partitioning``): each device runs the kernel on its shard, told where the shard starts so
that the stochastic draws are those of the whole array. Checked here (interpret mode): the same bits
as the unsharded XLA route for every layout, no all-gather where every shard tiles, the gathered
(correct) fallback where one does not, and QAT gradients of a data-parallel step.
"""

import os
import textwrap

import pytest

from fake_devices import run_script

pytestmark = pytest.mark.xdist_group("fake_quant_sharded")

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import fp4jax as fj
    from fp4jax import kernels
    from fp4jax.kernels import fake_quant as fk
    from fp4jax.qat import QatConfig, quantized_dot_general
    sys.path.insert(0, sys.argv[1])  # tests/: the unsharded route and bit comparison of the 1-device tests
    from test_kernels_fake_quant import inputs, xla_route

    def mismatches(a, b):  # every bit, NaN payloads included
      return int(np.sum(np.asarray(a).view(np.uint16) != np.asarray(b).view(np.uint16)))

    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    out = {"layouts": {}}
    for fmt, rule in ((fj.MXFP4, "ceil"), (fj.NVFP4, "nearest")):
      for axis in (1, 0):
        x = inputs((256, 512) if axis else (512, 256), jnp.bfloat16, seed=axis, specials=True)
        for key in (None, jax.random.key(5)):
          want = xla_route(x, key, fmt, rule, axis)
          for spec in (P("a", "b"), P(None, "b"), P(("a", "b"), None), P("b", "a")):
            for bp in (True, False) if fmt.has_global_scale else (None,):
              xs = jax.device_put(x, NamedSharding(mesh, spec))
              f = jax.jit(lambda v, k: fk.fake_quantize_2d(v, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16,
                                                            interpret=True, block_pass=bp))
              got = f(xs, key)
              name = f"{fmt.name} axis {axis} {'stochastic' if key is not None else 'nearest'} {spec} block_pass={bp}"
              out["layouts"][name] = {"mismatches": mismatches(got, want),
                                      "all_gather": "all-gather" in f.lower(xs, key).compile().as_text(),
                                      "same_sharding": got.sharding.is_equivalent_to(xs.sharding, 2)}

    # A shard too narrow for any tile (16 NVFP4 columns): the kernel gets the gathered array.
    x = jax.random.normal(jax.random.key(9), (16, 128), jnp.bfloat16)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, ("a", "b"))))
    f = jax.jit(lambda v, k: fk.fake_quantize_2d(v, k, fmt=fj.NVFP4, rule="nearest", axis=1, dtype=jnp.bfloat16,
                                                  interpret=True))
    out["narrow"] = {"mismatches": mismatches(f(xs, jax.random.key(2)), xla_route(x, jax.random.key(2), fj.NVFP4, "nearest", 1)),
                     "all_gather": "all-gather" in f.lower(xs, jax.random.key(2)).compile().as_text()}

    # A 16-point Hadamard transform in the kernel: each shard transforms its own tiles; NVFP4's tensor amax
    # comes from a Pallas pass whose int32 partial maxima (1/256 of the elements) are the only array gathered.
    import re
    from fp4jax import qat
    out["hadamard"] = {}
    for fmt, rule in ((fj.MXFP4, "ceil"), (fj.NVFP4, "nearest")):
      for axis in (1, 0):
        x = inputs((256, 512) if axis else (512, 256), jnp.bfloat16, seed=axis, specials=True)
        key = jax.random.key(5)
        want = xla_route(qat.random_hadamard(x, 16, axis=axis, seed=2), key, fmt, rule, axis)
        for spec in (P("a", "b"), P(("a", "b"), None)):
          xs = jax.device_put(x, NamedSharding(mesh, spec))
          f = jax.jit(lambda v, k: fk.fake_quantize_2d(v, k, fmt=fmt, rule=rule, axis=axis, dtype=jnp.bfloat16,
                                                        interpret=True, hadamard=16, seed=2))
          got = f(xs, key)
          gathered = re.findall(r"= (\w+)\[[\d,]*\]\S* all-gather\(", f.lower(xs, key).compile().as_text())
          out["hadamard"][f"{fmt.name} axis {axis} {spec}"] = {
              "mismatches": mismatches(got, want), "gathered_dtypes": sorted(set(gathered)),
              "same_sharding": got.sharding.is_equivalent_to(xs.sharding, 2)}

    # A data-parallel QAT step: tokens split over all 8 devices, the weight replicated.
    def loss(x, w, cfg, key):
      y = quantized_dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg, key=key)
      return jnp.sum(y.astype(jnp.float32) ** 2)

    x = jax.random.normal(jax.random.key(1), (512, 256), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (256, 128), jnp.bfloat16)
    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    out["dp"] = {}
    for fmt in ("mxfp4", "nvfp4"):
      cfg = QatConfig.uniform(fmt, backend="pallas")
      with kernels.interpret_mode():
        want = grad(x, w, cfg, jax.random.key(3))
        xs = jax.device_put(x, NamedSharding(mesh, P(("a", "b"), None)))
        wr = jax.device_put(w, NamedSharding(mesh, P()))
        got = grad(xs, wr, cfg, jax.random.key(3))
        hlo = grad.lower(xs, wr, cfg, jax.random.key(3)).compile().as_text()
      out["dp"][fmt] = {"dx_mismatches": mismatches(got[0], want[0]),
                        "dw_rel": float(np.linalg.norm(np.asarray(got[1], np.float64) - np.asarray(want[1], np.float64))
                                        / np.linalg.norm(np.asarray(want[1], np.float64))),
                        "all_gather": "all-gather" in hlo, "dx_same_sharding": got[0].sharding.is_equivalent_to(xs.sharding, 2)}
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def report():
  return run_script(SCRIPT, os.path.dirname(os.path.abspath(__file__)), timeout=1200)


def test_every_layout_gives_the_unsharded_bits_without_gathering(report):
  assert len(report["layouts"]) == 48
  for name, r in report["layouts"].items():
    assert r["mismatches"] == 0, name
    assert not r["all_gather"], name


def test_outputs_keep_the_operand_sharding(report):
  for name, r in report["layouts"].items():
    assert r["same_sharding"], name


def test_a_shard_no_tile_fits_is_gathered_and_still_exact(report):
  assert report["narrow"] == {"mismatches": 0, "all_gather": True}


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_data_parallel_qat_gradients_through_the_kernel(report, fmt):
  r = report["dp"][fmt]
  # dx is per token: the same bits. dW sums over the tokens split across devices (an all-reduce):
  # float32 reduction order, within 2 * n * eps32 for n = 512 tokens.
  assert r["dx_mismatches"] == 0
  assert r["dw_rel"] <= 2 * 512 * 2.0**-23
  assert not r["all_gather"]
  assert r["dx_same_sharding"]


def test_hadamard_in_the_kernel_on_shards(report):
  assert len(report["hadamard"]) == 8
  for name, r in report["hadamard"].items():
    assert r["mismatches"] == 0, name
    assert r["same_sharding"], name
    # x is never gathered; NVFP4 gathers its amax pass's int32 partial maxima.
    assert r["gathered_dtypes"] == (["s32"] if name.startswith("nvfp4") else []), name
