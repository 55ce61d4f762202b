"""Per-kernel GPU time of a jitted program, read from a jax.profiler trace (no TensorBoard needed).

``profile(call, n, out_dir)`` runs ``call(i)`` n times under ``jax.profiler.trace`` and returns, per
GPU, the busy time of each stream, the top kernels by total time, and how long the NCCL kernels ran
alongside other kernels (overlap) versus alone. Used by the issue-12 experiments to see whether a
gradient all-reduce overlaps the backward GEMMs.
"""

from __future__ import annotations

import collections
import glob
import tempfile

import jax


def _union(intervals):
  """Total length of a union of ``(start, end)`` intervals."""
  total, end = 0.0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def _intersect(a, b):
  """Total length of the intersection of two interval unions."""
  return _union(a) + _union(b) - _union(a + b)


def summarize_trace(path, top=40):
  data = jax.profiler.ProfileData.from_file(path)
  out = {}
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    by_name = collections.defaultdict(lambda: [0.0, 0])
    nccl, other, streams = [], [], {}
    for line in plane.lines:
      busy = []
      for ev in line.events:
        s, d = ev.start_ns, ev.duration_ns
        if d <= 0:
          continue
        busy.append((s, s + d))
        rec = by_name[ev.name[:90]]
        rec[0] += d
        rec[1] += 1
        (nccl if "nccl" in ev.name.lower() else other).append((s, s + d))
      if busy:
        streams[line.name] = _union(busy) / 1e3
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    out[plane.name] = {
        "streams_busy_us": streams,
        "nccl_us": _union(nccl) / 1e3, "other_us": _union(other) / 1e3,
        "nccl_overlapped_us": _intersect(nccl, other) / 1e3,
        "top": [(name, round(t / 1e3, 1), c) for name, (t, c) in ranked[:top]],
    }
  return out


def profile(call, n=3, out_dir=None):
  """Runs ``call(i)`` (returns what to block on) ``n`` times under the profiler; times are totals."""
  out_dir = out_dir or tempfile.mkdtemp()
  jax.block_until_ready(call(0))
  with jax.profiler.trace(out_dir):
    for i in range(n):
      jax.block_until_ready(call(i + 1))
  paths = sorted(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True))
  return summarize_trace(paths[-1]) if paths else {"error": f"no trace under {out_dir}"}
