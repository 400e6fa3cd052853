"""`python -m ddpm_jax.evaluate` and the in-loop evaluator, end to end on small inputs."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.evaluation import in_loop, inception, metrics, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_samples_formats(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=u8, labels=np.arange(5))  # as `ddpm_jax.sample` writes
    images, labels = tasks.load_samples(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(images, u8)
    np.testing.assert_array_equal(labels, np.arange(5))
    np.savez(tmp_path / "b.npz", images=u8 / 127.5 - 1.0)  # float in [-1, 1]
    np.testing.assert_array_equal(tasks.load_samples(str(tmp_path / "b.npz"))[0], u8)
    np.savez(tmp_path / "c.npz", x=u8)
    with pytest.raises(ValueError, match="'arr_0' or 'images'"):
        tasks.load_samples(str(tmp_path / "c.npz"))
    with pytest.raises(FileNotFoundError, match="--samples"):
        tasks.load_samples(str(tmp_path / "none.npz"))


def _digits_config(tmp_path):
    from configs import digits
    config = digits.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.model.ch, config.model.ch_mult, config.model.attn_resolutions = 16, (1,), ()
    config.diffusion.num_timesteps = 10
    config.sampling.steps = 10
    config.eval.num_samples, config.eval.bpd_examples, config.eval.batch_size = 16, 16, 16
    config.eval.digits_classifier = str(tmp_path / "clf.npz")
    return config


def test_check_config_names_the_field(tmp_path):
    config = _digits_config(tmp_path)
    for field, value, match in [("eval_every", -1, "eval.eval_every=-1"), ("batch_size", 0, "eval.batch_size=0"),
                                ("steps", 11, "eval.steps=11"), ("num_samples", 1, "eval.num_samples=1"),
                                ("inception_weights", "w.npz", "eval.inception_weights and eval.reference_stats")]:
        bad = config.copy_and_resolve_references()
        bad.eval[field] = value
        with pytest.raises(ValueError, match=match):
            in_loop.check_config(bad)
    missing = config.copy_and_resolve_references()
    missing.eval.inception_weights, missing.eval.reference_stats = str(tmp_path / "w.npz"), str(tmp_path / "s.npz")
    with pytest.raises(FileNotFoundError, match="eval.inception_weights=.*pytorch-fid"):
        in_loop.Evaluator(missing)


class _Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = scalars


@pytest.mark.slow
def test_in_loop_evaluator_on_digits(tmp_path):
    """Digits metrics on generated samples and bits/dim on real digits, written as eval/ scalars."""
    from ddpm_jax.models import unet_from_config
    config = _digits_config(tmp_path)
    params = unet_from_config(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                           jnp.zeros((1,), jnp.int32))["params"]
    writer = _Writer()
    out = in_loop.Evaluator(config)(7, params, writer)
    assert set(out) == {"digits_fd", "digits_cs", "bpd", "bpd_prior", "bpd_decoder", "bpd_kl"}
    assert all(np.isfinite(v) for v in out.values())
    np.testing.assert_allclose(out["bpd"], out["bpd_prior"] + out["bpd_decoder"] + out["bpd_kl"], rtol=1e-5)
    assert writer.scalars[7]["eval/digits_fd"] == out["digits_fd"]
    assert out["digits_fd"] > 50  # an untrained model makes noise, far from the digits


@pytest.mark.slow
def test_fid_is_kid_with_random_inception(tmp_path):
    """The whole FID path on 12 images with random Inception weights: identical sets have FID ~0 and
    KID ~0; a different set does not."""
    variables = inception.random_variables()
    flat = {"/".join(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    np.savez(tmp_path / "w.npz", **flat)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    tasks.reference_statistics(metrics.batched(real, 5), str(tmp_path / "w.npz"), str(tmp_path / "s.npz"),
                               keep_features=True, per_device_batch=1)
    same = tasks.fid_is_kid(real, str(tmp_path / "w.npz"), str(tmp_path / "s.npz"), per_device_batch=1)
    assert abs(same["fid"]) < 1e-2 and abs(same["kid"]) < 1e-3 and same["is"] >= 1.0
    other = tasks.fid_is_kid(np.full_like(real, 128), str(tmp_path / "w.npz"), str(tmp_path / "s.npz"),
                             per_device_batch=1)
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-3)


def test_cli_errors_before_work(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *args: subprocess.run([sys.executable, "-m", "ddpm_jax.evaluate", *args], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=300)
    r = run("nonsense")
    assert r.returncode != 0 and "COMMAND is one of" in r.stderr
    r = run("fid", f"--samples={tmp_path / 'none.npz'}", f"--reference_stats={tmp_path / 's.npz'}")
    assert r.returncode != 0 and "--inception_weights / eval.inception_weights=None" in r.stderr
    r = run("bpd", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "config.json" in r.stderr


@pytest.mark.slow
def test_training_loop_writes_eval_scalars(tmp_path):
    """The hook in `train_and_evaluate`: eval/ scalars at every eval.eval_every steps and at the end."""
    from ddpm_jax.training import train_and_evaluate
    from train_helpers import read_events, small_digits_config
    config = small_digits_config(str(tmp_path / "tfds"))
    config.training.num_train_steps = 4
    config.eval.eval_every, config.eval.num_samples, config.eval.bpd_examples = 3, 16, 16
    config.eval.steps, config.eval.batch_size = 5, 16
    config.eval.digits_classifier = str(tmp_path / "clf.npz")
    train_and_evaluate(config, str(tmp_path / "run"))
    events = read_events(str(tmp_path / "run"))
    for tag in ("eval/digits_fd", "eval/digits_cs", "eval/bpd", "eval/bpd_decoder"):
        assert [s for s, _ in events[tag]] == [3, 4], tag
        assert all(np.isfinite(v) for _, v in events[tag])


def test_run_configs_get_current_eval_defaults():
    """An older run's config.json lacks newer eval fields: they come from configs/default.py."""
    import ml_collections
    from ddpm_jax import evaluate
    config = evaluate._with_eval_defaults(ml_collections.ConfigDict({"eval": {"num_samples": 5}}))
    assert config.eval.num_samples == 5 and config.eval.bpd_examples == 0 and config.eval.digits_classifier is None


def test_pth_weights_are_converted_once_beside_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from ddpm_jax import evaluate
    from test_inception import _synthetic_state_dict
    torch.save({k: torch.from_numpy(v) for k, v in _synthetic_state_dict().items()}, tmp_path / "fid.pth")
    npz = evaluate._weights(str(tmp_path / "fid.pth"))
    assert npz == str(tmp_path / "fid.npz") and os.path.isfile(npz)
    mtime = os.path.getmtime(npz)
    assert evaluate._weights(str(tmp_path / "fid.pth")) == npz and os.path.getmtime(npz) == mtime
    assert evaluate._weights(npz) == npz
