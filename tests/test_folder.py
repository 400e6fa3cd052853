"""data.dataset='folder': a folder of images of any size and mode as a prepared tfds dataset."""
import logging
import os
import pathlib

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import input_pipeline, training
from ddpm_jax.datasets import folder as folder_dataset
from tests.train_helpers import first_examples, small_digits_config

SIZE = 8
RED, TEAL, WHITE = (255, 0, 0), (10, 200, 30), (255, 255, 255)


def _rng(seed):
    return np.random.default_rng(seed)


def write_mixed_folder(root) -> dict:
    """Class sub-folders 'cats' and 'dogs' of images in every mode; returns {relpath: (label, expected
    uint8 [8, 8, 3] or None for lossy JPEG)}. Also writes a truncated PNG, a text file and a hidden PNG."""
    for d in ("cats", "dogs"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    p = lambda rel: os.path.join(root, rel)
    expected = {}

    # Wider than tall: the centre 16x16 (teal) is cropped from red side bands, then halved to 8x8.
    wide = np.zeros((16, 24, 3), np.uint8)
    wide[:] = RED
    wide[:, 4:20] = TEAL
    Image.fromarray(wide).save(p("cats/wide.png"))
    expected["cats/wide.png"] = (0, np.broadcast_to(np.uint8(TEAL), (SIZE, SIZE, 3)))

    grey = _rng(1).integers(0, 256, (SIZE, SIZE), np.uint8)
    Image.fromarray(grey, "L").save(p("cats/grey.png"))
    expected["cats/grey.png"] = (0, np.repeat(grey[..., None], 3, axis=2))

    # EXIF orientation 6: the stored image is shown turned 90 degrees clockwise.
    stored = _rng(2).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(p("cats/rotated.png"), exif=exif)
    expected["cats/rotated.png"] = (0, np.rot90(stored, k=-1))

    jpeg = np.broadcast_to(np.uint8((90, 60, 200)), (12, SIZE, 3))  # taller than wide
    Image.fromarray(np.ascontiguousarray(jpeg)).save(p("cats/tall.JPG"), quality=95)
    expected["cats/tall.JPG"] = (0, None)

    # Transparent pixels (whatever RGB they hold) become white.
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[:, :4] = (*TEAL, 255)
    rgba[:, 4:] = (1, 2, 3, 0)
    Image.fromarray(rgba, "RGBA").save(p("dogs/alpha.png"))
    alpha_expected = np.zeros((SIZE, SIZE, 3), np.uint8)
    alpha_expected[:, :4], alpha_expected[:, 4:] = TEAL, WHITE
    expected["dogs/alpha.png"] = (1, alpha_expected)

    indices = _rng(3).integers(0, 3, (SIZE, SIZE), np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette([*RED, *TEAL, 0, 0, 255] + [0] * (256 - 3) * 3)
    palette.save(p("dogs/palette.png"))
    expected["dogs/palette.png"] = (1, np.array([RED, TEAL, (0, 0, 255)], np.uint8)[indices])

    deep = np.full((SIZE, SIZE), 257 * 100, np.uint16)
    deep[:, :2] = 65535
    Image.fromarray(deep).save(p("dogs/deep.png"))  # 16-bit greyscale
    deep_expected = np.full((SIZE, SIZE, 3), 100, np.uint8)
    deep_expected[:, :2] = 255
    expected["dogs/deep.png"] = (1, deep_expected)

    webp = _rng(4).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    Image.fromarray(webp).save(p("dogs/lossless.webp"), lossless=True)
    expected["dogs/lossless.webp"] = (1, webp)

    Image.fromarray(_rng(5).integers(0, 256, (32, 32, 3), np.uint8)).save(p("dogs/broken.png"))
    broken = pathlib.Path(p("dogs/broken.png"))
    broken.write_bytes(broken.read_bytes()[:broken.stat().st_size // 2])  # truncated: the header still reads
    pathlib.Path(p("dogs/notes.txt")).write_text("not an image")
    Image.fromarray(webp).save(p("dogs/.hidden.png"))
    return expected


def folder_config(root, **data):
    """small_digits_config (a 1-level U-Net, batch 16 over the 8 test devices) on a folder of RGB images."""
    c = small_digits_config(None)
    c.data.dataset = "folder"
    c.data.data_dir = str(root)
    c.data.channels = 3
    c.data.image_size = SIZE
    c.data.random_flip = False
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    expected = write_mixed_folder(str(root))
    config = folder_config(root)
    config.model.num_classes = 2
    return root, expected, config


def _match(images, labels, expected):
    """{relpath: the uint8 image} pairing each example with the file it must come from."""
    found = {}
    for image, label in zip(images, labels):
        exact = [f for f, (lb, e) in expected.items() if e is not None and lb == label and np.array_equal(e, image)]
        lossy = [f for f, (lb, e) in expected.items() if e is None and lb == label]
        found[(exact or lossy)[0]] = image
    return found


def test_folder_builds_with_labels_and_the_images_each_mode_should_give(mixed, caplog):
    root, expected, config = mixed
    with caplog.at_level(logging.WARNING):
        input_pipeline.check_dataset(config)
    assert "skipping dogs/broken.png (OSError" in caplog.text
    assert "skipped 1 of 9 files that could not be read: dogs/broken.png" in caplog.text
    assert "ignored 1 files that are not .jpg/.jpeg/.png/.webp" in caplog.text  # notes.txt

    builder = input_pipeline.get_builder(config.data)
    assert builder.is_prepared() and builder.data_dir.startswith(os.path.join(str(root), ".ddpm_jax_cache"))
    assert builder.info.features["label"].names == ["cats", "dogs"]
    assert builder.info.metadata["skipped"] == {"dogs/broken.png": "OSError: image file is truncated"}
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(examples) == len(expected) == 8
    found = _match([ex["image"] for ex in examples], [ex["label"] for ex in examples], expected)
    assert sorted(found) == sorted(expected)
    np.testing.assert_allclose(found["cats/tall.JPG"].astype(int), np.broadcast_to((90, 60, 200), (8, 8, 3)),
                               atol=4)

    # The pipeline: pmap layout, [-1, 1], every image once per epoch with its label.
    first = next(iter(tfds.as_numpy(input_pipeline.create_dataset(config))))
    assert first["image"].shape == (8, 2, SIZE, SIZE, 3) and first["label"].shape == (8, 2)
    images, labels = first_examples(config, 8)
    uint8 = np.round((images + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(images, uint8 / 127.5 - 1, atol=1e-6)
    assert sorted(_match(uint8, labels, expected)) == sorted(expected)


def test_greyscale_and_resume_from_a_position_is_the_tail_of_the_stream(mixed):
    root, expected, config = mixed
    config = folder_config(root, channels=1, random_flip=True, shuffle_buffer=4)
    input_pipeline.check_dataset(config)
    full, full_labels = first_examples(config, 3 * 8 + 6)
    assert full.shape[-1] == 1
    # Pillow's 'L' conversion of a grey image keeps its values.
    grey = expected["cats/grey.png"][1][..., 0]
    rows = {np.round((im[..., 0] + 1) * 127.5).astype(np.uint8).tobytes() for im in full[:8]}
    assert grey.tobytes() in rows or grey[:, ::-1].tobytes() in rows
    for start in (3, 8 + 5):
        tail, tail_labels = first_examples(config, 6, start_example=start)
        np.testing.assert_array_equal(tail, full[start:start + 6])
        np.testing.assert_array_equal(tail_labels, full_labels[start:start + 6])


def test_unchanged_folder_is_not_decoded_again_and_a_changed_one_is(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(_rng(i).integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(root / f"{i}.png")
    config = folder_config(root, cache_dir=str(tmp_path / "cache"))
    input_pipeline.check_dataset(config)
    first = input_pipeline.get_builder(config.data)
    assert first.data_dir.startswith(str(tmp_path / "cache")) and "label" not in first.info.features

    def no_decoding(self, relpath):
        raise AssertionError(f"decoded {relpath} again")

    with monkeypatch.context() as m:
        m.setattr(folder_dataset.Folder, "_encode", no_decoding)
        input_pipeline.check_dataset(config)
        assert input_pipeline.get_builder(config.data).data_dir == first.data_dir

    os.utime(root / "1.png", ns=(1, 1))  # touched, same content: prepared again
    input_pipeline.check_dataset(config)
    touched = input_pipeline.get_builder(config.data)
    assert touched.data_dir != first.data_dir and touched.info.splits["train"].num_examples == 3
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "3.png")
    input_pipeline.check_dataset(config)
    added = input_pipeline.get_builder(config.data)
    assert added.data_dir not in (first.data_dir, touched.data_dir)
    assert added.info.splits["train"].num_examples == 4


def _error(config):
    with pytest.raises(ValueError) as e:
        input_pipeline.check_dataset(config)
    return str(e.value)


def test_folder_mistakes_are_user_errors_naming_the_field(tmp_path):
    from ddpm_jax import validation

    config = folder_config(tmp_path / "missing")
    missing = str(tmp_path / "missing")
    assert _error(config) == (f"data.data_dir={missing!r}: no such folder (data.dataset='folder' reads the images "
                              f"in it).")
    (tmp_path / "empty" / ".ddpm_jax_cache").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("")
    empty = folder_config(tmp_path / "empty")
    assert "has no images (1 other files are not .jpg/.jpeg/.png/.webp)" in _error(empty)
    config.data.data_dir = None
    with pytest.raises(ValueError, match=r"data\.dataset='folder' needs data\.data_dir=PATH"):
        validation.validate_config(config)

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(flat / "a.png")
    Image.fromarray(np.zeros((6, 20, 3), np.uint8)).save(flat / "small.png")
    config = folder_config(flat)
    assert _error(config) == (f"data.image_size=8: 1 of the 2 images in data.data_dir={str(flat)!r} are smaller "
                              f"than 8x8: small.png (20x6). Remove them or lower data.image_size.")
    config.model.num_classes = 2
    assert _error(config) == (f"model.num_classes=2: data.data_dir={str(flat)!r} has no class sub-folders; put "
                              f"each class's images in a sub-folder named after it (sorted names are labels "
                              f"0..1), or use model.num_classes=0.")
    (flat / "cats").mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(flat / "cats" / "b.png")
    assert "1 images lie directly in data.data_dir=" not in _error(config)  # two lie there
    assert "2 images lie directly in data.data_dir=" in _error(config)
    for name in ("a.png", "small.png"):
        (flat / name).unlink()
    assert _error(config) == (f"model.num_classes=2: data.data_dir={str(flat)!r} has 1 class sub-folders with "
                              f"images ('cats').")


def test_user_errors_come_before_anything_is_written(tmp_path):
    config = folder_config(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match=r"no such folder"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_pod_slice_process_0_prepares_before_the_others(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "a.png")
    for index in (1, 0):  # process 1 must wait for process 0's copy; process 0 writes it first
        config = folder_config(root, cache_dir=str(tmp_path / f"cache{index}"))
        prepared_at_barrier = []
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: prepared_at_barrier.append(
            input_pipeline.get_builder(config.data).is_prepared()))
        input_pipeline.check_dataset(config)
        assert prepared_at_barrier == [index == 0]
        assert input_pipeline.get_builder(config.data).is_prepared()


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_training_on_a_folder_resumes_exactly(mixed, tmp_path):
    root, _, config = mixed
    config = config.copy_and_resolve_references()
    config.data.random_flip = True
    config.training.num_train_steps = 4
    config.training.checkpoint_every = 2
    straight = training.train_and_evaluate(config, str(tmp_path / "straight"))
    config.training.num_train_steps = 2
    training.train_and_evaluate(config, str(tmp_path / "resumed"))
    config.training.num_train_steps = 4
    resumed = training.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    chex.assert_trees_all_equal(straight, resumed)


# Captions (NAME.txt) and precomputed embeddings (NAME.npz) beside the images.
L, DIM = 6, 12  # data.max_text_len and model.text_emb_dim of the text configs below


def write_text_folder(root) -> dict:
    """Four random 8x8 images (PNG and lossless WebP, one in a sub-folder), each with a caption and an
    .npz of random embeddings of its own length <= L; returns {relpath: (image, caption, emb, mask)}."""
    os.makedirs(os.path.join(root, "more"), exist_ok=True)
    rng = _rng(10)
    files = {}
    for name, length in (("a.png", 3), ("b.webp", L), ("c.png", 1), ("more/d.png", 4)):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
        Image.fromarray(image).save(os.path.join(root, name), lossless=True)
        stem = os.path.join(root, os.path.splitext(name)[0])
        caption = f"  caption of {name}, é \n"
        pathlib.Path(stem + ".txt").write_text(caption, encoding="utf-8")
        emb = rng.normal(size=(length, DIM)).astype(np.float32)
        mask = np.arange(length) < max(1, length - 1)
        if name == "c.png":  # no text_mask: all True
            np.savez(stem + ".npz", text_emb=emb)
        else:
            np.savez(stem + ".npz", text_emb=emb, text_mask=mask)
        files[name] = (image, caption.strip(), emb, mask)
    return files


def text_folder_config(root, encoder, **data):
    """folder_config with a trained byte-level text encoder or precomputed embeddings [L, DIM]."""
    c = folder_config(root, max_text_len=L, **data)
    c.model.text_encoder, c.model.text_width, c.model.text_depth, c.model.text_heads = encoder, 32, 1, 2
    c.model.text_emb_dim = DIM if encoder == "precomputed" else 0
    return c


def _by_file(builder, files) -> dict:
    """{relpath: example} of the prepared copy, each example matched to its file by its image."""
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    found = {next(f for f, v in files.items() if np.array_equal(v[0], ex["image"])): ex for ex in examples}
    assert sorted(found) == sorted(files)
    return found


def test_captions_and_embeddings_beside_each_image_are_prepared(tmp_path):
    files = write_text_folder(str(tmp_path))
    captions = text_folder_config(tmp_path, "trained")
    input_pipeline.check_dataset(captions)
    builder = input_pipeline.get_builder(captions.data, captions.model)
    assert isinstance(builder.info.features["caption"], tfds.features.Text) and "text_emb" not in builder.info.features
    assert builder.listing.num_ignored == 4  # the .npz files; the captions read are not "ignored"
    for f, ex in _by_file(builder, files).items():
        assert ex["caption"].decode("utf-8") == files[f][1]
    batch = next(iter(tfds.as_numpy(input_pipeline.create_dataset(captions))))
    assert batch["tokens"].shape == batch["mask"].shape == (8, 2, L) and "text_emb" not in batch

    embeddings = text_folder_config(tmp_path, "precomputed")
    input_pipeline.check_dataset(embeddings)
    builder = input_pipeline.get_builder(embeddings.data, embeddings.model)
    # stored as long as each caption (disk: T5-XXL's 128 x 4096 padded would be 2 MB an image) ...
    features = builder.info.features
    assert features["text_emb"].shape == (None, DIM) and features["text_mask"].shape == (None,)
    for f, ex in _by_file(builder, files).items():
        _, _, emb, mask = files[f]
        np.testing.assert_array_equal(ex["text_emb"], emb)
        np.testing.assert_array_equal(ex["text_mask"], mask)
    # ... and zero- and False-padded to L in the pipeline
    batch = next(iter(tfds.as_numpy(input_pipeline.create_dataset(embeddings))))
    assert batch["text_emb"].shape == (8, 2, L, DIM) and batch["mask"].shape == (8, 2, L) and "tokens" not in batch
    padded = [(np.pad(e, ((0, L - len(e)), (0, 0))), np.pad(m, (0, L - len(m)))) for _, _, e, m in files.values()]
    for emb, mask in zip(batch["text_emb"].reshape(-1, L, DIM), batch["mask"].reshape(-1, L)):
        assert any(np.array_equal(emb, e) and np.array_equal(mask, m) for e, m in padded)
    # Three copies: images only (no model config), with captions, with embeddings.
    dirs = {input_pipeline.get_builder(c.data, m).data_dir for c, m in
            ((captions, None), (captions, captions.model), (embeddings, embeddings.model))}
    assert len(dirs) == 3


def test_an_edited_caption_prepares_a_new_copy(tmp_path):
    files = write_text_folder(str(tmp_path))
    config = text_folder_config(tmp_path, "trained")
    input_pipeline.check_dataset(config)
    before = input_pipeline.get_builder(config.data, config.model).data_dir
    images_only = input_pipeline.get_builder(config.data).data_dir
    (tmp_path / "more" / "d.txt").write_text("an edited caption")
    input_pipeline.check_dataset(config)
    after = input_pipeline.get_builder(config.data, config.model)
    assert after.data_dir != before and input_pipeline.get_builder(config.data).data_dir == images_only
    assert _by_file(after, files)["more/d.png"]["caption"] == b"an edited caption"


def test_missing_and_bad_text_files_are_one_line_errors_naming_the_file(tmp_path):
    root = str(tmp_path)
    write_text_folder(root)
    (tmp_path / "b.txt").unlink()
    (tmp_path / "more" / "d.txt").unlink()
    assert _error(text_folder_config(tmp_path, "trained")) == (
        f"data.data_dir={root!r}: 2 of its 4 images have no caption file beside them, the first 'b.txt' (for "
        f"'b.webp'); model.text_encoder='trained' (or data.embed_captions=True) reads NAME.txt beside each image "
        f"NAME.png.")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe not UTF-8")
    (tmp_path / "more" / "d.txt").write_text("fine")
    assert _error(text_folder_config(tmp_path, "trained")) == (
        f"data.data_dir={root!r}: b.txt cannot be read as UTF-8 text (UnicodeDecodeError).")

    config = text_folder_config(tmp_path, "precomputed")
    good = np.zeros((2, DIM), np.float32)
    bad = {  # what b.npz holds -> the error (a.npz, sorted first, is fine)
        "junk": "not an .npz file (empty, truncated or another format).",
        "no_emb": "expected arrays named 'text_emb', found ['emb'].",
        "rank": "'text_emb' must be float [L, 12] (model.text_emb_dim=12), got float32 (1, 2, 12).",
        "dim": "'text_emb' must be float [L, 12] (model.text_emb_dim=12), got float32 (2, 8).",
        "long": f"'text_emb' has {L + 1} tokens, more than data.max_text_len={L}; raise data.max_text_len.",
        "mask": "'text_mask' must be bool [2] (one per token of 'text_emb') with at least one True, got bool (3,) "
                "with 3 True.",
    }
    for case, message in bad.items():
        path = tmp_path / "b.npz"
        if case == "junk":
            path.write_bytes(b"not a zip")
        else:
            arrays = {"no_emb": {"emb": good}, "rank": {"text_emb": good[None]}, "dim": {"text_emb": good[:, :8]},
                      "long": {"text_emb": np.zeros((L + 1, DIM), np.float32)},
                      "mask": {"text_emb": good, "text_mask": np.ones(3, bool)}}[case]
            np.savez(path, **arrays)
        error = _error(config)
        assert error == f"data.data_dir={root!r}: b.npz: {message}", case
    path.unlink()
    assert "have no embedding file beside them, the first 'b.npz' (for 'b.webp')" in _error(config)
    assert not (tmp_path / ".ddpm_jax_cache").exists()  # nothing was prepared


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_training_on_precomputed_embeddings_in_a_folder(tmp_path):
    write_text_folder(str(tmp_path / "images"))
    config = text_folder_config(tmp_path / "images", "precomputed")
    config.training.num_train_steps = 2
    state = training.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2 and state.params["text_proj"]["kernel"].shape == (DIM, 32)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
