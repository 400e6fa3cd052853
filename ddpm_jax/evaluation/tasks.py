"""The evaluations that `python -m ddpm_jax.evaluate` and the in-loop hook run, as functions.

Images travel as uint8 `[N, H, W, C]` numpy arrays. TensorFlow is imported only to read a tfds split.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from ddpm_jax import diffusion, image_utils
from ddpm_jax.evaluation import digits_classifier, inception, likelihood, metrics


# ----------------------------------------------------------------------------------------------
# Images in.


def eval_split(config) -> str:
    """`eval.split`, or when unset the dataset's 'test' split if it has one, else `data.split`."""
    if config.eval.split:
        return config.eval.split
    from ddpm_jax import input_pipeline
    splits = input_pipeline.get_builder(config.data).info.splits
    return "test" if "test" in splits else config.data.split


def real_images(config, split: str, max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images `[N, S, S, C]` (S = data.image_size, centre-cropped and resized as for training
    when the dataset's images differ) and labels `[N]` (None if the dataset has none), in split order."""
    from ddpm_jax import input_pipeline  # TensorFlow is only needed here
    import tensorflow as tf
    import tensorflow_datasets as tfds

    d = config.data
    builder = input_pipeline.prepared_builder(d)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r}: {d.dataset!r} has splits {sorted(builder.info.splits)} "
                         "(set eval.split or --split).")
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
    if max_examples:
        ds = ds.take(max_examples)
    resize = tuple(builder.info.features["image"].shape[:2]) != (d.image_size, d.image_size)
    has_label = "label" in builder.info.features

    def prepare(ex):
        image = ex["image"]
        if resize:  # the training pipeline's crop and resize, back to uint8
            image = tf.cast(tf.round(input_pipeline.to_square(image, d.image_size)), tf.uint8)
        return (image, ex["label"]) if has_label else (image,)

    images, labels = [], []
    for batch in tfds.as_numpy(ds.map(prepare).batch(1000)):
        images.append(batch[0])
        if has_label:
            labels.append(batch[1])
    if not images:
        raise ValueError(f"split {split!r} of {d.dataset!r} is empty.")
    return np.concatenate(images), (np.concatenate(labels).astype(np.int32) if has_label else None)


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples from a `.npz`: uint8 images under 'arr_0' (as `python -m ddpm_jax.sample` writes) or
    'images', or float images in [-1, 1]; optional 'labels'. Returns (uint8 `[N, H, W, C]`, labels)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--samples={path}: no such file.")
    with np.load(path) as f:
        key = next((k for k in ("arr_0", "images") if k in f.files), None)
        if key is None:
            raise ValueError(f"--samples={path}: expected images under 'arr_0' or 'images', found {f.files}.")
        images, labels = f[key], (f["labels"] if "labels" in f.files else None)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"--samples={path}: images must be [N, H, W, 1 or 3], got {images.shape}.")
    if images.dtype != np.uint8:
        images = image_utils.to_uint8(images)
    return images, labels


def generate(config, params, num_samples: int, *, batch_size: int, seed: int = 0,
             steps: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`num_samples` uint8 samples with the config's sampler on all local devices, and their labels
    (classes in equal blocks for class-conditional models, else None)."""
    from ddpm_jax import sample

    req = sample.make_request(config, num_samples=num_samples, batch_size=batch_size, seed=seed,
                              steps=steps or None)
    images = image_utils.to_uint8(sample.run(config, params, req)["images"])
    return images, (req.labels if config.model.num_classes else None)


# ----------------------------------------------------------------------------------------------
# Metrics.


def reference_statistics(images_batches, inception_weights: str, out: str, *, keep_features: bool = False,
                         per_device_batch: int = 50) -> dict:
    """Inception pool statistics of real images, written to `out` in pytorch-fid's layout."""
    variables = inception.load_variables(inception_weights)
    features = metrics.inception_features(variables, images_batches, per_device_batch)
    return metrics.save_statistics(out, features["pool"], keep_features=keep_features)


def fid_is_kid(images: np.ndarray, inception_weights: str, reference_stats: str, *,
               per_device_batch: int = 50, variables=None, reference=None) -> dict:
    """FID and IS (and KID when the reference file keeps features) of uint8 `images`. `variables`
    and `reference` skip loading the files again (the in-loop evaluator keeps them)."""
    reference = reference or metrics.load_statistics(reference_stats)
    variables = variables or inception.load_variables(inception_weights)
    features = metrics.inception_features(variables, metrics.batched(images, 1000), per_device_batch)
    return metrics.sample_quality(features, reference)


def bits_per_dim(config, params, images: np.ndarray, *, batch_size: int, seed: int = 0) -> dict:
    """The variational bound on uint8 `images` on all local devices (`likelihood.bpd`), averaged.

    Returns bits/dim: 'bpd' (total), 'bpd_prior' (L_T), 'bpd_decoder' (L_0), 'bpd_kl' (sum of the KL
    terms L_1..L_{T-1}) and 'bpd_terms' `[T]` (mean of each term; [0] is L_0). Class-conditional
    models are evaluated with the null label: the unconditional likelihood.
    """
    from ddpm_jax import sampling
    from ddpm_jax.models import unet_from_config

    c = config.diffusion
    s = diffusion.schedule_from_config(c)
    model = unet_from_config(config)
    null = np.full(len(images), config.model.num_classes, np.int32)

    def fn(p, key, batch):
        model_fn = sampling.unet_model_fn(model, p, batch["labels"] if model.num_classes else None)
        return likelihood.bpd(s, c.model_output, model_fn, batch["x0"], key, variance=c.variance,
                              clip_x0=c.clip_x0)

    out = sampling.pmap_batches(fn, params, jax.random.key(seed),
                                {"x0": image_utils.from_uint8(images), "labels": null}, batch_size)
    terms = out["terms"].mean(0)
    return {"bpd": float(out["total"].mean()), "bpd_prior": float(out["prior"].mean()),
            "bpd_decoder": float(terms[0]), "bpd_kl": float(terms[1:].sum()), "bpd_terms": terms}


def digits(images: np.ndarray, labels: np.ndarray | None, classifier_path: str | None = None,
           reference: np.ndarray | None = None) -> dict:
    """The offline digits metrics (`digits_classifier.digits_metrics`) of uint8 8x8 samples."""
    params = digits_classifier.load_or_fit(classifier_path)
    return digits_classifier.digits_metrics(params, images, labels, reference)
