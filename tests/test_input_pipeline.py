"""The digits builder and the tf.data pipeline: real data, [-1, 1] scaling, pmap layout, fixed order."""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddpm_jax import input_pipeline, parallel
from ddpm_jax.datasets.digits import NUM_EXAMPLES
from tests.train_helpers import first_examples, prepare_digits, small_digits_config

# What sklearn's 0..16 become: stored as uint8 round(v * 255 / 16), then x / 127.5 - 1 in float32.
LEVELS = np.round(np.arange(17) * 255 / 16).astype(np.float32) / np.float32(127.5) - np.float32(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_digits(str(tmp_path_factory.mktemp("tfds")))


def _sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _as_sorted_rows(images, labels):
    rows = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_builder_yields_the_real_1797_images_with_labels(data_dir):
    builder = tfds.builder("digits", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == NUM_EXAMPLES
    assert builder.info.features["label"].num_classes == 10
    ds = list(tfds.as_numpy(builder.as_dataset(split="train")))
    images = np.stack([ex["image"] for ex in ds])
    labels = np.array([ex["label"] for ex in ds])
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    sk_images, sk_labels = _sklearn_digits()
    expected = np.round(sk_images * 255 / 16)
    np.testing.assert_array_equal(_as_sorted_rows(images[..., 0], labels), _as_sorted_rows(expected, sk_labels))


def test_pipeline_scales_to_unit_range_in_pmap_layout_and_an_epoch_is_a_permutation(data_dir):
    config = small_digits_config(data_dir)  # batch 16 over the 8 test devices, no flips
    batch = next(iter(tfds.as_numpy(input_pipeline.create_dataset(config))))
    assert batch["image"].shape == (8, 2, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8, 2) and batch["label"].dtype == np.int32

    images, labels = first_examples(config, NUM_EXAMPLES)
    assert np.isin(images, LEVELS).all()
    assert images.min() == -1.0 and images.max() == 1.0
    sk_images, sk_labels = _sklearn_digits()
    expected = np.round(sk_images * 255 / 16) / 127.5 - 1
    np.testing.assert_allclose(_as_sorted_rows(images[..., 0], labels),
                               _as_sorted_rows(expected, sk_labels), atol=1e-6)


def _uint8_rows(images):
    return [bytes(r) for r in np.round((images + 1) * 127.5).astype(np.uint8).reshape(len(images), -1)]


def test_stream_is_fixed_by_the_seed_and_resumes_as_its_tail(data_dir):
    config = small_digits_config(data_dir)
    config.data.random_flip = True
    config.data.shuffle_buffer = 500  # smaller than the data, as for large datasets
    n = NUM_EXAMPLES
    full, full_labels = first_examples(config, 2 * n + 40)
    np.testing.assert_array_equal(full, first_examples(config, 2 * n + 40)[0])
    for start in (37, n + 5):  # inside the first epoch, and in the second
        tail, tail_labels = first_examples(config, 40, start_example=start)
        np.testing.assert_array_equal(tail, full[start:start + 40])
        np.testing.assert_array_equal(tail_labels, full_labels[start:start + 40])
    # Epochs are shuffled differently; about half of the images are mirrored.
    assert not np.array_equal(full_labels[:n], full_labels[n:2 * n])
    originals = set(_uint8_rows(np.round(_sklearn_digits()[0] * 255 / 16)[..., None] / 127.5 - 1))
    as_is = np.array([r in originals for r in _uint8_rows(full[:n])])
    mirrored = np.array([r in originals for r in _uint8_rows(full[:n, :, ::-1])])
    assert (as_is | mirrored).all()
    assert 0.3 < np.mean(~as_is) < 0.7


def test_random_crops_are_windows_of_the_images_drawn_from_the_seed(data_dir):
    config = small_digits_config(data_dir)
    config.data.image_size, config.data.random_crop = 4, 8  # 4x4 windows of the 8x8 digits
    crops, labels = first_examples(config, 200)
    assert crops.shape == (200, 4, 4, 1)
    np.testing.assert_array_equal(first_examples(config, 40, start_example=37)[0], crops[37:77])
    sk_images, sk_labels = _sklearn_digits()
    originals = np.round(sk_images * 255 / 16) / 127.5 - 1
    windows = np.lib.stride_tricks.sliding_window_view(originals, (4, 4), axis=(1, 2))  # [N, 5, 5, 4, 4]
    offsets = []
    for crop, label in zip(crops[..., 0], labels):
        match = np.abs(windows[sk_labels == label] - crop).max(axis=(-2, -1)) < 1e-6  # [n, 5, 5]
        assert match.any()  # every crop is a window of a digit of its label
        where = np.argwhere(match.any(axis=0))
        if len(where) == 1:  # the crop says where it was taken
            offsets.append(tuple(where[0]))
    assert len(set(offsets)) >= 10  # of the 25 places, not one fixed window


def test_steps_per_call_stacks_consecutive_batches(data_dir):
    config = small_digits_config(data_dir)
    one = iter(tfds.as_numpy(input_pipeline.create_dataset(config)))
    first, second = next(one), next(one)
    config.training.steps_per_call = 2
    stacked = next(iter(tfds.as_numpy(input_pipeline.create_dataset(config))))
    assert stacked["image"].shape == (8, 2, 2, 8, 8, 1)  # [devices, k, per device, H, W, C]
    np.testing.assert_array_equal(stacked["image"][:, 0], first["image"])
    np.testing.assert_array_equal(stacked["image"][:, 1], second["image"])
    np.testing.assert_array_equal(stacked["label"][:, 1], second["label"])


def test_processes_take_their_shares_of_the_same_global_batches(data_dir):
    config = small_digits_config(data_dir)  # global batch 16: 8 per process on 2 processes of 4 devices
    config.data.random_flip = True  # flips too follow the global stream
    config.data.shuffle_buffer = 500
    n = NUM_EXAMPLES
    for start in (0, n - 37):  # from the start, and across an epoch's end as after a resume
        images, labels = first_examples(config, 16 * 6, start_example=start)
        parts = [first_examples(config, 8 * 6, start_example=start, process_index=i, process_count=2,
                           num_local_devices=4) for i in range(2)]
        # Global batch b is process 0's b-th batch of 8, then process 1's.
        joined = [np.concatenate([p[j][8 * b:8 * b + 8] for b in range(6) for p in parts]) for j in (0, 1)]
        np.testing.assert_array_equal(joined[0], images)
        np.testing.assert_array_equal(joined[1], labels)
    assert not np.array_equal(parts[0][1], parts[1][1])


def test_device_prefetch_places_batches_as_pmap_takes_them(data_dir):
    batch = next(input_pipeline.create_train_iterator(small_digits_config(data_dir)))
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].sharding == parallel.device_sharding()
    assert [s.data.shape for s in batch["image"].addressable_shards] == [(1, 2, 8, 8, 1)] * 8


def test_unknown_dataset_and_mismatched_channels_name_the_field(data_dir):
    config = small_digits_config(data_dir)
    config.data.dataset = "cifar100x"
    with pytest.raises(ValueError, match=r"data\.dataset='cifar100x'.*Did you mean.*'cifar100'"):
        input_pipeline.check_dataset(config)
    config.data.dataset = "digits"
    config.data.channels = 3
    with pytest.raises(ValueError, match=r"data\.channels=3: the 'digits' images have 1 channels"):
        input_pipeline.check_dataset(config)
    config.data.channels = 1
    config.model.num_classes = 100
    with pytest.raises(ValueError, match=r"model\.num_classes=100: the 'digits' dataset has 10 classes"):
        input_pipeline.check_dataset(config)


def test_dataset_that_cannot_be_prepared_names_the_fields_before_anything_is_written(tmp_path, monkeypatch):
    from ddpm_jax import training
    from ddpm_jax.evaluation import tasks

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    config = small_digits_config(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"data\.dataset='digits' is not prepared in data\.data_dir='.*empty' and "
                                         r"could not be prepared there \(ConnectionError: Failed to resolve"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"data\.dataset='digits' is not prepared"):  # evaluation reads it too
        tasks.real_images(config, "train")


def test_a_run_started_beside_another_reads_the_copy_the_other_prepared_first(tmp_path, monkeypatch):
    """Two runs started at once both prepare 'digits'; the one whose copy lands second (tfds: FileExistsError
    on moving it into place) reads the first one's instead of stopping."""
    from ddpm_jax.datasets.digits import Digits

    config = small_digits_config(str(tmp_path))
    original, raced = Digits._download_and_prepare, []

    def beaten(self, *args, **kwargs):
        if not raced:
            raced.append(True)
            input_pipeline.get_builder(config.data, config.model).download_and_prepare()  # the other run
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Digits, "_download_and_prepare", beaten)
    builder = input_pipeline.prepared_builder(config.data, config.model)
    assert raced and builder.is_prepared() and builder.info.splits["train"].num_examples == NUM_EXAMPLES
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["1.0.0"]  # no incomplete copy left
