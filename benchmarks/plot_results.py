"""Plots benchmarks/results/matmul.json as speed-up over the bf16 dot: docs/img/matmul_speedup.png.

  python benchmarks/plot_results.py [--json benchmarks/results/matmul.json] [--out docs/img/matmul_speedup.png]

Left panel, W4A16 (bf16 activations x MXFP4 weights): speed-up of the Pallas
kernel (solid) and of the two-pass path (dashed) against ``jnp.dot`` in bf16,
by the number of rows M, one colour per (K, N). ``backend="auto"`` took the
kernel up to the dotted line and the two-pass path above it. Right panel, MX x
MX: one group of bars per case.

Reads only the JSON that benchmarks/matmul.py wrote (``--json``): no fp4jax
import, no device. The JSON does not record where ``auto`` switched, so
AUTO_MAX_ROWS repeats ``fp4jax.matmul.KERNEL_MAX_ROWS`` as of that run (it is
printed in benchmarks/results/matmul.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")  # no display on CI machines or the GPU host
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
AUTO_MAX_ROWS = {"w4a16": 256, "mx": 64}
MX_PATHS = (("kernel", "kernel (bf16 MMA)"), ("kernel_fp8_mma", "kernel (fp8 MMA)"),
            ("two_pass", "two-pass"), ("jax_nn_scaled_matmul", "jax.nn.scaled_matmul"))


def speedup(row: dict, path: str) -> float | None:
  """bf16 dot time / ``path``'s time, or None where the run did not time that path."""
  t = row["t"]
  return t["xla_bf16"] / t[path] if t.get(path) else None


def plot_w4a16(ax, rows: list[dict]) -> None:
  shapes = sorted({(r["k"], r["n"]) for r in rows})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for color, (k, n) in zip(colors, shapes):
    sel = sorted((r for r in rows if (r["k"], r["n"]) == (k, n)), key=lambda r: r["m"])
    ms = [r["m"] for r in sel]
    ax.plot(ms, [speedup(r, "kernel") for r in sel], "o-", color=color, label=f"K={k}, N={n} kernel")
    ax.plot(ms, [speedup(r, "two_pass") for r in sel], "s--", color=color, alpha=0.6,
            label=f"K={k}, N={n} two-pass")
  ax.axvline(AUTO_MAX_ROWS["w4a16"], color="grey", linestyle=":")
  ax.text(AUTO_MAX_ROWS["w4a16"] * 0.9, 0.03, "auto: kernel", color="grey", fontsize=7, ha="right")
  ax.text(AUTO_MAX_ROWS["w4a16"] * 1.1, 0.03, "auto: two-pass", color="grey", fontsize=7, ha="left")
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_xscale("log", base=2)
  ms = sorted({r["m"] for r in rows})
  ax.set_xticks(ms, [str(m) for m in ms], fontsize=7)
  ax.minorticks_off()
  ax.set_xlabel("M (rows of activations)")
  ax.set_ylabel("speed-up vs jnp.dot in bf16 (higher is better)")
  ax.set_title("W4A16: bf16 x MXFP4 weights", fontsize=10)
  ax.set_ylim(0, 1.45)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6.5, ncol=2, loc="upper right")


def plot_mx(ax, rows: list[dict]) -> None:
  labels = [f"{r['fmt']}\nM={r['m']}\n{r['k']}x{r['n']}" for r in rows]
  width = 0.8 / len(MX_PATHS)
  for i, (path, name) in enumerate(MX_PATHS):
    xs = [j + (i - (len(MX_PATHS) - 1) / 2) * width for j in range(len(rows))]
    ys = [speedup(r, path) or 0.0 for r in rows]  # 0: not measured at that size
    ax.bar(xs, ys, width, label=name)
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_xticks(range(len(rows)), labels, fontsize=7)
  ax.set_ylabel("speed-up vs jnp.dot in bf16")
  ax.set_title("MX x MX (same format both sides)", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=ROOT / "benchmarks/results/matmul.json", type=pathlib.Path)
  parser.add_argument("--out", default=ROOT / "docs/img/matmul_speedup.png", type=pathlib.Path)
  args = parser.parse_args(argv)
  result = json.loads(args.json.read_text())
  env = result["env"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=90, width_ratios=(1.1, 1))
  plot_w4a16(left, result["w4a16"])
  plot_mx(right, result["mx"])
  fig.suptitle(f"fp4jax block-scaled matmul, {env['device'].split(' (')[0]}, jax {env['jax']}", fontsize=11)
  fig.tight_layout()
  args.out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
