"""Side-by-side table of a run of benchmarks/run_gpu.sh: ddpm_jax against the PyTorch peer.

  python benchmarks/compare.py OUT_DIR   (reads ddpm_jax.json, ddpm_jax_cached.json, peer.jsonl)
"""
import json
import os
import sys


def load(out_dir):
    with open(os.path.join(out_dir, "ddpm_jax.json")) as f:
        ours = json.load(f)
    cached = None
    if os.path.exists(os.path.join(out_dir, "ddpm_jax_cached.json")):
        with open(os.path.join(out_dir, "ddpm_jax_cached.json")) as f:
            cached = json.load(f)
    peer = {}
    if os.path.exists(os.path.join(out_dir, "peer.jsonl")):
        with open(os.path.join(out_dir, "peer.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                peer[rec["what"]] = rec
    return ours, cached, peer


def table(ours, cached, peer) -> str:
    tr, sa = ours.get("train", {}), ours.get("sample", {})
    ptr, psa = peer.get("train", {}), peer.get("sample", {})
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
    rows = [
        "| | ddpm_jax | PyTorch peer | ratio |",
        "|---|---|---|---|",
        f"| train images/s (batch {tr.get('batch')}) | {fmt(tr.get('images_per_s'), ',.0f')} | "
        f"{fmt(ptr.get('images_per_s'), ',.0f')} | {ratio(tr.get('images_per_s'), ptr.get('images_per_s'))} |",
        f"| {sa.get('images')} samples x {sa.get('steps')} steps, s | {fmt(sa.get('total_s'), '.2f')} | "
        f"{fmt(psa.get('total_s'), '.2f')} | {ratio(psa.get('total_s'), sa.get('total_s'))} |",
    ]
    lines = [f"device: {ours['device']} x{ours['num_devices']}; versions: {ours['versions']}; "
             f"peer: torch {ptr.get('torch') or psa.get('torch')}", "", *rows, ""]
    if tr:
        lines.append(f"train step {tr['step_s'] * 1e3:.2f} ms, compile {tr['compile_s']:.1f} s"
                     + (f" (second launch with the cache: {cached['train']['compile_s']:.1f} s)" if cached else "")
                     + (f", MFU {tr['mfu']:.1%} of {ours['peak_tflops_per_device']} TFLOP/s" if tr.get("mfu") else ""))
    if "sample_large_batch" in ours:
        lg = ours["sample_large_batch"]
        lines.append(f"sampling at batch {lg['images']}: {lg['image_steps_per_s']:,.0f} image-steps/s = "
                     f"{lg['images_per_s_at_sample_steps']:.1f} images/s at {sa.get('steps')} steps")
    if ours.get("peak_memory_bytes"):
        lines.append(f"peak device memory {ours['peak_memory_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*load(sys.argv[1])))
