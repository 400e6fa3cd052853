"""The offline 'faces' dataset (scikit-image's LFW crops) and configs/faces.py."""
import numpy as np
import tensorflow_datasets as tfds

from configs import faces
from ddpm_jax import input_pipeline, validation


def test_faces_are_the_100_skimage_crops_and_the_config_streams_them(tmp_path):
    from skimage.data import lfw_subset

    config = faces.get_config()
    config.data.data_dir = str(tmp_path)
    validation.validate_config(config)
    input_pipeline.check_dataset(config)
    builder = tfds.builder("faces", data_dir=str(tmp_path))
    images = np.stack([ex["image"] for ex in tfds.as_numpy(builder.as_dataset(split="train"))])
    assert images.shape == (100, 25, 25, 1) and images.dtype == np.uint8
    expected = np.round(lfw_subset()[:100] * 255).astype(np.uint8)  # the first 100 are the faces
    assert sorted(x.tobytes() for x in images[..., 0]) == sorted(x.tobytes() for x in expected)

    config.data.random_flip = False
    batch = next(iter(tfds.as_numpy(input_pipeline.create_dataset(config))))
    assert batch["image"].shape == (8, 4, 16, 16, 1)  # batch 32 over the 8 test devices, resized to 16
    assert -1 <= batch["image"].min() < batch["image"].max() <= 1
    # Resized from 25x25: the mean brightness of a face is kept to within a grey level or two.
    means = sorted(np.round((batch["image"].reshape(32, -1).mean(1) + 1) * 127.5))
    all_means = np.round(expected.reshape(100, -1).mean(1))
    assert all(np.abs(all_means - m).min() <= 2 for m in means)
