"""Text conditioning: the U-Net's text path, null-text guidance, text dropout, the pipeline's
tokenizer, prompts through the sample command, and that class-conditional params did not change."""
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import run_command

from configs import shapes_t2i, tiny
from ddpm_jax import checkpoints, diffusion, generation, image_utils, sample, text, training
from ddpm_jax import sampling as S
from ddpm_jax.models import UNet, unet_from_config
from ddpm_jax.train_state import TrainState, init_params, make_optimizer

L = 40  # data.max_text_len of the test models


def _text_config(encoder="trained"):
    """8x8 RGB, a one-level U-Net with attention at 8x8 (so text is attended to there and in the middle)."""
    c = tiny.get_config()
    c.data.dataset, c.data.image_size, c.data.max_text_len = "shapes", 8, L
    c.data.random_flip = False
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 32, (1,), (8,)
    c.model.text_encoder, c.model.text_width, c.model.text_depth, c.model.text_heads = encoder, 32, 1, 2
    c.model.text_emb_dim = 12 if encoder == "precomputed" else 0
    c.diffusion.num_timesteps = 20
    c.sampling.sampler, c.sampling.steps = "ddim", 4
    return c


def _perturbed(params, scale=0.2):
    """Params with noise, so zero-initialised layers no longer hide any path."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return tree.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _random_params(config):
    """Random params of the config's U-Net (shapes traced abstractly: no init to compile)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return _perturbed(jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), shapes))


@pytest.fixture(scope="module")
def text_model():
    config = _text_config()
    return config, unet_from_config(config), _random_params(config)


def _cond(texts, max_len, drop=None):
    tokens, mask = text.tokenize(texts, max_len)
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
            "drop": jnp.zeros(len(texts), bool) if drop is None else jnp.asarray(drop)}


@pytest.mark.parametrize("design", ["fused", "cross"])
def test_text_path_is_padding_invariant_and_uses_the_text(text_model, design):
    config, model, params = text_model
    if design != "fused":  # model.text_attention: text in its own attention after self-attention
        config = config.copy_and_resolve_references()
        config.model.text_attention = design
        model, params = unet_from_config(config), _random_params(config)
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
    t = jnp.array([1, 7, 15])
    texts = ["a red circle", "a blue square above a red circle", ""]
    apply = jax.jit(lambda c: model.apply({"params": params}, x, t, c))
    full = apply(_cond(texts, L))
    short = apply(_cond(texts, 34))  # fewer pad positions (the longest text has 32 bytes + BOS)
    np.testing.assert_allclose(full, short, rtol=1e-4, atol=1e-4)
    garbage = _cond(texts, L)
    garbage["tokens"] = jnp.where(garbage["mask"], garbage["tokens"], 200)  # junk under the mask
    np.testing.assert_allclose(apply(garbage), full, rtol=1e-4, atol=1e-4)
    other = apply(_cond(["a green circle"] + texts[1:], L))
    # The text matters (one word moves the random model's output by 7e-4 (cross) to 2e-3 (fused)).
    assert np.abs(other[0] - full[0]).max() > 3e-4
    np.testing.assert_allclose(other[1:], full[1:], rtol=1e-4, atol=1e-4)  # per row
    # Dropped rows see the null token only: their text does not matter.
    a = apply(_cond(texts, L, [True, True, False]))
    b = apply(_cond(["x", "yy", texts[2]], L, [True, True, False]))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(a[0] - full[0]).max() > 3e-4
    assert {"text_encoder", "null_text", "text_pool"} <= set(params)
    text_params = {"k_text", "v_text"} | ({"q_cross", "proj_cross"} if design == "cross" else set())
    assert text_params <= set(params["mid_attn_1"]) and text_params <= set(params["down_0_attn_0"])


def test_precomputed_embeddings_path(tmp_path):
    config = _text_config("precomputed")
    model = unet_from_config(config)
    params = _random_params(config)
    assert params["text_proj"]["kernel"].shape == (12, 32)
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    x, t = jnp.ones((2, 8, 8, 3)), jnp.array([3, 9])
    cond = {"text_emb": emb, "mask": mask, "drop": jnp.zeros(2, bool)}
    out = model.apply({"params": params}, x, t, cond)
    padded = {**cond, "text_emb": jnp.where(mask[..., None], emb, 7.0)}
    np.testing.assert_allclose(model.apply({"params": params}, x, t, padded), out, rtol=1e-4, atol=1e-4)
    # The sample command takes the prompt's embedding from a .npz (random, made here).
    run = _save_run(tmp_path / "run", config)
    np.savez(tmp_path / "emb.npz", text_emb=rng.normal(size=(2, 5, 12)).astype(np.float32),
             text_mask=np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool))
    status, _, err = run_command(sample, f"--workdir={run}", f"--prompt_embedding={tmp_path / 'emb.npz'}",
                                 "--num_samples=2", "--guidance=2", f"--out={tmp_path / 'out'}")
    assert status == 0, err[-2000:]
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (4, 8, 8, 3)  # 2 prompts x 2


def test_guidance_is_cond_minus_null_and_negative_prompt_replaces_null(text_model):
    config, model, params = text_model
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    t = jnp.array([4, 12])
    apply_fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
    cond, negative = _cond(["a red circle", "a blue square"], L), _cond(["a green triangle"] * 2, L)
    w = 2.5

    @jax.jit
    def outputs():
        return (apply_fn(x, t, cond), apply_fn(x, t, {**cond, "drop": jnp.ones(2, bool)}), apply_fn(x, t, negative),
                S.unet_model_fn(model, params, cond, w)(x, t),
                S.unet_model_fn(model, params, cond, w, null_cond=negative)(x, t))

    out_cond, out_null, out_neg, guided, guided_neg = outputs()
    assert not np.allclose(out_cond, out_null, atol=1e-3)
    np.testing.assert_allclose(guided, (1 + w) * out_cond - w * out_null, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(guided_neg, (1 + w) * out_cond - w * out_neg, rtol=1e-4, atol=1e-3)
    assert not np.allclose(guided_neg, guided, atol=1e-3)
    np.testing.assert_array_equal(S.null_condition(cond)["drop"], [True, True])
    np.testing.assert_array_equal(S.null_condition(cond)["tokens"], cond["tokens"])


def test_autoguidance_is_the_model_minus_its_guide_under_the_same_prompt(text_model):
    config, model, params = text_model
    guide = _perturbed(params, 0.1)  # a different network of the same architecture
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    t = jnp.array([4, 12])
    cond, negative = _cond(["a red circle", "a blue square"], L), _cond(["a green triangle"] * 2, L)
    w = 2.5

    @jax.jit
    def outputs():
        apply = lambda p, c: model.apply({"params": p}, x, t, c)
        return (apply(params, cond), apply(guide, cond), apply(guide, negative),
                S.unet_model_fn(model, params, cond, w, guide=(model, guide))(x, t),
                S.unet_model_fn(model, params, cond, w, null_cond=negative, guide=(model, guide))(x, t),
                S.unet_model_fn(model, params, cond, w, guide=(model, params))(x, t))

    out, out_guide, out_guide_neg, guided, guided_neg, self_guided = outputs()
    assert not np.allclose(out, out_guide, atol=1e-3)
    np.testing.assert_allclose(guided, (1 + w) * out - w * out_guide, rtol=1e-4, atol=1e-3)
    # A negative prompt is what the guide network is given instead of the prompt.
    np.testing.assert_allclose(guided_neg, (1 + w) * out - w * out_guide_neg, rtol=1e-4, atol=1e-3)
    # Guided by itself under the same prompt, the model is unchanged.
    np.testing.assert_allclose(self_guided, out, rtol=1e-4, atol=1e-4)


def test_inpainting_with_a_prompt_keeps_unmasked_pixels_exactly(text_model):
    config, model, params = text_model
    s = diffusion.schedule_from_config(config.diffusion, 4)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    mask = jnp.zeros((2, 8, 8, 1), bool).at[:, 2:6, 1:5].set(True)
    spec = S.SampleSpec(sampler="ddim", guidance=2.0, inpaint=True)
    batch = {"cond": _cond(["a red circle", "a blue square"], L), "x0": x0, "mask": mask}
    out = jax.jit(lambda k: S.sample_shard(model, s, "eps", spec, (8, 8, 3), params, k, batch))(jax.random.key(0))
    x = np.asarray(out["images"])
    np.testing.assert_array_equal(np.where(mask, 0, x), np.where(mask, 0, x0))
    assert np.abs(x - np.asarray(x0))[np.broadcast_to(np.asarray(mask), x.shape)].max() > 0.1


def test_text_dropout_rate_and_per_example_determinism():
    config = _text_config()
    config.training.text_dropout = 0.25
    n = 4000
    batch = {"tokens": jnp.zeros((n, L), jnp.int32), "mask": jnp.ones((n, L), bool)}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(n))
    drop = np.asarray(training.conditioning(config, batch, keys)["drop"])
    assert abs(drop.mean() - 0.25) < 0.03  # 4 sigma
    # An example's decision depends on its key alone, not on the rest of the batch.
    half = training.conditioning(config, jax.tree.map(lambda a: a[n // 2:], batch), keys[n // 2:])["drop"]
    np.testing.assert_array_equal(half, drop[n // 2:])
    config.training.text_dropout = 0.0
    assert not training.conditioning(config, batch, keys)["drop"].any()
    config.training.text_dropout = 1.0
    assert training.conditioning(config, batch, keys)["drop"].all()


def test_pipeline_tokenizer_round_trips():
    tf = pytest.importorskip("tensorflow")
    from ddpm_jax import input_pipeline
    texts = ["a red circle left of a blue square", "", "héllo ☃", "é" * 9, "x" * 40]
    for max_len in (1, 2, 6, 16, 48):
        want_tokens, want_mask = text.tokenize(texts, max_len)
        for i, s in enumerate(texts):
            tokens, mask = input_pipeline.tokenize(tf.constant(s), max_len)
            np.testing.assert_array_equal(tokens.numpy(), want_tokens[i])
            np.testing.assert_array_equal(mask.numpy(), want_mask[i])
    tokens, mask = text.tokenize(texts, 48)
    assert text.detokenize(tokens, mask) == texts
    # Several captions: one drawn per (epoch seed, example), the same on every call, all reachable.
    captions = tf.constant(["a", "b", "c"])
    picks = [input_pipeline.pick_caption(captions, tf.constant([7, i], tf.int64)).numpy() for i in range(60)]
    assert set(picks) == {b"a", b"b", b"c"}
    assert picks == [input_pipeline.pick_caption(captions, tf.constant([7, i], tf.int64)).numpy() for i in range(60)]


def test_class_conditional_params_keep_their_names_and_shapes():
    """The listing of a class-conditional U-Net's params (names and shapes) is the one before text
    conditioning existed (hash taken from that code), so old checkpoints restore."""
    model = UNet(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                 num_classes=10)
    cond = {"label": jnp.zeros((1,), jnp.int32)}
    p = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                                          cond)["params"])
    rows = sorted(jax.tree_util.tree_flatten_with_path(p)[0], key=lambda kv: jax.tree_util.keystr(kv[0]))
    listing = "\n".join(f"{jax.tree_util.keystr(k)}:{v.shape}" for k, v in rows)
    assert len(rows) == 145
    assert hashlib.sha256(listing.encode()).hexdigest() == \
        "f90e92cff7eef257b77eabd8b68a3d3d1b7a2a2680c2c15fd49c41526ec6765f"


def test_shapes_t2i_config_is_valid_and_has_no_flips():
    from ddpm_jax.validation import validate_config
    config = shapes_t2i.get_config()
    validate_config(config, num_devices=1)
    assert not config.data.random_flip and config.model.text_encoder == "trained"
    assert (config.sampling.sampler, config.sampling.steps) == ("ddim", 50)
    # The longest caption of the grammar fits.
    assert len(b"a yellow triangle right of a yellow circle") < config.data.max_text_len


def _save_run(path, config, params_at=None):
    """A run of `config` with checkpoints of {step: params} (default {0: `_random_params`})."""
    checkpoints.write_config(str(path), config)
    manager = checkpoints.checkpoint_manager(str(path))
    for step, params in (params_at or {0: _random_params(config)}).items():
        state = TrainState(step=jnp.array(step, jnp.int32), params=params, ema_params=params,
                           opt_state=make_optimizer(config.optim).init(params),
                           key=jax.random.key_data(jax.random.key(0)))
        checkpoints.save_train_state(manager, state, {"position": step})
    manager.wait_until_finished()
    manager.close()
    return str(path)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("t2i") / "run", _text_config())


def test_sample_command_with_prompts(text_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square above a green triangle  \na yellow square\n")
    out = tmp_path / "out"
    status, stdout, err = run_command(sample, f"--workdir={text_run}", f"--prompts={prompts}", "--num_samples=2",
                                      "--guidance=3", "--negative_prompt=a green circle", f"--out={out}")
    assert status == 0, err[-2000:]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, 8, 8, 3)
    assert list(npz["prompts"]) == ["a red circle"] * 2 + ["a blue square above a green triangle"] * 2 + \
        ["a yellow square"] * 2
    grid = image_utils.load_images(str(out / "samples.png"), channels=3)[0]
    assert grid.shape[0] > grid.shape[1]  # one row per prompt: 3 rows of 2
    status, _, err = run_command(sample, f"--workdir={text_run}", "--prompt=a red circle", "--num_samples=3",
                                 f"--out={tmp_path / 'one'}")
    assert status == 0, err[-2000:]
    one = np.load(tmp_path / "one" / "samples.npz")
    assert one["arr_0"].shape == (3, 8, 8, 3) and list(one["prompts"]) == ["a red circle"] * 3


@pytest.mark.slow  # a minute; the default suite checks the guidance (test_autoguidance_...) and chosen steps elsewhere
def test_sample_command_with_a_guide_run(text_run, tmp_path):
    """--guide_workdir: a run with the same params guides to the unguided samples; another changes them;
    --guide_checkpoint_step and --checkpoint_step choose a checkpoint; a missing or mismatched guide run or
    step is one line naming the field or flag."""
    same = _save_run(tmp_path / "same", _text_config())  # _random_params: the same params as text_run
    other_config = _text_config()
    other_config.model.ch = 16  # a smaller guide network is allowed
    other = _save_run(tmp_path / "other", other_config)
    npz = {}
    for name, flags in {"unguided": ["--guidance=0"], "same": ["--guidance=2", f"--guide_workdir={same}"],
                        "other": ["--guidance=2", f"--guide_workdir={other}"]}.items():
        status, _, err = run_command(sample, f"--workdir={text_run}", "--prompt=a red circle", "--num_samples=4",
                                     f"--out={tmp_path / name}", *flags)
        assert status == 0, err[-2000:]
        npz[name] = np.load(tmp_path / name / "samples.npz")["arr_0"].astype(int)
    assert np.abs(npz["same"] - npz["unguided"]).max() <= 1  # (1 + w) a - w a: float rounding only
    assert np.abs(npz["other"] - npz["unguided"]).mean() > 5
    # An earlier checkpoint of a run as the guide (--guide_checkpoint_step), and sampling one
    # (--checkpoint_step): step 1 of `two` has text_run's params, its newest (2) others.
    params = _random_params(_text_config())
    two = _save_run(tmp_path / "two", _text_config(), {1: params, 2: _perturbed(params, 0.5)})
    for name, flags in {"guide_step_1": ["--guidance=2", f"--guide_workdir={two}", "--guide_checkpoint_step=1"],
                        "guide_newest": ["--guidance=2", f"--guide_workdir={two}"]}.items():
        status, _, err = run_command(sample, f"--workdir={text_run}", "--prompt=a red circle", "--num_samples=4",
                                     f"--out={tmp_path / name}", *flags)
        assert status == 0, err[-2000:]
        npz[name] = np.load(tmp_path / name / "samples.npz")["arr_0"].astype(int)
    assert "autoguidance by " + two + " step 2" in err
    assert np.abs(npz["guide_step_1"] - npz["unguided"]).max() <= 1
    assert np.abs(npz["guide_newest"] - npz["unguided"]).mean() > 5
    status, _, err = run_command(sample, f"--workdir={two}", "--checkpoint_step=1", "--prompt=a red circle",
                                 "--num_samples=4", "--guidance=0", f"--out={tmp_path / 'step_1'}")
    assert status == 0 and "step 1 (EMA params)" in err, err[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "step_1" / "samples.npz")["arr_0"], npz["unguided"])
    mismatched = _text_config()
    mismatched.diffusion.model_output = "v"
    checkpoints.write_config(str(tmp_path / "mismatched"), mismatched)
    checkpoints.write_config(str(tmp_path / "untrained"), _text_config())
    for flags, says in (([f"--guide_workdir={tmp_path / 'none'}"], "sampling.guide_workdir="),
                        ([f"--guide_workdir={tmp_path / 'mismatched'}"], "model_output='v'"),
                        ([f"--guide_workdir={tmp_path / 'untrained'}"], "sampling.guide_workdir: --workdir="),
                        ([f"--guide_workdir={two}", "--guide_checkpoint_step=3"],
                         f"error: sampling.guide_checkpoint_step=3: sampling.guide_workdir={two} has no checkpoint"),
                        (["--guide_checkpoint_step=1"],
                         "error: sampling.guide_checkpoint_step=1: a checkpoint of sampling.guide_workdir, which is "
                         "not set.")):
        status, _, err = run_command(sample, f"--workdir={text_run}", "--prompt=a red circle", "--guidance=2",
                                     *flags, f"--out={tmp_path / 'bad'}")
        assert status != 0 and says in err and "Traceback" not in err, err[-2000:]
    status, _, err = run_command(sample, f"--workdir={two}", "--checkpoint_step=3", f"--out={tmp_path / 'bad'}")
    assert status == 2 and err.strip().endswith(f"error: --checkpoint_step=3: --workdir={two} has no checkpoint of "
                                                "that step; it has steps [1, 2]."), err[-2000:]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # the documented editing lines run in test_documented_commands
def test_editing_with_prompts_runs_and_differs_by_prompt(text_run, tmp_path):
    config = checkpoints.load_config(text_run)
    params, _ = checkpoints.load_params(text_run, config)
    rng = np.random.default_rng(0)
    image_utils.save_png(str(tmp_path / "in.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    config.sampling.update(num_samples=1, guidance=2.0, strength=0.75)
    run = lambda **kw: generation.run(config, params, generation.make_request(
        config, init_images=str(tmp_path / "in.png"), **kw))["images"]
    a = run(prompts=["a red circle", "a blue square"])
    assert a.shape == (2, 8, 8, 3) and not np.allclose(a[0], a[1], atol=1e-3)
    inv = run(prompts=["a blue square"], source_prompt="a red circle", invert=True)
    inv2 = run(prompts=["a blue square"], source_prompt="a green circle", invert=True)
    assert not np.allclose(inv, inv2, atol=1e-4)  # the inversion ran under the source prompt


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_diffedit_command_keeps_the_pixels_outside_its_mask(text_run, tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image_utils.save_png(str(tmp_path / "in.png"), image)
    out = tmp_path / "out"
    status, _, err = run_command(sample, f"--workdir={text_run}", f"--init_images={tmp_path / 'in.png'}",
                                 "--mask=auto", "--prompt=a blue square", "--source_prompt=a red square", "--invert",
                                 "--strength=0.7", "--guidance=2", "--sampler=ddim", "--num_samples=2", f"--out={out}")
    assert status == 0, err[-2000:]
    npz = np.load(out / "samples.npz")
    masks, edited = npz["masks"][..., 0], npz["arr_0"]
    assert masks.shape == (2, 8, 8) and masks.any() and not masks.all()
    np.testing.assert_array_equal(edited[~masks], np.broadcast_to(image, edited.shape)[~masks])
    assert (edited[masks] != np.broadcast_to(image, edited.shape)[masks]).any()
    assert (out / "masks.png").exists()


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_fid_of_a_text_model_samples_one_image_per_held_out_caption(tmp_path, monkeypatch):
    """`evaluate fid` and the in-loop FID of a text-to-image run draw one sample per held-out caption
    (or --prompts line), as papers compute it (Inception stubbed: the samples are what is checked); the
    in-loop CLIP score scores the same samples. A model that cannot embed captions is one line."""
    from ddpm_jax import evaluate
    from ddpm_jax.datasets import shapes as shapes_ds
    from ddpm_jax.evaluation import in_loop, inception, metrics, tasks

    monkeypatch.setattr(shapes_ds, "SPLITS", {"train": (8, 0), "test": (12, 1)})
    seen = []
    monkeypatch.setattr(tasks, "fid_is_kid", lambda images, *a, **k: seen.append(images) or {"fid": 1.0})
    monkeypatch.setattr(tasks, "inception_weights_file", lambda path: path)
    monkeypatch.setattr(inception, "load_variables", lambda *a: {})
    monkeypatch.setattr(metrics, "load_statistics", lambda *a: {"mu": np.zeros(inception.POOL_DIM)})
    config = _text_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.eval.update(num_samples=12, batch_size=8, inception_weights="w.npz", reference_stats="s.npz")
    params = _random_params(config)
    run = _save_run(tmp_path / "run", config, {3: params})
    _, captions, _, want = tasks.caption_samples(config, params)
    assert len(set(captions)) > 1

    status, out, err = run_command(evaluate, "fid", f"--workdir={run}")
    assert status == 0, err[-2000:]
    np.testing.assert_array_equal(seen[-1], want["images"])
    written = json.loads((tmp_path / "run" / "eval" / "fid_step_3_ddim4_w0_n12.json").read_text())
    assert written["split"] == "test" and written["num_samples"] == 12
    lines = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "triangle", "star", "cross")]
    prompts = tmp_path / "mine.txt"
    prompts.write_text("\n".join(lines))
    status, out, err = run_command(evaluate, "fid", f"--workdir={run}", f"--prompts={prompts}")
    assert status == 0, err[-2000:]
    np.testing.assert_array_equal(seen[-1], tasks.caption_samples(config, params, prompts=lines)[3]["images"])
    written = json.loads((tmp_path / "run" / "eval" / "fid_step_3_mine_ddim4_w0_n10.json").read_text())
    assert written["prompts"] == str(prompts) and "split" not in written

    clip_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "clip_tiny")
    config.eval.update(eval_every=10, clip_model=clip_dir)
    result = in_loop.Evaluator(config)(10, params, _Writer())
    assert set(result) == {"fid", "clip_score"}
    np.testing.assert_array_equal(seen[-1], want["images"])
    assert result["clip_score"] == pytest.approx(tasks.clip_score(config, params)["clip_score"], abs=1e-9)

    precomputed = _text_config("precomputed")
    precomputed.eval.update(inception_weights="w.npz", reference_stats="s.npz")
    other = _save_run(tmp_path / "precomputed", precomputed)
    status, _, err = run_command(evaluate, "fid", f"--workdir={other}")
    assert status == 2 and err.startswith("error: model.text_encoder='precomputed': a text-to-image run is evaluated "
                                          "on one sample per held-out caption") and err.count("\n") == 1, err


class _Writer:
    def write_scalars(self, step, scalars):
        self.scalars = scalars
