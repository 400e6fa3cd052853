"""Side-by-side table of a run of benchmarks/run_gpu.sh: ddpm_jax against the PyTorch peer.

  python benchmarks/compare.py OUT_DIR

Reads ddpm_jax.json, and where present ddpm_jax_cached.json, ddpm_jax_variant_*.json and peer.jsonl.
"""
import glob
import json
import os
import sys


def _read(path):
    with open(path) as f:
        return json.load(f)


def load(out_dir):
    ours = _read(os.path.join(out_dir, "ddpm_jax.json"))
    cached_path = os.path.join(out_dir, "ddpm_jax_cached.json")
    cached = _read(cached_path) if os.path.exists(cached_path) else None
    variants = {os.path.basename(p)[len("ddpm_jax_variant_"):-len(".json")]: _read(p)
                for p in sorted(glob.glob(os.path.join(out_dir, "ddpm_jax_variant_*.json")))}
    peer = {}
    if os.path.exists(os.path.join(out_dir, "peer.jsonl")):
        with open(os.path.join(out_dir, "peer.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                peer[rec["what"]] = rec
    return ours, cached, variants, peer


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(ours, cached, variants, peer) -> str:
    tr, sa = ours.get("train", {}), ours.get("sample", {})
    ptr, psa = peer.get("train", {}), peer.get("sample", {})
    same_train = ptr.get("batch", tr.get("batch")) == tr.get("batch")
    same_sample = ((psa.get("n", sa.get("images")), psa.get("steps", sa.get("steps")))
                   == (sa.get("images"), sa.get("steps")))
    lines = [f"device: {ours['device']} x{ours['num_devices']}; versions: {ours['versions']}; "
             f"peer: torch {ptr.get('torch') or psa.get('torch')}", "",
             "| | ddpm_jax | PyTorch peer | ratio |", "|---|---|---|---|",
             f"| train images/s (batch {tr.get('batch')}" + ("" if same_train else f"; peer {ptr['batch']}")
             + f") | {_fmt(tr.get('images_per_s'), ',.0f')} | {_fmt(ptr.get('images_per_s'), ',.0f')} | "
             f"{_ratio(tr.get('images_per_s'), ptr.get('images_per_s'))} |",
             f"| {sa.get('images')} samples x {sa.get('steps')} steps"
             + ("" if same_sample else f" (peer {psa['n']} x {psa['steps']}: no ratio)")
             + f", s | {_fmt(sa.get('total_s'), '.2f')} | {_fmt(psa.get('total_s'), '.2f')} | "
             f"{_ratio(psa.get('total_s'), sa.get('total_s')) if same_sample else '-'} |", ""]
    for what, rec in (("train", ptr), ("sample", psa)):
        if rec.get("error"):
            lines.append(f"peer {what} failed: {rec['error']}")
    if tr:
        lines.append(f"train step {tr['step_s'] * 1e3:.2f} ms"
                     + (f" (host dispatch {tr['dispatch_s'] * 1e3:.2f} ms per call" if "dispatch_s" in tr else "")
                     + (f", process CPU {tr['host_cpu_s'] * 1e3:.2f} ms per call" if "host_cpu_s" in tr else "")
                     + (")" if "dispatch_s" in tr else "")
                     + f", compile {tr['compile_s']:.1f} s"
                     + (f" (second launch with the cache: {cached['train']['compile_s']:.1f} s)" if cached else "")
                     + (f", MFU {tr['mfu']:.1%} of {ours['peak_tflops_per_device']} TFLOP/s" if tr.get("mfu") else ""))
    if "roofline" in tr:
        r = tr["roofline"]
        lines.append(f"floors per step: compute {r['compute_floor_s'] * 1e3:.2f} ms at "
                     f"{ours['peak_tflops_per_device']} TFLOP/s, memory {r['memory_floor_s'] * 1e3:.2f} ms at "
                     f"{ours['peak_tbps_per_device']} TB/s (XLA's {tr['bytes_per_step'] / 1e9:.1f} GB per step)")
    if "parts" in ours:
        p = ours["parts"]
        lines.append(f"at {p['batch_per_device']} images per device: forward {p['forward_s'] * 1e3:.2f} ms, "
                     f"forward+backward {p['forward_backward_s'] * 1e3:.2f} ms"
                     + (f"; step - forward+backward = {(tr['step_s'] - p['forward_backward_s']) * 1e3:.2f} ms "
                        "(Adam, EMA, noise, cross-device mean; timing noise when near 0)" if tr else ""))
    if "sample_large_batch" in ours:
        lg = ours["sample_large_batch"]
        lines.append(f"sampling at batch {lg['images']}: {lg['image_steps_per_s']:,.0f} image-steps/s = "
                     f"{lg['images_per_s_at_sample_steps']:.1f} images/s at {sa.get('steps')} steps"
                     + (f"; MFU {lg['mfu']:.1%} (batch {sa['images']}: {sa['mfu']:.1%})"
                        if "mfu" in lg and "mfu" in sa else ""))
    if ours.get("peak_memory_bytes"):
        lines.append(f"peak device memory {ours['peak_memory_bytes'] / 2**30:.1f} GiB")
    if variants:
        lines += ["", "| variant | train images/s | step ms | host dispatch ms per call | compile s | sampling s |",
                  "|---|---|---|---|---|---|", _variant_row("baseline", ours)]
        lines += [_variant_row(name, v) for name, v in variants.items()]
    return "\n".join(lines)


def _variant_row(name, result):
    tr = result.get("train", {})
    ms = lambda key: tr[key] * 1e3 if key in tr else None
    return (f"| {name} | {_fmt(tr.get('images_per_s'), ',.0f')} | {_fmt(ms('step_s'), '.2f')} | "
            f"{_fmt(ms('dispatch_s'), '.2f')} | {_fmt(tr.get('compile_s'), '.1f')} | "
            f"{_fmt(result.get('sample', {}).get('total_s'), '.2f')} |")


if __name__ == "__main__":
    print(table(*load(sys.argv[1])))
