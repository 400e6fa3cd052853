"""Training input: a tfds dataset as an endless, seed-ordered stream of batches shaped for pmap.

Batches are dicts {'image': float32 `[D, B_dev, H, W, C]` in [-1, 1], 'label': int32 `[D, B_dev]`}
(D = local devices, B_dev = per-device batch; with `training.steps_per_call` k > 1 a `[D, k, B_dev,
...]` stack of k consecutive batches). 'label' is there when the dataset has one.

The order is a fixed function of `config.seed`: epoch e of the split is shuffled with its own seed,
and the flip (and with `data.random_crop` the crop) of its i-th example comes from (that seed, i).
The stream from example position p is therefore the tail of the stream from 0, and a resumed run
rebuilds it from epoch p // n, skipping p % n records that are still encoded (cheap).

With several processes every process walks that same global stream and keeps the contiguous share
of each global batch of `training.batch_size` that its devices take (process i: examples
[i * B / P, (i + 1) * B / P) of it), dropping the others before they are decoded. The examples at
each step, and the global index each gets in the train step, are then the same for any number of
processes, and positions (what a checkpoint records) count examples of the global stream.
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

from ddpm_jax import datasets as _local_datasets  # noqa: F401  (registers the offline datasets)
from ddpm_jax import parallel, text
from ddpm_jax.datasets import folder as folder_dataset
from ddpm_jax.validation import UserError

# TensorFlow only feeds data here; it must not take GPU memory from JAX.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow ran something before this import: too late to hide the GPUs
    logging.warning("TensorFlow was initialised before ddpm_jax.input_pipeline and may hold GPU memory.")

_EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled with s * stride + e
_CAPTION_SEED_OFFSET = 2 ** 40  # a caption draw's seed is the flip's, index shifted by this
_CROP_SEED_OFFSET = 2 ** 41  # and a crop's by this


def text_input(data_config, model_config) -> str:
    """What the data gives a model: 'captions' (a trained encoder's, or a frozen T5's with
    `data.embed_captions`), 'embeddings' (stored ones, 'precomputed') or 'none'."""
    encoder = model_config.text_encoder if model_config is not None else "none"
    if encoder == "trained" or (encoder == "precomputed" and data_config.embed_captions):
        return "captions"
    return "embeddings" if encoder == "precomputed" else "none"


def get_builder(data_config, model_config=None) -> tfds.core.DatasetBuilder:
    """The tfds builder of `data.dataset`, or a UserError naming the field and similar names.

    'folder' reads the images in `data.data_dir` (`datasets.folder`), prepared at `data.image_size`
    (`data.random_crop` if set) and `data.channels` into `data.cache_dir` (None: a hidden folder
    inside `data.data_dir`), with the text the model reads (`text_input`) beside each image:
    NAME.txt captions, or NAME.npz embeddings of `model.text_emb_dim`, each as long as its caption and
    padded to `data.max_text_len` tokens in the pipeline. Without `model_config`, images (and labels) only.
    """
    name = data_config.dataset
    if name == "folder":
        if not data_config.data_dir:
            raise UserError("data.dataset='folder' needs data.data_dir=PATH, the folder of images to train on.")
        text = text_input(data_config, model_config)
        embedding_shape = (data_config.max_text_len, model_config.text_emb_dim) if text == "embeddings" else None
        size = data_config.random_crop or data_config.image_size  # the crops' source size, if cropping
        return folder_dataset.Folder(folder=data_config.data_dir, image_size=size,
                                     channels=data_config.channels, cache_dir=data_config.cache_dir,
                                     captions=text == "captions", embedding_shape=embedding_shape,
                                     size_field="data.random_crop" if data_config.random_crop else "data.image_size")
    try:
        return tfds.builder(name, data_dir=data_config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UserError(
            f"data.dataset={name!r}: no tensorflow-datasets dataset has that name.{hint} 'digits' and "
            f"'faces' ship with this package (offline), 'folder' reads your own images in data.data_dir; "
            f"others such as 'cifar10', 'celeb_a' or 'lsun/church_outdoor' are downloaded once into "
            f"data.data_dir.") from None


def prepared_builder(d, m=None) -> tfds.core.DatasetBuilder:
    """`get_builder`, with the dataset prepared in `data.data_dir` ('digits', 'faces' and 'folder' are
    built locally, others downloaded once), or a UserError naming the fields when it cannot be.
    `d`: `config.data`; `m`: `config.model` (for 'folder': which text is read beside the images)."""
    return _prepare(get_builder(d, m), d, m)


def _prepare(builder, d, m) -> tfds.core.DatasetBuilder:
    try:
        builder.download_and_prepare()
    except UserError:
        raise
    except Exception as e:  # no network, no space, an unwritable folder: say which field to change
        if isinstance(e, FileExistsError) and (fresh := get_builder(d, m)).is_prepared():
            # A run started beside this one prepared the same dataset and moved its copy into place first.
            logging.info("data.dataset=%r: prepared by another process meanwhile; reading that copy.", d.dataset)
            return fresh
        if d.dataset == "folder":
            raise UserError(
                f"data.data_dir={d.data_dir!r}: could not write its prepared copy to {builder.data_dir} "
                f"({type(e).__name__}: {str(e)[:300]}); set data.cache_dir to a writable folder.") from e
        raise UserError(
            f"data.dataset={d.dataset!r} is not prepared in data.data_dir={d.data_dir!r} and could not be "
            f"prepared there ({type(e).__name__}: {str(e)[:300]}). On a machine with network run `tfds build "
            f"{d.dataset} --data_dir=DIR`, copy DIR here and pass --config.data.data_dir=DIR.") from e
    return builder


def check_dataset(config: ConfigDict) -> None:
    """Checks that `data.dataset` exists and has the image channels and labels the config expects,
    then prepares it (`prepared_builder`). For 'folder': the class sub-folders, the image sizes and
    the captions or embeddings beside the images too."""
    d, m = config.data, config.model
    builder = get_builder(d, m)
    if d.dataset == "folder":
        _check_folder(builder, config)
        return
    features = builder.info.features
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
    text = text_input(d, m)
    if text == "captions" and d.text_feature.split("/")[0] not in features:
        raise UserError(f"data.text_feature={d.text_feature!r}: the {d.dataset!r} dataset has no such feature "
                        f"(it has {sorted(features)}).")
    if text == "embeddings" and not {"text_emb", "text_mask"} <= set(features):
        raise UserError(f"model.text_encoder='precomputed': the {d.dataset!r} dataset has no 'text_emb' and "
                        f"'text_mask' features (it has {sorted(features)}); with captions and a frozen T5 in "
                        f"model.text_encoder_path, set data.embed_captions=True.")
    _check_split(_prepare(builder, d, m), d)


def _check_split(builder, d) -> None:
    """A UserError unless `data.split` names a split (or a slice of one) of the prepared dataset."""
    splits = builder.info.splits
    try:
        if splits:  # (tfds.testing.mock_data leaves them empty)
            splits[d.split]  # also parses slices such as 'train[:90%]'
    except (KeyError, ValueError, AssertionError):
        raise UserError(f"data.split={d.split!r}: {d.dataset!r} has splits {sorted(splits)} (slices such as "
                        "'train[:90%]' work too).") from None


def _check_folder(builder, config) -> None:
    """The folder's classes, image sizes and text files, then its prepared copy (process 0's first on a
    pod slice)."""
    d = config.data
    folder_dataset.check_classes(builder.listing, config.model.num_classes)
    if text_input(d, config.model) == "captions" and d.text_feature != "caption":
        raise UserError(f"data.text_feature={d.text_feature!r}: data.dataset='folder' has its captions (NAME.txt "
                        f"beside each image) in 'caption'.")
    if not builder.is_prepared():
        builder.check_images()  # on every process: a UserError must stop all of them, not only process 0
        if jax.process_count() > 1:
            # Hosts may share the folder (NFS, gcsfuse): only process 0 writes the copy there; the
            # others then find it, or write their own when their disk is their own.
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                _prepare(builder, d, config.model)
            multihost_utils.sync_global_devices("ddpm_jax: folder dataset prepared")
            builder = get_builder(d, config.model)  # one made before the copy existed does not read its info
    builder = _prepare(builder, d, config.model)
    _check_split(builder, d)
    skipped = builder.info.metadata.get("skipped") or {}
    logging.info("data.data_dir=%s: %d images, prepared in %s%s", d.data_dir,
                 builder.info.splits["train"].num_examples, builder.data_dir,
                 f"; {len(skipped)} unreadable files skipped: {', '.join(skipped)}" if skipped else "")


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
    """The batch stream of this process, from example `start_example` of the global stream on (see
    module doc)."""
    d, t = config.data, config.training
    num_local_devices = num_local_devices or jax.local_device_count()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = process_count or jax.process_count()

    builder = prepared_builder(d, config.model)  # a quick check once `check_dataset` has prepared it
    records = builder.as_dataset(split=d.split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    image_feature = builder.info.features["image"]
    keys = ["image"] + (["label"] if "label" in builder.info.features else [])
    text = text_input(d, config.model)
    if text == "embeddings":
        keys += ["text_emb", "text_mask"]
    records = records.map(lambda ex: {**{k: ex[k] for k in keys},
                                      **({"text": text_feature(ex, d.text_feature)} if text == "captions" else {})})
    n = int(records.cardinality())
    first_epoch, skip = divmod(start_example, n)

    def epoch(e):
        seed = config.seed * _EPOCH_SEED_STRIDE + e
        shuffled = records.shuffle(min(d.shuffle_buffer, n), seed=seed, reshuffle_each_iteration=False)
        flip_seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([seed, i]))
        return tf.data.Dataset.zip(shuffled, flip_seeds)

    # With data.random_crop, a random image_size crop of the image made random_crop square.
    square = d.random_crop or d.image_size
    resize = tuple(image_feature.shape[:2]) != (square, square)

    def preprocess(ex, flip_seed):
        image = image_feature.decode_example(ex["image"])
        image = to_square(image, square) if resize else tf.cast(image, tf.float32)
        if d.random_crop:
            crop_seed = tf.stack([flip_seed[0], flip_seed[1] + _CROP_SEED_OFFSET])
            image = tf.image.stateless_random_crop(image, [d.image_size, d.image_size, d.channels], crop_seed)
        if d.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        out = {"image": image / 127.5 - 1.0}
        if "label" in ex:
            out["label"] = tf.cast(ex["label"], tf.int32)
        if "text" in ex and d.embed_captions:  # for the frozen T5's tokenizer, a batch at a time (`t5_tokens`)
            out["text"] = pick_caption(ex["text"], flip_seed)
        elif "text" in ex:
            out["tokens"], out["mask"] = tokenize(pick_caption(ex["text"], flip_seed), d.max_text_len)
        if "text_emb" in ex:
            out["text_emb"], out["mask"] = tf.cast(ex["text_emb"], tf.float32), tf.cast(ex["text_mask"], tf.bool)
            if ex["text_emb"].shape[0] is None:  # a folder's, as long as its caption: zero-padded to L
                pad = d.max_text_len - tf.shape(out["mask"])[0]
                out["text_emb"] = tf.ensure_shape(tf.pad(out["text_emb"], [[0, pad], [0, 0]]),
                                                  [d.max_text_len, config.model.text_emb_dim])
                out["mask"] = tf.ensure_shape(tf.pad(out["mask"], [[0, pad]]), [d.max_text_len])
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
    if process_count > 1:  # this process's share of each global batch
        def mine(i, example):
            return i % t.batch_size // per_process == process_index

        ds = ds.enumerate().filter(mine).map(lambda i, example: example)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process * k, drop_remainder=True)
    if d.embed_captions:
        ds = ds.map(t5_tokens(config, per_process * k))
    return ds.map(shape_for_pmap).prefetch(tf.data.AUTOTUNE)


def t5_tokens(config: ConfigDict, n: int):
    """A map of batches of n captions 'text' to the frozen T5's 'tokens' int32 and 'mask' bool `[n,
    data.max_text_len]` (`t5.FrozenT5.tokenize`: longer captions are cut to EOS), in one Python call per batch."""
    from ddpm_jax import t5

    encoder, L = t5.from_config(config.model), config.data.max_text_len

    def tokenize_batch(texts):
        return encoder.tokenize([t.decode("utf-8") for t in texts], L)

    def fn(batch):
        batch = dict(batch)
        texts = batch.pop("text")
        tokens, mask = tf.numpy_function(tokenize_batch, [texts], [tf.int32, tf.bool], stateful=False)
        return {**batch, "tokens": tf.ensure_shape(tokens, [n, L]), "mask": tf.ensure_shape(mask, [n, L])}

    return fn


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
    """Device-resident batches from `create_dataset`, for pmap over all local devices; with
    `data.embed_captions`, their T5 'tokens' replaced by the frozen encoder's 'text_emb' (`embed_on_devices`)."""
    batches = prefetch_to_device(tfds.as_numpy(create_dataset(config, start_example=start_example)))
    return map(embed_on_devices(config), batches) if config.data.embed_captions else batches


def embed_on_devices(config: ConfigDict):
    """A function of a device batch {'tokens', 'mask', ...} `[D, ...]` to {'text_emb' float32 `[D, ..., L,
    d_model]`, 'mask', ...}: the frozen T5 of `model.text_encoder_path` (`t5.load`: a copy on every
    group of `model.text_encoder_shards` local devices), each group embedding its own rows
    (`t5.embed_tokens`; gradients never reach it: it is not in the train state). With one device per
    group the rows stay where they are."""
    from ddpm_jax import t5

    encoder, pmap_layout = t5.from_config(config.model), parallel.device_sharding()

    def fn(batch):
        batch = dict(batch)
        tokens, mask = (jax.device_put(x, encoder.rows) for x in (batch.pop("tokens"), batch["mask"]))
        return {**batch, "text_emb": jax.device_put(encoder.apply(encoder.params, tokens, mask), pmap_layout)}

    return fn
