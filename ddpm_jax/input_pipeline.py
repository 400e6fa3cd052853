"""Training input: a tfds dataset as an endless, seed-ordered stream of batches shaped for pmap.

Batches are dicts {'image': float32 `[D, B_dev, H, W, C]` in [-1, 1], 'label': int32 `[D, B_dev]`}
(D = local devices, B_dev = per-device batch; with `training.steps_per_call` k > 1 a `[D, k, B_dev,
...]` stack of k consecutive batches). 'label' is there when the dataset has one.

The order is a fixed function of `config.seed`: epoch e of this process's part of the split is
shuffled with its own seed, and the flip of its i-th example comes from (that seed, i). The stream
from example position p is therefore the tail of the stream from 0, and a resumed run rebuilds it
from epoch p // n, skipping p % n records that are still encoded (cheap).
"""
from __future__ import annotations

import collections
import difflib
from collections.abc import Iterator

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from ml_collections import ConfigDict

from ddpm_jax import datasets as _local_datasets  # noqa: F401  (registers the offline 'digits')
from ddpm_jax import parallel, text
from ddpm_jax.validation import UserError

# TensorFlow only feeds data here; it must not take GPU memory from JAX.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow ran something before this import: too late to hide the GPUs
    logging.warning("TensorFlow was initialised before ddpm_jax.input_pipeline and may hold GPU memory.")

_EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled with s * stride + e
_CAPTION_SEED_OFFSET = 2 ** 40  # a caption draw's seed is the flip's, index shifted by this


def get_builder(data_config) -> tfds.core.DatasetBuilder:
    """The tfds builder of `data.dataset`, or a UserError naming the field and similar names."""
    name = data_config.dataset
    try:
        return tfds.builder(name, data_dir=data_config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UserError(
            f"data.dataset={name!r}: no tensorflow-datasets dataset has that name.{hint} 'digits' "
            f"ships with this package (offline); others such as 'cifar10', 'celeb_a' or "
            f"'lsun/church_outdoor' are downloaded once into data.data_dir.") from None


def prepared_builder(d) -> tfds.core.DatasetBuilder:
    """`get_builder`, with the dataset prepared in `data.data_dir` ('digits' is built locally, others
    downloaded once), or a UserError naming the fields when it cannot be. `d`: `config.data`."""
    builder = get_builder(d)
    try:
        builder.download_and_prepare()
    except Exception as e:  # no network, no space, an unwritable folder: say which field to change
        raise UserError(
            f"data.dataset={d.dataset!r} is not prepared in data.data_dir={d.data_dir!r} and could not be "
            f"prepared there ({type(e).__name__}: {str(e)[:300]}). On a machine with network run `tfds build "
            f"{d.dataset} --data_dir=DIR`, copy DIR here and pass --config.data.data_dir=DIR.") from e
    return builder


def check_dataset(config: ConfigDict) -> None:
    """Checks that `data.dataset` exists and has the image channels and labels the config expects,
    then prepares it (`prepared_builder`)."""
    d, m = config.data, config.model
    features = get_builder(d).info.features
    if "image" not in features:
        raise UserError(f"data.dataset={d.dataset!r} has no 'image' feature (it has {list(features)}).")
    channels = features["image"].shape[-1]
    if channels is not None and channels != d.channels:
        raise UserError(f"data.channels={d.channels}: the {d.dataset!r} images have {channels} channels.")
    if m.num_classes:
        label = features["label"] if "label" in features else None  # noqa: SIM401  (FeaturesDict has no .get)
        if not isinstance(label, tfds.features.ClassLabel):
            raise UserError(f"model.num_classes={m.num_classes}: the {d.dataset!r} dataset has no class "
                             f"labels; use model.num_classes=0.")
        if label.num_classes != m.num_classes:
            raise UserError(f"model.num_classes={m.num_classes}: the {d.dataset!r} dataset has "
                             f"{label.num_classes} classes.")
    splits = prepared_builder(d).info.splits
    try:
        if splits:  # (tfds.testing.mock_data leaves them empty)
            splits[d.split]  # also parses slices such as 'train[:90%]'
    except (KeyError, ValueError, AssertionError):
        raise UserError(f"data.split={d.split!r}: {d.dataset!r} has splits {sorted(splits)} (slices such as "
                        "'train[:90%]' work too).") from None


def to_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Centre crop to a square, then resize to `size` x `size` (for celeb_a / lsun style images)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    s = tf.minimum(h, w)
    image = tf.image.crop_to_bounding_box(image, (h - s) // 2, (w - s) // 2, s, s)
    image = tf.image.resize(image, [size, size], method="bicubic", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def text_feature(example: dict, path: str) -> tf.Tensor:
    """The feature at `path` ('caption', or nested as 'captions/text') of a tfds example."""
    for part in path.split("/"):
        example = example[part]
    return example


def pick_caption(texts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One caption: `texts` itself if scalar, else element k of the `[n]` captions, k uniform from
    the stateless `seed` (an example's (epoch seed, index)), so resuming draws the same one."""
    if texts.shape.rank == 0:
        return texts
    pick_seed = tf.stack([seed[0], seed[1] + _CAPTION_SEED_OFFSET])  # not the flip's draw
    k = tf.random.stateless_uniform([], pick_seed, maxval=tf.shape(texts, tf.int64)[0], dtype=tf.int64)
    return texts[k]


def tokenize(caption: tf.Tensor, max_len: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`ddpm_jax.text.tokenize` of one string in TensorFlow: (int32 `[max_len]`, bool `[max_len]`).

    BOS, the UTF-8 bytes + 1, zero padding; more than max_len - 1 bytes are cut before the first
    byte that does not start a character, so the cut decodes.
    """
    data = tf.cast(tf.io.decode_raw(caption, tf.uint8), tf.int32)
    n = tf.shape(data)[0]
    # cut = the largest c <= min(n, max_len - 1) with c == n or data[c] not a continuation byte.
    limit = tf.minimum(n, max_len - 1)
    c = tf.range(limit + 1)
    starts = tf.concat([tf.bitwise.bitwise_and(data, 0xC0) != 0x80, [True]], axis=0)
    cut = tf.reduce_max(tf.where(tf.gather(starts, c), c, 0))
    tokens = tf.concat([[text.BOS], data[:cut] + 1, tf.zeros([max_len - 1 - cut], tf.int32)], axis=0)
    tokens = tf.ensure_shape(tokens, [max_len])
    return tokens, tokens != text.PAD


def create_dataset(config: ConfigDict, *, start_example: int = 0, num_local_devices: int | None = None,
                   process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """The batch stream of this process, starting `start_example` examples into it (see module doc)."""
    d, t = config.data, config.training
    num_local_devices = num_local_devices or jax.local_device_count()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = process_count or jax.process_count()

    builder = prepared_builder(d)  # a quick check once `check_dataset` has prepared it
    # Each process reads its own part of the split.
    split = d.split if process_count == 1 else tfds.even_splits(d.split, process_count)[process_index]
    records = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    image_feature = builder.info.features["image"]
    keys = ["image"] + (["label"] if "label" in builder.info.features else [])
    if config.model.text_encoder == "precomputed":
        keys += ["text_emb", "text_mask"]
    trained_text = config.model.text_encoder == "trained"
    records = records.map(lambda ex: {**{k: ex[k] for k in keys},
                                      **({"text": text_feature(ex, d.text_feature)} if trained_text else {})})
    n = int(records.cardinality())
    first_epoch, skip = divmod(start_example, n)

    def epoch(e):
        seed = config.seed * _EPOCH_SEED_STRIDE + e
        shuffled = records.shuffle(min(d.shuffle_buffer, n), seed=seed, reshuffle_each_iteration=False)
        flip_seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([seed, i]))
        return tf.data.Dataset.zip(shuffled, flip_seeds)

    resize = tuple(image_feature.shape[:2]) != (d.image_size, d.image_size)

    def preprocess(ex, flip_seed):
        image = image_feature.decode_example(ex["image"])
        image = to_square(image, d.image_size) if resize else tf.cast(image, tf.float32)
        if d.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        out = {"image": image / 127.5 - 1.0}
        if "label" in ex:
            out["label"] = tf.cast(ex["label"], tf.int32)
        if "text" in ex:
            out["tokens"], out["mask"] = tokenize(pick_caption(ex["text"], flip_seed), d.max_text_len)
        if "text_emb" in ex:
            out["text_emb"], out["mask"] = tf.cast(ex["text_emb"], tf.float32), tf.cast(ex["text_mask"], tf.bool)
        return out

    k, per_process = t.steps_per_call, t.batch_size // process_count
    per_device = per_process // num_local_devices

    def shape_for_pmap(batch):
        def reshape(x):
            x = tf.reshape(x, [k, num_local_devices, per_device] + x.shape[1:].as_list())
            # [k, D, ...] -> [D, k, ...]: pmap maps axis 0, the scanned step inside takes axis 0 next.
            return x[0] if k == 1 else tf.transpose(x, [1, 0] + list(range(2, x.shape.rank)))
        return {key: reshape(x) for key, x in batch.items()}

    ds = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(skip)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process * k, drop_remainder=True).map(shape_for_pmap)
    return ds.prefetch(tf.data.AUTOTUNE)


def prefetch_to_device(iterator, size: int = 2, devices=None) -> Iterator:
    """Keeps `size` batches already placed on the devices (as pmap takes them) ahead of the consumer."""
    sharding = parallel.device_sharding(devices)
    queue = collections.deque()
    for batch in iterator:
        queue.append(jax.device_put(batch, sharding))
        if len(queue) == size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def create_train_iterator(config: ConfigDict, start_example: int = 0) -> Iterator[dict]:
    """Device-resident batches from `create_dataset`, for pmap over all local devices."""
    return prefetch_to_device(tfds.as_numpy(create_dataset(config, start_example=start_example)))
