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
        **_gaps(plane),
    }
  return out


def _gaps(plane, top=12, min_ns=3000):
  """Where the GPU idles: ``span_us`` (first kernel start to last end), and the idle gaps of at least
  ``min_ns`` between one kernel's end and the next start on any stream, summed by the kernels around them."""
  evs = sorted((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name[:60]) for line in plane.lines
               for ev in line.events if ev.duration_ns > 0)
  if not evs:
    return {}
  by_pair = collections.defaultdict(lambda: [0.0, 0])
  end, last = evs[0][1], evs[0][2]
  for s, e, name in evs[1:]:
    if s - end >= min_ns:
      rec = by_pair[f"{last} -> {name}"]
      rec[0] += s - end
      rec[1] += 1
    if e > end:
      end, last = e, name
  ranked = sorted(by_pair.items(), key=lambda kv: -kv[1][0])
  return {"span_us": (max(e for _, e, _ in evs) - evs[0][0]) / 1e3,
          "idle_gaps_us": round(sum(t for t, _ in by_pair.values()) / 1e3, 1),
          "top_gaps": [(pair, round(t / 1e3, 1), c) for pair, (t, c) in ranked[:top]]}


def profile(call, n=3, out_dir=None, block_each=True):
  """Runs ``call(i)`` (returns what to block on) ``n`` times under the profiler; times are totals.
  ``block_each=False``: the calls back to back (as a training loop), blocking once after the last."""
  out_dir = out_dir or tempfile.mkdtemp()
  jax.block_until_ready(call(0))
  with jax.profiler.trace(out_dir):
    outs = []
    for i in range(n):
      outs.append(call(i + 1))
      if block_each:
        jax.block_until_ready(outs.pop())
    jax.block_until_ready(outs)
  paths = sorted(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True))
  return summarize_trace(paths[-1]) if paths else {"error": f"no trace under {out_dir}"}
