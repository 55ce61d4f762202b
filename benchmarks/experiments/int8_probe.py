"""Does XLA's int8 GEMM (s8 x s8 -> s32) run at FP8 tensor-core speed on the GPU, and is it exact? (issue 15)

Why: an E2M1 value is a multiple of 1/2 (``2 * E2M1`` is an integer in [-12, 12]), so an MXFP4 row whose
block exponents span at most 4 binades re-bases to int8 values ``2 * E2M1 * 2**d``, d in [0, 3], with
one power-of-two row scale; the int32 sums of an int8 GEMM are exact (no rounding at all, where Hopper's
FP8 MMA adds with ~14 bits: ``benchmarks/results/fp8_rebase.md``). Before building that path, measure:
1. exactness: the int32 GEMM against numpy int64 on values in [-96, 96];
2. speed (us, median, inputs rotated): bf16 dot (rhs stored (N, K)), FP8 dot, int8 dot (int32 out),
   int8 dot plus the epilogue (int32 -> float32 times 2**(ea_row + eb_col) -> bfloat16), at the issue's shapes.
Usage: python benchmarks/experiments/int8_probe.py --out DIR
"""
import argparse, json, os, sys
import numpy as np, jax, jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_rebase import bench  # noqa: E402  (the same timing as the FP8 probe it is compared with)

DN = (((1,), (1,)), ((), ()))
SHAPES = [(8192, 8192, 8192), (4096, 4096, 14336), (1024, 8192, 8192), (4096, 14336, 4096), (16, 8192, 8192)]


def i8(key, shape):
  return jax.random.randint(key, shape, -96, 97, jnp.int32).astype(jnp.int8)


def exactness():
  rows = []
  for (m, k, n) in [(64, 8192, 128), (256, 4096, 256), (128, 32768, 64)]:
    a, b = i8(jax.random.key(1), (m, k)), i8(jax.random.key(2), (n, k))
    # adversarial: every product +96*96 (the largest int32 sum of this K)
    for name, (x, y) in {"random": (a, b), "max": (jnp.full((m, k), 96, jnp.int8), jnp.full((n, k), 96, jnp.int8)),
                         "cancel": (a, jnp.concatenate([b[:, : k // 2], b[:, : k // 2]], 1))}.items():
      got = np.asarray(jax.jit(lambda x, y: lax.dot_general(x, y, DN, preferred_element_type=jnp.int32))(x, y))
      want = np.asarray(x, np.int64) @ np.asarray(y, np.int64).T
      rows.append({"m": m, "k": k, "n": n, "input": name, "exact": bool((got == want).all()),
                   "max_abs_diff": int(np.abs(got - want).max())})
      print(rows[-1], flush=True)
  return rows


def speed():
  rows = []
  for (m, k, n) in SHAPES:
    sets = max(2, min(6, int(np.ceil(200e6 / (m * k * 2 + n * k * 2)))))
    keys = jax.random.split(jax.random.key(0), 2 * sets)
    xs = [jax.random.normal(keys[i], (m, k), jnp.bfloat16) for i in range(sets)]
    ws = [jax.random.normal(keys[sets + i], (n, k), jnp.bfloat16) for i in range(sets)]
    a8 = [i8(keys[i], (m, k)) for i in range(sets)]
    b8 = [i8(keys[sets + i], (n, k)) for i in range(sets)]
    f8a = [x.astype(jnp.float8_e4m3fn) for x in xs]
    f8b = [w.astype(jnp.float8_e4m3fn) for w in ws]
    ea = jax.random.randint(keys[0], (m,), -10, 10, jnp.int32)
    eb = jax.random.randint(keys[1], (n,), -10, 10, jnp.int32)
    bf16 = jax.jit(lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    fp8 = jax.jit(lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=jnp.float32))
    int8 = jax.jit(lambda x, w: lax.dot_general(x, w, DN, preferred_element_type=jnp.int32))

    def epi(x, w):
      s = lax.dot_general(x, w, DN, preferred_element_type=jnp.int32).astype(jnp.float32)
      e = ea[:, None] + eb[None, :]
      return (s * lax.bitcast_convert_type((e + 127) << 23, jnp.float32)).astype(jnp.bfloat16)
    int8_epi = jax.jit(epi)
    r = {"m": m, "k": k, "n": n,
         "bf16_us": bench(bf16, list(zip(xs, ws))),
         "fp8_us": bench(fp8, list(zip(f8a, f8b))),
         "int8_us": bench(int8, list(zip(a8, b8))),
         "int8_epilogue_us": bench(int8_epi, list(zip(a8, b8)))}
    hlo = int8_epi.lower(a8[0], b8[0]).compile().as_text()
    r["int8_kernels"] = sorted({l.split("custom_call_target=")[1].split(",")[0]
                                for l in hlo.splitlines() if "custom_call_target=" in l})
    r["int8_fusions"] = sum(1 for l in hlo.splitlines() if " fusion(" in l)
    for key in ("fp8_us", "int8_us", "int8_epilogue_us"):
      r[key.replace("_us", "_x_bf16")] = round(r["bf16_us"] / r[key], 3)
    print(r, flush=True)
    rows.append(r)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "exactness": exactness(), "speed": speed()}
  with open(os.path.join(a.out, "int8_probe.json"), "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
