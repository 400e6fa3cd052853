"""`faces`: the 100 greyscale face crops that ship inside scikit-image, as a tfds dataset (no download).

`skimage.data.lfw_subset()` holds 100 faces from Labeled Faces in the Wild (Huang et al.) and then
100 non-face patches, 25x25, as floats in [0, 1]; the faces are stored as uint8 round(v * 255), one
'train' split without labels. The pipeline resizes them to `data.image_size`. A hundred images is a
demonstration that runs on a CPU, not a benchmark.
"""
import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 100
SIZE = 25


def faces_uint8() -> np.ndarray:
    """The 100 faces as uint8 `[100, 25, 25, 1]`."""
    from skimage.data import lfw_subset  # reads lfw_subset.npy from the installed package

    return np.round(lfw_subset()[:NUM_EXAMPLES] * 255.0).astype(np.uint8)[..., None]


class Faces(tfds.core.GeneratorBasedBuilder):
    """scikit-image's 100 LFW face crops, 25x25 greyscale, one 'train' split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(SIZE, SIZE, 1))}),
            homepage="https://vis-www.cs.umass.edu/lfw/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, image in enumerate(faces_uint8()):
            yield i, {"image": image}
