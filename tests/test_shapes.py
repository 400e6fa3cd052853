"""The shapes scenes (grammar, sampler, rasteriser), the `shapes` tfds builder and the checker."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax import scenes as S
from ddpm_jax.scenes import SceneObject

PALETTE = {(0, 0, 0)} | set(S.COLOURS.values())


@pytest.fixture(scope="module")
def many_scenes():
    rng = np.random.default_rng(123)
    return [S.random_scene(rng) for _ in range(2000)]


def test_render_exact_shapes_and_colours():
    """Hand-checked rows: a 10-pixel triangle widens by 2 every 2 rows from 2 at the apex; an
    11-pixel one from 1; a circle fills its box's middle row and column; a square its box."""
    tri10 = S.render([SceneObject("triangle", "green", (3, 5, 13, 15))])
    assert set(map(tuple, tri10.reshape(-1, 3))) == {(0, 0, 0), (0, 255, 0)}
    widths = (tri10[..., 1] == 255).sum(1)
    np.testing.assert_array_equal(widths[3:13], [2, 2, 4, 4, 6, 6, 8, 8, 10, 10])
    assert widths[:3].sum() == widths[13:].sum() == 0
    np.testing.assert_array_equal(np.nonzero(tri10[3, :, 1])[0], [9, 10])  # apex at the top centre
    tri11 = S.object_mask(SceneObject("triangle", "red", (0, 0, 11, 11)))
    np.testing.assert_array_equal(tri11.sum(1)[:11], [1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11])
    assert np.nonzero(tri11[0])[0].tolist() == [5]
    circle = S.object_mask(SceneObject("circle", "red", (0, 0, 12, 12)))[:12, :12]
    assert circle[6].sum() == circle[:, 6].sum() == 12 and not circle[0, 0] and not circle[11, 11]
    np.testing.assert_array_equal(circle, circle[::-1])  # symmetric about both axes of its box
    np.testing.assert_array_equal(circle, circle[:, ::-1])
    np.testing.assert_array_equal(circle, circle.T)
    square = S.render([SceneObject("square", "yellow", (20, 18, 32, 30))])
    assert (square[20:32, 18:30] == (255, 255, 0)).all() and square.sum() == 12 * 12 * 510


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("side", range(S.MIN_SIDE, S.MAX_SIDE + 1))
def test_every_shape_fills_exactly_its_box(shape, side):
    mask = S.object_mask(SceneObject(shape, "blue", (7, 4, 7 + side, 4 + side)))
    ys, xs = np.nonzero(mask)
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (7, 4, 7 + side, 4 + side)
    fill = mask.sum() / side**2
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
    assert abs(fill - expected) < 0.11  # the pixel staircase of a small triangle adds up to 0.1


def test_random_scenes_keep_the_spec(many_scenes):
    counts, relations, kinds = {1: 0, 2: 0}, dict.fromkeys(S.RELATIONS, 0), set()
    for scene in many_scenes:
        counts[len(scene)] += 1
        for o in scene:
            y0, x0, y1, x1 = o.box
            assert y1 - y0 == x1 - x0 and S.MIN_SIDE <= y1 - y0 <= S.MAX_SIDE
            assert y0 >= 0 and x0 >= 0 and y1 <= S.IMAGE_SIZE and x1 <= S.IMAGE_SIZE
            kinds.add((o.colour, o.shape))
        if len(scene) == 2:
            a, b = scene
            assert (a.colour, a.shape) != (b.colour, b.shape)
            rel = S.relation(a, b)  # raises if the margin does not hold
            relations[rel] += 1
            axis = 1 if rel in ("left of", "right of") else 0
            first, second = (a, b) if rel in ("left of", "above") else (b, a)
            assert second.box[axis] - first.box[axis + 2] >= S.GAP  # boxes apart along the axis
            dy, dx = np.subtract(b.centre, a.centre)
            assert abs((dy, dx)[axis]) - abs((dx, dy)[axis]) >= S.MARGIN
        image = S.render(scene)
        assert set(map(tuple, image.reshape(-1, 3))) <= PALETTE
        # Objects never overlap: every object's pixels are all its colour in the full render.
        for o in scene:
            assert (image[S.object_mask(o)] == S.COLOURS[o.colour]).all()
    assert 0.45 < counts[1] / len(many_scenes) < 0.55
    assert min(relations.values()) > 0.2 * counts[2]
    assert len(kinds) == len(S.COLOURS) * len(S.SHAPES)


def test_random_scene_is_a_function_of_the_generator_state():
    a = [S.random_scene(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    assert S.random_scene(np.random.default_rng(6)) != a[0]
    assert len(S.random_scene(np.random.default_rng(0), num_objects=2)) == 2
    with pytest.raises(ValueError, match="1 or 2 objects"):
        S.random_scene(np.random.default_rng(0), num_objects=3)


def test_captions_and_parsing_round_trip(many_scenes):
    red_circle = SceneObject("circle", "red", (0, 0, 10, 10))
    blue_square = SceneObject("square", "blue", (2, 20, 12, 30))
    assert S.caption([red_circle]) == "a red circle"
    assert S.caption([red_circle, blue_square]) == "a red circle left of a blue square"
    assert S.caption([blue_square, red_circle]) == "a blue square right of a red circle"
    below = SceneObject("triangle", "yellow", (20, 3, 31, 14))
    assert S.caption([below, red_circle]) == "a yellow triangle below a red circle"
    assert S.caption([red_circle, below]) == "a red circle above a yellow triangle"
    with pytest.raises(ValueError, match="no relation is clear"):
        S.caption([red_circle, SceneObject("square", "blue", (12, 12, 22, 22))])  # diagonal
    for scene in many_scenes:
        kinds, rel = S.parse_caption(S.caption(scene))
        assert kinds == [(o.colour, o.shape) for o in scene]
        assert rel == (S.relation(*scene) if len(scene) == 2 else None)
    all_phrases = [f"a {c} {s}" for c, s in itertools.product(S.COLOURS, S.SHAPES)]
    assert all(S.parse_caption(p)[1] is None for p in all_phrases)


@pytest.mark.parametrize("text", [
    "a purple circle", "a red hexagon", "red circle", "a red circle ", "A red circle",
    "a red circle left of", "a red circle near a blue square", "a red circle left of a blue",
    "a red circle and a blue square left of a green triangle", ""])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match=f"caption {text!r} is not in the shapes grammar"):
        S.parse_caption(text)


def test_parse_caption_rejects_the_same_object_twice():
    with pytest.raises(ValueError, match="'a red circle above a red circle' names the same"):
        S.parse_caption("a red circle above a red circle")
    assert S.parse_caption("a red circle above a red square")[1] == "above"


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    """The `shapes` builder with 200 train / 50 test examples, built twice into separate folders."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from ddpm_jax.datasets import shapes as shapes_ds

    builds = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes_ds, "SPLITS", {"train": (200, 0), "test": (50, 1)})
        for _ in range(2):
            builder = tfds.builder("shapes", data_dir=str(tmp_path_factory.mktemp("tfds")))
            builder.download_and_prepare()
            builds.append({split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
                           for split in ("train", "test")})
    return builder, builds


def _scene(example, info) -> list[SceneObject]:
    objs = example["objects"]
    features = info.features["objects"]
    shape_names, colour_names = features["shape"].names, features["colour"].names
    return [SceneObject(shape_names[s], colour_names[c], tuple(int(v) for v in box))
            for s, c, box in zip(objs["shape"], objs["colour"], objs["box"])]


def test_shapes_builder_features_and_consistency(small_builds):
    builder, (build, _) = small_builds
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 200, "test": 50}
    assert builder.info.features["objects"]["shape"].names == list(S.SHAPES)
    assert builder.info.features["objects"]["colour"].names == list(S.COLOURS)
    for examples in build.values():
        num_two = 0
        for ex in examples:
            image, scene = ex["image"], _scene(ex, builder.info)
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert ex["objects"]["box"].dtype == np.int32 and ex["num_objects"] == len(scene) in (1, 2)
            assert set(map(tuple, image.reshape(-1, 3))) <= PALETTE
            np.testing.assert_array_equal(image, S.render(scene))  # image, objects and caption agree
            assert ex["caption"].decode() == S.caption(scene)
            num_two += len(scene) == 2
        assert 0.3 < num_two / len(examples) < 0.7


def test_shapes_builder_is_deterministic_and_splits_differ(small_builds):
    from ddpm_jax.datasets.shapes import SPLITS

    (train_size, train_seed), (test_size, test_seed) = SPLITS["train"], SPLITS["test"]
    assert train_size >= 20_000 and test_size >= 2_000 and train_seed != test_seed  # the real sizes
    _, (a, b) = small_builds
    for split in ("train", "test"):
        assert [ex["caption"] for ex in a[split]] == [ex["caption"] for ex in b[split]]
        np.testing.assert_array_equal(np.stack([ex["image"] for ex in a[split]]),
                                      np.stack([ex["image"] for ex in b[split]]))
    # The test split comes from another seed: not the train split's first 50 examples in any order.
    train = {ex["image"].tobytes() for ex in a["train"]}
    test = [ex["image"].tobytes() for ex in a["test"]]
    assert sum(t in train for t in test) < 5


# ---- the checker ----

from ddpm_jax.evaluation import shapes_checker as C  # noqa: E402


def _downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Box average of `factor` x `factor` blocks, rounded: uint8 [N, H / factor, W / factor, 3]."""
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return np.round(blocks.mean((2, 4))).astype(np.uint8)


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(11)
    scenes = [S.random_scene(rng) for _ in range(1000)]
    return scenes, np.stack([S.render(s) for s in scenes]), [S.caption(s) for s in scenes]


def test_checker_finds_exactly_the_rendered_objects(rendered):
    scenes, images, captions = rendered
    for scene, image in zip(scenes[:200], images):
        found = sorted((d.colour, d.shape, d.box) for d in C.detect(image))
        assert found == sorted((o.colour, o.shape, o.box) for o in scene)
    rates = C.check(images, captions)
    assert rates == {"colour": 1.0, "count": 1.0, "shape": 1.0, "all": 1.0, "relation": 1.0, "reversed": 0.0}


def test_checker_on_16x16_renders(rendered):
    """2x2 box averages, as a 16x16 base model would see the data: 100% on these 1,000 scenes."""
    _, images, captions = rendered
    rates = C.check(_downsample(images, 2), captions)
    assert rates == {"colour": 1.0, "count": 1.0, "shape": 1.0, "all": 1.0, "relation": 1.0, "reversed": 0.0}


@pytest.mark.parametrize("shape", S.SHAPES)
def test_checker_reads_every_size_and_subpixel_offset_at_16x16(shape):
    """Every side, colour and odd/even placement (which decides which edges half-cover a pixel)."""
    sides = range(S.MIN_SIDE, S.MAX_SIDE + 1)
    for side, dy, dx, colour in itertools.product(sides, range(2), range(2), S.COLOURS):
        image = S.render([SceneObject(shape, colour, (8 + dy, 5 + dx, 8 + dy + side, 5 + dx + side))])
        found = C.detect(_downsample(image[None], 2)[0])
        assert [(d.colour, d.shape) for d in found] == [(colour, shape)], (side, dy, dx)


def test_checker_floor_with_mismatched_captions(rendered):
    _, images, captions = rendered
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    rates = C.check(images, shuffled)
    # Measured here: colour 0.12, count 0.51 (half the captions name each count), shape 0.14,
    # relation 0.10, all 0.03.
    assert rates["all"] < 0.1 and rates["colour"] < 0.3 and rates["shape"] < 0.3
    assert 0.4 < rates["count"] < 0.6 and rates["relation"] < 0.3


def test_checker_with_gaussian_noise(rendered):
    _, images, captions = rendered
    noise = np.random.default_rng(2).normal(0, 20, images.shape)
    noisy = np.clip(np.round(images + noise), 0, 255).astype(np.uint8)
    rates = C.check(noisy, captions)
    assert rates["colour"] >= 0.95 and rates["count"] >= 0.95 and rates["all"] >= 0.95


def _one(image, text) -> dict:
    return {k: bool(v[0]) for k, v in C.per_image(image[None], [text]).items()}


def test_checker_verdicts_on_hand_made_mistakes():
    circle = SceneObject("circle", "red", (10, 2, 22, 14))
    square = SceneObject("square", "blue", (10, 18, 22, 30))
    image = S.render([circle, square])
    assert _one(image, "a red circle left of a blue square") == dict(
        colour=True, count=True, shape=True, relation=True, reversed=False, two_objects=True, all=True)
    # The right objects in the wrong relation: the opposite one, then a perpendicular one (neither).
    swapped = _one(image, "a blue square left of a red circle")
    assert swapped["colour"] and swapped["count"] and swapped["shape"] and swapped["two_objects"]
    assert not swapped["relation"] and swapped["reversed"] and not swapped["all"]
    assert _one(image, "a red circle right of a blue square")["reversed"]
    perpendicular = _one(image, "a red circle above a blue square")
    assert not perpendicular["relation"] and not perpendicular["reversed"]
    # Colour and shape bound the wrong way round: each attribute is there, the pairs are not.
    crossed = _one(image, "a blue circle left of a red square")
    assert crossed["colour"] and crossed["shape"] and not crossed["all"]
    # A wrong colour, a wrong shape, one object too many, none at all.
    assert not _one(image, "a green circle left of a blue square")["colour"]
    wrong_shape = _one(S.render([circle]), "a red triangle")
    assert wrong_shape["colour"] and wrong_shape["count"] and not wrong_shape["shape"]
    extra = _one(image, "a red circle")
    assert not extra["count"] and not extra["colour"] and not extra["all"]
    empty = _one(np.zeros((32, 32, 3), np.uint8), "a red circle")
    assert not empty["count"] and not empty["colour"] and not empty["all"]


def test_checker_ignores_specks_and_rejects_white():
    image = S.render([SceneObject("triangle", "green", (3, 3, 15, 15))])
    image[25:28, 25:28] = (255, 0, 0)  # 9 pixels: a speck at 32x32
    assert _one(image, "a green triangle")["all"]
    image[24:28, 24:28] = (255, 0, 0)  # 16 pixels: an object
    assert not _one(image, "a green triangle")["count"]
    white = S.render([SceneObject("square", "yellow", (3, 3, 15, 15))])
    white[white[..., 0] > 0] = (230, 230, 230)
    assert [d.colour for d in C.detect(white)] == ["other"]
    assert not _one(white, "a yellow square")["colour"]


def test_checker_needs_both_objects_told_apart_for_the_relation():
    """Two red circles for 'a red circle left of a red square': which is the square? No relation."""
    left = SceneObject("circle", "red", (10, 2, 22, 14))
    right = SceneObject("circle", "red", (10, 18, 22, 30))
    verdict = _one(S.render([left, right]), "a red circle left of a red square")
    assert verdict["colour"] and verdict["count"] and not verdict["shape"] and not verdict["relation"]


def test_checker_rejects_bad_input(rendered):
    _, images, captions = rendered
    with pytest.raises(ValueError, match=r"uint8 RGB images \[N, H, W, 3\]"):
        C.check(images.astype(np.float32), captions)
    with pytest.raises(ValueError, match=r"H, W >= 8"):
        C.check(_downsample(images[:4], 8), captions[:4])
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        C.check(images[:4], captions[:3])
    with pytest.raises(ValueError, match="caption 'a red blob' is not in the shapes grammar"):
        C.check(images[:1], ["a red blob"])
    assert C.check(images[:3], [c.encode() for c in captions[:3]])["all"] == 1.0  # tfds gives bytes
    assert np.isnan(C.check(images[:1], ["a red circle"])["relation"])


def test_scenes_and_checker_import_without_tensorflow():
    code = ("import sys\n"
            "for name in ('tensorflow', 'tensorflow_datasets'):\n"
            "    sys.modules[name] = None\n"
            "from ddpm_jax import scenes\n"
            "from ddpm_jax.evaluation import shapes_checker\n"
            "image = scenes.render([scenes.SceneObject('circle', 'red', (0, 0, 12, 12))])\n"
            "assert shapes_checker.check(image[None], ['a red circle'])['all'] == 1.0\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
