"""Throughput of the train step and of sampling on synthetic data, printed and written as JSON.

    python -m ddpm_jax.benchmark --config=configs/cifar10.py --out=bench.json
    JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python -m ddpm_jax.benchmark --config=configs/cifar10.py
    python -m ddpm_jax.benchmark --config=configs/tiny.py --sample_batch=16 --large_batch=64  # CPU smoke
    python -m ddpm_jax.benchmark --config=configs/cifar10.py --skip=sample,large --profile_dir=/tmp/prof

What it measures is described in `ddpm_jax.benchmarking`, which does the work. Imports neither
TensorFlow nor tfds.
"""
from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli, validation

SKIPPABLE = ("train", "parts", "sample", "large")


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, lock_config=True)
    flags.DEFINE_string("out", "", "Write the results here as JSON.", flag_values=fv)
    flags.DEFINE_integer("train_calls", 100, "Timed train-step calls (each runs training.steps_per_call steps).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("sample_batch", 256, "Images for the sampling-time measurement.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("sample_steps", 0, "Reverse steps (0: diffusion.num_timesteps).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("large_batch", 2048, "Batch for the sampling images/s measurement (0: skip).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("large_steps", 100, "Reverse steps timed at the large batch (images/s is scaled to "
                         "sample_steps).", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: look up the device kind).",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("peak_tbps", 0.0, "Memory bandwidth per device, TB/s, for the roofline (0: look up).",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_list("skip", [], f"Parts to skip, comma-separated: any of {', '.join(SKIPPABLE)}.",
                      flag_values=fv)
    flags.register_validator("skip", lambda parts: set(parts) <= set(SKIPPABLE),
                             f"--skip takes parts from {', '.join(SKIPPABLE)}.", flag_values=fv)
    flags.DEFINE_string("profile_dir", "", "Trace --profile_calls train calls here (perfetto_trace.json.gz too).",
                        flag_values=fv)
    flags.DEFINE_integer("profile_calls", 3, "Train calls in the trace.", lower_bound=1, flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.no_arguments(args)
    from ddpm_jax import benchmarking

    if fv.out:
        validation.check_output_file(fv.out, "--out")
    result = benchmarking.run_benchmark(
        fv.config, train_calls=fv.train_calls, sample_batch=fv.sample_batch, sample_steps=fv.sample_steps,
        large_batch=fv.large_batch, large_steps=fv.large_steps, peak=fv.peak_tflops, bandwidth=fv.peak_tbps,
        skip=fv.skip, profile_dir=fv.profile_dir, profile_calls=fv.profile_calls)
    text = json.dumps(result, indent=2)
    print(text)
    if fv.out:
        with open(fv.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    cli.run(define_flags, main)
