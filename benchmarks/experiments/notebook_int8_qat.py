"""The notebook's full MXFP4 QAT result with the int8 paths on and off (issue 15: "the notebook's QAT result
unchanged within noise with the fast paths").

``notebooks/qat_char_mlp.ipynb`` runs on the CPU, where ``fp4jax.qat.dot.INT8_FORWARD`` / ``INT8_BACKWARD``
change nothing (the int8 path runs on a GPU). This runs the notebook's character model on a GPU: its code
cells (the digits cell, the plots and the results cells left out), the bf16 base training, then the full
FP4 recipe (``QatConfig.uniform(MXFP4, scale_rule="floor")``, 500 fine-tuning steps) twice, the switches
off and on, each deployed as the notebook deploys it (W4A4 PTQ of the fine-tuned weights). Reports test bits
per character, accuracy, the wall time of each fine-tuning (compile included) and how many products traced
onto the int8 path (the deployed evaluation's 3 included). ``--offsets``: fine-tune on other batch orders
too, for the run-to-run spread the switches' float32 rounding differences should be compared with.

  JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/experiments/notebook_int8_qat.py --out DIR   # GPU
  PYTHONPATH=. python benchmarks/experiments/notebook_int8_qat.py --base-steps 20 --ft-steps 5 --out DIR  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import fp4jax as fj  # noqa: E402
from fp4jax.params import quantize_params  # noqa: E402
from fp4jax.qat import OperandConfig, QatConfig  # noqa: E402
from fp4jax.qat import dot as qdot  # noqa: E402

#: Cells (by a string they hold) this script does not run: the digits task, the notebook's own training
#: runs and its display.
SKIP = ("load_digits", "base = train()", "FT = dict", "display(", "plt.subplots")


def notebook_namespace():
  """The notebook's code cells run into one namespace (no plotting or IPython imports)."""
  nb = json.loads((ROOT / "notebooks" / "qat_char_mlp.ipynb").read_text())
  ns: dict = {}
  for cell in nb["cells"]:
    src = "".join(cell["source"])
    if cell["cell_type"] != "code" or any(s in src for s in SKIP):
      continue
    src = "\n".join(line for line in src.splitlines() if "matplotlib" not in line and "IPython" not in line)
    exec(compile(src, "qat_char_mlp.ipynb", "exec"), ns)  # noqa: S102 (our own notebook)
  return ns


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--base-steps", type=int, default=2000)
  p.add_argument("--ft-steps", type=int, default=500)
  p.add_argument("--offsets", default=str(10**6),
                 help="the fine-tuning's batch offsets (the notebook's is 10**6; others: a data-order control)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  ns = notebook_namespace()
  traced = []
  real, switches = qdot.residual_free_product, (qdot.INT8_FORWARD, qdot.INT8_BACKWARD)
  # The QAT products' int8 GEMM (traced once per product, both branches of its cond traced).
  qdot.residual_free_product = lambda *args, **kw: traced.append(args[0][0].shape) or real(*args, **kw)
  try:
    res = run(ns, traced, a)
  finally:
    qdot.residual_free_product = real
    qdot.INT8_FORWARD, qdot.INT8_BACKWARD = switches
  with open(os.path.join(a.out, "notebook_int8_qat.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))
  return 0


def run(ns, traced, a):
  """The base training, its PTQ, and the full MXFP4 QAT fine-tunings with the switches off and on."""
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__}
  base = ns["train"](steps=a.base_steps)
  res["bf16"] = ns["evaluate"](None, base)
  config = QatConfig.uniform(fj.MXFP4, scale_rule="floor")
  # The notebook's w4a4(MXFP4, "floor"): the deployed W4A4 configuration.
  deployed = QatConfig(lhs=OperandConfig(fj.MXFP4, "floor"), rhs=OperandConfig(fj.MXFP4, "floor"))
  res["ptq"] = ns["evaluate"](deployed, quantize_params(base, fj.MXFP4, scale_rule="floor"))
  for offset in [int(o) for o in a.offsets.split(",")]:
    for on in (False, True):
      qdot.INT8_FORWARD = qdot.INT8_BACKWARD = on
      traced.clear()
      t0 = time.perf_counter()
      params = ns["train"](config, steps=a.ft_steps, lr=1e-3, params=base, offset=offset)
      jax.block_until_ready(params)
      seconds = time.perf_counter() - t0
      name = f"qat_full_int8_{'on' if on else 'off'}" + ("" if offset == 10**6 else f"_batches_from_{offset}")
      res[name] = {**ns["evaluate"](deployed, quantize_params(params, fj.MXFP4, scale_rule="floor")),
                   "finetune_s_with_compile": round(seconds, 2), "int8_products_traced": len(traced)}
      print(name, res[name], flush=True)
  return res


if __name__ == "__main__":
  sys.exit(main())
