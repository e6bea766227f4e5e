"""Where a traced stretch of device time went: busy, idle gaps, per compiled module.

    with jax.profiler.trace("/tmp/trace"):
      ...  # e.g. two federated rounds
    print(summarize("/tmp/trace"))

Reads the newest `*.xplane.pb` under the trace folder with
`jax.profiler.ProfileData`, takes the accelerator planes (`/device:GPU:0`,
TPU) and reports, over the span from their first kernel to their last:
the fraction with a kernel running (the union of the stream lines' kernel
intervals), the idle gaps of at least 1 ms (count and total: the device
waiting on the host), and the device time per compiled module (the "XLA
Modules" line: which of the round's functions the time went to). A CPU
trace has no such plane and says so.
"""
from __future__ import annotations

import collections
import glob
import os

GAP_NS = 1e6  # idle stretches of at least 1 ms are counted as waits on the host


def union_ns(intervals) -> float:
  """Total length of the union of `(start, end)` intervals (ns)."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def gaps_ns(intervals, at_least: float = GAP_NS) -> list[float]:
  """Idle stretches between the merged intervals that last `at_least` ns or more."""
  out, end = [], None
  for s, e in sorted(intervals):
    if end is not None and s - end >= at_least:
      out.append(s - end)
    end = e if end is None else max(end, e)
  return out


def device_time(planes) -> dict | None:
  """{span_ms, busy, gaps, gap_ms, modules: {name: ms}} of the accelerator
  planes (objects with `.name`, `.lines`; lines with `.name`, `.events`;
  events with `.name`, `.start_ns`, `.end_ns`), or None without one."""
  kernels, modules = [], collections.Counter()
  for plane in planes:
    if not plane.name.startswith("/device:") or "CPU" in plane.name:
      continue
    for line in plane.lines:
      if line.name == "XLA Modules":
        for e in line.events:
          modules[e.name] += (e.end_ns - e.start_ns) / 1e6
      elif line.name.startswith("Stream"):
        kernels += [(e.start_ns, e.end_ns) for e in line.events]
  if not kernels:
    return None
  span = max(e for _, e in kernels) - min(s for s, _ in kernels)
  gaps = gaps_ns(kernels)
  return {"span_ms": span / 1e6, "busy": union_ns(kernels) / span if span else 1.0,
          "gaps": len(gaps), "gap_ms": sum(gaps) / 1e6, "modules": dict(modules)}


def summarize(trace_dir: str, top: int = 8) -> str:
  """Markdown lines of `device_time` for the newest trace under `trace_dir`."""
  import jax
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return f"no trace under {trace_dir}"
  t = device_time(jax.profiler.ProfileData.from_file(files[-1]).planes)
  if t is None:
    return "the trace has no accelerator plane (a CPU run): nothing to summarise"
  lines = [f"device busy {100 * t['busy']:.1f}% of {t['span_ms']:.0f} ms (first kernel to "
           f"last); {t['gaps']} idle gaps of >= 1 ms, {t['gap_ms']:.0f} ms in all",
           "", "| compiled module | device ms |", "|---|---|"]
  for name, ms in sorted(t["modules"].items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"| {name} | {ms:.1f} |")
  return "\n".join(lines)
