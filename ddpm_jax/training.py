"""Training: the pure data-parallel train step and the `train_and_evaluate` loop.

`train_step` (one step) and `train_steps` (`training.steps_per_call` steps in one `lax.scan`) are
pmapped where they are called, over all local devices, with the replicated state donated:

    p_step = jax.pmap(functools.partial(train_step, config=config), axis_name=AXIS_NAME,
                      donate_argnums=0)
    state, metrics = p_step(parallel.replicate(create_train_state(config, 0)), batch)

Randomness is a function of the base key, the step and the device, never a Python-side key chain:
step s uses fold_in(base, s); an example's timestep, noise and label drop come from its global index
in the batch (device index * B_dev + i), so an update does not depend on how the batch is split over
devices; dropout masks come from fold_in(step key, device index) (and the microbatch with
`training.grad_accum_steps` > 1).

This module and its imports do not import TensorFlow; `train_and_evaluate` imports the input
pipeline and clu's writers when it runs.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from ml_collections import ConfigDict

from ddpm_jax import checkpoints, diffusion, distillation, generation, image_utils, locking, parallel, superres
from ddpm_jax.models import unet_from_config
from ddpm_jax.parallel import AXIS_NAME
from ddpm_jax.train_state import TrainState, create_train_state, learning_rate_schedule, make_optimizer
from ddpm_jax.validation import check_output_dir, validate_config

__all__ = ["TrainState", "create_train_state", "accumulated_grads", "train_step", "train_steps", "pmap_train_step",
           "Diverged", "train_and_evaluate"]

# fold_in tag of the training steps under the base key (other streams may take other tags).
_TRAIN = 0


def _example_keys(key: jax.Array, first: jax.Array, num: int) -> jax.Array:
    """Keys `[num]` of the examples with global indices first .. first + num - 1."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(num))


def conditioning(config: ConfigDict, batch: dict, keys: jax.Array, schedule=None) -> dict:
    """The U-Net's `cond` for a batch: its labels or text, and 'drop' (the null condition) drawn per
    example from its key `keys[i]` with probability `training.label_dropout` (labels) or
    `training.text_dropout` (text); unconditional models get 'drop' too and ignore it.
    Super-resolution models get 'low_res' (the image area-downsampled, then noised to a level
    'aug_level' ~ U[0, diffusion.low_res_aug_max] by `superres.augment` on `schedule`, default
    the config's; never dropped). Students that learn guidance (`model.guidance_embedding`) get
    'guidance', w ~ U[distill.guidance_min, distill.guidance_max]."""
    m, t = config.model, config.training
    rate = t.label_dropout if m.num_classes else t.text_dropout if m.text_encoder != "none" else 0.0
    cond = {"drop": jax.vmap(lambda k: jax.random.bernoulli(k, rate))(keys)}
    if m.num_classes:
        cond["label"] = batch["label"]
    if m.text_encoder == "trained":
        cond.update(tokens=batch["tokens"], mask=batch["mask"])
    elif m.text_encoder == "precomputed":
        cond.update(text_emb=batch["text_emb"], mask=batch["mask"])
    if m.low_res_size:
        low_res = superres.downsample(batch["image"], m.low_res_size)
        uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
        level = config.diffusion.low_res_aug_max * uniform
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), low_res.shape[1:]))(keys)
        schedule = schedule or diffusion.schedule_from_config(config.diffusion)
        cond.update(low_res=superres.augment(schedule, low_res, level, noise), aug_level=level)
    if m.guidance_embedding:
        lo, hi = config.distill.guidance_min, config.distill.guidance_max
        cond["guidance"] = lo + (hi - lo) * jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3)))(keys)
    return cond


def loss_by_quarter(losses: jax.Array, t: jax.Array, num_timesteps: int) -> dict:
    """{'loss_qk'}: the expected loss over the timesteps of quarter k of [0, T), k = 0..3, estimated
    from per-example `losses` `[B]` at timesteps `t` `[B]` without dividing by a count that may be 0:
    mean(loss * [t in quarter k]) / P(t in quarter k). Their mean is the loss when 4 divides T."""
    quarter = t * 4 // num_timesteps
    sizes = np.bincount(np.arange(num_timesteps) * 4 // num_timesteps, minlength=4)
    return {f"loss_q{k}": jnp.mean(jnp.where(quarter == k, losses, 0.0)) * (num_timesteps / sizes[k])
            for k in range(4) if sizes[k]}


def unrolled_loops() -> bool:
    """Whether the loops over train steps (`train_steps`) and microbatches (`accumulated_grads`) are
    unrolled: on CPU, where XLA runs a loop body 15x slower than the same step outside a loop (tiny
    config: 15.8 vs 1.0 s per step; 28x for microbatches). Accelerators keep one compiled body."""
    return jax.default_backend() == "cpu"


def accumulated_grads(loss_fn: Callable, params, inputs, dropout_key: jax.Array, k: int):
    """(losses `[B_dev]`, gradient of their mean) of `loss_fn(params, inputs, dropout_key) -> (mean, losses)`,
    over k equal microbatches of `inputs` (arrays with leading dim B_dev) in a `lax.scan`, so only one
    microbatch's activations are alive at a time. The mean of the k microbatch gradients is the
    gradient of the whole device batch, as every example's noise and timestep are drawn beforehand;
    dropout masks are drawn per microbatch (fold_in(dropout_key, j)). k = 1: one plain call."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (_, losses), grads = grad_fn(params, inputs, dropout_key)
        return losses, grads
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), inputs)

    def body(grad_sum, j_and_inputs):
        j, inputs = j_and_inputs
        (_, losses), grads = grad_fn(params, inputs, jax.random.fold_in(dropout_key, j))
        return jax.tree.map(jnp.add, grad_sum, grads), losses

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = jax.lax.scan(body, zeros, (jnp.arange(k), micro), unroll=unrolled_loops())
    return losses.reshape(-1), jax.tree.map(lambda g: g / k, grad_sum)


def train_step(state: TrainState, batch: dict, teacher_params=None, *,
               config: ConfigDict) -> tuple[TrainState, dict]:
    """One Adam step on this device's share of the batch, under pmap with axis `AXIS_NAME`.

    batch: {'image': float32 `[B_dev, H, W, C]` in [-1, 1], and what `config.model` is conditioned
    on: 'label' int32 `[B_dev]`, or the text: 'tokens' int32 + 'mask' bool `[B_dev, L]`, or
    'text_emb' `[B_dev, L, D]` + 'mask'}; `conditioning` drops each example's condition with the
    configured probability. With `distill.teacher`, the loss's x_0 and eps are
    `distillation.training_targets` of `teacher_params`, and in progressive distillation t is a student
    step's timestep. With `training.grad_accum_steps=k` the gradient is accumulated over k microbatches
    of B_dev / k (`accumulated_grads`). Gradients, loss and metrics are averaged over devices; the EMA of the
    params is updated here. A step whose loss or gradient norm is not finite changes
    nothing but the step count. Returns (state, {'loss', 'grad_norm', 'nonfinite' (0 or 1),
    'learning_rate', 'loss_q0', ..., 'loss_q3' (`loss_by_quarter`)}).
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

    distilling = bool(config.distill.teacher)
    # Progressive distillation draws a student step i and takes its timestep.
    halving = distilling and config.distill.mode == "progressive"
    levels = config.sampling.steps if halving else schedule.num_timesteps
    i = jax.vmap(lambda k: diffusion.sample_timesteps(k, 1, levels)[0])(_example_keys(t_key, first, n))
    t = distillation.schedules(config.diffusion, levels)[0].timesteps[i] if halving else i
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(_example_keys(noise_key, first, n))
    cond = conditioning(config, batch, _example_keys(label_key, first, n), schedule)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    if distilling:
        x0, noise = distillation.training_targets(config, model, teacher_params, x_t, i, cond)
    dropout_key = jax.random.fold_in(dropout_key, device)

    def loss_fn(params, inputs, dropout_key):
        x0, x_t, noise, t, cond = inputs
        out = model.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": dropout_key})
        d = config.diffusion
        losses = diffusion.training_loss(schedule, kind, out, x0, x_t, noise, t, variance=d.variance,
                                         vlb_weight=d.vlb_weight, weighting=d.loss_weighting, gamma=d.min_snr_gamma)
        return losses.mean(), losses

    losses, grads = accumulated_grads(loss_fn, state.params, (x0, x_t, noise, t, cond), dropout_key,
                                      config.training.grad_accum_steps)
    loss = losses.mean()
    quarters = loss_by_quarter(losses, t, schedule.num_timesteps)
    loss, grads, quarters = jax.lax.pmean((loss, grads, quarters), AXIS_NAME)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = make_optimizer(config.optim).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - config.optim.ema_decay)
    # A non-finite loss or gradient leaves params, EMA and Adam state as they were (the selects fuse
    # into the update); the host reads `nonfinite` at logging steps and stops or carries on.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1 - finite.astype(jnp.int32),
               "learning_rate": learning_rate_schedule(config.optim)(state.step), **quarters}
    state = state.replace(step=state.step + 1, params=keep(params, state.params),
                          ema_params=keep(ema_params, state.ema_params), opt_state=keep(opt_state, state.opt_state))
    return state, metrics


def train_steps(state: TrainState, batches: dict, teacher_params=None, *,
                config: ConfigDict) -> tuple[TrainState, dict]:
    """k train steps in one call: `lax.scan` of `train_step` over batches `[k, B_dev, ...]`.

    Metrics are the means over the k steps ('nonfinite': the count).
    """
    state, metrics = jax.lax.scan(lambda st, b: train_step(st, b, teacher_params, config=config), state, batches,
                                  unroll=unrolled_loops())
    return state, {k: v.sum() if k == "nonfinite" else v.mean() for k, v in metrics.items()}


def pmap_train_step(config: ConfigDict):
    """`train_steps` (or `train_step` when `training.steps_per_call` is 1) pmapped over the local
    devices, with the replicated state donated: `(state, batch[, teacher_params]) -> (state, metrics)`."""
    fn = train_steps if config.training.steps_per_call > 1 else train_step
    return jax.pmap(functools.partial(fn, config=config), axis_name=AXIS_NAME, donate_argnums=0)


class _StopOnSignal:
    """SIGTERM (TPU VM preemption) or Ctrl-C asks the loop to save and stop after the current call
    (with several processes: at the next step where they agree, `agreed`).

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

    def agreed(self, step: int, k: int, every: int) -> bool:
        """Whether to stop after the call that reached `step` (`k` steps a call). One process stops as
        soon as asked. Several stop together, so that all save the same step: they compare their
        requests (a small all-gather, which also waits for the devices) at the calls that pass a
        multiple of `every` steps, the same calls on every process, and stop if any was asked."""
        if jax.process_count() == 1:
            return self.requested
        if step // every == (step - k) // every:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())


class Diverged(RuntimeError):
    """The loss or gradient stopped being finite (`training.nonfinite='stop'`); nothing after the last
    finite checkpoint was saved."""


@dataclasses.dataclass
class Periodic:
    """A periodic action of the train loop: `fn(step, state)` every `every` steps (0: never), at the
    last step, and with `on_stop` also when a stop is requested."""

    every: int
    fn: Callable[[int, TrainState], None]
    on_stop: bool = False

    def __call__(self, step: int, state: TrainState, *, last: bool, stopping: bool) -> None:
        if self.every and (step % self.every == 0 or last or (stopping and self.on_stop)):
            self.fn(step, state)


def sample_grid_config(config: ConfigDict):
    """The `sampling` settings of the training grid: `training.num_sample_images` images with the
    config's sampler, labels in equal blocks, the same noise (`seed`) at every grid."""
    c = config.copy_and_resolve_references()
    c.sampling.num_samples = c.sampling.batch_size = config.training.num_sample_images
    c.sampling.seed = config.seed
    return c


def train_and_evaluate(config: ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir` on all devices (of all processes), resuming from the latest readable
    checkpoint.

    Writes `workdir/config.json` (the previous one kept as `config.<step>.json` when a resume changes
    it), checkpoints, TensorBoard events and `samples/step_*.png` (process 0 only for logs and
    images). A distilled run (`distill.teacher`) reads its teacher's EMA params first and records the
    teacher's step in config.json. Bad config values, a resume that would change what the checkpoints
    mean, or a second trainer on the workdir raise UserError before anything is compiled or written; a
    loss or gradient that stops being finite raises `Diverged` (with `training.nonfinite='stop'`) after
    saving nothing non-finite. Returns the final state on the host.
    """
    validate_config(config)
    check_output_dir(workdir, "--workdir")
    teacher = None
    if config.distill.teacher:  # its step, resolved, goes into config.json: a resume reads the same teacher
        config, teacher = distillation.load_teacher(config)
    from ddpm_jax import input_pipeline  # TensorFlow comes in here, only for the training loop

    input_pipeline.check_dataset(config)
    from ddpm_jax.evaluation import in_loop  # checks and loads what eval.* names, before any compile
    evaluator = in_loop.Evaluator(config) if config.eval.eval_every else None
    # Before the checkpoint manager: its start-up deletes the temporary folders of saves in flight.
    with locking.workdir_lock(workdir):
        manager = checkpoints.checkpoint_manager(workdir, keep=config.training.keep_checkpoints)
        try:
            restored = checkpoints.restore_train_state(manager, config)  # may move unreadable ones aside
            resumed_from = None if restored is None else int(restored[0].step)
            if resumed_from is not None:
                checkpoints.check_resume_config(workdir, config, resumed_from)  # before writing: it may refuse
            if jax.process_count() > 1:  # every process has read config.json before process 0 replaces it
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("ddpm_jax: resume config checked")
            if jax.process_index() == 0:
                checkpoints.write_config(workdir, config, resumed_from=resumed_from)
            return _train(config, workdir, manager, restored, evaluator, teacher)
        finally:
            manager.wait_until_finished()
            manager.close()


def _train(config: ConfigDict, workdir, manager, restored, evaluator, teacher=None) -> TrainState:
    """The loop of `train_and_evaluate`, from the restored (or a fresh) state; a fresh state of a distilled
    run starts from the `teacher`'s params."""
    from clu import metric_writers, periodic_actions

    from ddpm_jax import input_pipeline

    grid_config = sample_grid_config(config)
    grid_request = generation.make_request(grid_config) if config.training.sample_every else None
    t = config.training
    k = t.steps_per_call
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if restored is None:
        state = jax.jit(functools.partial(create_train_state, config))(jax.random.key(config.seed), teacher)
        position = 0  # examples consumed from the global data stream (by all processes)
    else:
        state, data_state = restored
        position = data_state["position"]
        logging.info("Resuming from %s at step %d.", manager.directory, int(state.step))
    step = int(state.step)  # the host's copy; the loop never reads the device's
    train_iter = input_pipeline.create_train_iterator(config, start_example=position)
    state = parallel.replicate(state)
    p_train = pmap_train_step(config)
    teacher_args = () if teacher is None else (parallel.replicate(teacher),)  # p_train's last argument

    report = periodic_actions.ReportProgress(num_train_steps=t.num_train_steps, writer=writer, every_secs=60)
    profile = None
    if is_main and t.profile_steps:
        profile = periodic_actions.Profile(logdir=workdir, num_profile_steps=t.profile_steps,
                                           first_profile=step + 10 * k)

    def write_samples(at_step, state):
        with report.timed("sample"):
            images = generation.run(grid_config, parallel.to_host(state.ema_params), grid_request)["images"]
        if is_main:
            grid = image_utils.make_grid(image_utils.to_uint8(images))
            path = epath.Path(workdir) / "samples" / f"step_{at_step:08d}.png"
            image_utils.save_png(str(path), grid, scale=max(1, 64 // images.shape[1]))
            writer.write_images(at_step, {"samples": grid[None]})
            logging.info("Wrote %s", path)

    def evaluate(at_step, state):
        with report.timed("eval"):
            evaluator(at_step, parallel.to_host(state.ema_params), writer)

    def save(at_step, state):
        check_finite(at_step)  # the last finite checkpoint is never rotated away by a bad one
        with report.timed("checkpoint", wait_jax_async_dispatch=False):
            checkpoints.save_train_state(manager, parallel.to_host(state), {"position": position})

    # Periodic actions on (step, state), in order; the checkpoint comes last.
    hooks = [Periodic(t.sample_every, write_samples), Periodic(config.eval.eval_every, evaluate),
             Periodic(t.checkpoint_every, save, on_stop=True)]

    nonfinite = first_nonfinite = None  # device scalars, updated without waiting for the device

    def check_finite(at_step):
        """Reads the divergence counters (a host sync, so only at logging and checkpoint steps)."""
        if not int(parallel.to_host(nonfinite)):
            return
        first = int(parallel.to_host(first_nonfinite))
        if t.nonfinite == "skip":
            logging.warning("%d steps up to step %d had a non-finite loss or gradient and were skipped.",
                            int(parallel.to_host(nonfinite)), at_step)
            return
        raise Diverged(f"the loss or gradient norm is not finite since step {first} (checked at step {at_step}); "
                       f"nothing after it was saved, the checkpoints in {manager.directory} are all finite. "
                       "Lower optim.learning_rate, keep optim.grad_clip > 0, or set training.nonfinite='skip'.")

    def write_metrics(at_step, metrics):
        scalars = {name: float(v) for name, v in parallel.to_host(metrics).items() if name != "nonfinite"}
        check_finite(at_step)
        writer.write_scalars(at_step, scalars)

    pending = None  # (step, metrics) of a logging step, fetched once the next call is dispatched
    previous = None  # an output of the previous call
    try:
        with _StopOnSignal() as stop:
            while step < t.num_train_steps:
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = p_train(state, next(train_iter), *teacher_args)
                # The host runs at most this call ahead of the devices: a stop saves the step the devices
                # are at, not one many queued calls later (still overlapping host and device work).
                if previous is not None:
                    previous.block_until_ready()
                previous = bad = metrics["nonfinite"]
                nonfinite = bad if nonfinite is None else nonfinite + bad
                first_nonfinite = (jnp.where(bad > 0, step + 1, 0) if first_nonfinite is None else
                                   jnp.where((first_nonfinite == 0) & (bad > 0), step + 1, first_nonfinite))
                step += k
                position += k * t.batch_size
                if pending:
                    write_metrics(*pending)
                    pending = None
                report(step)
                if profile:
                    profile(step)
                last = step == t.num_train_steps
                if step % t.log_every == 0 or last:
                    pending = (step, metrics)
                stopping = stop.agreed(step, k, t.stop_check_every)
                for hook in hooks:
                    hook(step, state, last=last, stopping=stopping)
                if stopping:
                    logging.warning("Stopped at step %d; the same command resumes from here.", step)
                    break
        if pending:
            write_metrics(*pending)
    finally:
        writer.flush()
    return parallel.to_host(state)
