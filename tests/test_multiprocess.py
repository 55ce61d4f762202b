"""Multi-host is the same code: 2 processes on the CPU, joined by ``jax.distributed.initialize``.

Each process has 2 fake CPU devices (4 devices in all); CPU collectives go through gloo. Both run
a sharded NVFP4 quantize (its amax all-reduced across the processes) and a column-parallel
``scaled_matmul`` under ``jit``, and the same quantize under ``shard_map`` with ``axis_name``; each
checks the shards it holds against the single-process result: the QArrays bit for bit, the product
to float32 rounding (``2 * K * eps`` relative; a local product may sum in another order).
"""

import os
import socket
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2,
                               process_id=int(sys.argv[1]))
    import jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import fp4jax as fj
    from fp4jax import sharding

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    rng = np.random.default_rng(0)  # the same data in every process
    w = rng.standard_normal((256, 512)).astype(np.float32) * np.linspace(0.1, 2, 512, dtype=np.float32)
    x = rng.standard_normal((16, 256)).astype(np.float32)

    # The single-process reference, on this process's first device.
    local = jax.local_devices()[0]
    ref_q = fj.quantize(jax.device_put(w, local), fj.NVFP4, axis=0)
    ref_y = fj.scaled_matmul(jax.device_put(x, local).astype(jnp.bfloat16), ref_q, preferred_element_type=jnp.float32)
    ref_q, ref_y = jax.tree.map(np.asarray, ref_q), np.asarray(ref_y)

    mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,))
    cols = NamedSharding(mesh, P(None, "d"))  # 128 columns a device; blocks run along the rows
    ws = jax.make_array_from_callback(w.shape, cols, lambda i: w[i])
    xs = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda i: x[i])

    def held_equal(arr, ref):
      """Every shard this process holds equals the reference's slice, bit for bit."""
      return all(np.asarray(s.data).tobytes() == ref[s.index].tobytes() for s in arr.addressable_shards)

    def held_close(arr, ref, tol):
      return all(np.linalg.norm(np.asarray(s.data, np.float64) - ref[s.index]) <= tol * np.linalg.norm(ref[s.index])
                 for s in arr.addressable_shards)

    q = jax.jit(lambda w: fj.quantize(w, fj.NVFP4, axis=0))(ws)
    y = jax.jit(lambda x, q: fj.scaled_matmul(x.astype(jnp.bfloat16), q, preferred_element_type=jnp.float32))(xs, q)
    spec = sharding.qarray_partition_spec(q, P(None, "d"))
    qm = jax.jit(jax.shard_map(lambda w: fj.quantize(w, fj.NVFP4, axis=0, axis_name="d"), mesh=mesh,
                               in_specs=P(None, "d"), out_specs=spec))(ws)
    checks = {
        "jit values": held_equal(q.values, ref_q.values), "jit scales": held_equal(q.scales, ref_q.scales),
        "jit global scale": held_equal(q.global_scale, ref_q.global_scale),
        # A (16, 128) local product may sum in another order than the (16, 512) one: float32 rounding.
        "jit matmul": held_close(y, ref_y, 2 * 256 * np.finfo(np.float32).eps) and y.sharding.is_equivalent_to(cols, 2),
        "shard_map values": held_equal(qm.values, ref_q.values),
        "shard_map global scale": held_equal(qm.global_scale, ref_q.global_scale),
    }
    print("CHECKS", sys.argv[1], sorted(k for k, v in checks.items() if not v) or "all equal", flush=True)
    jax.distributed.shutdown()
''')


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_quantize_and_matmul_like_one():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (rc, out, err) in enumerate(outs):
    assert rc == 0, f"process {i} exited with {rc}:\n{err[-3000:]}"
    assert f"CHECKS {i} all equal" in out, f"process {i}: {out[-2000:]}"
