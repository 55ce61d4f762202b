"""The whole test suite on the GPU, and the cross-platform identity table, in one command.

Run on the GPU machine from the repository root::

  JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR

It runs ``python3 -m pytest -q -n 12 -p no:cacheprovider tests`` (serially when
pytest-xdist is not installed) with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and
the CPU platform added to ``JAX_PLATFORMS`` (so ``tests/test_cross_platform.py``
can compare the GPU with ``jax.devices("cpu")``), then writes:

* ``DIR/gpu_tests.md``: device, jax version, git commit, passed / failed /
  skipped counts, duration, the failures, and the cross-platform table (every
  format x rule x input dtype: mismatching codes, scales and global scales,
  CPU XLA vs GPU XLA vs GPU Pallas; the dequantize kernel vs XLA; the matmuls),
  built from the rows ``tests/test_cross_platform.py`` records while it runs;
* ``DIR/pytest.log`` (the raw log) and ``DIR/junit.xml``; the table's raw rows
  (``DIR/cross_platform_rows``) are removed once the table is written, unless
  ``--keep-rows`` (the device tool brings back at most 8 files a call).

The report is rewritten after every stage, so an interrupted run (Ctrl-C,
SIGTERM, the ``--budget`` running out) still leaves what was measured. The
suite gets ``--budget`` seconds (default 420: the whole command stays under 8
minutes on one H200 with 16 cores). ``--gpus N`` gives each pytest-xdist worker one of N GPUs (two H200s,
``--workers 28``: 354 s instead of 546 s on one). ``--cpu-smoke`` runs a tiny subset on the
CPU instead, to check this script and the report's format without a GPU.
Exit status 0 only when every test passed and no comparison mismatched.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_TESTS = ["tests/test_bits.py::test_halving_sum_adds_in_its_fixed_tree",
               "tests/test_cross_platform.py::test_quantize_and_dequantize_give_the_same_bits_on_every_path",
               "tests/test_kernels_lowering.py::test_tensor_amax_lowers"]
SMOKE_FILTER = "mxfp4-floor or nvfp4-nearest or halving or lowers"


class Report:
  """The markdown report, rewritten whole on every update."""

  def __init__(self, path, args):
    self.path, self.args = path, args
    self.env, self.tests, self.failures, self.table, self.notes = {}, {}, [], "", []

  def write(self):
    lines = ["# fp4jax on the GPU: test suite and cross-platform identity", ""]
    lines += [f"- {k}: {v}" for k, v in self.env.items()]
    lines += ["", "## Test suite", ""]
    lines += [f"- {k}: {v}" for k, v in self.tests.items()] or ["- not run yet"]
    if self.failures:
      lines += ["", f"### Failures and errors ({len(self.failures)})", ""]
      lines += [f"- `{name}`: {msg}" for name, msg in self.failures]
    lines += ["", "## Cross-platform identity", "", self.table or "(no rows recorded yet)"]
    if self.notes:
      lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(tmp, self.path)


def _git_commit(given):
  # A given commit wins: the device machine's copy of the tree can carry a stale .git.
  if given:
    return given
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    if out.returncode == 0:
      dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
      return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return "unknown (no git here; pass --commit)"


def _environment(env):
  """Device and versions, from a short child process (this one never touches the GPU)."""
  code = "\n".join([
      "import jax, jaxlib",
      "def n(p):",
      "  try:",
      "    return len(jax.devices(p))",
      "  except RuntimeError:",
      "    return 0",
      "d = jax.devices()",
      "print(d[0].platform, getattr(d[0], 'device_kind', d[0]), len(d), jax.__version__, jaxlib.__version__,",
      "      n('cpu'), n('gpu'), sep='|')",
  ])
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  if out.returncode:
    return {"Device": f"unavailable: {out.stderr.strip().splitlines()[-1:]}"}
  plat, kind, n, jv, jlv, n_cpu, n_gpu = out.stdout.strip().splitlines()[-1].split("|")
  return {"Device": f"{kind} (default platform {plat}, {n} device(s); CPU devices: {n_cpu}, GPU devices: {n_gpu})",
          "jax": f"{jv} (jaxlib {jlv}), Python {platform.python_version()}"}


def _pytest_command(args, junit):
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
         f"--junitxml={junit}"]
  if args.cpu_smoke:
    return cmd + SMOKE_TESTS + ["-k", SMOKE_FILTER]
  if importlib.util.find_spec("xdist") is not None:
    cmd += ["-n", str(args.workers)]
  return cmd + (args.tests or ["tests"])


_CHILD = []  # the running pytest process, for the signal handler


def _stop(proc, wait_s=30):
  """SIGINT (pytest then prints its summary and writes the junit file), then SIGKILL."""
  if proc.poll() is not None:
    return
  os.killpg(proc.pid, signal.SIGINT)
  try:
    proc.wait(timeout=wait_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_pytest(cmd, env, log_path, budget):
  """Runs pytest, teeing its output; interrupts it past ``budget`` seconds."""
  start = time.time()
  with open(log_path, "w") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    _CHILD.append(proc)
    timer = threading.Timer(budget, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGINT))
    timer.start()
    try:
      for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
        log.flush()
    except KeyboardInterrupt:
      _stop(proc)
      raise
    finally:
      timer.cancel()
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        _stop(proc)
  seconds = time.time() - start
  return proc.returncode, seconds, seconds >= budget


def _junit(path):
  """(counts, failures) from pytest's junit xml, or (None, []) when it was not written."""
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError):
    return None, []
  suites = [root] if root.tag == "testsuite" else list(root)
  counts = collections.Counter()
  failures = []
  for s in suites:
    for key in ("tests", "failures", "errors", "skipped"):
      counts[key] += int(s.get(key, 0))
    counts["time"] += float(s.get("time", 0))
    for case in s.iter("testcase"):
      for kind in ("failure", "error"):
        el = case.find(kind)
        if el is not None:
          name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
          failures.append((name, _failure_line(el, kind)))
  return counts, failures


def _failure_line(el, kind: str) -> str:
  """The failure's message, or when that says nothing past its exception name (an assert on
  arrays, hypothesis), the first ``E`` line of the traceback that does."""
  msg = (el.get("message") or "").strip().splitlines()
  first = msg[0].strip() if msg else ""
  if first and not first.endswith(":"):
    return first[:300]
  for ln in (el.text or "").splitlines():
    said = ln.strip()[1:].strip() if ln.strip().startswith("E ") else ""
    if said and not said.endswith(":"):
      return f"{first} {said}".strip()[:300]
  return first or kind


def _summary_line(log_path):
  try:
    with open(log_path) as f:
      lines = [ln.strip() for ln in f if ln.strip()]
  except OSError:
    return "(no log)"
  for ln in reversed(lines):
    if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln) and " in " in ln:
      return ln.strip("= ")
  return lines[-1] if lines else "(empty log)"


# ---- the cross-platform table -------------------------------------------------------------
def _rows(rows_dir):
  rows = []
  for path in sorted(glob.glob(os.path.join(rows_dir, "*.jsonl"))):
    with open(path) as f:
      rows += [json.loads(ln) for ln in f if ln.strip()]
  return rows


def _cell(rs):
  if not rs:
    return "-"
  n = len(rs)
  parts = [f"{sum(r.get(k, 0) for r in rs)}" for k in ("values", "scales") if any(k in r for r in rs)]
  if any("global" in r for r in rs):
    parts.append(f"{sum(r.get('global', 0) for r in rs)}")
  return "/".join(parts) + f" ({n})"


def _values_table(rows, title, headers, key_of):
  """Markdown lines of one kind of rows that count mismatching output elements (``values``):
  a row per ``key_of(row)``, a column per pair of paths; and the mismatches in all."""
  if not rows:
    return [], 0
  pairs = sorted({r["pair"] for r in rows})
  out = ["", f"{title} (mismatching output elements):", "",
         "| " + " | ".join(headers) + " | " + " | ".join(pairs) + " |", "|" + "---|" * (len(headers) + len(pairs))]
  groups = collections.defaultdict(list)
  for r in rows:
    groups[key_of(r)].append(r)
  for key in sorted(groups):
    cells = [_cell([r for r in groups[key] if r["pair"] == p]) for p in pairs]
    out.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
  return out, sum(r["values"] for r in rows)


def cross_platform_table(rows):
  """Markdown tables: mismatching elements per format x rule x input dtype and pair of paths."""
  if not rows:
    return "(no rows: tests/test_cross_platform.py did not run)"
  quant = [r for r in rows if r["kind"] == "quantize"]
  pairs = sorted({r["pair"] for r in quant})
  out = ["Mismatching codes/scales[/global scales] against the first path, summed over the test's "
         "shapes and layouts (number of comparisons in brackets); `-`: not compared (no kernel for the "
         "case, or not reached).", "",
         "| format | rule | input | " + " | ".join(pairs) + " |", "|---|---|---|" + "---|" * len(pairs)]
  groups = collections.defaultdict(list)
  for r in quant:
    key = (r["fmt"], r["rule"], r["dtype"] + (f" ({r['feature']})" if r.get("feature") else ""))
    groups[key].append(r)
  total = 0
  for key in sorted(groups):
    cells = [_cell([r for r in groups[key] if r["pair"] == p]) for p in pairs]
    total += sum(r.get("values", 0) + r.get("scales", 0) + r.get("global", 0) for r in groups[key])
    out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
  for kind, title, headers, key_of in (
      ("dequantize", "dequantize of one QArray", ("format", "output"), lambda r: (r["fmt"], r["dtype"])),
      ("qat fake quantize", "QAT fake quantization of a 2-D operand", ("format", "rule", "input", "rounding"),
       lambda r: (r["fmt"], r["rule"], f"{r['dtype']}, axis {r['axis']}", r["feature"]))):
    lines, mismatched = _values_table([r for r in rows if r["kind"] == kind], title, headers, key_of)
    out += lines
    total += mismatched
  mm = [r for r in rows if r["kind"] == "scaled_matmul"]
  if mm:
    out += ["", "scaled_matmul (outputs beyond float32 accumulation rounding): " +
            ", ".join(f"{r['fmt']} {r['pair']}: {r['values']}" for r in mm)]
    total += sum(r["values"] for r in mm)
  out += ["", f"**Total mismatches: {total}** over {len(rows)} comparisons."]
  return "\n".join(out), total


# ---- main ----------------------------------------------------------------------------------------
def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="directory for gpu_tests.md, pytest.log, junit.xml")
  ap.add_argument("--commit", default=None, help="the commit tested, when git does not work here")
  ap.add_argument("--budget", type=float, default=420.0, help="seconds for the test suite")
  ap.add_argument("--workers", type=int, default=12, help="pytest-xdist workers")
  ap.add_argument("--gpus", type=int, default=1,
                  help="spread the pytest-xdist workers over this many GPUs (tests/conftest.py)")
  ap.add_argument("--cpu-smoke", action="store_true", help="a tiny subset on the CPU: checks this script")
  ap.add_argument("--keep-rows", action="store_true", help="keep DIR/cross_platform_rows (the table's raw rows)")
  ap.add_argument("tests", nargs="*", help="pytest arguments instead of 'tests'")
  args = ap.parse_args(argv)

  os.makedirs(args.out, exist_ok=True)
  rows_dir = os.path.join(args.out, "cross_platform_rows")
  shutil.rmtree(rows_dir, ignore_errors=True)
  env = dict(os.environ)
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
  elif env.get("JAX_PLATFORMS", "") in ("cuda", "gpu"):
    env["JAX_PLATFORMS"] += ",cpu"  # tests/conftest.py does the same
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env["FP4JAX_CROSS_PLATFORM_DIR"] = rows_dir
  env["FP4JAX_TEST_GPUS"] = str(args.gpus)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

  report = Report(os.path.join(args.out, "gpu_tests.md"), args)
  junit, log_path = os.path.join(args.out, "junit.xml"), os.path.join(args.out, "pytest.log")
  report.env = {
      "Command": "`python3 benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
      "Commit": _git_commit(args.commit),
      "Started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "(unset)"),
  }
  report.write()

  def interrupted(signum, frame):
    for proc in _CHILD:
      _stop(proc)
    report.notes.append(f"interrupted by signal {signum}: partial results")
    _finish(report, rows_dir, junit, log_path, None, None, None)
    sys.exit(130)

  signal.signal(signal.SIGTERM, interrupted)
  try:
    report.env.update(_environment(env))
    report.write()
    cmd = _pytest_command(args, junit)
    report.tests = {"pytest": "`" + " ".join(cmd[1:]) + "`", "status": "running"}
    report.write()
    rc, seconds, timed_out = _run_pytest(cmd, env, log_path, args.budget)
  except KeyboardInterrupt:
    report.notes.append("interrupted (Ctrl-C): partial results")
    _finish(report, rows_dir, junit, log_path, None, None, None)
    return 130
  return _finish(report, rows_dir, junit, log_path, rc, seconds, timed_out)


def _finish(report, rows_dir, junit, log_path, rc, seconds, timed_out):
  counts, failures = _junit(junit)
  summary = _summary_line(log_path)
  if counts is not None:
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    report.tests.update({"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
                         "skipped": counts["skipped"], "duration": f"{counts['time']:.0f} s (pytest)"})
  report.tests["summary line"] = f"`{summary}`"
  if seconds is not None:
    report.tests["wall time"] = f"{seconds:.0f} s"
  report.tests["status"] = ("timed out: interrupted at the budget" if timed_out else
                            "interrupted" if rc is None else f"exit status {rc}")
  report.failures = failures
  table = cross_platform_table(_rows(rows_dir))
  report.table, mismatches = table if isinstance(table, tuple) else (table, 0)
  report.write()
  if not report.args.keep_rows:  # the table holds them; the device tool returns only 8 files a call
    shutil.rmtree(rows_dir, ignore_errors=True)
  print(f"wrote {report.path}: {summary}; cross-platform mismatches: {mismatches}")
  ok = rc == 0 and not timed_out and mismatches == 0
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
