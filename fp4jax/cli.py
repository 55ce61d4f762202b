"""The ``fp4jax`` command line: ``convert``, ``inspect`` and ``report``.

``fp4jax convert IN.safetensors OUT.safetensors --format mxfp4`` quantizes a
checkpoint tensor by tensor; ``fp4jax inspect FILE.safetensors [--reference
ORIGINAL.safetensors]`` lists its tensors (and their SQNR against the
original); ``fp4jax report`` prints the error table of every format and rule.

How it ends (``docs/checkpoints.md`` has the table): 0 done; 2 a problem the
user can fix (bad arguments, an unreadable or malformed input, an output that
cannot or must not be written, a missing extra), said in one line naming the
file as given, found before any work; 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP,
each after removing the unfinished output; 141 when stdout is closed (``|
head``), silently; 1 a bug (one line; ``FP4JAX_TRACEBACK=1`` shows the
traceback). No output file is ever left half written.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import threading

# What each command imports beyond the core, all from the ``cli`` extra.
_EXTRA = "pip install 'fp4jax[cli]'"
_NEEDS = {"convert": ("safetensors", "tqdm"), "inspect": ("safetensors",), "report": ("matplotlib",)}

# MXFP8 without a suffix means E4M3 elements, the usual choice for weights.
_FORMAT_CHOICES = {"mxfp4": "mxfp4", "nvfp4": "nvfp4", "mxfp8": "mxfp8_e4m3",
                   "mxfp8_e4m3": "mxfp8_e4m3", "mxfp8_e5m2": "mxfp8_e5m2",
                   "mxfp6_e2m3": "mxfp6_e2m3", "mxfp6_e3m2": "mxfp6_e3m2", "mxint8": "mxint8"}


def _add_report(sub):
  p = sub.add_parser("report", help="quantization error table (MSE, SQNR) for every format and rule, plus a PNG plot")
  p.add_argument("--out", default="fp4jax_report.png",
                 help="path of the PNG plot (default: %(default)s); missing directories are created")
  p.add_argument("--no-plot", action="store_true", help="print the tables only (needs no matplotlib)")
  p.add_argument("--size", type=int, default=1 << 16, help="elements per synthetic tensor (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--formats", metavar="NAMES", default=None,
                 help="'all' or comma-separated format names (default: mxfp4, nvfp4, mxfp8_e4m3, mxfp8_e5m2)")
  p.add_argument("--rules", metavar="NAMES", default=None,
                 help="'all' or comma-separated scale rules (default: floor, ceil, nearest, mse; "
                      "'all' adds even and 4over6)")
  p.set_defaults(func=_report)


def _report(args) -> int:
  from fp4jax import report  # lazy: the other commands need none of it

  return report.main(args)


def _add_convert(sub):
  from fp4jax.checkpoints import LAYOUTS
  from fp4jax.scales import SCALE_RULES

  p = sub.add_parser("convert", help="quantize the float tensors of a safetensors file, one tensor at a time")
  p.add_argument("src", metavar="IN.safetensors")
  p.add_argument("dst", metavar="OUT.safetensors", help="a new file: never IN itself; an existing file only "
                 "with --overwrite (replaced once the new one is complete)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT.safetensors if it exists")
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
  p.add_argument("--stats", action="store_true",
                 help="then print fp4jax.stats of each quantized tensor (SQNR, clipped %%, scales at max/min %%)")
  p.set_defaults(func=_convert)


def _add_inspect(sub):
  p = sub.add_parser("inspect", help="list the tensors of a safetensors file: format, shape, bytes, SQNR")
  p.add_argument("file", metavar="FILE.safetensors")
  p.add_argument("--reference", metavar="REF.safetensors",
                 help="the unquantized original: adds each tensor's SQNR against it")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.add_argument("--stats", action="store_true",
                 help="with --reference: add fp4jax.stats columns (clipped %%, scales at max/min %%) for "
                      "quantized tensors (the JSON always has them)")
  p.set_defaults(func=_inspect)


_DESCRIPTION = """\
fp4jax: block-scaled 4- and 8-bit numerics for JAX.

  fp4jax convert IN.safetensors OUT.safetensors --format mxfp4
      quantize a checkpoint, one tensor at a time
  fp4jax inspect FILE.safetensors [--reference ORIGINAL.safetensors]
      list its tensors (and their SQNR against the original)
  fp4jax report
      quantization error of every format and scale rule on generated data

The commands need the cli extra: pip install 'fp4jax[cli]'.
"""


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def build_parser() -> argparse.ArgumentParser:
  description = _DESCRIPTION
  missing = sorted({m for needs in _NEEDS.values() for m in needs if not _installed(m)})
  if missing:
    description += f"Not installed here: {', '.join(missing)}.\n"
  parser = argparse.ArgumentParser(prog="fp4jax", description=description,
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


def _regex(pattern: str | None, flag: str) -> None:
  try:
    re.compile(pattern or "")
  except re.error as e:
    raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def _convert(args) -> int:
  from tqdm import tqdm

  from fp4jax import checkpoints
  from fp4jax.formats import get_format
  from fp4jax.outfile import check_output
  from fp4jax.scales import check_rule

  # Everything that can be refused is refused here, before any work.
  fmt = _FORMAT_CHOICES[args.format]
  if args.scale_rule is not None:
    check_rule(get_format(fmt), args.scale_rule)
  _regex(args.include, "--include")
  _regex(args.exclude, "--exclude")
  total = sum(e.nbytes for e in checkpoints.read_entries(args.src))
  check_output(args.dst, inputs=[args.src])
  if os.path.lexists(args.dst) and not args.overwrite:
    raise ValueError(f"{args.dst} exists; pass --overwrite to replace it")
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr, disable=args.no_progress)

  def progress(rec):
    _check_signals()  # before the output is renamed into place, if one was swallowed
    bar.set_postfix_str(rec.name, refresh=False)
    bar.update(rec.bytes_before)
    if args.verbose:
      bar.write(f"  {rec.name} {list(rec.shape)}: {rec.action}"
                + (f", SQNR {rec.sqnr_db:.2f} dB" if rec.sqnr_db is not None else ""))

  with bar:
    records = checkpoints.convert(args.src, args.dst, fmt, scale_rule=args.scale_rule, axis=args.axis,
                                  include=args.include, exclude=args.exclude, layout=args.layout,
                                  progress=progress)
  args.written = True
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
  if args.stats and groups["quantized"]:
    _print_stats(args.dst, args.src, [r.name for r in groups["quantized"]])
  return 0


# ---- fp4jax.stats ------------------------------------------------------------------


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.3f}"


def _stats_against(tensor, ref):
  """fp4jax.stats of a QArray ``tensor`` against the original ``ref``; None if either does not fit."""
  import numpy as np

  from fp4jax.qarray import QArray
  from fp4jax.stats import stats

  if not isinstance(tensor, QArray) or isinstance(ref, QArray):
    return None
  r = np.asarray(ref)
  if tuple(r.shape) != tuple(tensor.shape) or r.dtype.kind not in "fV":
    return None
  try:
    return stats(r, tensor)
  except ValueError:
    return None


def _print_stats(path, reference, names) -> None:
  from fp4jax import checkpoints

  rows = []
  with checkpoints.CheckpointFile(path) as f, checkpoints.CheckpointFile(reference) as ref:
    for name in names:
      st = _stats_against(f.load(name), ref.load(name))
      if st is not None:
        rows.append([name, _db(st.sqnr_db), f"{st.rel_mse:.3e}", _pct(st.clipped_fraction),
                     _pct(st.scale_at_max_fraction), _pct(st.scale_at_min_fraction)])
  print(f"fp4jax.stats of {path} against {reference}:")
  print(_table(["tensor", "SQNR dB", "rel MSE", "clipped %", "scale@max %", "scale@min %"], rows, "<>>>>>"))


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
          tensor, original = (f.load(e.name), ref.load(e.name)) if e.name in ref_names else (None, None)
          row["sqnr_db"] = _sqnr_against(tensor, original) if e.name in ref_names else None
          st = _stats_against(tensor, original) if e.name in ref_names else None
          for key in _STATS_KEYS:
            row[key] = None if st is None else getattr(st, key)
        rows.append(row)
    finally:
      if ref is not None:
        ref.close()
  if args.json:
    for r in rows:  # strict JSON has no Infinity: an exact copy reads "inf"
      for key in ("sqnr_db",) + _STATS_KEYS:
        if r.get(key) is not None and not math.isfinite(r[key]):
          r[key] = str(r[key])
    print(json.dumps({"file": args.file, "reference": args.reference, "tensors": rows}, indent=1, allow_nan=False))
    return 0
  extra = args.stats and ref is not None
  headers = (["name", "format", "layout", "axis", "shape", "bytes"] + (["SQNR dB"] if ref is not None else [])
             + (["clipped %", "scale@max %", "scale@min %"] if extra else []))
  table = [[r["name"], r["format"], r["layout"], "" if r["axis"] is None else r["axis"],
            "x".join(map(str, r["shape"])) or "()", f"{r['bytes']:,}"]
           + ([_db(r["sqnr_db"])] if ref is not None else [])
           + ([_pct(r[k]) for k in _STATS_KEYS[1:]] if extra else []) for r in rows]
  print(f"{args.file}: {len(rows)} tensors, {sum(r['bytes'] for r in rows):,} bytes of data")
  print(_table(headers, table, "<<<>>>>" + (">>>" if extra else "")))
  return 0


# Stats fields the inspect JSON carries for each quantized tensor with a reference.
_STATS_KEYS = ("rel_mse", "clipped_fraction", "scale_at_max_fraction", "scale_at_min_fraction")


class _Signal(BaseException):
  """SIGTERM or SIGHUP, raised where the program is so that ``with`` blocks clean up."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


# Signals received during this run. Python swallows the exception a handler raises inside a
# garbage-collection callback, a weakref callback or a __del__ (it prints "Exception ignored" and a
# traceback, and goes on): in the first and last the handler only records the signal; in any of them
# main's unraisable hook keeps the swallowed exception of a recorded signal from being printed; and
# the convert loop (at each tensor) and the end of every command raise a recorded one (_check_signals).
_RECEIVED: list[int] = []


def _stop(signum: int):
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  raise _Signal(signum)


def _raise_signal(signum, frame):
  _RECEIVED.append(signum)
  if not _swallows_exceptions(frame):
    _stop(signum)


def _swallows_exceptions(frame) -> bool:
  """Whether ``frame`` runs inside a garbage-collection callback or a ``__del__``."""
  callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


def _quiet_recorded_signals(previous):
  """A ``sys.unraisablehook`` that drops the swallowed exception of a recorded signal (it is raised again
  by :func:`_check_signals`) and hands anything else to ``previous``. Weakref callbacks cannot be told
  from their frames (any function can be one; CI once saw SIGINT land in weakref.py's own)."""
  def hook(unraisable):
    if _RECEIVED and isinstance(unraisable.exc_value, (KeyboardInterrupt, _Signal)):
      return
    previous(unraisable)
  return hook


def _check_signals() -> None:
  """Raises the first signal of this run again, if one was received (see ``_RECEIVED``)."""
  if _RECEIVED:
    _stop(_RECEIVED[0])


_HANDLED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _require(command: str, args) -> str | None:
  """One line saying what to install, or None when the command's imports all work."""
  needs = () if command == "report" and args.no_plot else _NEEDS[command]
  missing, broken = [], []
  for module in needs:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name == module:
        missing.append(module)
      else:
        broken.append(f"{module} ({e})")
    except ImportError as e:
      broken.append(f"{module} ({e})")
  if not missing and not broken:
    return None
  what = "the plot needs" if command == "report" else "needs"
  if missing:
    line = f"{what} {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: {_EXTRA}"
  else:
    line = f"{what} {' and '.join(broken)}, which cannot be imported: {_EXTRA}"
  return line + (" (or pass --no-plot for the tables alone)" if command == "report" else "")


def _unwritten(args) -> str:
  """What an interrupted command left alone: its output, when it had not finished writing it."""
  out = {"convert": getattr(args, "dst", None), "report": None if getattr(args, "no_plot", True) else args.out}
  path = out.get(args.command)
  if path is None:
    return ""
  if getattr(args, "written", False):
    return f", after {path} was written in full"
  return f": {path} was not written (an existing file is unchanged)"


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror:
    return e.strerror if e.filename is None else f"{os.fsdecode(e.filename) or repr('')}: {e.strerror}"
  return str(e)


def main(argv=None) -> int:
  """Runs ``fp4jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  from fp4jax import outfile

  args = build_parser().parse_args(argv)
  name = f"fp4jax {args.command}"
  err = lambda line: print(f"{name}: {line}", file=sys.stderr)
  missing = _require(args.command, args)
  if missing:
    err(f"error: {missing}")
    return 2
  in_main = threading.current_thread() is threading.main_thread()
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, *_HANDLED)} if in_main else {}
  _RECEIVED.clear()
  saved_hook = sys.unraisablehook
  sys.unraisablehook = _quiet_recorded_signals(saved_hook)
  for s in _HANDLED:
    if in_main and saved[s] is not signal.SIG_IGN:  # respect nohup
      signal.signal(s, _raise_signal)
  if in_main and saved.get(signal.SIGINT) is signal.default_int_handler:  # Python's own: made sticky too
    signal.signal(signal.SIGINT, _raise_signal)
  try:
    try:
      rc = int(args.func(args) or 0)
      _check_signals()  # one whose exception was swallowed still ends the run with its status
      sys.stdout.flush()  # here, where a closed pipe can still be caught
      return rc
    except BaseException:
      if in_main:  # a second Ctrl-C must not interrupt the cleanup
        for s in (signal.SIGINT, *_HANDLED):
          signal.signal(s, signal.SIG_IGN)
      outfile.remove_pending()
      raise
  except KeyboardInterrupt:
    err(f"interrupted (Ctrl-C){_unwritten(args)}")
    return 130
  except _Signal as e:
    err(f"stopped by {signal.Signals(e.signum).name}{_unwritten(args)}")
    return 128 + e.signum
  except BrokenPipeError:
    # The reader went away (``| head``): say nothing, like a command killed by SIGPIPE.
    try:  # and keep the interpreter's final flush from raising it again
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
      pass
    return 128 + 13
  except (ValueError, OSError) as e:
    # A malformed or missing file, a refused output: the user's to fix. One line naming it.
    err(f"error: {_message(e)}")
    return 2
  except Exception as e:  # noqa: BLE001 -- a bug: one line, the traceback on request
    if os.environ.get("FP4JAX_TRACEBACK"):
      raise
    err(f"internal error: {type(e).__name__}: {e} (FP4JAX_TRACEBACK=1 shows where; please report it)")
    return 1
  finally:
    for s, h in saved.items():
      if h is not None:
        signal.signal(s, h)
    sys.unraisablehook = saved_hook


if __name__ == "__main__":
  sys.exit(main())
