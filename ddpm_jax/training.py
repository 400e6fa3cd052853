"""Training: the pure data-parallel train step and the `train_and_evaluate` loop.

`train_step` (one step) and `train_steps` (`training.steps_per_call` steps in one `lax.scan`) are
pmapped where they are called, over all local devices, with the replicated state donated:

    p_step = jax.pmap(functools.partial(train_step, config=config), axis_name=AXIS_NAME,
                      donate_argnums=0)
    state, metrics = p_step(parallel.replicate(create_train_state(config, 0)), batch)

Randomness is a function of the base key, the step and the device, never a Python-side key chain:
step s uses fold_in(base, s); an example's timestep, noise and label drop come from its global index
in the batch (device index * B_dev + i), so an update does not depend on how the batch is split over
devices; dropout masks come from fold_in(step key, device index).

This module and its imports do not import TensorFlow; `train_and_evaluate` imports the input
pipeline and clu's writers when it runs.
"""
from __future__ import annotations

import functools
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from ddpm_jax import checkpoints, diffusion, image_utils, parallel, sampling
from ddpm_jax.validation import validate_config
from ddpm_jax.models import unet_from_config
from ddpm_jax.parallel import AXIS_NAME
from ddpm_jax.train_state import (TrainState, create_train_state, learning_rate_schedule,
                                  make_optimizer)

__all__ = ["TrainState", "create_train_state", "train_step", "train_steps", "pmap_train_step", "sample_images",
           "train_and_evaluate"]

# fold_in tags under the base key: training steps and sample grids draw from disjoint streams.
_TRAIN, _SAMPLE = 0, 1


def _example_keys(key: jax.Array, first: jax.Array, num: int) -> jax.Array:
    """Keys `[num]` of the examples with global indices first .. first + num - 1."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(num))


def train_step(state: TrainState, batch: dict, *, config) -> tuple[TrainState, dict]:
    """One Adam step on this device's share of the batch, under pmap with axis `AXIS_NAME`.

    batch: {'image': float32 `[B_dev, H, W, C]` in [-1, 1], 'label': int32 `[B_dev]`} ('label' read
    only when `model.num_classes > 0`: each is replaced by the null class `num_classes` with
    probability `training.label_dropout`). Gradients, loss and metrics are averaged over devices; the
    EMA of the params is updated here. Returns (state, {'loss', 'grad_norm', 'learning_rate'}).
    """
    model = unet_from_config(config)
    schedule = diffusion.schedule_from_config(config.diffusion)
    kind = config.diffusion.model_output
    x0 = batch["image"]
    n = x0.shape[0]
    device = jax.lax.axis_index(AXIS_NAME)
    base = jax.random.fold_in(jax.random.wrap_key_data(state.key), _TRAIN)
    t_key, noise_key, label_key, dropout_key = jax.random.split(jax.random.fold_in(base, state.step), 4)
    first = device * n  # global index of this device's first example

    t = jax.vmap(lambda k: diffusion.sample_timesteps(k, 1, schedule.num_timesteps)[0])(
        _example_keys(t_key, first, n))
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(_example_keys(noise_key, first, n))
    y = None
    if config.model.num_classes:
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.training.label_dropout))(
            _example_keys(label_key, first, n))
        y = jnp.where(drop, config.model.num_classes, batch["label"])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    rngs = {"dropout": jax.random.fold_in(dropout_key, device)}

    def loss_fn(params):
        out = model.apply({"params": params}, x_t, t, y, train=True, rngs=rngs)
        return diffusion.training_loss(schedule, kind, out, x0, x_t, noise, t, variance=config.diffusion.variance,
                                       vlb_weight=config.diffusion.vlb_weight).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    loss, grads = jax.lax.pmean((loss, grads), AXIS_NAME)
    updates, opt_state = make_optimizer(config.optim).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - config.optim.ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate_schedule(config.optim)(state.step)}
    state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return state, metrics


def train_steps(state: TrainState, batches: dict, *, config) -> tuple[TrainState, dict]:
    """k train steps in one call: `lax.scan` of `train_step` over batches `[k, B_dev, ...]`.

    Metrics are the means over the k steps.
    """
    state, metrics = jax.lax.scan(functools.partial(train_step, config=config), state, batches)
    return state, jax.tree.map(jnp.mean, metrics)


def pmap_train_step(config):
    """`train_steps` (or `train_step` when `training.steps_per_call` is 1) pmapped over the local
    devices, with the replicated state donated: `(state, batch) -> (state, metrics)`."""
    fn = train_steps if config.training.steps_per_call > 1 else train_step
    return jax.pmap(functools.partial(fn, config=config), axis_name=AXIS_NAME, donate_argnums=0)


def sample_images(params, labels: jax.Array, key: jax.Array, *, config) -> jax.Array:
    """Ancestral samples `[N, H, W, C]` in [-1, 1]; `labels` int32 `[N]` are used by conditional models."""
    model = unet_from_config(config)
    d, c = config.data, config.diffusion
    model_fn = sampling.unet_model_fn(model, params, labels if config.model.num_classes else None)
    shape = (labels.shape[0], d.image_size, d.image_size, d.channels)
    return diffusion.sample(diffusion.schedule_from_config(c), c.model_output, model_fn, key, shape,
                            variance=c.variance, clip_x0=c.clip_x0)


def _sample_on_device(params, labels, base_key, *, config):
    """Under pmap: this device's share of a sample grid, with the same noise at every call."""
    key = jax.random.fold_in(jax.random.wrap_key_data(base_key), _SAMPLE)
    return sample_images(params, labels, jax.random.fold_in(key, jax.lax.axis_index(AXIS_NAME)), config=config)


class _StopOnSignal:
    """SIGTERM (TPU VM preemption) or Ctrl-C asks the loop to save and stop after the current call.

    A second signal gets the previous handler (Ctrl-C twice interrupts at once).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        logging.warning("Received %s: saving a checkpoint and stopping.", signal.Signals(signum).name)
        self.requested = True
        signal.signal(signum, self._previous[signum])

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _write_samples(writer, workdir, step: int, images: np.ndarray):
    grid = image_utils.make_grid(image_utils.to_uint8(images))
    path = epath.Path(workdir) / "samples" / f"step_{step:08d}.png"
    image_utils.save_png(str(path), grid, scale=max(1, 64 // images.shape[1]))
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Wrote %s", path)


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Trains `config` in `workdir` on all local devices, resuming from the latest checkpoint there.

    Writes `workdir/config.json`, checkpoints, TensorBoard events and `samples/step_*.png` (process
    0 only for logs and images). Bad config values raise ValueError before anything is compiled or
    written. Returns the final state as host arrays.
    """
    validate_config(config)
    from ddpm_jax import input_pipeline  # TensorFlow comes in here, only for the training loop

    input_pipeline.check_dataset(config)
    from clu import metric_writers, periodic_actions

    from ddpm_jax.evaluation import in_loop  # checks and loads what eval.* names, before any compile
    evaluator = in_loop.Evaluator(config) if config.eval.eval_every else None

    t = config.training
    k = t.steps_per_call
    is_main = jax.process_index() == 0
    manager = checkpoints.checkpoint_manager(workdir, keep=t.keep_checkpoints)
    restored = checkpoints.restore_train_state(manager, config)  # before writing: it may not fit
    if is_main:
        checkpoints.write_config(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if restored is None:
        state = jax.jit(functools.partial(create_train_state, config))(jax.random.key(config.seed))
        position = 0  # examples this process has consumed from its data stream
    else:
        state, data_state = restored
        position = data_state["position"]
        logging.info("Resuming from %s at step %d.", manager.directory, int(state.step))
    step = int(state.step)  # the host's copy; the loop never reads the device's
    per_process_batch = t.batch_size // jax.process_count()
    train_iter = input_pipeline.create_train_iterator(config, start_example=position)

    state = parallel.replicate(state)
    p_train = pmap_train_step(config)
    p_sample = jax.pmap(functools.partial(_sample_on_device, config=config), axis_name=AXIS_NAME)
    # Every device samples the same number; the grid keeps the first num_sample_images.
    per_device = -(-t.num_sample_images // jax.local_device_count())
    sample_labels = np.arange(per_device * jax.local_device_count(), dtype=np.int32)
    sample_labels = (sample_labels % max(config.model.num_classes, 1)).reshape(jax.local_device_count(), -1)

    report = periodic_actions.ReportProgress(num_train_steps=t.num_train_steps, writer=writer, every_secs=60)
    hooks = [report]
    if is_main and t.profile_steps:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=t.profile_steps,
                                              first_profile=step + 10 * k))

    def write_metrics(at_step, metrics):
        writer.write_scalars(at_step, {name: float(v) for name, v in parallel.to_host(metrics).items()})

    pending = None  # (step, metrics) of a logging step, fetched once the next call is dispatched
    with _StopOnSignal() as stop:
        while step < t.num_train_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = p_train(state, next(train_iter))
            step += k
            position += k * per_process_batch
            if pending:
                write_metrics(*pending)
                pending = None
            for hook in hooks:
                hook(step)
            last = step == t.num_train_steps
            if step % t.log_every == 0 or last:
                pending = (step, metrics)
            if t.sample_every and (step % t.sample_every == 0 or last):
                with report.timed("sample"):
                    images = jax.device_get(p_sample(state.ema_params, sample_labels, state.key))
                if is_main:
                    images = images.reshape((-1,) + images.shape[2:])[:t.num_sample_images]
                    _write_samples(writer, workdir, step, images)
            # Further periodic actions on (step, state) go here, before the checkpoint.
            if evaluator and (step % config.eval.eval_every == 0 or last):
                with report.timed("eval"):
                    evaluator(step, parallel.to_host(state.ema_params), writer)
            if step % t.checkpoint_every == 0 or last or stop.requested:
                with report.timed("checkpoint", wait_jax_async_dispatch=False):
                    checkpoints.save_train_state(manager, parallel.to_host(state), {"position": position})
            if stop.requested:
                logging.warning("Stopped at step %d; the same command resumes from here.", step)
                break
    if pending:
        write_metrics(*pending)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    return parallel.to_host(state)
