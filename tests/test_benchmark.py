"""The benchmark command runs without TensorFlow, tfds or clu, and its figures hang together."""
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import compare, kernel_sources, trace_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the real command line with the packages the GPU image lacks made unimportable.
_WITHOUT_TF = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None
from ddpm_jax import benchmark, cli
cli.run(benchmark.define_flags, benchmark.main, ["benchmark"] + sys.argv[1:])
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TF, "--config=configs/tiny.py", "--train_calls=2", "--sample_batch=6",
         "--sample_steps=3", "--large_batch=8", "--large_steps=2", "--peak_tflops=2", "--peak_tbps=0.5",
         f"--profile_dir={out / 'profile'}", "--profile_calls=2", f"--out={out / 'bench.json'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "bench.json") as f:
        return json.load(f), out


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_benchmark_reports_consistent_figures(result):
    res, _ = result
    assert res["num_devices"] == 2 and res["platform"] == "cpu"
    assert res["model"]["params"] == 702_499  # the tiny config's U-Net
    tr = res["train"]
    assert tr["batch"] == 16 and tr["timed_steps"] == 2
    assert tr["images_per_s"] == pytest.approx(16 / tr["step_s"])
    assert 0 < tr["dispatch_s"] < tr["step_s"]  # calls return before the step finishes
    calls = tr["dispatch_calls_s"]
    assert len(calls) == 2 and tr["dispatch_s"] == pytest.approx(np.median(calls), abs=1e-6)
    # The whole process's CPU time, XLA's threads included: on CPU they do the step's work.
    assert 0.3 * tr["step_s"] < tr["host_cpu_s"]
    # A train step (forward, backward, Adam) costs about 3 forward passes, summed over both devices.
    assert 2.5 < tr["flops_per_step"] / (16 * res["model"]["forward_flops_per_image"]) < 4.0
    assert tr["mfu"] == pytest.approx(tr["flops_per_step"] / tr["step_s"] / (2 * 2e12))
    floor = tr["roofline"]
    assert floor["compute_floor_s"] == pytest.approx(tr["flops_per_step"] / 2 / 2e12)
    assert floor["memory_floor_s"] == pytest.approx(tr["bytes_per_step"] / 2 / 0.5e12)
    assert res["parts"]["batch_per_device"] == 8
    assert 0 < res["parts"]["forward_s"] < res["parts"]["forward_backward_s"]
    sa, lg = res["sample"], res["sample_large_batch"]
    assert (sa["images"], sa["steps"], lg["images"], lg["steps"]) == (6, 3, 8, 2)
    assert lg["images_per_s_at_sample_steps"] == pytest.approx(lg["image_steps_per_s"] / 3)
    assert sa["mfu"] == pytest.approx(6 * 3 / sa["total_s"] * res["model"]["forward_flops_per_image"] / (2 * 2e12))
    text = compare.table(res, None, {"nodrop": res}, {})  # no peer: its columns are blank
    assert f"| train images/s (batch 16) | {tr['images_per_s']:,.0f} | - | - |" in text
    assert "floors per step: compute" in text
    assert f"process CPU {tr['host_cpu_s'] * 1e3:.2f} ms per call" in text
    assert (f"| nodrop | {tr['images_per_s']:,.0f} | {tr['step_s'] * 1e3:.2f} | {tr['dispatch_s'] * 1e3:.2f} | "
            f"{tr['compile_s']:.1f} | {sa['total_s']:.2f} |") in text


@pytest.mark.slow  # a minute of loops that XLA:CPU runs slowly
def test_flops_per_step_count_every_step_and_microbatch_of_a_call_also_where_it_loops(monkeypatch):
    """XLA's cost analysis counts a loop body once: where a call loops over steps and microbatches (off
    CPU), the FLOPs per step are still those of one plain step, as where they are unrolled (CPU)."""
    from configs import tiny
    from ddpm_jax import benchmarking, training

    config = tiny.get_config()
    config.data.image_size, config.model.ch, config.model.ch_mult, config.model.attn_resolutions = 8, 16, (1,), ()
    plain = benchmarking.bench_train(config, num_calls=1)
    config.training.steps_per_call, config.training.grad_accum_steps = 2, 2
    unrolled = benchmarking.bench_train(config, num_calls=1)
    monkeypatch.setattr(training, "unrolled_loops", lambda: False)
    looped = benchmarking.bench_train(config, num_calls=1)
    assert plain["flops_per_step"] > 0 and plain["bytes_per_step"] > 0
    # The microbatches add a gradient sum (4% here); the lowered step has 7% fewer FLOPs than the
    # compiled one here. Counting each loop body once would give a quarter.
    assert unrolled["flops_per_step"] == pytest.approx(plain["flops_per_step"], rel=0.1)
    assert looped["flops_per_step"] == pytest.approx(plain["flops_per_step"], rel=0.1)
    assert looped["bytes_per_step"] is None  # fusion decides them: unknown without compiling a plain step


def test_benchmark_of_a_folder_config_needs_no_folder():
    """The benchmark makes synthetic batches: a config training on a folder of images (celebahq256,
    data.data_dir unset) is measured as it is, while training it still asks for the folder."""
    from configs import celebahq256
    from ddpm_jax import benchmarking, validation
    config = celebahq256.get_config()
    res = benchmarking.run_benchmark(config, skip=("train", "parts", "sample", "large"))  # the checks alone
    assert res["model"]["params"] > 100_000_000 and res["model"]["image_size"] == 256
    with pytest.raises(validation.UserError, match="data.data_dir"):
        validation.validate_config(config, num_devices=8)


def test_benchmark_skips_the_forward_flop_count_without_sampling():
    from configs import tiny
    from ddpm_jax import benchmarking

    res = benchmarking.run_benchmark(tiny.get_config(), skip=("train", "parts", "sample", "large"))
    assert res["model"]["forward_flops_per_image"] is None and res["model"]["params"] == 702_499


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_benchmark_profile_holds_the_profiled_steps(result):
    _, out = result
    summary = trace_summary.summarize(trace_summary.load_events(str(out / "profile")))
    assert summary["steps"] == 2  # the host's step annotations; a CPU trace has no device lines
    assert summary["kernels"] == 0


def _event(pid, tid, name, ts, dur, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_summary_counts_overlapping_kernels_once(tmp_path):
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "Stream #8(Compute)"}},
            {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    events = meta + [
        _event(1, 1, "train", 0, 5), _event(1, 1, "train", 100, 5),
        _event(2, 7, "conv_kernel", 10, 30, hlo_op="convolution.3"),
        _event(2, 8, "loop_fusion_3", 30, 20, hlo_op="fusion.12"),  # overlaps the conv by 10
        _event(2, 7, "conv_kernel", 110, 30, hlo_op="convolution.4"),
        _event(2, 8, "loop_fusion_14", 150, 10, hlo_op="fusion.14"),
        _event(2, 9, "convolution.3", 10, 30),  # a summary line: must not be counted again
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary.summarize(trace_summary.load_events(str(tmp_path)))
    assert s["steps"] == 2 and s["kernels"] == 4
    assert s["busy_us_per_step"] == pytest.approx((40 + 30 + 10) / 2)  # [10, 50), [110, 140), [150, 160)
    assert s["span_us_per_step"] == pytest.approx(150 / 2)
    assert s["idle_share"] == pytest.approx(1 - 80 / 150)
    assert [(k["name"], k["total_us"], k["calls_per_step"]) for k in s["top_kernels"]] == [
        ("conv_kernel", 60, 1.0), ("loop_fusion_3", 20, 0.5), ("loop_fusion_14", 10, 0.5)]
    assert [(k["name"], k["total_us"]) for k in s["top_families"]] == [("conv_kernel", 60), ("loop_fusion", 30)]
    assert [(k["name"], k["share"]) for k in s["top_op_kinds"]] == [("convolution", 2 / 3), ("fusion", 1 / 3)]
    text = trace_summary.format_summary(s)
    assert "2 steps: device busy 0.04 ms per step" in text and "| loop_fusion | 0.015 | 1 | 33.3% |" in text


def test_kernel_sources_traces_each_kernel_to_its_model_part():
    ops = {"loop_add_fusion.10": "jit(_fun)/transpose(jvp(UNet))/up_1_block_0/norm2/GroupNorm_0/add",
           "cudnn-conv.3": "jit(_fun)/jvp(UNet)/down_0_block_1/conv1/conv_general_dilated",
           "concatenate.4": "jit(_fun)/jvp(UNet)/concatenate", "fusion.2": "jit(_fun)/mul"}
    hlo = "ENTRY %main {\n" + "\n".join(
        f'  {"ROOT " if name == "fusion.2" else ""}%{name} = f32[8]{{0}} fusion(%p), kind=kLoop, calls=%f, '
        f'metadata={{op_name="{op}" stack_frame_id=3}}' for name, op in ops.items()) + "\n}"
    names = kernel_sources.op_names(hlo)
    assert set(names) == {"loop_add_fusion.10", "cudnn-conv.3", "concatenate.4", "fusion.2"}
    meta = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}}]
    events = meta + [
        _event(1, 1, "train", 0, 5), _event(1, 1, "train", 100, 5),
        # inside a command buffer the kernel's own name tells its fusion
        _event(2, 7, "loop_add_fusion_10", 10, 30, hlo_op="command_buffer.1"),
        _event(2, 7, "sm90_xmma_fprop_implicit_gemm", 40, 20, hlo_op="cudnn-conv.3"),
        _event(2, 7, "wrapped_concatenate", 60, 4, hlo_op="concatenate.4"),
        _event(2, 7, "loop_multiply_fusion", 70, 6, hlo_op="fusion.2"),
        _event(2, 7, "memcpy128", 80, 2, hlo_op="command_buffer.1"),
    ]
    steps, rows = kernel_sources.attribute(events, names)
    assert steps == 2
    assert [(src, us) for src, us, _ in rows] == [
        (("backward", "up 1", "block/norm2"), 30), (("forward", "down 0", "block/conv1"), 20),
        (("forward", "top", "concatenate (concatenate)"), 4), (("outside", "-", "mul"), 6),
        (("unmatched", "-", "memcpy128"), 2)]
    text = kernel_sources.table(rows, lambda s, i: s[0], steps, "phase", 10)
    assert "| backward | 0.015 | 0.5 | 48.4% |" in text


@pytest.mark.slow  # a minute and a half each: the GPU scripts at toy sizes
@pytest.mark.parametrize("script", ["run_gpu.sh", "gpu_levers.sh"])
def test_gpu_script_runs_end_to_end_at_toy_sizes(tmp_path, script):
    """Device time is scarce: the prepared scripts are checked here (SMOKE=1: the tiny config on CPU,
    without torch the peer is skipped) before a GPU session spends its minutes on them."""
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), WORK=str(tmp_path / "work"), JAX_PLATFORMS="cpu")
    r = subprocess.run(["bash", f"benchmarks/{script}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "| train images/s (batch 16) |" in table, table  # ddpm_jax's own figures
    variant = {"run_gpu.sh": "rbg", "gpu_levers.sh": "spc5"}[script]  # the first of each script's SMOKE variants
    assert f"| {variant} |" in table, table
    log = next(p for p in tmp_path.iterdir() if p.suffix == ".log").read_text()
    failed = [line for line in re.findall(r"^[\w ]+ failed$", log, re.M) if line != "peer failed"]  # the scripts' marks
    assert not failed, log[-3000:]
