"""The offline digits metrics: a classifier fitted on the real digits separates real from noise."""
import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tensorflow_datasets")  # the digits builder module the real images come from

from ddpm_jax.evaluation import digits_classifier as C


@pytest.fixture(scope="module")
def fitted():
    # The default cache, which the evaluate commands' tests read too: the suite fits it once.
    return C.load_or_fit()


def test_classifier_params_round_trip_exactly(fitted, tmp_path):
    path = str(tmp_path / "digits_classifier.npz")
    C.save(path, fitted)
    loaded = C.load(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(fitted)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_classifier_accuracy_on_held_out_digits(fitted):
    images, labels = C.real_digits()
    _, held_out = C.split_indices(len(images))
    assert C.accuracy(fitted, images[held_out], labels[held_out]) > 0.95


def test_digits_fd_real_vs_real_small_real_vs_noise_large(fitted):
    """Two disjoint halves of the real digits are ~4 apart (mostly the finite-sample bias of FD with
    128-d features and ~900 images each); uniform noise is ~230. The thresholds sit 5x and 2x from
    those measured values, and the two sides are 5x apart."""
    images, labels = C.real_digits()
    perm = np.random.default_rng(1).permutation(len(images))
    a, b = perm[:900], perm[900:]
    real = C.digits_metrics(fitted, images[a], labels[a], reference=images[b])
    noise = np.random.default_rng(0).integers(0, 256, images[a].shape, dtype=np.uint8)
    fake = C.digits_metrics(fitted, noise, labels[a], reference=images[b])
    assert real["digits_fd"] < 20 and fake["digits_fd"] > 100
    assert real["digits_accuracy"] > 0.95 and fake["digits_accuracy"] < 0.3
    assert real["digits_cs"] > 8.5 and fake["digits_cs"] < 5.0


def test_digits_metrics_reject_wrong_images(fitted):
    with pytest.raises(ValueError, match=r"uint8 images \[N, 8, 8, 1\]"):
        C.digits_metrics(fitted, np.zeros((4, 8, 8, 1), np.float32))
