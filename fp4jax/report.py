"""Quantization error report: MSE and SQNR of every format and scale rule on synthetic data.

``python -m fp4jax report --out report.png --size N --seed S`` prints a table
and writes a bar chart of SQNR. The plot needs matplotlib (the ``cli``
extra); the command checks it, and the ``--out`` path, before computing
anything, and ``--no-plot`` prints the tables alone without it. The data
(``size`` float32 elements each, as rows of 512 blocked along the last axis):

``gaussian``
  i.i.d. N(0, 1).
``student_t``
  i.i.d. Student-t with 3 degrees of freedom: heavy tails, infinite kurtosis,
  so a block's maximum is often far above its typical element.
``llm_weights``
  A weight matrix ``(out_features, in_features)`` quantized along
  ``in_features`` as LLM linear layers are. ``0.02 * t_8 / sd`` elements
  (std 0.02, mildly heavy-tailed), times a log-normal per-row gain (sigma 0.35,
  output channels of different norms), times a gain of 8 to 30 on 1% of the
  columns (outlier input channels, as where weights meet the large activation
  channels of LLMs), plus one "super weight" per 32768 elements of magnitude
  100 to 300 standard deviations (the few huge scalars reported in LLM
  weights). The super weights set NVFP4's tensor-wide scale; the outlier
  columns put one large element into many blocks.

Metrics, in float64 over all elements: ``mse = mean((x - dq)**2)``,
``rel_mse = mse / mean(x**2)`` and ``sqnr_db = 10 * log10(1 / rel_mse)``; and
from :func:`fp4jax.stats`: the fraction of elements that saturated
(``clipped_fraction``) and of blocks whose scale is the largest or smallest
of its range (``scale_at_max_fraction``, ``scale_at_min_fraction``), printed
in a second table.

By default the table covers the formats of ``fp4jax.FORMATS`` and the rules
of ``fp4jax.SCALE_RULES``; ``--formats all --rules all`` adds MXFP6, MXINT8,
"even" and "4over6".
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.formats import ALL_FORMATS, FORMATS, Format, get_format
from fp4jax.outfile import AtomicOutput, check_output
from fp4jax.quantize import dequantize, quantize
from fp4jax.scales import ALL_SCALE_RULES, SCALE_RULES
from fp4jax.stats import stats

__all__ = ["DISTRIBUTIONS", "COLUMNS", "generate", "valid_rules", "error_table", "format_table",
           "format_diagnostics", "plot", "main"]

ROW_LENGTH = 512  # elements per row: a multiple of every format's block size


def _gaussian(rng: np.random.Generator, shape):
  return rng.standard_normal(shape)


def _student_t(rng: np.random.Generator, shape):
  return rng.standard_t(3, shape)


def _llm_weights(rng: np.random.Generator, shape):
  rows, cols = shape
  df = 8
  w = 0.02 * rng.standard_t(df, shape) / math.sqrt(df / (df - 2))
  w *= np.exp(rng.normal(0.0, 0.35, (rows, 1)))
  outlier_cols = rng.choice(cols, max(1, cols // 100), replace=False)
  w[:, outlier_cols] *= rng.uniform(8.0, 30.0, outlier_cols.size)
  n_super = max(1, w.size // 32768)
  flat = rng.choice(w.size, n_super, replace=False)
  w.flat[flat] = 0.02 * rng.uniform(100.0, 300.0, n_super) * rng.choice([-1.0, 1.0], n_super)
  return w


#: name -> generator ``(numpy Generator, (rows, cols)) -> float64 array``.
DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, tuple], np.ndarray]] = {
    "gaussian": _gaussian,
    "student_t": _student_t,
    "llm_weights": _llm_weights,
}

#: Keys of each row of :func:`error_table`: the main table's columns in
#: printed order, then the :func:`fp4jax.stats` fractions of the second table.
COLUMNS = ("distribution", "format", "rule", "bits", "mse", "rel_mse", "sqnr_db",
           "clipped_fraction", "scale_at_max_fraction", "scale_at_min_fraction")


def generate(name: str, size: int, seed: int) -> np.ndarray:
  """The float32 ``(ceil(size / 512), 512)`` test tensor of distribution ``name``.

  Each distribution draws from its own stream, so adding one leaves the
  others unchanged.
  """
  if name not in DISTRIBUTIONS:
    raise ValueError(f"unknown distribution {name!r}; expected one of {list(DISTRIBUTIONS)}")
  if size < 1:
    raise ValueError(f"size must be a positive number of elements, got {size}")
  rows = -(-size // ROW_LENGTH)
  rng = np.random.default_rng([seed, list(DISTRIBUTIONS).index(name)])
  return DISTRIBUTIONS[name](rng, (rows, ROW_LENGTH)).astype(np.float32)


def valid_rules(fmt: Format, rules: Iterable[str] | None = None) -> list[str]:
  """The scale rules ``quantize`` accepts for ``fmt``, in ``SCALE_RULES`` order.

  Asks ``quantize`` itself (abstractly, nothing is compiled): a rule that does
  not apply to the format's scale dtype raises ValueError while tracing.
  ``rules`` (default ``SCALE_RULES``) are the candidates, e.g. ``ALL_SCALE_RULES``.
  """
  probe = jax.ShapeDtypeStruct((1, fmt.block_size), jnp.float32)
  out = []
  for rule in (SCALE_RULES if rules is None else rules):
    try:
      jax.eval_shape(lambda x, rule=rule: quantize(x, fmt, scale_rule=rule, backend="xla"), probe)
    except ValueError:
      continue
    out.append(rule)
  return out


def _errors(x: np.ndarray, dq: np.ndarray) -> dict:
  x64 = x.astype(np.float64)
  err = dq.astype(np.float64) - x64
  mse = float(np.mean(err * err))
  power = float(np.mean(x64 * x64))
  rel = mse / power
  sqnr = math.inf if rel == 0 else -10.0 * math.log10(rel)
  return {"mse": mse, "rel_mse": rel, "sqnr_db": sqnr}


def error_table(
    size: int = 1 << 16,
    seed: int = 0,
    *,
    formats: Iterable[Format | str] | None = None,
    distributions: Iterable[str] | None = None,
    rules: Iterable[str] | None = None,
) -> list[dict]:
  """Quantization error of every (distribution, format, scale rule).

  Args:
    size: elements per distribution (rounded up to whole rows of 512).
    seed: seeds every distribution's generator.
    formats: formats or names; default every format in ``fp4jax.FORMATS``
      (``fp4jax.ALL_FORMATS`` adds MXFP6 and MXINT8).
    distributions: names from :data:`DISTRIBUTIONS`; default all.
    rules: scale rules to try, from ``fp4jax.ALL_SCALE_RULES``; default every
      rule of ``fp4jax.SCALE_RULES``; rules a format does not accept are
      skipped (see :func:`valid_rules`).

  Returns:
    A list of dicts with keys :data:`COLUMNS`: ``distribution``, ``format``
    and ``rule`` (str), ``bits`` (storage bits per element including scales),
    ``mse``, ``rel_mse`` and ``sqnr_db`` (float), and the clipping and
    scale-range fractions of :func:`fp4jax.stats`. Each tensor is quantized
    along its last axis with ``backend="xla"`` and dequantized to float32.
  """
  fmts = [get_format(f) for f in (FORMATS.values() if formats is None else formats)]
  dists = list(DISTRIBUTIONS if distributions is None else distributions)
  wanted = list(SCALE_RULES if rules is None else rules)
  for r in wanted:
    if r not in ALL_SCALE_RULES:
      raise ValueError(f"unknown scale rule {r!r}; expected one of {list(ALL_SCALE_RULES)}")
  table = []
  for dist in dists:
    x = generate(dist, size, seed)
    xj = jnp.asarray(x)
    for fmt in fmts:
      for rule in valid_rules(fmt, wanted):
        q = quantize(xj, fmt, axis=-1, scale_rule=rule, backend="xla")
        dq = np.asarray(dequantize(q, jnp.float32, backend="xla"))
        row = {"distribution": dist, "format": fmt.name, "rule": rule, "bits": fmt.bits_per_element}
        row.update(_errors(x, dq))
        st = stats(x, q)
        row.update(clipped_fraction=st.clipped_fraction, scale_at_max_fraction=st.scale_at_max_fraction,
                   scale_at_min_fraction=st.scale_at_min_fraction)
        table.append(row)
  return table


def format_table(table: list[dict]) -> str:
  """The rows of :func:`error_table` as an aligned text table, one line per row."""
  head = f"{'distribution':<13}{'format':<12}{'rule':<9}{'bits':>5}{'MSE':>12}{'rel MSE':>11}{'SQNR dB':>9}"
  lines = [head, "-" * len(head)]
  last = None
  for r in table:
    if last is not None and r["distribution"] != last:
      lines.append("")
    last = r["distribution"]
    lines.append(
        f"{r['distribution']:<13}{r['format']:<12}{r['rule']:<9}{r['bits']:>5.2f}"
        f"{r['mse']:>12.4e}{r['rel_mse']:>11.3e}{r['sqnr_db']:>9.2f}"
    )
  return "\n".join(lines)


def format_diagnostics(table: list[dict]) -> str:
  """The :func:`fp4jax.stats` fractions of :func:`error_table`'s rows, in percent, one line per row.

  Rows start with the format (the main table's with the distribution).
  """
  head = f"{'format':<12}{'rule':<9}{'distribution':<13}{'clipped %':>11}{'scale@max %':>13}{'scale@min %':>13}"
  lines = [head, "-" * len(head)]
  for r in table:
    lines.append(
        f"{r['format']:<12}{r['rule']:<9}{r['distribution']:<13}{100 * r['clipped_fraction']:>11.3f}"
        f"{100 * r['scale_at_max_fraction']:>13.3f}{100 * r['scale_at_min_fraction']:>13.3f}"
    )
  return "\n".join(lines)


def _names(arg: str | None, known: Iterable[str], what: str) -> list[str] | None:
  """``--formats`` / ``--rules``: None (the default set), ``"all"`` or a comma-separated list."""
  if arg is None:
    return None
  if arg == "all":
    return list(known)
  names = [n.strip().lower() if what == "format" else n.strip() for n in arg.split(",") if n.strip()]
  for n in names:
    if n not in known:
      raise ValueError(f"unknown {what} {n!r}; expected 'all' or a comma-separated list of {list(known)}")
  return names


def plot(table: list[dict], path: str, title: str = "fp4jax quantization error") -> None:
  """Writes a grouped bar chart of SQNR (dB) per format/rule and distribution to a PNG.

  Missing directories of ``path`` are created; the file appears only complete
  (:class:`fp4jax.outfile.AtomicOutput`).
  """
  # The object API with an explicit Agg canvas: no pyplot, no global backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  combos = list(dict.fromkeys((r["format"], r["rule"]) for r in table))
  dists = list(dict.fromkeys(r["distribution"] for r in table))
  sqnr = {(r["distribution"], r["format"], r["rule"]): r["sqnr_db"] for r in table}
  fig = Figure(figsize=(max(6.0, 0.75 * len(combos) + 2.0), 4.8), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  width = 0.8 / max(1, len(dists))
  xs = np.arange(len(combos))
  for i, dist in enumerate(dists):
    ys = [sqnr.get((dist, f, r), np.nan) for f, r in combos]
    bars = ax.bar(xs + (i - (len(dists) - 1) / 2) * width, ys, width, label=dist)
    ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
  ax.set_xticks(xs, [f"{f}\n{r}" for f, r in combos], fontsize=7)
  ax.set_ylabel("SQNR (dB), higher is better")
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  check_output(path, create_dirs=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with AtomicOutput(path) as f:
    fig.savefig(f, format="png")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_replaceable(path) -> None:
  """An existing ``--out`` is replaced only if it is a PNG image (a mistyped path must not cost a checkpoint)."""
  if not os.path.lexists(path):
    return
  try:
    with open(path, "rb") as f:
      head = f.read(len(_PNG_SIGNATURE))
  except OSError as e:
    raise ValueError(f"cannot replace {path}: {e.strerror}") from None
  if head != _PNG_SIGNATURE:
    raise ValueError(f"{path} exists and is not a PNG image: the report will not replace it; choose another --out")


def main(args) -> int:
  """The ``report`` subcommand: ``args.out`` (PNG path), ``args.size``, ``args.seed``.

  Optional ``args.formats`` / ``args.rules``: ``"all"`` or comma-separated
  names (default: ``fp4jax.FORMATS`` and ``fp4jax.SCALE_RULES``);
  ``args.no_plot``: print the tables only. Arguments, matplotlib and the
  ``--out`` path are checked before anything is computed; an existing
  ``--out`` is replaced only if it is a PNG image.
  """
  if args.size < 1:
    print(f"fp4jax report: error: --size must be a positive number of elements, got {args.size}", file=sys.stderr)
    return 2
  try:
    formats = _names(getattr(args, "formats", None), ALL_FORMATS, "format")
    rules = _names(getattr(args, "rules", None), ALL_SCALE_RULES, "scale rule")
    plotting = not getattr(args, "no_plot", False)
    if plotting:
      check_output(args.out, create_dirs=True)
      _check_replaceable(args.out)
  except ValueError as e:
    print(f"fp4jax report: error: {e}", file=sys.stderr)
    return 2
  if plotting:
    # Fail now, not after the table: the plot needs matplotlib (the cli extra).
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
  start = time.perf_counter()
  table = error_table(args.size, args.seed, formats=formats, rules=rules)
  rows = -(-args.size // ROW_LENGTH)
  print(
      f"fp4jax quantization error: {rows}x{ROW_LENGTH} float32 per distribution, blocks along "
      f"the last axis, seed {args.seed}, jax {jax.__version__} on {jax.default_backend()}"
  )
  print(format_table(table))
  print()
  print("Clipping and scale range (fp4jax.stats): elements that saturated, blocks at the ends of the scale range")
  print(format_diagnostics(table))
  if plotting:
    plot(table, args.out, title=f"fp4jax quantization SQNR ({rows}x{ROW_LENGTH} elements, seed {args.seed})")
    args.written = True
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
  return 0
