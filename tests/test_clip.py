"""The CLIP of the CLIP score against Hugging Face transformers' (tests/data/clip_tiny, random weights,
made by make_clip_fixture.py): token ids, text and image embeddings, the image preprocessing and the
cosines; its errors; and `evaluate clip` on a small text-to-image run."""
import json
import os
import shutil

import numpy as np
import pytest
from cli_helpers import run_command

from ddpm_jax import evaluate
from ddpm_jax.evaluation import clip
from ddpm_jax.validation import UserError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = os.path.join(DATA, "clip_tiny")
REF = np.load(os.path.join(DATA, "clip_reference.npz"))
PROMPTS = [str(p) for p in REF["prompts"]]


def test_tokens_match_transformers_cut_with_the_end_token_kept():
    model = clip.load(TINY)
    ids, mask = model.tokenizer(PROMPTS, 16)
    np.testing.assert_array_equal(ids, REF["input_ids"])
    np.testing.assert_array_equal(mask, REF["attention_mask"].astype(bool))
    for text, full, n in zip(PROMPTS, REF["full_ids"], REF["full_lengths"]):
        assert model.tokenizer.encode(text) == full[:n].tolist(), text
    # transformers' normalizer: NFC (e + combining acute is é), and the special tokens written out are themselves
    assert model.tokenizer.encode("e\u0301cole") == model.tokenizer.encode("\u00e9cole")
    assert model.tokenizer.encode("a <|endoftext|>")[2:] == [model.tokenizer.eos] * 2


def test_embeddings_and_cosines_match_transformers():
    model = clip.load(TINY)
    # float32 against HF in float64: 1.1e-6 (text) and 5.4e-7 (images) measured
    np.testing.assert_allclose(model.embed_texts(PROMPTS, batch_size=4), REF["text_embeds"], rtol=0, atol=1e-5)
    pixels = clip.preprocess(REF["images"], model.config.image_size)  # 48x40 -> 38x32 bicubic -> the centre 32
    np.testing.assert_allclose(pixels, REF["pixel_values"].transpose(0, 2, 3, 1), rtol=0, atol=1e-5)
    images = model.embed_images(REF["images"], batch_size=2)
    np.testing.assert_allclose(images, REF["image_embeds"], rtol=0, atol=1e-5)
    # logits_per_image = exp(logit_scale) cos(image, text), of each image (48x40, preprocessed) and prompt
    cos = REF["logits_per_image"] / np.exp(REF["logit_scale"])
    n = len(images)
    np.testing.assert_allclose(model.cosines(REF["images"], PROMPTS[:n]), np.diag(cos[:, :n]), rtol=0, atol=1e-6)
    assert np.abs(np.diag(cos)).min() > 1e-3  # (the random model's are all negative: -0.21 to -0.04)
    np.testing.assert_array_equal(model.score(REF["images"], PROMPTS[:n]), 0)


def test_exact_gelu_towers_match_transformers(tmp_path):
    """hidden_act "gelu" (LAION's CLIPs): the same weights with the exact gelu in both towers."""
    folder = tmp_path / "gelu"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    model = clip.load(str(folder))
    np.testing.assert_allclose(model.embed_texts(PROMPTS), REF["text_embeds_gelu"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.embed_images(REF["images"]), REF["image_embeds_gelu"], rtol=0, atol=1e-5)
    assert np.abs(REF["text_embeds_gelu"] - REF["text_embeds"]).max() > 1e-2  # quick_gelu would fail


def test_clip_score_is_100_times_the_cosine_clamped_at_0():
    np.testing.assert_allclose(clip.clip_score(np.array([1.0, 0.5 ** 0.5, 0.0, -0.3])), [100, 70.710678, 0, 0])


def _error(folder) -> str:
    with pytest.raises(UserError) as e:
        clip.load(str(folder))
    return str(e.value)


def test_checkpoint_mistakes_are_errors_naming_the_field(tmp_path):
    assert _error(tmp_path / "none").startswith(f"eval.clip_model={str(tmp_path / 'none')!r}: no config.json there")
    folder = tmp_path / "clip"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vision_config": {**config["vision_config"],
                                                                                 "hidden_act": "gelu_new"}}))
    assert "hidden_act ['gelu_new', 'quick_gelu'] in config.json; this CLIP reads quick_gelu or gelu" in \
        _error(folder)
    (folder / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"],
                                                                               "num_hidden_layers": 3}}))
    assert ("model.safetensors lacks 16 tensors of its config.json, the first "
            "'text_model.encoder.layers.2.self_attn.q_proj.weight'") in _error(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "text_config"}))
    assert "config.json is not a CLIP model's" in _error(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "merges.txt").unlink()
    assert _error(folder).endswith("no merges.txt (CLIP's BPE vocabulary) there.")


def test_evaluate_clip_scores_a_samples_file_against_its_prompts(tmp_path):
    """`evaluate clip --samples --prompts`: N / P images per prompt, prompt by prompt, as `sample
    --prompts` writes them; the score is `ClipModel.score` of those pairs."""
    images = np.concatenate([REF["images"], REF["images"][::-1]])  # 6 images, 3 per prompt
    np.savez(tmp_path / "samples.npz", arr_0=images)
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n\na red circle\n")
    args = [f"--samples={tmp_path / 'samples.npz'}", f"--clip_model={TINY}"]
    status, out, err = run_command(evaluate, "clip", *args, f"--prompts={tmp_path / 'prompts.txt'}")
    assert status == 0, err
    result = json.loads(out[out.index("{"):out.index("}") + 1])
    texts = ["a photo of a cat"] * 3 + ["a red circle"] * 3
    cos = clip.load(TINY).cosines(images, texts)
    assert result["num_samples"] == 6 and result["num_prompts"] == 2
    assert result["clip_score"] == pytest.approx(clip.clip_score(cos).mean(), abs=1e-9)
    (tmp_path / "prompts.txt").write_text("a\nb\nc\nd\n")
    status, _, err = run_command(evaluate, "clip", *args, f"--prompts={tmp_path / 'prompts.txt'}")
    assert status == 2 and "6 images for the 4 --prompts" in err, err
    status, _, err = run_command(evaluate, "clip", *args)
    assert status == 2 and "give --prompts=FILE too" in err, err
    status, _, err = run_command(evaluate, "fid", *args, f"--prompts={tmp_path / 'prompts.txt'}")
    assert status == 2 and "fid samples a text-to-image run's --workdir under them" in err, err
    status, _, err = run_command(evaluate, "shapes", *args)  # before: an UnboundLocalError with --workdir
    assert status == 2 and "--samples applies to fid, digits and clip; shapes needs the model" in err, err


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_in_loop_clip_score_of_a_text_model(tmp_path, monkeypatch):
    """`eval.clip_model` in training: eval/clip_score, the score of one sample per held-out caption,
    the same as `tasks.clip_score` draws (the same noise, `eval.seed`)."""
    import jax

    from ddpm_jax.datasets import shapes as shapes_ds
    from ddpm_jax.defaults import load_config_file
    from ddpm_jax.evaluation import in_loop, tasks
    from ddpm_jax.train_state import init_params

    monkeypatch.setattr(shapes_ds, "SPLITS", {"train": (8, 0), "test": (6, 1)})
    config = load_config_file(os.path.join(os.path.dirname(DATA), "..", "configs", "shapes_t2i.py"))
    config.data.data_dir = str(tmp_path / "tfds")
    config.model.update(ch=16, ch_mult=(1,), attn_resolutions=(), text_width=16, text_depth=1)
    config.sampling.steps, config.eval.num_samples, config.eval.batch_size = 4, 4, 8
    config.eval.eval_every, config.eval.clip_model = 10, TINY
    params = init_params(config, jax.random.key(0))
    out = in_loop.Evaluator(config)(10, params, _Writer())
    assert set(out) == {"clip_score"}
    direct = tasks.clip_score(config, params)
    assert out["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-9) and direct["num_samples"] == 4


class _Writer:
    def write_scalars(self, step, scalars):
        self.scalars = scalars
