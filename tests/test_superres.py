"""Super-resolution and cascades: the low-resolution conditioning, noise-conditioning augmentation
(exact at level 0, consistent with the level the model is told), the sample command's --low_res,
the cascade's row pairing and command, and a tiny SR training run end to end."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import run_command
from test_text_to_image import _perturbed, _random_params, _save_run, _text_config
from train_helpers import prepare_digits, small_digits_config

from ddpm_jax import cascade, cascading, checkpoints, evaluate, generation, image_utils, sample, superres, training
from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax.models import unet_from_config
from ddpm_jax.validation import UserError


def _sr_config(low_res=4, text="none"):
    """8x8 greyscale (digits-shaped) SR from `low_res`x`low_res`, T = 20."""
    c = _text_config(text) if text != "none" else _text_config()
    if text == "none":
        c.model.text_encoder = "none"
        c.data.dataset, c.data.channels = "digits", 1
    c.model.low_res_size = low_res
    c.model.ch = 64  # GroupNorm's 32 groups of 2 channels: one channel per group would cancel the temb shift
    c.diffusion.low_res_aug_max = 0.5
    return c


def test_augmentation_is_exact_at_level_zero_and_follows_the_forward_process():
    c = _sr_config()
    full = D.schedule_from_config(c.diffusion)
    respaced = D.schedule_from_config(c.diffusion, 5)
    T = c.diffusion.num_timesteps
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_array_equal(superres.augment(full, x, jnp.zeros(3), noise), x)
    # Level k / T is timestep k - 1 of the forward process (float64 reference), on the respaced
    # schedule too (sampling) as on the full one (training).
    abar = np.cumprod(1.0 - D.get_betas(c.diffusion.beta_schedule, T, c.diffusion.beta_start, c.diffusion.beta_end))
    levels = jnp.arange(1, T + 1) / T
    for s in (full, respaced):
        np.testing.assert_allclose(superres.level_alpha_bar(s, levels), abar, rtol=2e-5)
    mid = superres.level_alpha_bar(full, jnp.array([0.5 / T]))  # halfway between 1 and abar_0
    np.testing.assert_allclose(mid, (1 + abar[0]) / 2, rtol=1e-6)
    z = superres.augment(full, x, jnp.full(3, 3 / T), noise)
    np.testing.assert_allclose(z, np.sqrt(abar[2]) * x + np.sqrt(1 - abar[2]) * noise, rtol=1e-5, atol=1e-6)


def test_downsample_is_the_block_mean():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
    ref = np.zeros((2, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            ref[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    np.testing.assert_allclose(superres.downsample(jnp.asarray(x, jnp.float32), 4), ref, rtol=1e-5, atol=1e-6)
    assert superres.upsample(jnp.asarray(ref, jnp.float32), 8, "nearest").shape == (2, 8, 8, 3)
    np.testing.assert_allclose(superres.downsample(superres.upsample(jnp.asarray(ref), 8, "nearest"), 4), ref,
                               rtol=1e-6)


def test_image_metrics_of_the_originals_and_of_a_shifted_copy():
    from ddpm_jax.evaluation import super_resolution as SR

    rng = np.random.default_rng(0)
    originals = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    low_res = image_utils.to_uint8(superres.downsample(image_utils.from_uint8(originals), 8))
    same = SR.image_metrics(originals, originals, low_res)
    assert same["ssim"] == pytest.approx(1.0) and same["consistency_mse"] < 1e-4  # uint8 rounding only
    shifted = np.clip(originals.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = np.mean((shifted.astype(float) - originals) ** 2, axis=(1, 2, 3))  # per image, then the mean PSNR
    expected = np.mean(10 * np.log10(255 ** 2 / mse))
    assert SR.image_metrics(shifted, originals, low_res)["psnr"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def sr_model():
    config = _sr_config()
    return config, unet_from_config(config), _random_params(config)


def test_the_model_reads_the_low_res_image_and_its_level(sr_model):
    config, model, params = sr_model
    x, t = jax.random.normal(jax.random.key(2), (2, 8, 8, 1)), jnp.array([3, 7])
    a, b = (jax.random.uniform(jax.random.key(k), (2, 4, 4, 1), minval=-1, maxval=1) for k in (3, 4))
    apply = jax.jit(lambda low_res, level, drop=False: model.apply(
        {"params": params}, x, t, {"low_res": low_res, "aug_level": level, "drop": jnp.full(2, drop)}))
    zero = jnp.zeros(2)
    base = apply(a, zero)
    assert np.abs(base - apply(b, zero)).max() > 1e-3  # the image reaches the model
    assert np.abs(base - apply(a, zero + 0.3)).max() > 1e-3  # and so does the level
    np.testing.assert_array_equal(apply(a, zero, True), base)  # guidance's null condition keeps the image
    grad = jax.grad(lambda lv: apply(a, lv).sum())(zero + 0.2)
    assert np.all(np.abs(grad) > 0)
    with pytest.raises(ValueError, match="low_res"):
        model.apply({"params": params}, x, t, {"drop": jnp.zeros(2, bool)})


def _train_cond(config, images):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(len(images)))
    return training.conditioning(config, {"image": images}, keys)


def test_training_condition_is_the_noised_low_res_image_at_the_level_it_reports():
    config = _sr_config()
    images = jax.random.uniform(jax.random.key(6), (256, 8, 8, 1), minval=-1, maxval=1)
    clean = superres.downsample(images, 4)
    config.diffusion.low_res_aug_max = 0.0  # no augmentation: exactly the plain conditioning
    cond = _train_cond(config, images)
    np.testing.assert_array_equal(cond["low_res"], clean)
    np.testing.assert_array_equal(cond["aug_level"], 0.0)
    config.diffusion.low_res_aug_max = 0.5
    cond = _train_cond(config, images)
    level = np.asarray(cond["aug_level"])
    assert level.min() >= 0 and level.max() <= 0.5 and level.std() > 0.1
    # Given the reported level, the input is sqrt(abar) clean + sqrt(1 - abar) N(0, 1): the noise it
    # implies is standard normal (a level that did not match the noise would not be).
    abar = superres.level_alpha_bar(D.schedule_from_config(config.diffusion), cond["aug_level"])[:, None, None, None]
    implied = (cond["low_res"] - jnp.sqrt(abar) * clean) / jnp.sqrt(1 - abar)
    keep = np.asarray(level > 0.05)
    assert abs(float(implied[keep].mean())) < 0.05 and abs(float(implied[keep].std()) - 1) < 0.05
    np.testing.assert_array_equal(_train_cond(config, images)["low_res"], cond["low_res"])  # per-example keys


def test_sampling_augments_once_for_both_guidance_halves():
    s = D.schedule_from_config(_sr_config().diffusion, 5)
    low_res = jnp.ones((2, 4, 4, 1)) * 0.5
    batch = {"cond": {"low_res": low_res, "aug_level": jnp.zeros(2), "drop": jnp.zeros(2, bool)},
             "null_cond": {"low_res": low_res, "aug_level": jnp.zeros(2), "drop": jnp.ones(2, bool)}}
    out = S.augment_low_res(s, batch, jax.random.key(0))
    np.testing.assert_array_equal(out["cond"]["low_res"], low_res)
    batch["cond"]["aug_level"] = jnp.full(2, 0.3)
    out = S.augment_low_res(s, batch, jax.random.key(0))
    assert np.abs(out["cond"]["low_res"] - low_res).max() > 0.05
    np.testing.assert_array_equal(out["null_cond"]["low_res"], out["cond"]["low_res"])


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("sr") / "run", _sr_config())


def test_sample_command_upscales_low_res_inputs(sr_run, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(3):
        image_utils.save_png(str(tmp_path / "in" / f"{i}.png"), rng.integers(0, 256, (4, 4, 1), dtype=np.uint8))
    status, _, err = run_command(sample, f"--workdir={sr_run}", f"--low_res={tmp_path / 'in'}", "--aug_level=0",
                                 "--steps=3", f"--out={tmp_path / 'out'}")
    assert status == 0, err[-2000:]
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)
    # Larger inputs are upscaled by the same factor (the model was trained 4 -> 8)
    image_utils.save_png(str(tmp_path / "big.png"), rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
    status, _, err = run_command(sample, f"--workdir={sr_run}", f"--low_res={tmp_path / 'big.png'}", "--steps=2",
                                 f"--out={tmp_path / 'big'}")
    assert status == 0, err[-2000:]
    assert np.load(tmp_path / "big" / "samples.npz")["arr_0"].shape == (1, 16, 16, 1)
    image_utils.save_png(str(tmp_path / "wide.png"), rng.integers(0, 256, (4, 6, 1), dtype=np.uint8))
    image_utils.save_png(str(tmp_path / "small.png"), rng.integers(0, 256, (2, 2, 1), dtype=np.uint8))
    for args, needle in (((), "--low_res: this run's model is a super-resolution model"),
                         ((f"--low_res={tmp_path / 'wide.png'}",), "the inputs are 6x4; this model upscales 4x4"),
                         ((f"--low_res={tmp_path / 'small.png'}",), "square inputs at least that large"),
                         ((f"--low_res={tmp_path / 'in'}", "--aug_level=1.5"), "sampling.aug_level=1.5"),
                         ((f"--low_res={tmp_path / 'in'}", "--sr_strength=2"), "sampling.sr_strength=2")):
        status, _, err = run_command(sample, f"--workdir={sr_run}", *args, f"--out={tmp_path / 'bad'}")
        assert status == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()


def test_sr_strength_starts_from_the_upsampled_input(sr_run):
    config = checkpoints.load_config(sr_run)
    params, _ = checkpoints.load_params(sr_run, config)
    low = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    up = generation.upsampled(config, image_utils.from_uint8(low))
    config.sampling.steps, config.sampling.sr_strength = 3, 0.0
    out = generation.run(config, params, generation.make_request(config, low_res=low))["images"]
    np.testing.assert_allclose(out, up, atol=1e-6)  # level 0: the upsampled input itself
    config.sampling.sr_strength = 0.5
    req = generation.make_request(config, low_res=low)
    assert req.spec.level == S.strength_to_level(0.5, 3) and not req.spec.invert
    np.testing.assert_array_equal(generation.paired_request(config, low).x0, up)
    config.sampling.sr_strength = 1.0  # SR3: from pure noise
    assert generation.make_request(config, low_res=low).x0 is None
    # twice the trained size: level 0 is the input upsampled to 16x16, as the model upsamples it
    big = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    config.sampling.sr_strength = 0.0
    req = generation.paired_request(config, big)
    assert req.image_size == 16 and req.cond["low_res"].shape == (2, 8, 8, 1)
    np.testing.assert_allclose(generation.run(config, params, req)["images"],
                               superres.upsample(image_utils.from_uint8(big), 16, config.model.low_res_resize),
                               atol=1e-6)


@pytest.mark.slow
def test_cascade_pairs_rows_with_their_prompts_and_writes_every_stage(tmp_path):
    base = _save_run(tmp_path / "base", _text_config())  # 8x8 RGB text-to-image
    sr_config = _text_config()
    sr_config.data.image_size, sr_config.model.low_res_size = 16, 8
    sr_config.model.attn_resolutions = (16,)
    sr = _save_run(tmp_path / "sr", sr_config)
    prompts = ["a red circle", "a blue square above a green triangle"]
    stages = cascading.load_stages([base, sr], {"steps": ["3"], "guidance": ["2", "0"]}, num_samples=2)
    assert [st.config.sampling.guidance for st in stages] == [2.0, 0.0]
    previous = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    req = generation.paired_request(stages[1].config, previous, prompts=prompts)
    np.testing.assert_array_equal(req.cond["low_res"], image_utils.from_uint8(previous))  # row i <- image i
    np.testing.assert_array_equal(req.cond["tokens"][1], req.cond["tokens"][0])
    assert not np.array_equal(req.cond["tokens"][2], req.cond["tokens"][1])  # rows 2, 3: the second prompt

    out = tmp_path / "out"
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    status, stdout, err = run_command(cascade, f"--stages={base},{sr}", f"--prompts={tmp_path / 'prompts.txt'}",
                                      "--num_samples=2", "--steps=3,2", "--guidance=2,0", "--aug_level=0.1",
                                      f"--out={out}")
    assert status == 0, err[-2000:]
    assert np.load(out / "stage_0" / "samples.npz")["arr_0"].shape == (4, 8, 8, 3)
    final = np.load(out / "stage_1" / "samples.npz")
    assert final["arr_0"].shape == (4, 16, 16, 3) and list(final["prompts"]) == [p for p in prompts for _ in (0, 1)]
    assert (out / "cascade.png").is_file()
    for args, needle in (((f"--stages={sr},{base}",), "the first stage"),
                         ((f"--stages={base},{base}",), "each stage must upscale"),
                         ((f"--stages={base},{sr}", "--steps=1,2,3"), "--steps=1,2,3: give one value"),
                         ((f"--stages={base},{tmp_path}",), "is not a training run")):
        status, _, err = run_command(cascade, *args, "--prompt=a red circle", f"--out={tmp_path / 'bad'}")
        assert status == 2 and needle in err and "Traceback" not in err, err
    with pytest.raises(UserError, match="--guidance"):
        cascading.load_stages([base, sr], {"guidance": ["x"]})
    # a stage trained 4 -> 8 (on crops, say) upscales the base's whole 8x8 images to 16x16
    crops_config = _text_config()
    crops_config.model.low_res_size = 4
    crops = _save_run(tmp_path / "crops", crops_config)
    outputs = cascading.run(cascading.load_stages([base, crops], {"steps": ["2"]}, num_samples=1),
                            prompts=prompts[:1])
    assert [o.shape for o in outputs] == [(1, 8, 8, 3), (1, 16, 16, 3)]
    # the ode sampler in the second stage only: that stage counts its network evaluations
    stages = cascading.load_stages([base, crops], {"steps": ["2"], "sampler": ["ddim", "ode"], "eta": ["0"],
                                                   "ode_tolerance": ["1e-2"]}, num_samples=1)
    cascading.run(stages, prompts=prompts[:1])
    assert stages[0].ode == {} and stages[1].ode["ode_sampling_evals"] > 7


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_cascade_checkpoint_step_chooses_each_stage_checkpoint(tmp_path):
    """--checkpoint_step=1,0: stage 0 reads its run's step 1 (bit for bit the cascade of a run holding
    those params), stage 1 its newest; a step a run lacks, or too many values, is one line naming the stage."""
    params = _random_params(_text_config())
    two = _save_run(tmp_path / "two", _text_config(), {1: params, 2: _perturbed(params, 0.5)})
    one = _save_run(tmp_path / "one", _text_config(), {1: params})
    sr_config = _text_config()
    sr_config.data.image_size, sr_config.model.low_res_size = 16, 8
    sr_config.model.attn_resolutions = (16,)
    sr = _save_run(tmp_path / "sr", sr_config, {3: _random_params(sr_config)})
    images, errs = {}, {}
    for name, stages, flags in (("chosen", f"{two},{sr}", ["--checkpoint_step=1,0"]), ("one", f"{one},{sr}", [])):
        status, _, errs[name] = run_command(cascade, f"--stages={stages}", "--prompt=a red circle", "--num_samples=2",
                                            "--steps=3,2", *flags, f"--out={tmp_path / name}")
        assert status == 0, errs[name][-2000:]
        images[name] = [np.load(tmp_path / name / f"stage_{k}" / "samples.npz")["arr_0"] for k in (0, 1)]
    assert f"stage 0: {two} (step 1)" in errs["chosen"] and f"stage 1: {sr} (step 3)" in errs["chosen"]
    for k in (0, 1):  # (the newest, step 2, has other params: reading it would fail this)
        np.testing.assert_array_equal(images["chosen"][k], images["one"][k])
    for flag, says in (("--checkpoint_step=3,0", f"stage 0 ({two}) has no checkpoint of step 3; it has steps [1, 2]"),
                       ("--checkpoint_step=0,1", f"stage 1 ({sr}) has no checkpoint of step 1; it has steps [3]"),
                       ("--checkpoint_step=1,0,0", "give one value, or one per stage (2)"),
                       ("--checkpoint_step=1,x", "each value must be a whole number")):
        status, _, err = run_command(cascade, f"--stages={two},{sr}", "--prompt=a red circle", flag,
                                     f"--out={tmp_path / 'bad'}")
        assert status == 2 and f"error: {flag}: " in err and says in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_a_super_resolution_model_trains_and_samples(tmp_path):
    config = small_digits_config(prepare_digits(str(tmp_path / "tfds")))
    config.model.low_res_size = 4
    config.training.num_train_steps = 4
    state = training.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(np.asarray(state.step).reshape(-1)[0]) == 4
    config = checkpoints.load_config(str(tmp_path / "run"))
    params, _ = checkpoints.load_params(str(tmp_path / "run"), config)
    low_res = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    config.sampling.steps = 4
    images = generation.run(config, params, generation.make_request(config, low_res=low_res))["images"]
    assert images.shape == (5, 8, 8, 1) and np.isfinite(images).all()
    # held-out metrics beside bicubic, and the likelihood given the low-res image
    status, out, err = run_command(evaluate, "sr", f"--workdir={tmp_path / 'run'}", "--num_samples=6", "--steps=2")
    assert status == 0, err[-2000:]
    result = json.loads(out[:out.rindex("}") + 1])
    assert result["num_examples"] == 6 and result["model"]["psnr"] > 0 and result["bicubic"]["ssim"] > 0
    assert result["bicubic"]["consistency_mse"] < 0.05 and np.isfinite(result["model"]["consistency_mse"])
    status, out, err = run_command(evaluate, "bpd", f"--workdir={tmp_path / 'run'}", "--num_examples=4")
    assert status == 0 and '"bpd"' in out, err[-2000:]
    status, _, err = run_command(evaluate, "digits", f"--workdir={tmp_path / 'run'}")
    assert status == 2 and "use `evaluate sr`" in err
