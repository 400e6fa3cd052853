"""Small configs and readers shared by the training tests."""
import glob
import os

import numpy as np
import tensorflow as tf

from configs import digits, tiny


def small_digits_config(data_dir: str):
    """The digits config shrunk to seconds: a 1-level U-Net at 8x8, T=100, batch 16 over 8 devices."""
    c = digits.get_config()
    c.data.data_dir = data_dir
    c.model.ch = 16
    c.model.ch_mult = (1,)  # one level (plus the middle attention): compiles in seconds
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.diffusion.num_timesteps = 100
    c.sampling.steps = 100
    c.optim.warmup_steps = 2
    c.training.batch_size = 16
    c.training.num_train_steps = 8
    c.training.steps_per_call = 1
    c.training.log_every = 2
    c.training.checkpoint_every = 4
    c.training.sample_every = 0
    c.training.num_sample_images = 16
    c.training.profile_steps = 0
    return c


def small_cifar10_config():
    """configs/tiny.py (CIFAR-10 shapes), smaller still, for 4 steps with checkpoints, logs and samples."""
    c = tiny.get_config()
    c.model.ch = 16
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.diffusion.num_timesteps = 20
    c.sampling.steps = 20
    c.training.num_train_steps = 4
    c.training.log_every = 2
    c.training.checkpoint_every = 2
    c.training.sample_every = 4
    return c


def read_events(workdir: str) -> dict:
    """{tag: [(step, value)]} from the TensorBoard event files in `workdir` (images as shapes)."""
    out = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = tf.make_ndarray(v.tensor)
                out.setdefault(v.tag, []).append((event.step, value if value.ndim else float(value)))
    return out


def prepare_digits(data_dir: str) -> str:
    """Builds the offline digits dataset into `data_dir` (about a second) and returns `data_dir`."""
    import tensorflow_datasets as tfds

    from ddpm_jax import datasets  # noqa: F401  (registers 'digits')

    tfds.builder("digits", data_dir=data_dir).download_and_prepare()
    return data_dir


def first_examples(config, num, **kwargs):
    """The first `num` examples of `input_pipeline.create_dataset(config, **kwargs)` as (images
    `[num, H, W, C]`, labels `[num]`)."""
    import tensorflow_datasets as tfds

    from ddpm_jax import input_pipeline

    images, labels = [], []
    for batch in tfds.as_numpy(input_pipeline.create_dataset(config, **kwargs)):
        images.append(batch["image"].reshape((-1,) + batch["image"].shape[-3:]))
        labels.append(batch["label"].reshape(-1))
        if sum(map(len, labels)) >= num:
            return np.concatenate(images)[:num], np.concatenate(labels)[:num]
    raise AssertionError(f"the stream ended before {num} examples")
