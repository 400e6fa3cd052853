"""`python -m ddpm_jax.evaluate` and the in-loop evaluator, end to end on small inputs."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from cli_helpers import run_command
from flax import traverse_util

from ddpm_jax import checkpoints, cli, evaluate, image_utils, parallel
from ddpm_jax.evaluation import in_loop, inception, metrics, tasks
from ddpm_jax.validation import UserError, validate_eval

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
    with pytest.raises(UserError, match="'arr_0' or 'images'"):
        tasks.load_samples(str(tmp_path / "c.npz"))
    with pytest.raises(UserError, match="--samples"):
        tasks.load_samples(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "nan.npz", images=np.full((2, 8, 8, 1), np.nan, np.float32))
    with pytest.raises(UserError, match="2 images have non-finite values"):
        tasks.load_samples(str(tmp_path / "nan.npz"))


def test_samples_from_a_folder_of_images(tmp_path):
    """A folder of PNGs (`sample --individual`'s images/, another program's samples): read in name
    order as stored, greyscale as 1 channel and colour as 3; no labels; images of different sizes or
    a folder without images are one line."""
    rng = np.random.default_rng(0)
    for name, shape in (("grey", (3, 8, 8, 1)), ("rgb", (2, 6, 6, 3))):
        u8 = rng.integers(0, 256, shape, dtype=np.uint8)
        for i, img in enumerate(u8):
            image_utils.save_png(str(tmp_path / name / f"{i:06d}.png"), img)
        images, labels = tasks.load_samples(str(tmp_path / name))
        np.testing.assert_array_equal(images, u8)
        assert labels is None
    image_utils.save_png(str(tmp_path / "rgb" / "000002.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match=r"000002.png is 8x8x3 .*000000.png 6x6x3: the images must all be alike"):
        tasks.load_samples(str(tmp_path / "rgb"))
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="--samples=.*none: .*folder has no .png/.jpg images"):
        tasks.load_samples(str(tmp_path / "none"))


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


def test_eval_config_errors_name_the_field(tmp_path):
    config = _digits_config(tmp_path)
    for field, value, match in [("eval_every", -1, "eval.eval_every=-1"), ("batch_size", 0, "eval.batch_size=0"),
                                ("steps", 11, "eval.steps=11"), ("num_samples", 1, "eval.num_samples=1"),
                                ("seed", -2, "eval.seed=-2"), ("bpd_method", "x", "eval.bpd_method='x'"),
                                ("ode_tolerance", 1.0, "eval.ode_tolerance=1.0"),
                                ("ode_sigma_min", 1.0, "eval.ode_sigma_min=1.0"),
                                ("inception_weights", "w.npz", "eval.inception_weights and eval.reference_stats")]:
        bad = config.copy_and_resolve_references()
        bad.eval[field] = value
        with pytest.raises(UserError, match=match):
            validate_eval(bad, in_loop=True)
    missing = config.copy_and_resolve_references()
    missing.eval.inception_weights, missing.eval.reference_stats = str(tmp_path / "w.npz"), str(tmp_path / "s.npz")
    with pytest.raises(UserError, match="eval.inception_weights=.*pytorch-fid"):
        in_loop.Evaluator(missing)


class _Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = scalars


@pytest.mark.slow
def test_in_loop_evaluator_on_digits(tmp_path):
    """Digits metrics on generated samples and bits/dim on real digits (by the bound, then the ODE),
    written as eval/ scalars."""
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
    config.eval.bpd_method, config.eval.num_samples = "ode", 0
    out = in_loop.Evaluator(config)(8, params, writer)
    assert set(out) == {"bpd", "ode_evals", "ode_unfinished"} and np.isfinite(out["bpd"]) and out["ode_evals"] > 7
    assert writer.scalars[8]["eval/ode_evals"] == out["ode_evals"]
    # Samples by the ode sampler: its evaluations per image beside the metrics, apart from bits/dim's.
    config.sampling.sampler, config.eval.ode_tolerance, config.eval.num_samples = "ode", 1e-2, 8
    out = in_loop.Evaluator(config)(9, params, writer)
    assert out["ode_sampling_evals"] > 7 and out["ode_sampling_evals"] != out["ode_evals"]
    assert writer.scalars[9]["eval/ode_sampling_evals"] == out["ode_sampling_evals"]


@pytest.mark.slow
def test_fid_is_kid_precision_recall_with_random_inception(tmp_path, monkeypatch):
    """The whole FID path on 12 images with random Inception weights: identical sets have FID ~0, KID ~0
    and precision = recall = 1; a different set does not. The same through `evaluate fid` (its JSON)
    and the in-loop evaluator (its TensorBoard scalars)."""
    variables = inception.random_variables()
    flat = traverse_util.flatten_dict(variables, sep="/")
    np.savez(tmp_path / "w.npz", **{k: np.asarray(v) for k, v in flat.items()})
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    tasks.reference_statistics(real, str(tmp_path / "w.npz"), str(tmp_path / "s.npz"), keep_features=True,
                               per_device_batch=1)
    reference = metrics.load_statistics(str(tmp_path / "s.npz"))
    replicated = parallel.replicate(inception.load_variables(str(tmp_path / "w.npz")))
    same = tasks.fid_is_kid(real, replicated, reference, per_device_batch=1)
    assert abs(same["fid"]) < 1e-2 and abs(same["kid"]) < 1e-3 and same["is"] >= 1.0
    assert same["precision"] == same["recall"] == 1.0
    other = tasks.fid_is_kid(np.full_like(real, 128), replicated, reference, per_device_batch=1)
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-3)
    assert other["recall"] == 0.0  # 12 copies of one image: a manifold of one point, radius 0

    np.savez(tmp_path / "samples.npz", arr_0=real)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    status, out, err = run_command(evaluate, "fid", f"--samples={tmp_path / 'samples.npz'}",
                                   f"--workdir={tmp_path / 'run'}", f"--inception_weights={tmp_path / 'w.npz'}",
                                   f"--reference_stats={tmp_path / 's.npz'}", "--per_device_batch=1")
    assert status == 0, err[-2000:]
    written = json.loads((tmp_path / "run" / "eval" / "fid_samples.json").read_text())
    assert written["precision"] == written["recall"] == 1.0 and written["num_samples"] == 12
    assert json.loads(out[out.index("{"):out.index("}") + 1]) == written

    config = _digits_config(tmp_path)
    config.data.dataset, config.eval.bpd_examples = "cifar10", 0  # FID alone: nothing reads the dataset
    config.eval.inception_weights, config.eval.reference_stats = str(tmp_path / "w.npz"), str(tmp_path / "s.npz")
    evaluator = in_loop.Evaluator(config)
    np.testing.assert_array_equal(evaluator.reference["radii"], metrics.knn_radii(reference["features"]))
    monkeypatch.setattr(tasks, "generate", lambda config, params, **kw: (real, None, {}))
    monkeypatch.setattr(tasks, "fid_is_kid", functools.partial(tasks.fid_is_kid, per_device_batch=1))  # compiled
    writer = _Writer()
    evaluator(3, None, writer)
    assert writer.scalars[3]["eval/precision"] == writer.scalars[3]["eval/recall"] == 1.0


def test_cli_errors_before_work(tmp_path):
    status, _, err = run_command(evaluate, "nonsense")
    assert status == 2 and "COMMAND is one of" in err
    status, _, err = run_command(evaluate, "fid", f"--samples={tmp_path / 'none.npz'}",
                                 f"--reference_stats={tmp_path / 's.npz'}")
    assert status == 2 and "--inception_weights / eval.inception_weights=None" in err
    status, _, err = run_command(evaluate, "bpd", f"--workdir={tmp_path}")
    assert status == 2 and "config.json" in err


def test_fid_inputs_that_cannot_give_fid_and_is_are_one_line(tmp_path):
    """Reference statistics of other features than the 2048-d pool, or fewer images than the Inception
    Score's 10 splits, stop before any work with one line naming the file or field."""
    flat = traverse_util.flatten_dict(inception.random_variables(), sep="/")
    np.savez(tmp_path / "w.npz", **{k: np.asarray(v) for k, v in flat.items()})
    np.savez(tmp_path / "s16.npz", mu=np.zeros(16), sigma=np.eye(16))
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((9, 32, 32, 3), np.uint8))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    fid = ("fid", f"--samples={tmp_path / 'samples.npz'}", f"--inception_weights={tmp_path / 'w.npz'}")
    for args, says in ((("fid", f"--workdir={tmp_path / 'run'}", "--num_samples=5",
                         f"--inception_weights={tmp_path / 'w.npz'}", f"--reference_stats={tmp_path / 's.npz'}"),
                        "error: eval.num_samples: 5 images; the Inception Score is computed over 10 splits"),
                       ((*fid, f"--reference_stats={tmp_path / 's16.npz'}"),
                        f"error: --reference_stats / eval.reference_stats={tmp_path / 's16.npz'}: its statistics are "
                        "16-d; FID here uses the 2048-d Inception pool features"),
                       ((*fid, f"--reference_stats={tmp_path / 's.npz'}"),
                        f"error: --samples={tmp_path / 'samples.npz'}: 9 images; the Inception Score is computed "
                        "over 10 splits, so fid needs at least 10")):
        status, _, err = run_command(evaluate, *args)
        assert status == 2 and says in err and "Traceback" not in err, err[-2000:]


@pytest.mark.slow
def test_training_loop_writes_eval_scalars(tmp_path):
    """The hook in `train_and_evaluate`: eval/ scalars at every eval.eval_every steps and at the end."""
    from train_helpers import read_events, small_digits_config

    from ddpm_jax.training import train_and_evaluate
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


def test_run_configs_get_current_defaults(tmp_path):
    """An older run's config.json lacks newer fields: they come from `defaults.get_config()`."""
    (tmp_path / "config.json").write_text(json.dumps({"eval": {"num_samples": 5}, "model": {"ch_mult": [1, 2]}}))
    config = checkpoints.load_config(str(tmp_path))
    assert config.eval.num_samples == 5 and config.eval.bpd_examples == 0 and config.eval.digits_classifier is None
    assert config.model.ch_mult == (1, 2) and config.sampling.seed == 0
    # ... and the evaluate command's flags write into them (the FieldReference fields included).
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["evaluate", "--num_samples=7", "--inception_weights=w.npz"])
    cli.apply_flags(config, fv, cli.EVAL_FLAGS)
    assert config.eval.num_samples == 7 and config.eval.inception_weights == "w.npz"


def test_pth_weights_are_converted_once_beside_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from test_inception import _synthetic_state_dict

    torch.save({k: torch.from_numpy(v) for k, v in _synthetic_state_dict().items()}, tmp_path / "fid.pth")
    npz = tasks.inception_weights_file(str(tmp_path / "fid.pth"))
    assert npz == str(tmp_path / "fid.npz") and os.path.isfile(npz)
    mtime = os.path.getmtime(npz)
    assert tasks.inception_weights_file(str(tmp_path / "fid.pth")) == npz and os.path.getmtime(npz) == mtime
    assert tasks.inception_weights_file(npz) == npz


def test_result_names_tell_the_sampling_settings_apart():
    from configs import shapes_t2i
    c = shapes_t2i.get_config()
    assert tasks.sampling_name(c) == "ddim50_eta1_w3_t150-inf_n500"
    c.sampling.update(guidance=0.0)
    assert tasks.sampling_name(c) == "ddim50_eta1_w0_n500"  # unguided: the interval changes nothing
    c.sampling.update(guidance_t_min=0.0, eta=0.0, guidance=3.0)
    assert tasks.sampling_name(c) == "ddim50_w3_n500"  # every t: no interval in the name
    c.sampling.update(guidance=2.0, guidance_t_min=300.0, guidance_t_max=900.0)
    c.eval.update(seed=1, steps=25, num_samples=1000)
    assert tasks.sampling_name(c) == "ddim25_w2_t300-900_seed1_n1000"  # a run on more captions: another file
    c.sampling.guide_workdir = "runs/t2i_2k/"
    assert tasks.sampling_name(c) == "ddim25_w2_t300-900_guide-t2i_2k_seed1_n1000"  # autoguidance
    c.sampling.guide_checkpoint_step = 2000
    assert tasks.sampling_name(c) == "ddim25_w2_t300-900_guide-t2i_2k_step2000_seed1_n1000"  # its checkpoint 2000
    c.sampling.guidance = 0.0
    assert tasks.sampling_name(c) == "ddim25_w0_seed1_n1000"  # unguided: no guide either


def test_evaluate_cascade_passes_its_sampling_flags_as_one_value_for_all_stages(monkeypatch, tmp_path):
    from ddpm_jax.evaluation import super_resolution

    calls = []

    def fake_cascade(workdirs, num_samples, split, overrides, seed=None, checkpoint_steps=None, progress=None,
                     resume_dir=None, text_encoder=None):
        calls.append((workdirs, num_samples, split, overrides, seed, checkpoint_steps, text_encoder))
        return {"stages": [{"workdir": workdirs[0], "step": 8}, {"workdir": workdirs[1], "step": 15}]}

    monkeypatch.setattr(super_resolution, "cascade", fake_cascade)
    base, sr = str(tmp_path / "base"), str(tmp_path / "sr")
    status, out, err = run_command(evaluate, "cascade", f"--stages={base},{sr}", "--guidance_t_min=150",
                                   "--steps=7", "--num_samples=4", "--seed=3", "--checkpoint_step=8,0",
                                   "--text_encoder=/t5/moved")
    assert status == 0, err[-2000:]
    assert calls == [([base, sr], 4, None, {"guidance_t_min": [150.0], "steps": [7]}, 3, ["8", "0"], "/t5/moved")]
    # named by the SR run too: another SR run at step 15 must not overwrite it; not by the encoder's folder
    name = "cascade_step_8_sr-15_guidance_t_min150_num_samples4_seed3_steps7.json"
    assert os.listdir(os.path.join(base, "eval")) == [name]
    with pytest.raises(UserError, match="--batch_size does not apply to cascade"):
        tasks.cascade_command([base, sr], {"batch_size": 8})


def test_the_held_out_split_is_test_on_a_dataset_not_prepared_yet(tmp_path, monkeypatch):
    """Before: an unprepared dataset listed no splits, so the first evaluation on a fresh data_dir read
    data.split ('train') and later ones 'test'."""
    from configs import shapes_t2i
    from ddpm_jax.datasets import shapes as shapes_ds
    monkeypatch.setattr(shapes_ds, "SPLITS", {"train": (8, 0), "test": (6, 1)})
    config = shapes_t2i.get_config()
    config.data.data_dir = str(tmp_path)
    assert tasks.eval_split(config) == "test"
    first = tasks.captions(config, "test", 4)
    assert first == tasks.captions(config, tasks.eval_split(config), 4) and first != tasks.captions(config, "train", 4)
