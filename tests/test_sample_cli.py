"""`python -m ddpm_jax.sample`: the files it promises, editing through it, and its errors."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from ddpm_jax import checkpoints, generation, image_utils
from ddpm_jax.train_state import create_train_state
from ddpm_jax.validation import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(num_classes=3):
    c = tiny.get_config()
    c.data.image_size, c.data.channels = 8, 1
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 32, (1,), ()
    c.model.num_classes = num_classes
    c.diffusion.num_timesteps = 20
    c.sampling.steps = 5
    c.sampling.num_frames = 4
    return c


def _workdir(path, config):
    checkpoints.write_config(path, config)
    manager = checkpoints.checkpoint_manager(path)
    checkpoints.save_train_state(manager, jax.device_get(create_train_state(config, 0)), {})
    manager.wait_until_finished()
    manager.close()
    return str(path)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    return _workdir(tmp_path_factory.mktemp("cond"), _config())


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i in range(3):
        image_utils.save_png(str(d / f"in{i}.png"), rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
    mask = np.zeros((8, 8, 1), np.uint8)
    mask[2:6, 2:6] = 255
    image_utils.save_png(str(d.parent / "mask.png"), mask)
    image_utils.save_png(str(d.parent / "mask16.png"), np.zeros((16, 16, 1), np.uint8))
    return str(d)


def test_cli_writes_the_files_it_promises(cond_run, tmp_path):
    out = str(tmp_path / "out")
    # 10 samples in batches of 4 over 8 devices (tests/conftest.py): padding and a ragged last batch.
    r = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.sample", f"--workdir={cond_run}", f"--out={out}", "--num_samples=9",
         "--batch_size=4", "--sampler=ddim", "--guidance=2", "--label=all", "--individual", "--figures"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "samples.npz", "forward_process.png", "reverse_process.png"):
        assert os.path.join(out, name) in r.stdout.split()
        assert os.path.getsize(os.path.join(out, name)) > 0
    npz = np.load(os.path.join(out, "samples.npz"))
    assert npz["arr_0"].shape == (9, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(npz["labels"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert sorted(os.listdir(os.path.join(out, "images"))) == [f"{i:06d}.png" for i in range(9)]
    np.testing.assert_array_equal(image_utils.load_images(os.path.join(out, "images", "000004.png"), channels=1)[0],
                                  npz["arr_0"][4])
    # Grid: one row per class (3 rows of 3), 8x8 images with 2px padding, enlarged 4x.
    grid = image_utils.load_images(os.path.join(out, "samples.png"), channels=1)[0]
    assert grid.shape == (4 * (3 * 10 + 2), 4 * (3 * 10 + 2), 1)
    # Figures: 8 rows (capped at the 9 samples), x_0 + 4 frames forward, 4 frames reverse.
    assert image_utils.load_images(os.path.join(out, "forward_process.png"), channels=1).shape[1:3] == (
        4 * (8 * 10 + 2), 4 * (5 * 10 + 2))
    assert "[##############################] 9/9 images" in r.stderr


def test_individual_images_are_those_of_the_last_run(tmp_path):
    """--individual into a folder that holds a larger earlier run's images: only this run's remain
    (a folder read whole for FID must not mix runs); other files there are left alone."""
    config = _config(num_classes=0)
    out, rng = str(tmp_path), np.random.default_rng(0)
    for n in (5, 3):
        config.sampling.num_samples = n
        images = rng.integers(0, 256, (n, 8, 8, 1), np.uint8)
        if n == 3:
            (tmp_path / "images" / "notes.txt").write_text("mine")
        generation.write_outputs(out, images, generation.make_request(config), 0, individual=True)
    assert sorted(os.listdir(tmp_path / "images")) == ["000000.png", "000001.png", "000002.png", "notes.txt"]
    np.testing.assert_array_equal(image_utils.load_images(str(tmp_path / "images" / "000002.png"), channels=1)[0],
                                  images[2])


def _request(config, *, label=None, init_images=None, mask=None, invert=False, **sampling):
    """`generation.make_request` as the command calls it: flags written into `sampling` first."""
    config = config.copy_and_resolve_references()
    config.sampling.update(sampling)
    return config, generation.make_request(config, label=label, init_images=init_images, mask=mask,
                                           invert=invert, given=frozenset(sampling))


def test_editing_keeps_what_it_must(cond_run, images_dir):
    config = checkpoints.load_config(cond_run)
    params, step = checkpoints.load_params(cond_run, config)
    assert step == 0
    inputs = image_utils.load_images(images_dir, channels=1)
    mask_path = os.path.join(os.path.dirname(images_dir), "mask.png")
    for kw in (dict(jump_length=1, jump_n_sample=2), dict(sampler="ddim")):
        c, req = _request(config, init_images=images_dir, mask=mask_path, num_samples=5, label="1", guidance=1.0,
                          **kw)
        out = image_utils.to_uint8(generation.run(c, params, req)["images"])
        known = np.ones((8, 8, 1), bool)
        known[2:6, 2:6] = False
        # Every known pixel comes back exactly as the input PNG had it (images cycle: 0 1 2 0 1).
        np.testing.assert_array_equal(out[:, known], inputs[[0, 1, 2, 0, 1]][:, known])
    c, req = _request(config, init_images=images_dir, strength=0.0)
    np.testing.assert_array_equal(image_utils.to_uint8(generation.run(c, params, req)["images"]), inputs)
    c, req = _request(config, init_images=images_dir, strength=0.6, invert=True, sampler="ddim")
    assert req.spec.level == 3 and req.spec.invert
    assert generation.run(c, params, req)["images"].shape == (3, 8, 8, 1)
    c, req = _request(config, guidance=1.0, guidance_t_min=100.0, guidance_t_max=600.0)
    assert req.spec.guidance_interval == (100.0, 600.0)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_unconditional_model_rejects_labels_and_guidance(tmp_path):
    config = _config(num_classes=0)
    with pytest.raises(UserError, match=r"guidance=2.0 needs a class- or text-conditional model.*num_classes=0"):
        _request(config, guidance=2.0)
    with pytest.raises(UserError, match=r"--label=1: this run's model is unconditional"):
        _request(config, label="1")
    # Autoguidance needs no condition: the guide run (freshly initialised: its zero output layer
    # predicts eps = 0) is the negative half, so the samples of a model with an output change.
    guide = _workdir(tmp_path / "guide", config)
    leaves, tree = jax.tree.flatten(jax.device_get(create_train_state(config, 1)).ema_params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    c, req = _request(config, guidance=2.0, guide_workdir=guide)
    guided = generation.run(c, params, req)["images"]
    c0, req0 = _request(config, guide_workdir=guide)  # w = 0: the guide is not used (nor checked)
    plain = generation.run(c0, params, req0)["images"]
    assert np.isfinite(guided).all() and np.abs(guided - plain).mean() > 1e-3
    _request(config, guidance=0.0, guide_workdir=str(tmp_path / "no_such_run"))


def test_per_class_accuracy_table():
    from ddpm_jax.evaluation import conditional_accuracy as ca

    labels = np.array([0, 0, 1, 1, 2, 2])
    acc = ca.per_class_accuracy(np.array([0, 1, 1, 1, 0, 0]), labels, 3)
    np.testing.assert_allclose(acc, [0.5, 1.0, 0.0])
    table = ca.markdown_table([("ddim 10", {"per_class": acc, "accuracy": 0.5, "digits_fd": 1.234,
                                              "seconds": 12.3})], 3)
    assert table.splitlines()[2] == "| ddim 10 | 50 | 100 | 0 | 50.0 | 1.23 | 12 |"


def test_relative_workdir_loads(cond_run, monkeypatch):
    """`--workdir=runs/x` is relative to the current folder (Orbax itself wants absolute paths)."""
    monkeypatch.chdir(os.path.dirname(cond_run))
    params, step = checkpoints.load_params(os.path.basename(cond_run))
    assert step == 0 and jax.tree.leaves(params)


def test_a_sample_command_stopped_by_ctrl_c_resumes_and_writes_the_images_of_an_uninterrupted_run(
        cond_run, tmp_path, monkeypatch):
    """Ctrl-C after 2 of its 3 batches: two lines say what is kept and that it stopped (exit 130, no
    traceback), OUT/partial holds those batches, the same command again samples only the last and
    writes what one run writes; OUT/partial is gone then."""
    from cli_helpers import run_command

    from ddpm_jax import sample

    args = [f"--workdir={cond_run}", "--num_samples=20", "--batch_size=8", "--label=all"]  # 8 devices: 3 batches
    status, _, err = run_command(sample, *args, f"--out={tmp_path / 'whole'}")
    assert status == 0, err[-2000:]

    class CtrlCAt16(generation.ProgressBar):
        def __call__(self, done, total, resumed=False):
            super().__call__(done, total, resumed)
            if done == 16:
                raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(generation, "ProgressBar", CtrlCAt16)
        status, _, err = run_command(sample, *args, f"--out={tmp_path / 'out'}")
    assert status == 130 and "Traceback" not in err, err[-2000:]
    assert err.rstrip().endswith("stopped by Ctrl-C.") and (f"Stopped with 2 of 3 batches done; they are kept in "
                                                           f"{tmp_path / 'out' / 'partial'}") in err, err[-2000:]
    assert sorted(os.listdir(tmp_path / "out" / "partial" / "process_0")) == [
        "chunk_000000.npz", "chunk_000001.npz", "meta.json"]
    status, _, err = run_command(sample, *args, f"--out={tmp_path / 'out'}")
    assert status == 0 and "resuming: 16/20 images read from the last run" in err, err[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["samples.npz", "samples.png"]
    with np.load(tmp_path / "whole" / "samples.npz") as whole, np.load(tmp_path / "out" / "samples.npz") as resumed:
        assert len({img.tobytes() for img in whole["arr_0"]}) == 20  # each row its own noise
        np.testing.assert_array_equal(resumed["arr_0"], whole["arr_0"])
        np.testing.assert_array_equal(resumed["labels"], whole["labels"])



def test_non_finite_samples_stop_at_the_first_batch_naming_it():
    """A diverged checkpoint's samples are a one-line error at batch 0, before a later batch is drawn
    or anything is kept; with the ode sampler the message also names the solver's budget."""
    config = _config(num_classes=0)
    config.sampling.update(num_samples=16, batch_size=8)
    params = jax.tree.map(lambda p: np.full_like(p, np.nan), create_train_state(config, 0).ema_params)
    calls = []
    for sampler, why in (("ddim", r"the checkpoint's params are broken"),
                         ("ode", r"the ode solver did not reach --ode_tolerance in 2,000 tries, or the checkpoint's")):
        config.sampling.sampler = sampler
        with pytest.raises(UserError, match=rf"^8 of the 8 samples of batch 0 are not finite: {why}"):
            generation.run(config, params, generation.make_request(config), lambda *a, **k: calls.append(a),
                           uint8=True)
    assert calls == []
