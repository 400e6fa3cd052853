r"""Throughput of the train step and of sampling on synthetic data, printed and written as JSON.

Measures, on all local devices: train images/s and step time, model FLOPs utilisation against a
stated or given peak, compile time (a second launch with a persistent compilation cache shows the
saving), sampling time for a batch (default 256 x T steps) and images/s at a large batch, peak
device memory, device and versions. Imports neither TensorFlow nor tfds.

Where the time goes: the forward pass and forward+backward timed alone next to the whole step
(`parts`); the step's floor from XLA's own FLOP and byte counts over the chip's peak rate and memory
bandwidth (`roofline`); with --profile_dir, a trace of a few steps that
`benchmarks/trace_summary.py` turns into a table of device time by kernel.

`python -m ddpm_jax.benchmark` runs `run_benchmark`.
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ddpm_jax import generation, parallel, sampling, train_state, training
from ddpm_jax.models import unet_from_config
from ddpm_jax.validation import validate_config

# Per chip, from the vendors' data sheets: dense bf16 matrix peak (TFLOP/s) and memory bandwidth
# (TB/s). Measured on this workplace's H200: ~790 TFLOP/s and ~4.3 TB/s (copy, read + write); pass
# --peak_tflops / --peak_tbps to use measured figures. The first matching name wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
                    "TPU v6e": 918.0}
PEAK_HBM_TBPS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8, "A100": 2.0, "TPU v4": 1.2, "TPU v5 lite": 0.82,
                 "TPU v5e": 0.82, "TPU v5p": 2.76, "TPU v6 lite": 1.64, "TPU v6e": 1.64}

def _seconds(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def _cost(compiled, key: str = "flops") -> float | None:
    """XLA's count of `key` ('flops' or 'bytes accessed') for one run of a compiled or lowered program (per
    device for pmap), from its cost analysis; None where the backend reports none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports costs
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost[key]) if cost and key in cost else None


def _lookup(table: dict, device) -> float | None:
    kind = getattr(device, "device_kind", "").lower()
    return next((v for k, v in table.items() if k.lower() in kind), None)


def roofline(flops: float, bytes_accessed: float, tflops: float, tbps: float) -> dict:
    """Lower bounds on one device's time: its FLOPs at the peak rate, its bytes at full bandwidth."""
    return dict(compute_floor_s=flops / (tflops * 1e12), memory_floor_s=bytes_accessed / (tbps * 1e12),
                arithmetic_intensity=flops / bytes_accessed)


def peak_memory_bytes() -> int | None:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    return max(peaks) if peaks else None


def forward_flops_per_image(config: ConfigDict) -> float | None:
    """XLA's FLOP count of one U-Net forward pass on one image."""
    d = config.data
    model = unet_from_config(config)
    params = jax.eval_shape(lambda: train_state.init_params(config, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((1, d.image_size, d.image_size, d.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    cond = jax.eval_shape(lambda: train_state.example_cond(config, 1))
    return _cost(jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)).lower(params, x, t, cond).compile())


def synthetic_batch(config: ConfigDict, rng: np.random.Generator) -> dict:
    """A device-ready batch `[D, (k,) B_dev, ...]` of uniform images in [-1, 1], labels, and for
    text models full-length random byte tokens (or embeddings) with their mask."""
    d, t, m = config.data, config.training, config.model
    n_dev = jax.local_device_count()
    lead = (n_dev,) + ((t.steps_per_call,) if t.steps_per_call > 1 else ()) + (t.batch_size // n_dev,)
    batch = {"image": rng.uniform(-1, 1, lead + (d.image_size, d.image_size, d.channels)).astype(np.float32),
             "label": rng.integers(0, max(m.num_classes, 1), lead).astype(np.int32)}
    if m.text_encoder != "none":
        batch["mask"] = np.ones(lead + (d.max_text_len,), bool)
    if m.text_encoder == "trained":
        batch["tokens"] = rng.integers(1, 257, lead + (d.max_text_len,)).astype(np.int32)
    elif m.text_encoder == "precomputed":
        batch["text_emb"] = rng.normal(size=lead + (d.max_text_len, m.text_emb_dim)).astype(np.float32)
    return jax.device_put(batch, parallel.device_sharding())


def bench_train(config: ConfigDict, num_calls: int, profile_dir: str = "", profile_calls: int = 3) -> dict:
    """Times `num_calls` calls of the pmapped, donating train step on a fixed synthetic batch (a distilled
    run's: with its initial params as the teacher's, which costs the same)."""
    k, batch_size = config.training.steps_per_call, config.training.batch_size
    state = parallel.replicate(jax.jit(functools.partial(training.create_train_state, config))(jax.random.key(0)))
    batch = synthetic_batch(config, np.random.default_rng(0))
    teacher = (jax.tree.map(jnp.copy, state.ema_params),) if config.distill.teacher else ()  # state is donated
    p_train = training.pmap_train_step(config)
    lowered, lower_s = _seconds(lambda: p_train.lower(state, batch, *teacher))
    compiled, compile_s = _seconds(lowered.compile)
    for _ in range(2):  # warm-up: first-run allocations, autotuning
        state, metrics = compiled(state, batch, *teacher)
    jax.block_until_ready(metrics)
    dispatch = []  # host time to enqueue each call; near step_s means the host is the bottleneck
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_calls):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, *teacher)
        dispatch.append(time.perf_counter() - t0)
    jax.block_until_ready((state, metrics))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for i in range(profile_calls):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, metrics = compiled(state, batch, *teacher)
            jax.block_until_ready((state, metrics))
    steps = num_calls * k
    flops, bytes_accessed = _step_cost(config, compiled, state, batch, teacher)
    n_dev = jax.local_device_count()
    return dict(batch=batch_size, steps_per_call=k, timed_steps=steps, step_s=elapsed / steps,
                images_per_s=steps * batch_size / elapsed, dispatch_s=float(np.median(dispatch)),
                dispatch_calls_s=[round(d, 6) for d in dispatch],  # a slow start, or a steady cost?
                host_cpu_s=cpu / num_calls,
                lower_s=lower_s, compile_s=compile_s,
                flops_per_step=None if flops is None else flops * n_dev,
                bytes_per_step=None if bytes_accessed is None else bytes_accessed * n_dev,
                final_loss=float(parallel.to_host(metrics)["loss"]))


def _step_cost(config: ConfigDict, compiled, state, batch, teacher=()) -> tuple[float | None, float | None]:
    """(FLOPs, bytes accessed) of one train step on one device, from XLA's cost analysis of the
    compiled call. That analysis counts a loop's body once whatever its trip count (checked on
    XLA:CPU), so where the call loops over steps or microbatches (`training.unrolled_loops` is False)
    the FLOPs are those of one plain step as lowered, before XLA's passes (1-7% below the compiled
    count on CPU, tiny config), and the bytes, which fusion decides, are not known (None)."""
    t = config.training
    if training.unrolled_loops() or (t.steps_per_call == 1 and t.grad_accum_steps == 1):
        k = t.steps_per_call
        flops, bytes_accessed = _cost(compiled), _cost(compiled, "bytes accessed")
        return (None if flops is None else flops / k), (None if bytes_accessed is None else bytes_accessed / k)
    plain = config.copy_and_resolve_references()
    plain.training.steps_per_call = plain.training.grad_accum_steps = 1
    one_step = jax.tree.map(lambda x: x[:, 0], batch) if t.steps_per_call > 1 else batch
    return _cost(training.pmap_train_step(plain).lower(state, one_step, *teacher)), None


def _median_seconds(fn, args, calls: int) -> float:
    jax.block_until_ready(fn(*args))
    times = [_seconds(lambda: fn(*args))[1] for _ in range(calls)]
    return float(np.median(times))


def bench_parts(config: ConfigDict, num_calls: int) -> dict:
    """The U-Net's forward pass (as in sampling) and forward+backward (as in training, without the
    optimizer, EMA and cross-device mean) on one device at its share of the batch, median seconds."""
    model = unet_from_config(config)
    d = config.data
    n = config.training.batch_size // jax.local_device_count()
    rng = np.random.default_rng(0)
    params = jax.jit(functools.partial(train_state.init_params, config))(jax.random.key(0))
    x = jnp.asarray(rng.uniform(-1, 1, (n, d.image_size, d.image_size, d.channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, config.diffusion.num_timesteps, n), jnp.int32)
    cond = train_state.example_cond(config, n)

    def loss(p, x, t, c, key):
        return jnp.mean(jnp.square(model.apply({"params": p}, x, t, c, train=True, rngs={"dropout": key}) - x))

    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    backward = jax.jit(jax.value_and_grad(loss))
    return dict(batch_per_device=n,
                forward_s=_median_seconds(forward, (params, x, t, cond), num_calls),
                forward_backward_s=_median_seconds(backward, (params, x, t, cond, jax.random.key(1)), num_calls))


def bench_sample(config: ConfigDict, num_images: int, num_steps: int) -> dict:
    """Time of one run of the sampler `generation.run` uses (pmapped, one `lax.scan` of `num_steps`
    ancestral steps) over `num_images` images, split over the local devices."""
    n_dev = jax.local_device_count()
    per_dev = -(-num_images // n_dev)
    c = config.copy_and_resolve_references()
    c.sampling.sampler, c.sampling.steps, c.sampling.guidance = "ancestral", num_steps, 0.0
    spec = sampling.SampleSpec(opts=sampling.step_options(c))
    run = generation.pmapped_sampler(c, spec)
    params = jax.jit(functools.partial(train_state.init_params, config))(jax.random.key(0))
    cond = jax.tree.map(lambda x: x.reshape((n_dev, per_dev) + x.shape[1:]),
                        train_state.example_cond(config, n_dev * per_dev))
    args = (params, jax.random.key(1), {"cond": jax.device_put(cond, parallel.device_sharding())})
    compiled, compile_s = _seconds(lambda: run.lower(*args).compile())
    jax.block_until_ready(compiled(*args))
    _, total_s = _seconds(lambda: compiled(*args))
    images = per_dev * n_dev
    return dict(images=images, steps=num_steps, total_s=total_s, compile_s=compile_s,
                images_per_s=images / total_s, image_steps_per_s=images * num_steps / total_s)


def _sampling_mfu(r: dict, forward_flops: float | None, peak: float | None) -> dict:
    """Adds the MFU of a sampling measurement: one U-Net forward pass per image and step."""
    if forward_flops and peak:
        r["mfu"] = r["image_steps_per_s"] * forward_flops / (peak * 1e12 * jax.local_device_count())
    return r


def run_benchmark(config: ConfigDict, *, train_calls=100, sample_batch=256, sample_steps=0, large_batch=2048,
                  large_steps=100, peak=0.0, bandwidth=0.0, skip=(), profile_dir="", profile_calls=3) -> dict:
    """All measurements as one dict (see the module docstring)."""
    validate_config(config, jax.local_device_count(), reads_data=False)  # synthetic batches
    device = jax.local_devices()[0]
    sample_steps = sample_steps or config.diffusion.num_timesteps
    peak = peak or _lookup(PEAK_BF16_TFLOPS, device)
    bandwidth = bandwidth or _lookup(PEAK_HBM_TBPS, device)
    result = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=device.device_kind, platform=device.platform, num_devices=jax.local_device_count(),
        versions={name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
        | {"python": platform.python_version()},
        compilation_cache_dir=jax.config.jax_compilation_cache_dir,
        model=dict(dtype=config.model.dtype, attention=config.model.attention, ch=config.model.ch,
                   ch_mult=list(config.model.ch_mult), image_size=config.data.image_size,
                   dropout=config.model.dropout,
                   params=int(sum(p.size for p in jax.tree.leaves(
                       jax.eval_shape(lambda: train_state.init_params(config, jax.random.key(0)))))),
                   # a compile of its own: only where a sampling MFU needs it
                   forward_flops_per_image=None if {"sample", "large"} <= set(skip)
                   else forward_flops_per_image(config)),
        peak_tflops_per_device=peak, peak_tbps_per_device=bandwidth)
    if "train" not in skip:
        r = bench_train(config, train_calls, profile_dir, profile_calls)
        n_dev = jax.local_device_count()
        if r["flops_per_step"] and peak:
            r["mfu"] = r["flops_per_step"] / r["step_s"] / (peak * 1e12 * n_dev)
        if r["flops_per_step"] and r["bytes_per_step"] and peak and bandwidth:
            r["roofline"] = roofline(r["flops_per_step"] / n_dev, r["bytes_per_step"] / n_dev, peak, bandwidth)
        result["train"] = r
        logging.info("train: %s", r)
    if "parts" not in skip:
        result["parts"] = bench_parts(config, train_calls)
        logging.info("parts: %s", result["parts"])
    sampling_mfu = functools.partial(_sampling_mfu, forward_flops=result["model"]["forward_flops_per_image"],
                                     peak=peak)
    if "sample" not in skip:
        result["sample"] = sampling_mfu(bench_sample(config, sample_batch, sample_steps))
        logging.info("sample: %s", result["sample"])
    if large_batch and "large" not in skip:
        r = sampling_mfu(bench_sample(config, large_batch, large_steps))
        r["images_per_s_at_sample_steps"] = r["image_steps_per_s"] / sample_steps
        result["sample_large_batch"] = r
        logging.info("large batch: %s", r)
    result["peak_memory_bytes"] = peak_memory_bytes()
    return result
