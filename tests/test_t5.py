"""The frozen T5 encoder against Hugging Face transformers' (tests/data, made by make_t5_fixture.py with
random weights): token ids and hidden states of three checkpoints (gated-gelu, relu, sharded bfloat16);
the checkpoint errors; prompts of a precomputed-embedding model; and the documented embed, train and
sample commands on a folder."""
import json
import os
import re
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import run_command
from PIL import Image

from ddpm_jax import cascade, embed, evaluate, files, generation, main, sample, t5
from ddpm_jax.defaults import load_config_file
from ddpm_jax.validation import UserError, validate_text

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(DATA, "t5_tiny")
REF = np.load(os.path.join(DATA, "t5_reference.npz"))
PROMPTS = [str(p) for p in REF["prompts"]]
L = int(REF["max_length"])


@pytest.mark.parametrize("folder,key", [("t5_tiny", "hidden_tiny"), ("t5_tiny_relu", "hidden_relu"),
                                        ("t5_tiny_sharded_bf16", "hidden_sharded_bf16")])
def test_tokens_and_hidden_states_match_transformers(folder, key):
    encoder = t5.load(os.path.join(DATA, folder))
    ids, mask = encoder.tokenize(PROMPTS, L)  # the long prompt cut to 15 pieces + EOS, as HF cuts it
    np.testing.assert_array_equal(ids, REF["input_ids"])
    np.testing.assert_array_equal(mask, REF["attention_mask"].astype(bool))
    # 19 texts over the 8 (fake) local devices, batch_size 9: calls of 16 rows, then 3 padded to 8
    emb, mask = encoder.embed(PROMPTS * 2 + PROMPTS[:3], L, batch_size=9)
    assert emb.dtype == np.float32 and emb.shape == (19, L, 32)
    np.testing.assert_allclose(emb[8:], np.concatenate([emb, emb])[:11], rtol=0, atol=1e-6)
    emb, mask = emb[:8], mask[:8]
    # float32 against HF in float64 (bfloat16: its stored weights, in float64): 1.5e-6 measured; an erf
    # gelu instead of the tanh approximation is 6e-4 off, a 1/sqrt(d_kv) scale 3.4
    np.testing.assert_allclose(emb[mask], REF[key][mask], rtol=0, atol=1e-5)
    assert not emb[~mask].any()


def test_untruncated_ids_and_any_padding_give_the_same_embeddings():
    encoder = t5.load(TINY)
    width = REF["full_ids"].shape[1]
    ids, mask = encoder.tokenize(PROMPTS, width)
    np.testing.assert_array_equal(ids, REF["full_ids"])
    np.testing.assert_array_equal(mask.sum(1), REF["full_lengths"])
    short, short_mask = encoder.embed(PROMPTS, L)
    long, long_mask = encoder.embed(PROMPTS, width)
    fits = REF["full_lengths"] <= L
    np.testing.assert_array_equal(long_mask[fits, :L], short_mask[fits])
    np.testing.assert_allclose(long[fits, :L], short[fits], rtol=0, atol=1e-5)  # float32 rounding: 1.2e-6
    assert not long[fits, L:].any()


def test_relative_position_buckets_are_those_of_transformers():
    relative = jnp.array([0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 100, 127, 128, 129, 1000,
                          -1, -7, -8, -16, -64, -127, -128, -1000])
    # transformers' T5Attention._relative_position_bucket(relative, True, 32, 128), 5.24.0
    expected = [0, 17, 23, 24, 25, 26, 27, 28, 29, 30, 31, 31, 31, 31, 31, 1, 7, 8, 10, 14, 15, 15, 15]
    assert t5.relative_position_bucket(relative, 32, 128).tolist() == expected


def test_safetensors_reader_reads_bfloat16_shards_as_stored():
    folder = os.path.join(DATA, "t5_tiny_sharded_bf16")
    located = t5.weight_files(folder)
    assert len(set(located.values())) == 3
    name = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    bf16 = files.load_safetensors(located[name], [name])[name]
    f32 = files.load_safetensors(os.path.join(TINY, "model.safetensors"), [name])[name]
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == f32.shape == (64, 32)
    np.testing.assert_array_equal(bf16, f32.astype(jnp.bfloat16))  # the shards hold f32 rounded to bf16


def _copy(tmp_path, name="t5_tiny"):
    folder = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), folder)
    return folder


def _load_error(folder) -> str:
    with pytest.raises(UserError) as e:
        t5.load(str(folder))
    return str(e.value)


def test_checkpoint_mistakes_are_errors_naming_the_field_and_the_file(tmp_path):
    field = f"model.text_encoder_path={str(tmp_path / 'nothing')!r}"
    assert _load_error(tmp_path / "nothing").startswith(f"{field}: no config.json there")

    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-silu"}))
    assert "feed_forward_proj='gated-silu' in config.json; this encoder reads relu or gated-gelu" in _load_error(folder)
    (folder / "config.json").write_text(json.dumps({**config, "d_ff": 65}))
    assert ("tensor 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight' has shape (64, 32), but config.json "
            "implies (65, 32)") in _load_error(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    assert ("the checkpoint lacks 9 encoder tensors of its config.json, the first "
            "'encoder.block.2.layer.0.SelfAttention.q.weight'") in _load_error(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "d_kv"}))
    assert "config.json needs positive integers ['d_kv']" in _load_error(folder)

    folder = _copy(tmp_path / "b")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert "no model.safetensors or model.safetensors.index.json there (PyTorch pickles are not read" in \
        _load_error(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert _load_error(folder) == f"{folder / 'model.safetensors'}: not a safetensors file."
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    (folder / "spiece.model").write_bytes(b"garbage")
    assert "spiece.model is not a SentencePiece model" in _load_error(folder)


def _precomputed_config(**model):
    config = load_config_file(os.path.join(ROOT, "configs", "shapes_t2i.py"))
    config.data.max_text_len = L
    config.model.update({"text_encoder": "precomputed", "text_emb_dim": 32, "text_encoder_path": TINY, **model})
    return config


def test_prompts_of_a_precomputed_model_are_embedded_by_its_encoder():
    config = _precomputed_config()
    cond, null, source, _ = generation.conditioning(config, prompts=PROMPTS[:2], negative_prompt="a dog",
                                                    source_prompt="a cat")
    emb, mask = t5.load(TINY).embed(PROMPTS[:2], L)
    np.testing.assert_array_equal(cond["text_emb"], emb)
    np.testing.assert_array_equal(cond["mask"], mask)
    assert not cond["drop"].any() and null["text_emb"].shape == source["text_emb"].shape == (1, L, 32)
    np.testing.assert_array_equal(null["text_emb"], t5.load(TINY).embed(["a dog"], L)[0])
    # no prompt: the null text, without reading the encoder
    cond, *_ = generation.conditioning(_precomputed_config(text_encoder_path="/nowhere"))
    assert cond["drop"].all()


@pytest.mark.parametrize("model,kwargs,message", [
    ({"text_encoder_path": ""}, {"prompts": ["a cat"]},
     "--prompt: this model reads precomputed text embeddings (model.text_encoder='precomputed') and has no frozen "
     "encoder to embed text (model.text_encoder_path, --text_encoder=T5_FOLDER); give --prompt_embedding=FILE.npz."),
    ({}, {"prompts": ["a cat"], "prompt_embedding": "x.npz"},
     "--prompt and --prompt_embedding: give text or its embedding, not both."),
    ({"text_emb_dim": 8}, {"prompts": ["a cat"]},
     f"model.text_emb_dim=8: the encoder in model.text_encoder_path={TINY!r} makes 32-wide embeddings; set "
     "model.text_emb_dim=32."),
    ({}, {"prompts": [PROMPTS[-1]]},
     f"--prompt={PROMPTS[-1]!r}: {REF['full_lengths'][-1]} T5 tokens (EOS included); this model reads at most "
     f"data.max_text_len={L}."),
])
def test_prompt_mistakes_are_one_line_errors(model, kwargs, message):
    with pytest.raises(UserError) as e:
        generation.conditioning(_precomputed_config(**model), **kwargs)
    assert str(e.value) == message


def test_an_encoder_path_needs_precomputed_embeddings():
    config = _precomputed_config(text_encoder="trained")
    with pytest.raises(UserError, match=r"^model.text_encoder_path=.*set model.text_encoder='precomputed' "
                                        r"\(model.text_encoder='trained'\)\.$"):
        validate_text(config)


def _write_folder(root, captions: dict[str, str]):
    rng = np.random.default_rng(0)
    for name, caption in captions.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(os.path.join(root, name + ".png"))
        with open(os.path.join(root, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption)


def _documented(command: str, marker: str = "python -m ddpm_jax.embed") -> list[str]:
    """The lines of the docs/text_to_image.md block holding `marker` that run `command`, as argument lists."""
    with open(os.path.join(ROOT, "docs", "text_to_image.md")) as f:
        text = re.sub(r"\\\n\s*", " ", f.read())
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if marker in b)
    lines = [shlex.split(line.split("  #")[0])[3:] for line in block.splitlines()
             if line.startswith(f"python -m ddpm_jax.{command} ")]
    assert lines, command
    return lines


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_documented_embed_train_and_sample_commands_run_on_a_folder(tmp_path, monkeypatch, caplog):
    """The docs' commands as written, in a folder with `mine/` (four captioned images) and the docs'
    encoder folder (here the tiny one; so `--config.model.text_emb_dim=32` is appended), a smaller
    model and two steps appended too."""
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "configs"), "configs")
    captions = {"0001": "a red circle", "0002": "a photo of a cat", "more/0003": "a blue square", "0004": "  a dog "}
    _write_folder("mine", captions)
    (embed_args,) = _documented("embed")
    encoder_folder = next(a.split("=", 1)[1] for a in embed_args if a.startswith("--config.model.text_encoder_path="))
    shutil.copytree(TINY, encoder_folder)
    tiny = ["--config.model.text_emb_dim=32"]
    status, _, err = run_command(embed, *embed_args, *tiny)
    assert status == 0, err
    encoder = t5.load(TINY)
    for name, caption in captions.items():
        with np.load(f"mine/{name}.npz") as f:
            emb, mask = encoder.embed([caption.strip()], 48)
            np.testing.assert_allclose(f["text_emb"], emb[mask], rtol=0, atol=1e-5)  # batches of 4 and of 1
    os.utime("mine/0001.txt", ns=(0, 0))  # an older caption keeps its up-to-date embedding
    with open("mine/0004.txt", "w") as f:
        f.write("a green triangle")
    before = os.stat("mine/0001.npz").st_mtime_ns
    status, _, err = run_command(embed, *embed_args, *tiny)
    assert status == 0 and "wrote 1 embeddings, kept 3 up to date (4 captions)" in caplog.text, err
    assert os.stat("mine/0001.npz").st_mtime_ns == before

    small = ["--config.model.ch=16", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=(16,)",
             "--config.training.batch_size=8", "--config.training.num_train_steps=2",
             "--config.training.checkpoint_every=2", "--config.training.sample_every=0",
             "--config.training.profile_steps=0", "--compilation_cache="]
    (main_args,) = _documented("main")
    status, _, err = run_command(main, *main_args, *tiny, *small)
    assert status == 0, err
    (sample_args,) = _documented("sample")
    workdir = next(a.split("=", 1)[1] for a in sample_args if a.startswith("--workdir="))
    status, _, err = run_command(sample, *sample_args, "--num_samples=2", "--batch_size=8")
    assert status == 0, err
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
    os.rename(encoder_folder, "moved")  # the run's encoder elsewhere: --text_encoder names it
    status, _, err = run_command(sample, *sample_args, "--num_samples=2")
    assert status == 2 and err == f"error: model.text_encoder_path={encoder_folder!r}: no config.json there; give " \
        "the folder of a T5 checkpoint in the Hugging Face layout (config.json, model.safetensors or " \
        "model.safetensors.index.json with its shards, spiece.model).\n", err
    status, _, err = run_command(sample, *sample_args, "--num_samples=2", "--text_encoder=moved")
    assert status == 0, err
    stage = [f"--stages={workdir}", "--prompt=a red circle", "--num_samples=2"]
    status, _, err = run_command(cascade, *stage)
    assert status == 2 and "error: stage 0" not in err and "model.text_encoder_path=" in err, err
    status, _, err = run_command(cascade, *stage, "--text_encoder=moved")
    assert status == 0, err
    clip = os.path.join(ROOT, "tests", "data", "clip_tiny")  # the captions of a folder of embeddings are not kept
    status, _, err = run_command(evaluate, "clip", f"--workdir={workdir}", f"--clip_model={clip}", "--num_samples=2")
    assert status == 2 and err.startswith("error: data.text_feature='caption': this run's data ('folder') has no "
                                          "captions there"), err
    long = " ".join(["a red circle left of a blue square"] * 8)  # more than data.max_text_len=48 tokens
    status, _, err = run_command(sample, *sample_args, f"--prompt={long}", "--num_samples=2", "--text_encoder=moved")
    assert status == 2 and err.startswith("error: --prompt=") and "T5 tokens" in err and err.count("\n") == 1, err


def _embedding_captions_config(data_dir, **data):
    config = _precomputed_config()
    config.data.update({"data_dir": str(data_dir), "embed_captions": True, **data})
    config.training.update(batch_size=16, steps_per_call=2)
    return config


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores (the distillation tests took its place)
def test_captions_are_embedded_on_the_devices_as_the_byte_pipeline_draws_them(tmp_path):
    """data.embed_captions: each batch's embeddings are `FrozenT5.embed` of the captions that a trained
    encoder's pipeline (same seed, same positions) gets as bytes, in pmap's `[D, k, B_dev]` layout."""
    import tensorflow_datasets as tfds

    from ddpm_jax import input_pipeline, text

    config = _embedding_captions_config(tmp_path)
    trained = config.copy_and_resolve_references()
    trained.model.update(text_encoder="trained", text_encoder_path="")
    trained.data.update(embed_captions=False, max_text_len=48)  # whole captions: 43 bytes at most
    start = 40  # a resumed stream's batch
    want = next(iter(tfds.as_numpy(input_pipeline.create_dataset(trained, start_example=start))))
    captions = text.detokenize(want["tokens"].reshape(-1, 48), want["mask"].reshape(-1, 48))
    emb, mask = t5.load(TINY).embed(captions, L)  # some shapes captions are cut at L = 16 tokens
    got = next(input_pipeline.create_train_iterator(config, start_example=start))
    assert sorted(got) == ["image", "mask", "text_emb"]
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["mask"], mask.reshape(8, 2, 2, L))
    np.testing.assert_allclose(np.asarray(got["text_emb"]), emb.reshape(8, 2, 2, L, 32), rtol=0, atol=1e-5)
    assert len(set(captions)) > 4 and (mask.sum(1) == L).any()  # cut captions among them


@pytest.mark.parametrize("data,message", [
    ({"text_feature": "label"}, "data.text_feature='label': the 'shapes' dataset has no such feature (it has "),
    ({"embed_captions": False}, "model.text_encoder='precomputed': the 'shapes' dataset has no 'text_emb' and "
                                "'text_mask' features (it has "),
])
def test_text_the_dataset_lacks_is_one_line_naming_the_field(tmp_path, data, message):
    from ddpm_jax import input_pipeline

    with pytest.raises(UserError, match="^" + re.escape(message)):
        input_pipeline.check_dataset(_embedding_captions_config(tmp_path, **data))


@pytest.mark.parametrize("model", [{"text_encoder_path": ""}, {"text_encoder": "trained", "text_encoder_path": ""}])
def test_embedding_captions_needs_a_frozen_encoder(model):
    config = _precomputed_config(**model)
    config.data.embed_captions = True
    with pytest.raises(UserError, match=r"^data.embed_captions=True: captions are embedded by the frozen T5 of a "
                                        r"precomputed model; set model.text_encoder='precomputed' \(is "):
        validate_text(config)


@pytest.mark.slow  # 48 s; the pipeline tests below check embedding as it trains in the default suite
def test_documented_commands_of_captions_embedded_as_it_trains_run(tmp_path, monkeypatch):
    """The docs' block as written (the tiny encoder under the docs' folder name, so
    `--config.model.text_emb_dim=32` is appended; a smaller model, 2 steps, fewer samples too)."""
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "configs"), "configs")
    marker = "--config.data.embed_captions=True"
    (main_args,) = _documented("main", marker)
    encoder_folder = next(a.split("=", 1)[1] for a in main_args if a.startswith("--config.model.text_encoder_path="))
    shutil.copytree(TINY, encoder_folder)
    small = ["--config.model.text_emb_dim=32", f"--config.data.data_dir={tmp_path / 'tfds'}",
             "--config.model.ch=16", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=(16,)",
             "--config.training.batch_size=8", "--config.training.num_train_steps=2",
             "--config.training.checkpoint_every=2", "--config.training.sample_every=0",
             "--config.training.profile_steps=0", "--compilation_cache="]
    status, _, err = run_command(main, *main_args, *small)
    assert status == 0, err
    (sample_args,) = _documented("sample", marker)
    status, _, err = run_command(sample, *sample_args, "--num_samples=2", "--batch_size=8")
    assert status == 0, err
    (evaluate_args,) = _documented("evaluate", marker)
    status, out, err = run_command(evaluate, *evaluate_args, "--num_samples=8")
    assert status == 0 and '"num_samples": 8' in out, err
    os.rename(encoder_folder, "moved")  # evaluate --text_encoder reads it from there, cascade too
    status, _, err = run_command(evaluate, *evaluate_args, "--num_samples=8")
    assert status == 2 and err.startswith(f"error: model.text_encoder_path={encoder_folder!r}: no config.json"), err
    status, out, err = run_command(evaluate, *evaluate_args, "--num_samples=8", "--text_encoder=moved")
    assert status == 0 and '"num_samples": 8' in out, err
    workdir = next(a.split("=", 1)[1] for a in evaluate_args if a.startswith("--workdir="))
    status, out, err = run_command(evaluate, "cascade", f"--stages={workdir}", "--num_samples=2",
                                   "--text_encoder=moved")
    assert status == 0 and '"stage_0"' in out, err
    written = sorted(os.listdir(os.path.join(workdir, "eval")))  # the encoder's folder is not in a result's name
    assert written == ["cascade_step_2_num_samples2.json", "shapes_step_2_ddim50_eta1_w3_t150-inf_n8.json"], written


@pytest.mark.parametrize("shards", [1, 4])
def test_a_folder_of_captions_is_embedded_as_it_trains_without_the_embed_step(tmp_path, shards):
    """(With the encoder split over groups of 4 devices too: the batch leaves in pmap's layout.)"""
    from ddpm_jax import input_pipeline, parallel

    captions = {"a": "a red circle", "b": "a photo of a cat", "c/d": "a blue square", "e": "a dog"}
    _write_folder(str(tmp_path / "mine"), captions)
    config = _embedding_captions_config(tmp_path / "mine", dataset="folder", image_size=16)
    config.training.steps_per_call = 1
    config.model.text_encoder_shards = shards
    input_pipeline.check_dataset(config)
    assert not list((tmp_path / "mine").glob("*.npz"))
    emb, mask = t5.load(TINY).embed(list(captions.values()), L)
    got = next(input_pipeline.create_train_iterator(config))
    assert got["text_emb"].sharding.is_equivalent_to(parallel.device_sharding(), 4)
    rows = np.asarray(got["text_emb"]).reshape(16, L, 32)  # four epochs of the four captions
    nearest = [np.abs(emb - row).max(axis=(1, 2)).min() for row in rows]
    assert max(nearest) < 1e-5 and len({r.tobytes() for r in rows.round(4)}) == 4


def test_embed_refuses_a_config_that_embeds_as_it_trains():
    status, _, err = run_command(embed, f"--config={ROOT}/configs/shapes_t2i.py", "--config.data.dataset=folder",
                                 "--config.data.data_dir=mine", "--config.model.text_encoder=precomputed",
                                 f"--config.model.text_encoder_path={TINY}", "--config.data.embed_captions=True")
    assert status == 2 and err == "error: --config: data.embed_captions=True embeds the captions on the devices as " \
        "it trains; these files are read with data.embed_captions=False.\n", err


def test_weights_cast_as_loaded():
    """text_encoder_dtype: bfloat16 weights (half the memory) give embeddings within bfloat16's rounding
    of the stored float32 ones, under another fingerprint; bfloat16 shards cast to float32 give exactly
    the stored weights' embeddings."""
    stored, cast = t5.load(TINY), t5.load(TINY, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(cast.params)} == {jnp.dtype("bfloat16")}
    assert cast.fingerprint != stored.fingerprint
    emb, mask = stored.embed(PROMPTS, L)
    emb16, mask16 = cast.embed(PROMPTS, L)
    np.testing.assert_array_equal(mask16, mask)
    error = np.abs(emb16 - emb)[mask].max()
    assert 1e-4 < error < 0.1, error  # RMS-normed outputs of size ~1; bfloat16 keeps 8 bits
    sharded = os.path.join(DATA, "t5_tiny_sharded_bf16")
    up = t5.load(sharded, "float32")
    assert {x.dtype for x in jax.tree.leaves(up.params)} == {jnp.dtype("float32")}
    np.testing.assert_array_equal(up.embed(PROMPTS, L)[0], t5.load(sharded).embed(PROMPTS, L)[0])
    config = _precomputed_config(text_encoder_dtype="float16")
    with pytest.raises(UserError, match=r"^model.text_encoder_dtype='float16': must be one of \('', 'bfloat16', "):
        validate_text(config)


@pytest.mark.parametrize("shards", [2, 8])
def test_an_encoder_split_over_devices_embeds_as_a_whole_copy(shards):
    """text_encoder_shards: each device holds 1/shards of the split kernels; the embeddings are those of
    a copy per device (float32 sums in another order)."""
    split = t5.load(TINY, "", shards)
    kernel = split.params["block_0_mlp"]["wi_0"]["kernel"]  # [d_model, d_ff] split by its units
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 64 // shards)}
    assert {s.data.shape for s in split.params["shared"]["embedding"].addressable_shards} == {(200, 32)}
    emb, mask = split.embed(PROMPTS * 2 + PROMPTS[:3], L, batch_size=9)
    want, want_mask = t5.load(TINY).embed(PROMPTS * 2 + PROMPTS[:3], L, batch_size=9)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match=r"^model.text_encoder_shards=3: must divide this process's 8 devices and "
                                        r"the encoder's attention \(num_heads \* d_kv\)=32 and feed-forward "
                                        r"\(d_ff\)=64\.$"):
        t5.load(TINY, "", 3)


def test_an_encoder_that_cannot_be_split_so_is_refused_before_training(tmp_path):
    status, _, err = run_command(main, f"--config={ROOT}/configs/shapes_t2i.py", f"--workdir={tmp_path / 'run'}",
                                 "--config.model.text_encoder=precomputed", f"--config.model.text_encoder_path={TINY}",
                                 "--config.model.text_emb_dim=32", "--config.data.embed_captions=True",
                                 "--config.model.text_encoder_shards=16", "--compilation_cache=")
    assert status == 2 and err == "error: model.text_encoder_shards=16: must divide this process's 8 devices and the " \
        "encoder's attention (num_heads * d_kv)=32 and feed-forward (d_ff)=64.\n", err
    assert not (tmp_path / "run").exists()
