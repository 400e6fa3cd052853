"""`shapes`: captioned 32x32 scenes of one or two coloured shapes on black, generated offline.

Each example is a scene from `ddpm_jax.scenes` (circles, squares and upward triangles in red,
green, blue or yellow, 10-14 pixels across; two objects stand left of / right of / above / below
each other) with its caption, e.g. "a red circle left of a blue square", and its objects. Splits
are drawn deterministically from fixed seeds: 'train' (20,000) and 'test' (2,000), about half with
one object. Every pixel is black or exactly one of the four colours.

The grammar and rasteriser live in `ddpm_jax.scenes` (no TensorFlow) and are re-exported here.
"""
import numpy as np
import tensorflow_datasets as tfds

from ddpm_jax.scenes import COLOURS, IMAGE_SIZE, SHAPES, caption, parse_caption, random_scene, render

__all__ = ["Shapes", "SPLITS", "caption", "parse_caption", "random_scene", "render"]

# split -> (number of examples, seed). Tests build smaller splits by patching this.
SPLITS = {"train": (20_000, 0), "test": (2_000, 1)}


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Captioned scenes of coloured shapes: 'train' and 'test' splits, no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "caption": tfds.features.Text(),
                "num_objects": tfds.features.Scalar(dtype=np.int32),
                "objects": tfds.features.Sequence({
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "colour": tfds.features.ClassLabel(names=list(COLOURS)),
                    # (y0, x0, y1, x1) in pixels, half-open.
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                }),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(n, seed) for split, (n, seed) in SPLITS.items()}

    def _generate_examples(self, num_examples: int, seed: int):
        rng = np.random.default_rng(seed)
        for i in range(num_examples):
            objects = random_scene(rng)
            yield i, {
                "image": render(objects),
                "caption": caption(objects),
                "num_objects": len(objects),
                "objects": [{"shape": o.shape, "colour": o.colour, "box": np.asarray(o.box, np.int32)}
                            for o in objects],
            }
