"""Where a profiled run's device time goes: kernels ranked by total time, from a JAX perfetto trace.

  python -m ddpm_jax.benchmark --config=configs/cifar10.py --skip=parts,sample,large --profile_dir=DIR
  python benchmarks/trace_summary.py DIR [--top 25] [--json summary.json]

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(..., create_perfetto_trace=True)` writes
(the newest one under DIR). Device work is on the threads of '/device:*' processes: GPU kernels on
'Stream' threads, TPU ops on 'XLA Ops' (other device threads summarise these and would count them
twice). Steps are the host's 'train' step annotations. A CPU trace has no device process.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def load_events(path: str) -> list[dict]:
    """The trace events of `path` (a perfetto_trace.json.gz, or a folder holding one)."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True),
                       key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"{path}: no perfetto_trace.json.gz under it; write one with "
                                    "`python -m ddpm_jax.benchmark --profile_dir={path}`.")
        path = found[-1]
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _names(events, kind: str) -> dict:
    return {(e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]: e["args"]["name"]
            for e in events if e.get("ph") == "M" and e.get("name") == kind}


def device_kernels(events: list[dict]) -> list[dict]:
    """The complete ('X') events of the device lines that hold kernels (see the module docstring)."""
    processes, threads = _names(events, "process_name"), _names(events, "thread_name")
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
    on_device = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]
    for prefix in ("Stream", "XLA Ops"):
        chosen = [e for e in on_device if threads.get((e["pid"], e.get("tid")), "").startswith(prefix)]
        if chosen:
            return chosen
    return on_device


def union_length(intervals) -> float:
    """Total length covered by `(start, end)` intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _op_kind(event: dict) -> str:
    """The HLO op behind a kernel without its number ('fusion.12' -> 'fusion'), else the kernel name."""
    op = (event.get("args") or {}).get("hlo_op")
    return re.sub(r"[._]\d+$", "", op) if op else event["name"]


def _family(event: dict) -> str:
    """A kernel's name without its number ('loop_add_fusion_10' -> 'loop_add_fusion': XLA names a
    fusion for its root op) and, for library kernels, without their tile shapes ('sm90_xmma_fprop')."""
    name = re.sub(r"_\d+$", "", event["name"])
    return "_".join(name.split("_")[:3]) if name.startswith(("sm90_", "sm80_", "cudnn_", "nvjet_")) else name


def summarize(events: list[dict], top: int = 25) -> dict:
    """Device busy time and span per step, and the `top` kernels, kernel families (`_family`) and
    HLO op kinds by total time (us)."""
    kernels = device_kernels(events)
    steps = max(1, sum(1 for e in events if e.get("ph") == "X" and e.get("name") == "train"))
    if not kernels:
        return dict(steps=steps, kernels=0)
    busy = union_length((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)

    def ranked(key):
        total, count = collections.Counter(), collections.Counter()
        for e in kernels:
            total[key(e)] += e["dur"]
            count[key(e)] += 1
        return [dict(name=n, total_us=t, per_step_us=t / steps, calls_per_step=count[n] / steps,
                     share=t / sum(total.values())) for n, t in total.most_common(top)]

    return dict(steps=steps, kernels=len(kernels), busy_us_per_step=busy / steps, span_us_per_step=span / steps,
                idle_share=1.0 - busy / span if span else 0.0, top_kernels=ranked(lambda e: e["name"]),
                top_families=ranked(_family), top_op_kinds=ranked(_op_kind))


def format_summary(s: dict) -> str:
    if not s["kernels"]:
        return "No device kernels in this trace (a CPU run has no device process)."
    lines = [f"{s['steps']} steps: device busy {s['busy_us_per_step'] / 1e3:.2f} ms per step of a "
             f"{s['span_us_per_step'] / 1e3:.2f} ms span ({s['idle_share']:.1%} idle), {s['kernels']} kernels"]
    for title, rows in (("kernel", s["top_kernels"]), ("kernel family", s["top_families"]),
                        ("HLO op kind", s["top_op_kinds"])):
        lines += ["", f"| {title} | ms/step | calls/step | share |", "|---|---|---|---|"]
        lines += [f"| {r['name'][:90]} | {r['per_step_us'] / 1e3:.3f} | {r['calls_per_step']:g} | {r['share']:.1%} |"
                  for r in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a profile folder or a perfetto_trace.json.gz")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default="", help="also write the summary here")
    args = p.parse_args()
    summary = summarize(load_events(args.path), args.top)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
