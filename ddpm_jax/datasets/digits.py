"""`digits`: the 1,797 handwritten digits that scikit-learn bundles, as a tfds dataset (no download).

8x8 greyscale images with values 0..16 (the UCI optdigits test set) and their labels 0..9. Stored as
uint8 round(v * 255 / 16), so 0 -> 0 and 16 -> 255 and the input pipeline's [-1, 1] scaling maps
them to exactly -1 and 1.
"""
import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (uint8 images `[1797, 8, 8, 1]`, int64 labels `[1797]`)."""
    from sklearn.datasets import load_digits  # reads the CSV that ships inside scikit-learn

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, one 'train' split of 1,797 images with labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels = digits_uint8()
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
