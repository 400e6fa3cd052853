"""Evaluation from the command line: FID / IS / KID, reference statistics, bits/dim, digits metrics.

    # one command: converts the weights and computes CIFAR-10 train statistics on first use
    python -m ddpm_jax.evaluate fid --workdir=runs/cifar10 --num_samples=50000 \\
        --inception_weights=pt_inception-2015-12-05-6726825d.pth \\
        --reference_stats=cifar10_train_stats.npz --reference_split=train
    # or step by step
    python -m ddpm_jax.evaluate convert_inception --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz
    python -m ddpm_jax.evaluate reference_stats --config=configs/cifar10.py --split=train \\
        --inception_weights=inception_fid.npz --out=cifar10_train_stats.npz
    python -m ddpm_jax.evaluate fid --workdir=runs/cifar10 --num_samples=50000 \\
        --inception_weights=inception_fid.npz --reference_stats=cifar10_train_stats.npz
    python -m ddpm_jax.evaluate fid --samples=samples.npz --inception_weights=... --reference_stats=...
    python -m ddpm_jax.evaluate bpd --workdir=runs/cifar10 [--split=test] [--num_examples=10000]
    python -m ddpm_jax.evaluate digits --workdir=runs/digits [--samples=samples.npz]

Workdir commands read the run's config.json and its latest checkpoint (EMA params), print the
metrics and write them to WORKDIR/eval/{command}_step_{step}.json. Every flag left unset falls back
to the run's `eval` / `sampling` config. The logic lives in `ddpm_jax.evaluation.tasks`.
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("convert_inception", "reference_stats", "fid", "bpd", "digits")

_CONFIG = config_flags.DEFINE_config_file("config", None, "reference_stats: the config naming the dataset "
                                          "(data.dataset, data_dir, image_size).", lock_config=False)
flags.DEFINE_string("workdir", None, "A training run's --workdir (fid, bpd, digits).")
flags.DEFINE_string("samples", None, "fid/digits: a .npz of samples (uint8 under 'arr_0' or 'images'; "
                    "'labels' optional) instead of sampling the workdir's model.")
flags.DEFINE_string("pth", None, "convert_inception: pytorch-fid's weights file.")
flags.DEFINE_string("out", None, "convert_inception / reference_stats: the .npz to write.")
flags.DEFINE_string("inception_weights", None, "The converted .npz (default eval.inception_weights); a .pth "
                    "is converted once to the .npz beside it.")
flags.DEFINE_string("reference_stats", None, "Reference statistics .npz (default eval.reference_stats).")
flags.DEFINE_string("split", None, "reference_stats / bpd: the tfds split (default data.split / eval.split).")
flags.DEFINE_bool("keep_features", False, "reference_stats: also store the features, which KID needs.")
flags.DEFINE_string("reference_split", None, "fid: if --reference_stats does not exist yet, first compute it "
                    "from this split of the run's dataset (e.g. train) and save it there.")
flags.DEFINE_integer("num_samples", None, "fid/digits: samples to generate (default eval.num_samples).")
flags.DEFINE_integer("num_examples", None, "reference_stats / bpd: examples of the split (default: all).")
flags.DEFINE_integer("steps", None, "Sampler steps (default eval.steps, then sampling.steps).")
flags.DEFINE_integer("batch_size", None, "Images per device call over all devices (default eval.batch_size).")
flags.DEFINE_integer("per_device_batch", 50, "Inception images per device per call.")
flags.DEFINE_integer("seed", 0, "Sampling / bound noise seed.")
FLAGS = flags.FLAGS
_WEIGHTS_FIELD = "--inception_weights / eval.inception_weights"


def _with_eval_defaults(config):
    """A run's config.json with the current `eval` defaults under its values (older runs lack fields)."""
    from ddpm_jax import defaults
    e = defaults.get_config().eval
    e.update(config.get("eval", {}))
    config.eval = e
    return config


def _require(flag: str, value):
    if value is None:
        raise app.UsageError(f"--{flag} is required for this command.")
    return value


def _write(workdir: str | None, name: str, result: dict) -> None:
    printable = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items()}
    print(json.dumps({k: v for k, v in printable.items() if k != "bpd_terms"}, indent=1))
    if workdir:
        path = os.path.join(workdir, "eval", f"{name}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(printable, f, indent=1)
        print(f"wrote {path}")


def _weights(path: str | None) -> str | None:
    """pytorch-fid's .pth is converted once to the .npz of the same name beside it (needs torch)."""
    from ddpm_jax.evaluation import inception
    if path and path.endswith(".pth"):
        npz = os.path.splitext(path)[0] + ".npz"
        if not os.path.isfile(npz):
            inception.convert_pytorch_fid_weights(path, npz)
            print(f"converted {path} to {npz}")
        return npz
    return path


def _reference_stats(config, split: str, weights: str, out: str) -> None:
    from ddpm_jax.evaluation import metrics, tasks
    images, _ = tasks.real_images(config, split, FLAGS.num_examples)
    stats = tasks.reference_statistics(metrics.batched(images, 1000), weights, out, keep_features=FLAGS.keep_features,
                                       per_device_batch=FLAGS.per_device_batch)
    print(f"wrote {out}: statistics of {len(images)} images of {config.data.dataset}/{split} "
          f"({stats['mu'].shape[0]}-d)")


def _run_config_and_params(workdir: str):
    from ddpm_jax import checkpoints
    config = _with_eval_defaults(checkpoints.load_config(workdir))
    params, step = checkpoints.load_params(workdir, config)
    return config, params, step


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m ddpm_jax.evaluate COMMAND [flags]; COMMAND is one of {COMMANDS}.")
    from ddpm_jax.evaluation import inception, metrics, tasks
    command = argv[1]

    if command == "convert_inception":
        inception.convert_pytorch_fid_weights(_require("pth", FLAGS.pth), _require("out", FLAGS.out))
        print(f"wrote {FLAGS.out}")
        return

    if command == "reference_stats":
        config = _require("config", _CONFIG.value)
        weights = _weights(FLAGS.inception_weights or config.eval.inception_weights)
        inception.load_variables(weights, _WEIGHTS_FIELD)  # a missing file fails before the dataset is read
        _reference_stats(config, FLAGS.split or config.data.split, weights, _require("out", FLAGS.out))
        return

    workdir = FLAGS.workdir
    if FLAGS.samples is None or command == "bpd":
        config, params, step = _run_config_and_params(_require("workdir", workdir))
        e = config.eval
        batch_size = FLAGS.batch_size or e.batch_size
        name = f"{command}_step_{step}"
    else:
        config, params, step, e, batch_size, name = None, None, None, None, None, command

    if command == "bpd":
        split = FLAGS.split or tasks.eval_split(config)
        images, _ = tasks.real_images(config, split, FLAGS.num_examples)
        result = tasks.bits_per_dim(config, params, images, batch_size=batch_size, seed=FLAGS.seed)
        result.update(step=step, split=split, num_examples=len(images))
        _write(workdir, name, result)
        return

    if command == "fid":
        weights = _weights(FLAGS.inception_weights or (e.inception_weights if e else None))
        stats = FLAGS.reference_stats or (e.reference_stats if e else None)
        inception.load_variables(weights, _WEIGHTS_FIELD)  # missing files fail before sampling
        if FLAGS.reference_split and stats and not os.path.isfile(stats):
            if config is None:
                raise app.UsageError("--reference_split reads the dataset of a --workdir's run; with --samples "
                                     "make the statistics first with `reference_stats --config=...`.")
            _reference_stats(config, FLAGS.reference_split, weights, stats)
        metrics.load_statistics(stats, "--reference_stats / eval.reference_stats")
    if FLAGS.samples:
        images, labels = tasks.load_samples(FLAGS.samples)
    else:
        images, labels = tasks.generate(config, params, FLAGS.num_samples or e.num_samples, batch_size=batch_size,
                                        seed=FLAGS.seed, steps=FLAGS.steps if FLAGS.steps is not None else e.steps)
    if command == "fid":
        result = tasks.fid_is_kid(images, weights, stats, per_device_batch=FLAGS.per_device_batch)
    else:
        result = tasks.digits(images, labels, e.digits_classifier if e else None)
    result.update(num_samples=len(images), step=step)
    _write(workdir, name, result)


if __name__ == "__main__":
    app.run(main)
