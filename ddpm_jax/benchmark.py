r"""Throughput of the train step and of sampling on synthetic data, printed and written as JSON.

Measures, on all local devices: train images/s and step time, model FLOPs utilisation against a
stated or given peak, compile time (a second launch with a persistent compilation cache shows the
saving), sampling time for a batch (default 256 x T steps) and images/s at a large batch, peak
device memory, device and versions. Imports neither TensorFlow nor tfds.

  python -m ddpm_jax.benchmark --config=configs/cifar10.py --out=bench.json
  JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python -m ddpm_jax.benchmark --config=configs/cifar10.py
  python -m ddpm_jax.benchmark --config=configs/tiny.py --sample_batch=16 --large_batch=64  # CPU smoke
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import diffusion, parallel, sampling, train, train_state
from ddpm_jax.config_validation import validate_config
from ddpm_jax.models import unet_from_config

# Dense bf16 matrix peak per chip, TFLOP/s, from the vendors' data sheets. The brief's measured
# figure for an H200 is ~790; pass --peak_tflops to use a measured peak instead.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_string("out", "", "Write the results here as JSON.")
flags.DEFINE_integer("train_calls", 20, "Timed train-step calls (each runs training.steps_per_call steps).")
flags.DEFINE_integer("sample_batch", 256, "Images for the sampling-time measurement.")
flags.DEFINE_integer("sample_steps", 0, "Reverse steps (0: diffusion.num_timesteps).")
flags.DEFINE_integer("large_batch", 2048, "Batch for the sampling images/s measurement (0: skip).")
flags.DEFINE_integer("large_steps", 100, "Reverse steps timed at the large batch (images/s is scaled to sample_steps).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: look up the device kind).")
flags.DEFINE_list("skip", [], "Parts to skip: train, sample, large.")


def _seconds(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def _flops(compiled) -> float | None:
    """FLOPs of one run of a compiled program (per device for pmap), from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports costs
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


def peak_memory_bytes() -> int | None:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    return max(peaks) if peaks else None


def forward_flops_per_image(config) -> float | None:
    """XLA's FLOP count of one U-Net forward pass on one image."""
    d = config.data
    model = unet_from_config(config)
    params = jax.eval_shape(lambda: train_state.init_params(config, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((1, d.image_size, d.image_size, d.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if config.model.num_classes else None
    return _flops(jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)).lower(params, x, t, y).compile())


def synthetic_batch(config, rng: np.random.Generator) -> dict:
    """A device-ready batch `[D, (k,) B_dev, ...]` of uniform images in [-1, 1] and labels."""
    d, t = config.data, config.training
    n_dev = jax.local_device_count()
    lead = (n_dev,) + ((t.steps_per_call,) if t.steps_per_call > 1 else ()) + (t.batch_size // n_dev,)
    batch = {"image": rng.uniform(-1, 1, lead + (d.image_size, d.image_size, d.channels)).astype(np.float32),
             "label": rng.integers(0, max(config.model.num_classes, 1), lead).astype(np.int32)}
    return jax.device_put(batch, parallel.device_sharding())


def bench_train(config, num_calls: int) -> dict:
    k, batch_size = config.training.steps_per_call, config.training.batch_size
    state = parallel.replicate(jax.jit(functools.partial(train.create_train_state, config))(jax.random.key(0)))
    batch = synthetic_batch(config, np.random.default_rng(0))
    p_train = train.pmap_train_step(config)
    lowered, lower_s = _seconds(lambda: p_train.lower(state, batch))
    compiled, compile_s = _seconds(lowered.compile)
    for _ in range(2):  # warm-up: first-run allocations, autotuning
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(num_calls):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    steps = num_calls * k
    flops = _flops(compiled)
    return dict(batch=batch_size, steps_per_call=k, timed_steps=steps, step_s=elapsed / steps,
                images_per_s=steps * batch_size / elapsed, lower_s=lower_s, compile_s=compile_s,
                flops_per_step=None if flops is None else flops * jax.local_device_count() / k,
                final_loss=float(parallel.to_host(metrics)["loss"]))


def bench_sample(config, num_images: int, num_steps: int) -> dict:
    """Time of one pmapped `lax.scan` ancestral run of `num_steps` steps over `num_images` images."""
    n_dev = jax.local_device_count()
    per_dev = -(-num_images // n_dev)
    d, c = config.data, config.diffusion
    model = unet_from_config(config)
    s = diffusion.schedule_from_config(c, num_steps)
    spec = sampling.SampleSpec(opts=sampling.StepOptions(variance=c.variance, clip_x0=c.clip_x0))
    shard = functools.partial(sampling.sample_shard, model, s, c.model_output, spec,
                              (d.image_size, d.image_size, d.channels))
    run = jax.pmap(lambda p, key, b: shard(p, jax.random.fold_in(key, jax.lax.axis_index("d")), b), "d",
                   in_axes=(0, None, 0))
    params = parallel.replicate(jax.jit(functools.partial(train_state.init_params, config))(jax.random.key(0)))
    labels = jax.device_put(np.zeros((n_dev, per_dev), np.int32), parallel.device_sharding())
    args = (params, jax.random.key(1), {"labels": labels})
    compiled, compile_s = _seconds(lambda: run.lower(*args).compile())
    jax.block_until_ready(compiled(*args))
    _, total_s = _seconds(lambda: compiled(*args))
    images = per_dev * n_dev
    return dict(images=images, steps=len(s.betas), total_s=total_s, compile_s=compile_s,
                images_per_s=images / total_s, image_steps_per_s=images * len(s.betas) / total_s)


def run_benchmark(config, *, train_calls=20, sample_batch=256, sample_steps=0, large_batch=2048,
                  large_steps=100, peak=0.0, skip=()) -> dict:
    """All measurements as one dict (see the module docstring)."""
    validate_config(config, jax.local_device_count())
    device = jax.local_devices()[0]
    sample_steps = sample_steps or config.diffusion.num_timesteps
    peak = peak or peak_tflops(device)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device.device_kind, platform=device.platform, num_devices=jax.local_device_count(),
        versions={name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
        | {"python": platform.python_version()},
        compilation_cache_dir=jax.config.jax_compilation_cache_dir,
        model=dict(dtype=config.model.dtype, ch=config.model.ch, ch_mult=list(config.model.ch_mult),
                   image_size=config.data.image_size,
                   params=int(sum(p.size for p in jax.tree.leaves(
                       jax.eval_shape(lambda: train_state.init_params(config, jax.random.key(0)))))),
                   forward_flops_per_image=forward_flops_per_image(config)),
        peak_tflops_per_device=peak)
    if "train" not in skip:
        r = bench_train(config, train_calls)
        if r["flops_per_step"] and peak:
            r["mfu"] = r["flops_per_step"] / r["step_s"] / (peak * 1e12 * jax.local_device_count())
        result["train"] = r
        logging.info("train: %s", r)
    if "sample" not in skip:
        result["sample"] = bench_sample(config, sample_batch, sample_steps)
        logging.info("sample: %s", result["sample"])
    if large_batch and "large" not in skip:
        r = bench_sample(config, large_batch, large_steps)
        r["images_per_s_at_sample_steps"] = r["image_steps_per_s"] / sample_steps
        result["sample_large_batch"] = r
        logging.info("large batch: %s", r)
    result["peak_memory_bytes"] = peak_memory_bytes()
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    result = run_benchmark(_CONFIG.value, train_calls=f.train_calls, sample_batch=f.sample_batch,
                           sample_steps=f.sample_steps, large_batch=f.large_batch,
                           large_steps=f.large_steps, peak=f.peak_tflops, skip=f.skip)
    text = json.dumps(result, indent=2)
    print(text)
    if f.out:
        with open(f.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
