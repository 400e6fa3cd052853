"""An offline sample-quality metric for the 8x8 digits: a small CNN fitted on the real digits.

Its 128-d penultimate features give a Frechet distance between generated and real digits (the FID
recipe in another feature space: NOT comparable with FID), and its predictions give the class
accuracy of class-conditional samples and a classifier score (the Inception Score recipe with 10
classes, at most 10). It is fitted deterministically (fixed seed, fixed split) in seconds on a CPU
and cached as `.npz`; it is separate from the diffusion training code.

Data: scikit-learn's 1,797 digits as the `digits` tfds builder stores them (uint8, `[N, 8, 8, 1]`).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddpm_jax import files, validation
from ddpm_jax.evaluation import metrics

NUM_CLASSES = 10
FEATURE_DIM = 128
NUM_HELD_OUT = 297  # the last examples of a fixed permutation; the classifier never trains on them
# The cache file's version: bump it whenever `fit` changes, so no stale classifier is reused.
DEFAULT_PATH = os.path.join(os.path.expanduser("~"), ".cache", "ddpm_jax", "digits_classifier_v2.npz")


class DigitsCNN(nn.Module):
    """x `[B, 8, 8, 1]` in [-1, 1] -> (features `[B, 128]`, logits `[B, 10]`)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), name="conv2")(x))
        features = nn.relu(nn.Dense(FEATURE_DIM, name="dense")(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(NUM_CLASSES, name="logits")(features)


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All real digits: (uint8 `[1797, 8, 8, 1]`, int labels `[1797]`), exactly as the tfds builder."""
    from ddpm_jax.datasets.digits import digits_uint8  # imports tfds; only needed here
    return digits_uint8()


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of a fixed permutation of n examples."""
    perm = np.random.default_rng(0).permutation(n)
    return perm[:-NUM_HELD_OUT], perm[-NUM_HELD_OUT:]


def _to_float(images) -> jax.Array:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _augment(key, x):
    """Random shifts by up to one pixel and small pixel noise, so the features are not brittle to
    the small imperfections of generated digits."""
    k1, k2 = jax.random.split(key)
    shifts = jax.random.randint(k1, (x.shape[0], 2), -1, 2)
    x = jax.vmap(lambda im, s: jnp.roll(im, s, axis=(0, 1)))(x, shifts)
    return x + 0.1 * jax.random.normal(k2, x.shape)


def fit(images: np.ndarray, labels: np.ndarray, steps: int = 600, batch_size: int = 64,
        seed: int = 0) -> dict:
    """Fits `DigitsCNN` with Adam on (uint8 images, labels); all steps run in one `lax.scan`."""
    model, tx = DigitsCNN(), optax.adam(1e-3)
    key = jax.random.key(seed)
    params = model.init(key, jnp.zeros((1, 8, 8, 1)))["params"]
    x, y = _to_float(images), jnp.asarray(labels, jnp.int32)

    def loss_fn(params, xb, yb):
        logits = model.apply({"params": params}, xb)[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(carry, i):
        params, opt_state = carry
        k_idx, k_aug = jax.random.split(jax.random.fold_in(key, i))
        idx = jax.random.choice(k_idx, x.shape[0], (batch_size,), replace=False)
        grads = jax.grad(loss_fn)(params, _augment(k_aug, x[idx]), y[idx])
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps)))(params)
    return params


def save(path: str, params) -> None:
    files.save_npz(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})


def load(path: str):
    arrays = files.load_npz(path, "eval.digits_classifier")
    try:
        return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in arrays.items()}, sep="/")
    except ValueError as e:
        raise validation.UserError(f"eval.digits_classifier={path}: not a digits classifier ({e}).") from None


def load_or_fit(path: str | None = None):
    """The classifier's params: loaded from `path` (default `DEFAULT_PATH`), or fitted on the
    training part of the real digits and saved there."""
    path = path or DEFAULT_PATH
    if files.is_file(path):
        return load(path)
    images, labels = real_digits()
    train, _ = split_indices(len(images))
    params = fit(images[train], labels[train])
    save(path, params)
    return params


@jax.jit
def apply(params, images) -> tuple[jax.Array, jax.Array]:
    """uint8 `[B, 8, 8, 1]` -> (features `[B, 128]`, logits `[B, 10]`)."""
    return DigitsCNN().apply({"params": params}, _to_float(images))


def features_and_logits(params, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Same as `apply` over any number of images, in batches; numpy out."""
    if images.dtype != np.uint8 or images.shape[1:] != (8, 8, 1):
        raise ValueError(f"digits metrics need uint8 images [N, 8, 8, 1], got {images.dtype} {images.shape}.")
    outs = [apply(params, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return (np.concatenate([np.asarray(f) for f, _ in outs]), np.concatenate([np.asarray(lg) for _, lg in outs]))


def accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images the classifier assigns to their label."""
    return float(np.mean(features_and_logits(params, images)[1].argmax(-1) == np.asarray(labels)))


def digits_metrics(params, samples: np.ndarray, labels: np.ndarray | None = None,
                   reference: np.ndarray | None = None) -> dict:
    """Quality of uint8 samples `[N, 8, 8, 1]` against the real digits (`reference`, default all).

    Returns 'digits_fd' (Frechet distance of classifier features), 'digits_cs' (classifier score:
    the Inception Score recipe with this classifier, one split; 10 is the best possible) and, when
    the samples' class `labels` are given, 'digits_accuracy'.
    """
    reference = real_digits()[0] if reference is None else reference
    f_ref, _ = features_and_logits(params, reference)
    f, logits = features_and_logits(params, samples)
    out = {"digits_fd": metrics.frechet_distance(*metrics.feature_statistics(f),
                                                 *metrics.feature_statistics(f_ref)),
           "digits_cs": metrics.inception_score(logits, splits=1)[0]}
    if labels is not None:
        out["digits_accuracy"] = float(np.mean(logits.argmax(-1) == np.asarray(labels)))
    return out
