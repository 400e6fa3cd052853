"""Where a profiled train step's device time goes, by the part of the model each kernel comes from.

  XLA_FLAGS="--xla_dump_to=HLO --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit__fun" \
    python -m ddpm_jax.benchmark --config=configs/cifar10.py --skip=parts,sample,large --profile_dir=DIR
  python benchmarks/kernel_sources.py DIR HLO/module_*.jit__fun.*after_optimizations.txt [--top 30]

(`benchmarks/gpu_levers.sh` does both for its baseline.) Each kernel of the trace is matched to the
HLO instruction it runs (its `hlo_op`, or for kernels inside a command buffer the kernel's own name,
which XLA takes from its fusion: 'loop_add_fusion_10' runs 'loop_add_fusion.10'; identical fusions
share one kernel, so such time goes to the first of them). The instruction's `op_name` metadata says
where it comes from: 'jvp(UNet)/up_1_block_0/norm2/...' is the forward pass of the norm2 of that
block, 'transpose(jvp(UNet))/...' its backward pass; what is outside the U-Net (Adam, EMA, clipping,
the non-finite guard, the noise) is grouped by its primitive.
"""
from __future__ import annotations

import argparse
import collections
import re

try:
    from benchmarks.trace_summary import device_kernels, load_events
except ImportError:  # run as `python benchmarks/kernel_sources.py`
    from trace_summary import device_kernels, load_events

INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')
LEVEL = re.compile(r"^(down|up)_(\d+)_|^(mid)_")


def op_names(hlo_text: str) -> dict:
    """Instruction name -> its op_name metadata, for every instruction of an HLO text dump."""
    found = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            found.setdefault(m.group(1), m.group(2))
    return found


def source(op_name: str) -> tuple[str, str, str]:
    """(phase, level, part) of an op_name: phase forward | backward | outside the U-Net."""
    if "jvp(UNet)" not in op_name:
        return "outside", "-", re.sub(r"\[\d+\]", "", op_name.rsplit("/", 1)[-1])
    phase = "backward" if "transpose(jvp(UNet))" in op_name else "forward"
    path = op_name.split("jvp(UNet)", 1)[1].strip(")/").split("/")
    block = path[0] if len(path) > 1 else ""
    m = LEVEL.match(block)
    level = (f"{m.group(1)} {m.group(2)}" if m.group(1) else "mid") if m else block or "top"
    modules = [p for p in path[1:-1] if not p.startswith(("GroupNorm_", "Dense_", "Conv_"))]
    kind = re.sub(r"_\d+$", "", re.sub(r"^(down|up)_\d+_|^mid_", "", block))  # block, attn, downsample...
    part = "/".join([kind] + modules[:1]) if modules else f"{kind or path[0]} ({path[-1]})"
    return phase, level, part


def kernel_instruction(event: dict, names: dict) -> str | None:
    """The HLO instruction a kernel event runs, or None when it cannot be told."""
    op = (event.get("args") or {}).get("hlo_op", "")
    if op in names and not op.startswith("command_buffer"):
        return op
    name = re.sub(r"_(\d+)$", r".\1", event["name"])
    return name if name in names else (event["name"] if event["name"] in names else None)


def attribute(events: list[dict], names: dict) -> tuple[int, list[tuple[tuple, float, str]]]:
    """(steps, [(source, us, instruction)]) for every device kernel of the trace."""
    steps = max(1, sum(1 for e in events if e.get("ph") == "X" and e.get("name") == "train"))
    # A CPU trace has no device process: its XLA ops run as host events that name their instruction.
    kernels = device_kernels(events) or [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
    rows = []
    for e in kernels:
        inst = kernel_instruction(e, names)
        src = source(names[inst]) if inst else ("unmatched", "-", e["name"][:60])
        rows.append((src, e["dur"], inst or e["name"]))
    return steps, rows


def table(rows, key, steps: int, title: str, top: int) -> list[str]:
    total, count = collections.Counter(), collections.Counter()
    for src, us, inst in rows:
        total[key(src, inst)] += us
        count[key(src, inst)] += 1
    whole = sum(total.values())
    out = ["", f"| {title} | ms/step | kernels/step | share |", "|---|---|---|---|"]
    out += [f"| {name} | {us / steps / 1e3:.3f} | {count[name] / steps:g} | {us / whole:.1%} |"
            for name, us in total.most_common(top)]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", help="a profile folder or a perfetto_trace.json.gz")
    p.add_argument("hlo", nargs="+", help="the train step's *after_optimizations.txt (others after it)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    names = {}
    for path in reversed(args.hlo):  # names in the first file win
        with open(path) as f:
            names.update(op_names(f.read()))
    steps, rows = attribute(load_events(args.profile), names)
    matched = sum(us for src, us, _ in rows if src[0] != "unmatched") / max(1e-9, sum(us for _, us, _ in rows))
    lines = [f"{steps} steps, {len(rows) / steps:.0f} kernels per step, {matched:.1%} of the kernel time "
             f"matched to an HLO instruction"]
    lines += table(rows, lambda s, i: s[0], steps, "phase", args.top)
    lines += table(rows, lambda s, i: f"{s[0]}: {s[2]}", steps, "phase: part", args.top)
    lines += table(rows, lambda s, i: f"{s[0]}: {s[1]}", steps, "phase: level", args.top)
    lines += table(rows, lambda s, i: f"{i} ({s[0]}: {s[1]} {s[2]})", steps, "instruction", args.top)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
