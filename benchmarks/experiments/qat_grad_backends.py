"""Why QAT gradients with backend="pallas" and "xla" differ on a GPU while the fake-quantized operands agree.

For MXFP4 and NVFP4, 2-D and 3-D activations, prints per gradient the mismatching elements and the
largest difference relative to max|g| for: jit xla vs jit pallas, each against the op-by-op program
(jax.disable_jit: nothing fused into a GEMM), and a loss linear in the output (the cotangent then
does not depend on the forward GEMM's bits). Run it under several XLA_FLAGS to see which fusion
decision is responsible.
Usage: PYTHONPATH=. python benchmarks/experiments/qat_grad_backends.py
"""
import dataclasses, json, os

import jax, jax.numpy as jnp, numpy as np

import fp4jax as fj
from fp4jax import kernels, qat
from fp4jax.qat import QatConfig


def square_loss(x, w, cfg, key):
  y = qat.quantized_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), config=cfg, key=key)
  return jnp.sum(y.astype(jnp.float32) ** 2)


def linear_loss(x, w, cfg, key):
  y = qat.quantized_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), config=cfg, key=key)
  c = jax.random.normal(jax.random.key(9), y.shape, jnp.float32)
  return jnp.sum(y.astype(jnp.float32) * c)


def diff(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return int(np.sum(a != b)), float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def main():
  out = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  for loss_name, loss in (("square", square_loss), ("linear", linear_loss)):
    for fmt in ("mxfp4", "nvfp4"):
      for shape in ((64, 256), (2, 32, 256)):
        x = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
        w = jax.random.normal(jax.random.key(2), (256, 128), jnp.bfloat16)
        cfg = QatConfig.uniform(fmt)
        pal = dataclasses.replace(cfg, backend="pallas")
        grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
        g = {"xla": grad(x, w, cfg, jax.random.key(3))}
        with kernels.interpret_mode(not kernels.on_gpu()):
          g["pallas"] = grad(x, w, pal, jax.random.key(3))
        with jax.disable_jit():
          g["xla_eager"] = jax.grad(loss, (0, 1))(x, w, cfg, jax.random.key(3))
        row = {}
        for a, b in (("xla", "pallas"), ("xla", "xla_eager"), ("pallas", "xla_eager")):
          row[f"{a}-{b}"] = [diff(u, v) for u, v in zip(g[a], g[b])]
        name = f"{loss_name} {fmt} {shape}"
        out[name] = row
        print(name, json.dumps(row), flush=True)
  return out


if __name__ == "__main__":
  res = main()
  path = os.environ.get("OUT_JSON")
  if path:
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
