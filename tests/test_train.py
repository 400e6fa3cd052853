"""The training system: an end-to-end run, exact resume (also after SIGTERM), and the pmapped step."""
import functools
import json
import os
import signal

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddpm_jax import checkpoints, input_pipeline, parallel, train
from tests.train_helpers import (assert_trees_equal, prepare_digits, read_events, small_cifar10_config,
                                 small_digits_config)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_digits(str(tmp_path_factory.mktemp("tfds")))


def test_train_and_evaluate_writes_checkpoints_logs_and_samples(tmp_path):
    config = small_cifar10_config()
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=64):  # CIFAR-10's features, random pixels, no download
        state = train.train_and_evaluate(config, workdir)

    assert int(state.step) == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert checkpoints.load_config(workdir).to_dict() == checkpoints._tuples(json.loads(config.to_json_best_effort()))
    params, step = checkpoints.load_params(workdir)
    assert step == 4
    assert_trees_equal(params, state.ema_params)
    assert all(x.devices() == {jax.local_devices(backend="cpu")[0]} for x in jax.tree.leaves(params))

    # A 4x4 grid of 32x32 samples with 2-pixel padding, enlarged twice.
    from PIL import Image

    png = Image.open(os.path.join(workdir, "samples", "step_00000004.png"))
    assert png.size == (2 * (4 * 34 + 2),) * 2 and png.mode == "RGB"
    events = read_events(workdir)
    assert [s for s, _ in events["loss"]] == [2, 4]
    assert all(0.1 < v < 10 for _, v in events["loss"])
    assert {"grad_norm", "learning_rate"} <= set(events)
    np.testing.assert_allclose([v for _, v in events["learning_rate"]], [1e-4, 3e-4], rtol=1e-5)
    assert [s for s, _ in events["samples"]] == [4]


def _run(config, workdir, num_steps):
    config = config.copy_and_resolve_references()
    config.training.num_train_steps = num_steps
    return train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("conditional", [False, True])
def test_stopping_and_restarting_gives_bitwise_identical_params(data_dir, tmp_path, conditional):
    config = small_digits_config(data_dir)
    if conditional:  # also resumes the label-dropout draws
        config.model.num_classes = 10
    straight = _run(config, str(tmp_path / "straight"), 8)
    _run(config, str(tmp_path / "resumed"), 4)
    resumed = _run(config, str(tmp_path / "resumed"), 8)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "8"]
    assert int(resumed.step) == 8
    assert_trees_equal(straight, resumed)
    # The data position went into the checkpoint: 8 steps of 16 examples.
    with open(tmp_path / "resumed" / "checkpoints" / "8" / "data" / "metadata") as f:
        assert json.load(f) == {"position": 128}


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
    assert_trees_equal(straight, resumed)


def test_pmapped_step_on_8_devices_equals_the_global_batch_on_1(data_dir):
    config = small_digits_config(data_dir)
    config.model.dropout = 0.0  # dropout masks are per device; everything else is per example
    config.model.num_classes = 10
    config.training.label_dropout = 0.5
    config.optim.warmup_steps = 0
    rng = np.random.default_rng(0)
    batches = [{"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
                "label": rng.integers(0, 10, (16,)).astype(np.int32)} for _ in range(2)]
    state = train.create_train_state(config, 0)
    results = []
    for devices in (jax.devices()[:8], jax.devices()[:1]):
        p_step = jax.pmap(functools.partial(train.train_step, config=config), axis_name=parallel.AXIS_NAME,
                          devices=devices)
        s = parallel.replicate(state, devices)
        for b in batches:
            s, metrics = p_step(s, jax.tree.map(lambda x: x.reshape((len(devices), -1) + x.shape[1:]), b))
        results.append((parallel.to_host(s), parallel.to_host(metrics)))
    (s8, m8), (s1, m1) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert int(s8.step) == int(s1.step) == 2
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the steps did change the params
    for a, b in zip(jax.tree.leaves((s8.params, s8.ema_params, s8.opt_state)),
                    jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label_dropout", [0.0, 1.0])
def test_label_dropout_trains_the_null_class_embedding(data_dir, label_dropout):
    config = small_digits_config(data_dir)
    config.model.num_classes = 10
    config.training.label_dropout = label_dropout
    config.optim.warmup_steps = 0
    state = train.create_train_state(config, 0)
    batch = {"image": np.random.default_rng(0).uniform(-1, 1, (8, 2, 8, 8, 1)).astype(np.float32),
             "label": np.full((8, 2), 3, np.int32)}
    p_step = jax.pmap(functools.partial(train.train_step, config=config), axis_name=parallel.AXIS_NAME)
    new, _ = p_step(parallel.replicate(state), batch)
    before = state.params["label_emb"]["embedding"]
    changed = np.abs(parallel.to_host(new).params["label_emb"]["embedding"] - before).max(axis=1) > 0
    # Rows 0..9 are the classes, row 10 the null class; only the rows the step saw get gradients.
    expected = np.zeros(11, bool)
    expected[10 if label_dropout == 1.0 else 3] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.slow
def test_a_few_hundred_digits_steps_lower_the_loss(data_dir, tmp_path):
    config = small_digits_config(data_dir)
    config.optim.warmup_steps = 20
    config.training.batch_size = 64
    config.training.steps_per_call = 10
    config.training.num_train_steps = 300
    config.training.log_every = 10
    config.training.checkpoint_every = 300
    train.train_and_evaluate(config, str(tmp_path))
    losses = [v for _, v in read_events(str(tmp_path))["loss"]]
    assert np.mean(losses[:2]) > 0.6  # eps prediction starts at E[eps^2] = 1
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2])
