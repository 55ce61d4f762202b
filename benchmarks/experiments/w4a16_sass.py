"""SASS instruction mix of the W4A16 decode kernel per decode variant (issue 11), on the GPU.

Compiles 1 x 8192 x 8192 MXFP4 with XLA dumping its PTX, assembles each module for sm_90a with ptxas
and counts the w4a16 kernel's SASS instructions by opcode (cuobjdump). Static counts: the loop body
dominates them.
Usage: PYTHONPATH=. python benchmarks/experiments/w4a16_sass.py --out DIR
"""
import argparse, collections, glob, json, os, re, shutil, subprocess, sys

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=".")
args = ap.parse_args()
res = {}
for dec in ("jnp", "bits", "bits_halves"):
  dump = os.path.join(args.out, f"dump_{dec}")
  code = f"""
import jax, jax.numpy as jnp, fp4jax as fj
from fp4jax.kernels import w4a16_matmul as wk
q = fj.quantize(jax.random.normal(jax.random.key(0), (8192, 8192)), fj.MXFP4, axis=0).with_layout("rows")
x = jnp.ones((1, 8192), jnp.bfloat16)
cfg = wk.Config(16, 128, 256, 4, False, 4, 3, decode={dec!r})
jax.block_until_ready(wk.w4a16_matmul(x, q.values, q.scales, fmt=fj.MXFP4, config=cfg))
"""
  env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}")
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  entry = {"rc": p.returncode, "stderr": p.stderr[-1500:]}
  for ptx in glob.glob(os.path.join(dump, "**", "*.ptx"), recursive=True):
    text = open(ptx).read()
    if "w4a16" not in text:
      continue
    cubin = ptx + ".cubin"
    a = subprocess.run(["ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True)
    entry["ptxas"] = a.stderr[-1500:]
    s = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    ops = collections.Counter()
    kernel = None
    for line in s.splitlines():
      m = re.match(r"\s*Function : (\S+)", line)
      if m:
        kernel = m.group(1)
      mi = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
      if mi and kernel and "w4a16" in kernel:
        ops[mi.group(1).split(".")[0]] += 1
    entry["ptx_file"] = os.path.basename(ptx)
    entry["sass_total"] = sum(ops.values())
    entry["sass_ops"] = dict(ops.most_common(40))
    with open(os.path.join(args.out, f"sass_{dec}.txt"), "w") as f:
      f.write(s)
  entry["files_sample"] = sorted({os.path.splitext(f)[1] for f in glob.glob(os.path.join(dump, "**", "*"), recursive=True)})
  entry["ptx_files_seen"] = len(glob.glob(os.path.join(dump, "**", "*.ptx"), recursive=True))
  shutil.rmtree(dump, ignore_errors=True)
  res[dec] = entry
  print(dec, {k: v for k, v in entry.items() if k != "stderr"}, flush=True)
json.dump(res, open(os.path.join(args.out, "w4a16_sass.json"), "w"), indent=1)
