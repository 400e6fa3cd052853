"""The training system: an end-to-end run, exact resume (also after SIGTERM), and the pmapped step."""
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from ddpm_jax import checkpoints, generation, input_pipeline, parallel, sampling, training
from ddpm_jax.train_state import learning_rate_schedule, make_optimizer
from tests.train_helpers import (
    prepare_digits,
    read_events,
    small_cifar10_config,
    small_digits_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_digits(str(tmp_path_factory.mktemp("tfds")))


def test_load_config_gives_fields_added_later_their_defaults(tmp_path):
    config = small_cifar10_config()
    config.model.attention = "cudnn"  # not the default: must come back as written
    checkpoints.write_config(str(tmp_path), config)
    assert checkpoints.load_config(str(tmp_path)).model.attention == "cudnn"
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["attention"]  # a run saved before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = checkpoints.load_config(str(tmp_path))
    assert loaded.model.attention == "xla" and loaded.model.ch == config.model.ch


@pytest.mark.parametrize("num_timesteps", [1000, 10, 2])
def test_loss_by_quarter_estimates_the_mean_loss_in_each_quarter_of_the_timesteps(num_timesteps):
    rng = np.random.default_rng(0)
    t = rng.integers(0, num_timesteps, 64)
    losses = rng.uniform(0, 2, 64)
    got = training.loss_by_quarter(jax.numpy.asarray(losses, np.float32), jax.numpy.asarray(t), num_timesteps)
    # quarter k: the timesteps floor(4 t / T) = k, each drawn with probability 1/T
    quarter_of = np.array([4 * i // num_timesteps for i in range(num_timesteps)])
    expected = {f"loss_q{k}": losses[quarter_of[t] == k].sum() / 64 / np.mean(quarter_of == k)
                for k in range(4) if (quarter_of == k).any()}
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5)


def test_learning_rate_schedules():
    """Warmup then constant (Ho et al.), or a cosine to 0 at optim.decay_steps, which Adam follows."""
    o = ConfigDict({"learning_rate": 1.0, "warmup_steps": 10, "decay_steps": 0, "grad_clip": 0.0, "b1": 0.9,
                    "b2": 0.999, "eps": 1e-8})
    constant = learning_rate_schedule(o)
    np.testing.assert_allclose([constant(i) for i in (0, 5, 10, 10_000)], [0.0, 0.5, 1.0, 1.0], atol=1e-7)
    o.decay_steps = 110
    cosine = learning_rate_schedule(o)
    np.testing.assert_allclose([cosine(i) for i in (5, 10, 35, 60, 110, 500)],
                               [0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.0, 0.0], atol=1e-6)
    o.warmup_steps, o.decay_steps = 0, 4
    opt, params = make_optimizer(o), np.ones(3, np.float32)
    state, moved = opt.init(params), []
    for _ in range(6):
        updates, state = opt.update(np.ones(3, np.float32), state, params)
        params = optax.apply_updates(params, updates)
        moved.append(float(np.abs(updates).max()))
    # Adam's first steps move by about the learning rate: cos schedule 1, 0.85, 0.5, 0.15, then 0
    np.testing.assert_allclose(moved, [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2,
                                       0.0, 0.0], atol=1e-4)


@pytest.mark.slow
def test_train_and_evaluate_writes_checkpoints_logs_and_samples(tmp_path):
    config = small_cifar10_config()
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=64):  # CIFAR-10's features, random pixels, no download
        state = training.train_and_evaluate(config, workdir)

    assert int(state.step) == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    loaded = checkpoints.load_config(workdir)
    assert loaded.to_json_best_effort(sort_keys=True) == config.to_json_best_effort(sort_keys=True)
    assert loaded.model.ch_mult == config.model.ch_mult  # tuples come back as tuples
    params, step = checkpoints.load_params(workdir)
    assert step == 4
    chex.assert_trees_all_equal(params, state.ema_params)
    assert all(x.devices() == {jax.local_devices(backend="cpu")[0]} for x in jax.tree.leaves(params))

    # A 4x4 grid of 32x32 samples with 2-pixel padding, enlarged twice.
    from PIL import Image

    png = Image.open(os.path.join(workdir, "samples", "step_00000004.png"))
    assert png.size == (2 * (4 * 34 + 2),) * 2 and png.mode == "RGB"
    events = read_events(workdir)
    assert [s for s, _ in events["loss"]] == [2, 4]
    assert all(0.1 < v < 10 for _, v in events["loss"])
    assert {"grad_norm", "learning_rate", "loss_q0", "loss_q3"} <= set(events)
    np.testing.assert_allclose([v for _, v in events["learning_rate"]], [1e-4, 3e-4], rtol=1e-5)
    assert [s for s, _ in events["samples"]] == [4]


def _run(config, workdir, num_steps):
    config = config.copy_and_resolve_references()
    config.training.num_train_steps = num_steps
    return training.train_and_evaluate(config, workdir)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_stopping_and_restarting_gives_bitwise_identical_params(data_dir, tmp_path):
    config = small_digits_config(data_dir)  # dropout 0.1: the dropout keys must resume too
    straight = _run(config, str(tmp_path / "straight"), 8)
    _run(config, str(tmp_path / "resumed"), 4)
    resumed = _run(config, str(tmp_path / "resumed"), 8)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "8"]
    assert int(resumed.step) == 8
    chex.assert_trees_all_equal(straight, resumed)
    # The data position went into the checkpoint: 8 steps of 16 examples.
    with open(tmp_path / "resumed" / "checkpoints" / "8" / "data" / "metadata") as f:
        assert json.load(f) == {"position": 128}
    # Another model in the same workdir: a clear error, and the run's config.json stays as it was.
    saved_config = (tmp_path / "resumed" / "config.json").read_text()
    config.model.ch = 32
    with pytest.raises(ValueError, match=r"checkpoints/8: the checkpoint does not fit this config"):
        _run(config, str(tmp_path / "resumed"), 16)
    assert (tmp_path / "resumed" / "config.json").read_text() == saved_config


def test_sigterm_saves_and_the_restart_resumes_exactly_with_steps_per_call(data_dir, tmp_path, monkeypatch):
    config = small_digits_config(data_dir)
    config.training.steps_per_call = 2
    straight = _run(config, str(tmp_path / "straight"), 8)

    make_iterator = input_pipeline.create_train_iterator

    def preempted_after_first_call(config, start_example=0):
        for i, batch in enumerate(make_iterator(config, start_example)):
            if i == 1:  # the loop asks for its second batch: the first call is done
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(input_pipeline, "create_train_iterator", preempted_after_first_call)
    stopped = _run(config, str(tmp_path / "resumed"), 8)
    assert int(stopped.step) == 4  # the call under way finished, was saved, and the run returned
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    monkeypatch.undo()
    resumed = _run(config, str(tmp_path / "resumed"), 8)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "8"]
    chex.assert_trees_all_equal(straight, resumed)


@pytest.mark.slow  # three compiles; the default suite's exact-resume test runs steps_per_call=2 too
def test_fused_steps_equal_the_steps_one_call_each(data_dir):
    """k = 2 steps in one call (unrolled on CPU) are the two single steps, metrics their means."""
    config = small_digits_config(data_dir)
    create = jax.jit(functools.partial(training.create_train_state, config))
    init = lambda: parallel.replicate(create(jax.random.key(0)))
    stacked = config.copy_and_resolve_references()
    stacked.training.steps_per_call = 2
    batches = next(iter(tfds.as_numpy(input_pipeline.create_dataset(stacked))))  # [D, 2, B_dev, ...]
    single = training.pmap_train_step(config)
    one, metrics = init(), []  # each call donates its state
    for i in range(2):
        one, m = single(one, jax.tree.map(lambda x: x[:, i], batches))
        metrics.append(parallel.to_host(m))
    fused, fused_metrics = training.pmap_train_step(stacked)(init(), batches)
    chex.assert_trees_all_close(parallel.to_host(fused), parallel.to_host(one), atol=1e-6)
    assert int(parallel.to_host(fused.step)) == 2
    mean_loss = np.mean([m["loss"] for m in metrics])
    np.testing.assert_allclose(parallel.to_host(fused_metrics)["loss"], mean_loss, rtol=1e-5)


@pytest.fixture(scope="module")
def steps_on_8_and_1_devices(data_dir):
    """Three conditional steps on global batches of 16, pmapped over 8 devices and over 1, each
    also with the batch in microbatches: {(devices, training.grad_accum_steps): (state, metrics)}.

    Three, because the U-Net's zero-initialised output convs let the embeddings' gradients through
    only from the third step on.
    """
    config = small_digits_config(data_dir)
    config.model.dropout = 0.0  # dropout masks are per device; everything else is per example
    config.model.num_classes = 10
    # 64 channels: GroupNorm(32) groups of 2, so the per-channel label/time embedding that a
    # block adds is not all normalised away (with groups of 1 channel its gradient is 0).
    config.model.ch = 64
    config.training.label_dropout = 0.5
    config.optim.warmup_steps = 0
    rng = np.random.default_rng(0)
    batches = [{"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
                "label": np.full((16,), 3, np.int32)} for _ in range(3)]
    state = training.create_train_state(config, 0)
    results = {}
    for num_devices, accum in ((8, 1), (1, 1), (8, 2), (1, 4)):  # 2, 16, 2 x 1 and 4 x 4 examples per call
        config.training.grad_accum_steps = accum
        devices = jax.devices()[:num_devices]
        p_step = jax.pmap(functools.partial(training.train_step, config=config), axis_name=parallel.AXIS_NAME,
                          devices=devices, donate_argnums=0)
        s = parallel.replicate(state, devices)
        for b in batches:
            s, metrics = p_step(s, jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), b))
        results[num_devices, accum] = (parallel.to_host(s), parallel.to_host(metrics))
    return state, results


def assert_same_steps(a, b, state):
    """The states and metrics `a` and `b` of `steps_on_8_and_1_devices` agree up to float round-off."""
    (sa, ma), (sb, mb) = a, b
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
    quarters = [f"loss_q{k}" for k in range(4)]
    np.testing.assert_allclose([ma[q] for q in quarters], [mb[q] for q in quarters], rtol=1e-5)
    np.testing.assert_allclose(np.mean([mb[q] for q in quarters]), mb["loss"], rtol=1e-5)  # 4 divides T
    assert int(sa.step) == int(sb.step) == 3
    moved = jax.tree.map(lambda x, y: np.abs(x - y).max(), sb.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the steps did change the params
    # Adam's moments hold the averaged gradients. Biases that a GroupNorm follows have gradient 0 up
    # to float noise, which the device split changes (and Adam's 1/sqrt(v) would blow up in the
    # params), so each moment is compared on the scale of its largest entry.
    adam_a, adam_b = sa.opt_state[-1][0], sb.opt_state[-1][0]
    for moment in ("mu", "nu"):
        leaves_a, leaves_b = jax.tree.leaves(getattr(adam_a, moment)), jax.tree.leaves(getattr(adam_b, moment))
        scale = max(np.abs(x).max() for x in leaves_b)
        assert scale > 0
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale)


def test_pmapped_step_on_8_devices_equals_the_global_batch_on_1(steps_on_8_and_1_devices):
    state, results = steps_on_8_and_1_devices
    assert_same_steps(results[8, 1], results[1, 1], state)


@pytest.mark.parametrize("num_devices, accum", [(8, 2), (1, 4)])
def test_accumulated_microbatches_equal_the_whole_batch(steps_on_8_and_1_devices, num_devices, accum):
    """training.grad_accum_steps: the gradient of k microbatches is the gradient of the batch."""
    state, results = steps_on_8_and_1_devices
    assert_same_steps(results[num_devices, accum], results[1, 1], state)


def test_label_dropout_trains_the_null_class_embedding(steps_on_8_and_1_devices):
    state, results = steps_on_8_and_1_devices
    s8 = results[8, 1][0]
    before = state.params["label_emb"]["embedding"]
    changed = np.abs(s8.params["label_emb"]["embedding"] - before).max(axis=1) > 0
    # Every label is 3 and half are dropped to the null class 10: only rows 3 and 10 get gradients.
    np.testing.assert_array_equal(np.flatnonzero(changed), [3, 10])


@pytest.mark.slow
def test_a_few_hundred_digits_steps_lower_the_loss(data_dir, tmp_path):
    config = small_digits_config(data_dir)
    config.optim.warmup_steps = 20
    config.training.batch_size = 32
    config.training.num_train_steps = 300
    config.training.log_every = 10
    config.training.checkpoint_every = 300
    training.train_and_evaluate(config, str(tmp_path))
    losses = [v for _, v in read_events(str(tmp_path))["loss"]]
    assert np.mean(losses[:2]) > 0.6  # eps prediction starts at E[eps^2] = 1
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2])


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_main_command_trains_and_keeps_compiled_programs(tmp_path, data_dir):
    cache, workdir = tmp_path / "xla", tmp_path / "run"
    flags = ["--config=configs/digits.py", f"--workdir={workdir}", f"--compilation_cache={cache}",
             f"--config.data.data_dir={data_dir}", "--config.model.ch=16", "--config.model.ch_mult=(1,)",
             "--config.model.attn_resolutions=()", "--config.training.batch_size=16",
             "--config.training.num_train_steps=2", "--config.training.log_every=2",
             "--config.training.checkpoint_every=2", "--config.training.sample_every=0",
             "--config.training.profile_steps=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "ddpm_jax.main", *flags], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(workdir / "checkpoints") == ["2"]
    # JAX 0.5 names a jitted functools.partial '_unnamed_wrapped_function_', later ones after the function.
    assert any(name.startswith(("jit_create_train_state", "jit__unnamed_wrapped_function_"))
               for name in os.listdir(cache))


def _diverging(config):
    """`config` resumed with a learning rate that overflows the params (and so the loss) within steps:
    Adam's step is about the learning rate whatever the (clipped) gradient."""
    config = config.copy_and_resolve_references()
    config.optim.learning_rate = 1e30
    config.training.log_every = 1
    return config


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_finite_checkpoint(data_dir, tmp_path):
    config = small_digits_config(data_dir)
    workdir = str(tmp_path / "run")
    _run(config, workdir, 4)
    bad = _diverging(config)
    bad.training.checkpoint_every, bad.training.keep_checkpoints = 1, 1  # a save per step: rotation would bite
    with pytest.raises(training.Diverged, match=r"not finite since step (\d+)") as info:
        _run(bad, workdir, 12)
    first_bad = int(re.search(r"since step (\d+)", str(info.value)).group(1))
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps and steps[-1] < first_bad <= 12  # nothing from the bad step on was saved
    params, step = checkpoints.load_params(workdir, bad, use_ema=False)
    assert step == steps[-1] and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_nonfinite_skip_carries_on_with_finite_params(data_dir, tmp_path):
    config = small_digits_config(data_dir)
    workdir = str(tmp_path / "run")
    _run(config, workdir, 4)
    skip = _diverging(config)
    skip.training.nonfinite = "skip"
    state = _run(skip, workdir, 8)
    assert int(state.step) == 8
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert checkpoints.load_params(workdir, skip)[1] == 8


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_train_step_leaves_the_state_alone_on_a_nonfinite_loss(data_dir):
    config = small_digits_config(data_dir)
    state = training.create_train_state(config, 0)
    step = jax.pmap(functools.partial(training.train_step, config=config), axis_name=parallel.AXIS_NAME)
    n = jax.local_device_count()
    batch = {"image": np.full((n, 2, 8, 8, 1), np.nan, np.float32), "label": np.zeros((n, 2), np.int32)}
    new, metrics = step(parallel.replicate(state), batch)
    assert int(parallel.to_host(metrics)["nonfinite"]) == 1
    host = parallel.to_host(new)
    assert int(host.step) == 1
    chex.assert_trees_all_equal((host.params, host.ema_params, host.opt_state), (state.params, state.ema_params,
                                                                         state.opt_state))


_KILLABLE = """
import sys
sys.path.insert(0, sys.argv[3])
from train_helpers import small_digits_config
from ddpm_jax import training
config = small_digits_config(sys.argv[1])
config.training.num_train_steps, config.training.checkpoint_every = 8, 1
training.train_and_evaluate(config, sys.argv[2])
"""


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_kill_9_during_saves_resumes_bitwise(data_dir, tmp_path):
    """SIGKILL while a checkpoint is saved every step: the rerun cleans the unfinished save, takes
    over the dead process's lock, resumes from the last finished checkpoint and ends bitwise where an
    uninterrupted run ends."""
    config = small_digits_config(data_dir)
    straight = _run(config, str(tmp_path / "straight"), 8)
    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, data_dir, str(workdir), os.path.dirname(__file__)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "3").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its third checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (workdir / ".lock").exists()  # left behind by the killed process
    config.training.checkpoint_every = 1
    resumed = _run(config, str(workdir), 8)
    chex.assert_trees_all_equal(straight, resumed)
@pytest.fixture(scope="module")
def learned_range_run():
    """A 2C-output U-Net (diffusion.variance='learned_range', class-conditional) after 3 pmapped steps of
    L_hybrid: (config, initial state, params, losses)."""
    config = small_cifar10_config()
    config.data.image_size, config.data.channels = 8, 1
    config.model.num_classes = 3
    config.diffusion.variance = "learned_range"
    config.optim.warmup_steps = 0
    state = jax.jit(functools.partial(training.create_train_state, config))(jax.random.key(0))
    step = jax.pmap(functools.partial(training.train_step, config=config), axis_name=parallel.AXIS_NAME)
    rng = np.random.default_rng(0)
    s, losses = parallel.replicate(state), []
    for _ in range(3):
        batch = {"image": rng.uniform(-1, 1, (8, 2, 8, 8, 1)).astype(np.float32),
                 "label": rng.integers(0, 3, (8, 2)).astype(np.int32)}
        s, metrics = step(s, batch)
        losses.append(float(metrics["loss"][0]))
    return config, state, jax.tree.map(lambda a: np.asarray(a)[0], s.params), losses


@pytest.mark.slow
def test_learned_range_trains_the_variance_head(learned_range_run):
    config, state, params, losses = learned_range_run
    assert all(np.isfinite(losses)), losses
    kernel, kernel0 = params["conv_out"]["kernel"], np.asarray(state.params["conv_out"]["kernel"])
    assert kernel.shape[-1] == 2  # eps and the variance output
    assert np.abs(kernel[..., 1] - kernel0[..., 1]).max() > 1e-4  # the variance head was trained


@pytest.mark.slow
def test_learned_range_samples_with_every_sampler(learned_range_run):
    # Guided (the mean half guided, the variance half from the conditional pass), every sampler (ode too):
    # finite images of the right shape, x0 clipped (diffusion.clip_x0).
    config, _, params, _ = learned_range_run
    for name in sampling.SAMPLERS:
        c = config.copy_and_resolve_references()
        c.sampling.update(sampler=name, steps=5, guidance=1.0, num_samples=8, batch_size=8)
        out = generation.run(c, params, generation.make_request(c, label="all"))
        assert out["images"].shape == (8, 8, 8, 1) and np.isfinite(out["images"]).all(), name
        assert np.abs(out["images"]).max() <= 1.0 + 1e-6, name
