"""The ``fp4jax`` command line: ``convert``, ``inspect`` and ``report``.

``fp4jax convert IN.safetensors OUT.safetensors --format mxfp4`` quantizes a
checkpoint tensor by tensor; ``fp4jax inspect FILE.safetensors [--reference
ORIGINAL.safetensors]`` lists its tensors (and their SQNR against the
original); ``fp4jax report`` prints the error table of every format and rule.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# MXFP8 without a suffix means E4M3 elements, the usual choice for weights.
_FORMAT_CHOICES = {"mxfp4": "mxfp4", "nvfp4": "nvfp4", "mxfp8": "mxfp8_e4m3",
                   "mxfp8_e4m3": "mxfp8_e4m3", "mxfp8_e5m2": "mxfp8_e5m2"}


def _add_report(sub):
  p = sub.add_parser("report", help="quantization error table (MSE, SQNR) for every format and rule, plus a PNG plot")
  p.add_argument("--out", default="fp4jax_report.png", help="path of the PNG plot (default: %(default)s)")
  p.add_argument("--size", type=int, default=1 << 16, help="elements per synthetic tensor (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=lambda args: __import__("fp4jax.report", fromlist=["main"]).main(args))


def _add_convert(sub):
  from fp4jax.checkpoints import LAYOUTS
  from fp4jax.scales import SCALE_RULES

  p = sub.add_parser("convert", help="quantize the float tensors of a safetensors file, one tensor at a time")
  p.add_argument("src", metavar="IN.safetensors")
  p.add_argument("dst", metavar="OUT.safetensors")
  p.add_argument("--format", required=True, choices=sorted(_FORMAT_CHOICES), help="block-scaled format")
  p.add_argument("--scale-rule", choices=sorted(SCALE_RULES), default=None,
                 help="block scale rule (default: the format's own: floor for MX, nearest for NVFP4)")
  p.add_argument("--axis", type=int, default=-1, help="block axis (default: %(default)s, the input features of a (out, in) weight)")
  p.add_argument("--layout", choices=LAYOUTS, default="gpt_oss",
                 help="file layout of MXFP4 along the last axis (default: %(default)s); other formats use fp4jax's")
  p.add_argument("--include", metavar="REGEX", help="quantize only tensors whose name matches (re.search)")
  p.add_argument("--exclude", metavar="REGEX", help="never quantize tensors whose name matches (re.search)")
  p.add_argument("--verbose", "-v", action="store_true", help="print a line per tensor")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_convert)


def _add_inspect(sub):
  p = sub.add_parser("inspect", help="list the tensors of a safetensors file: format, shape, bytes, SQNR")
  p.add_argument("file", metavar="FILE.safetensors")
  p.add_argument("--reference", metavar="REF.safetensors",
                 help="the unquantized original: adds each tensor's SQNR against it")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.set_defaults(func=_inspect)


_DESCRIPTION = """\
fp4jax: block-scaled 4- and 8-bit numerics for JAX.

  fp4jax convert IN.safetensors OUT.safetensors --format mxfp4
      quantize a checkpoint, one tensor at a time
  fp4jax inspect FILE.safetensors [--reference ORIGINAL.safetensors]
      list its tensors (and their SQNR against the original)
  fp4jax report
      quantization error of every format and scale rule on generated data
"""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="fp4jax", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  _add_convert(sub)
  _add_inspect(sub)
  _add_report(sub)
  return parser


# ---- formatting ------------------------------------------------------------------


def _table(headers: list[str], rows: list[list], align: str) -> str:
  """Text table; ``align`` has one ``<`` or ``>`` per column."""
  cells = [headers] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  fmt = lambda r: "  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(r, widths, align))
  lines = [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
  return "\n".join(line.rstrip() for line in lines)


def _db(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def _mean_db(values) -> float | None:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if finite:
    return sum(finite) / len(finite)
  return math.inf if any(v == math.inf for v in values) else None


# ---- convert -----------------------------------------------------------------------


def _convert(args) -> int:
  from tqdm import tqdm

  from fp4jax import checkpoints

  fmt = _FORMAT_CHOICES[args.format]
  total = sum(e.nbytes for e in checkpoints.read_entries(args.src))
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr, disable=args.no_progress)

  def progress(rec):
    bar.set_postfix_str(rec.name, refresh=False)
    bar.update(rec.bytes_before)
    if args.verbose:
      bar.write(f"  {rec.name} {list(rec.shape)}: {rec.action}"
                + (f", SQNR {rec.sqnr_db:.2f} dB" if rec.sqnr_db is not None else ""))

  with bar:
    records = checkpoints.convert(args.src, args.dst, fmt, scale_rule=args.scale_rule, axis=args.axis,
                                  include=args.include, exclude=args.exclude, layout=args.layout,
                                  progress=progress)
  groups = {"quantized": [], "passed through": [], "skipped": []}
  for r in records:
    groups["passed through" if r.action == "passed" else r.action.split(":")[0]].append(r)
  rows = []
  for label, recs in [*groups.items(), ("total", records)]:
    if recs or label == "total":
      sq = _mean_db([r.sqnr_db for r in recs]) if label in ("quantized", "total") else None
      rows.append([label, len(recs), f"{sum(r.bytes_before for r in recs):,}", f"{sum(r.bytes_after for r in recs):,}", _db(sq)])
  rule = args.scale_rule or "format default"
  print(f"fp4jax convert: {args.src} -> {args.dst} ({fmt}, scale rule {rule}, axis {args.axis})")
  print(_table(["tensors", "count", "bytes before", "bytes after", "mean SQNR dB"], rows, "<>>>>"))
  for r in groups["skipped"]:
    print(f"skipped {r.name}: {r.action.split(': ', 1)[1]}")
  return 0


# ---- inspect -----------------------------------------------------------------------


def _sqnr_against(tensor, ref) -> float | None:
  """SQNR (dB, float64) of ``tensor`` against ``ref``; None unless both are float of one shape."""
  import jax.numpy as jnp
  import numpy as np

  from fp4jax import checkpoints
  from fp4jax.qarray import QArray

  x, r = (np.asarray(t.dequantize() if isinstance(t, QArray) else t) for t in (tensor, ref))
  if x.shape != r.shape or not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (x, r)):
    return None
  x, r = x.astype(np.float64), r.astype(np.float64)
  return checkpoints.sqnr_db(float(np.sum(r * r)), float(np.sum((r - x) ** 2)))


def _inspect(args) -> int:
  from fp4jax import checkpoints

  rows = []
  with checkpoints.CheckpointFile(args.file) as f:
    ref = checkpoints.CheckpointFile(args.reference) if args.reference else None
    try:
      ref_names = {e.name for e in ref.entries} if ref else set()
      for e in f.entries:
        row = {
            "name": e.name,
            "format": e.fmt.name if e.fmt else str(e.dtype),
            "layout": e.layout or "plain",
            "axis": e.axis if e.fmt else None,
            "shape": list(e.shape),
            "bytes": e.nbytes,
            "file_tensors": sorted(e.parts.values()),
        }
        if ref is not None:
          row["sqnr_db"] = _sqnr_against(f.load(e.name), ref.load(e.name)) if e.name in ref_names else None
        rows.append(row)
    finally:
      if ref is not None:
        ref.close()
  if args.json:
    for r in rows:  # strict JSON has no Infinity: an exact copy reads "inf"
      if r.get("sqnr_db") is not None and not math.isfinite(r["sqnr_db"]):
        r["sqnr_db"] = str(r["sqnr_db"])
    print(json.dumps({"file": args.file, "reference": args.reference, "tensors": rows}, indent=1, allow_nan=False))
    return 0
  headers = ["name", "format", "layout", "axis", "shape", "bytes"] + (["SQNR dB"] if ref is not None else [])
  table = [[r["name"], r["format"], r["layout"], "" if r["axis"] is None else r["axis"],
            "x".join(map(str, r["shape"])) or "()", f"{r['bytes']:,}"]
           + ([_db(r["sqnr_db"])] if ref is not None else []) for r in rows]
  print(f"{args.file}: {len(rows)} tensors, {sum(r['bytes'] for r in rows):,} bytes of data")
  print(_table(headers, table, "<<<>>>>"))
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "report":
    return int(args.func(args) or 0)
  try:
    return int(args.func(args) or 0)
  except (ValueError, OSError) as e:
    # A malformed or missing file is the user's to fix: one line naming it, no traceback.
    print(f"fp4jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
