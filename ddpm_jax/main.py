"""Trains a DDPM on every local device; resumes from the workdir's latest checkpoint.

    python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits
    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=64

SIGTERM or Ctrl-C saves a checkpoint and exits; the same command resumes. Compiled programs are kept
in JAX's persistent compilation cache (--compilation_cache), so a restart and each in-loop evaluation
after the first load them instead of compiling again.
"""
import logging as py_logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data; keep its log quiet

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and config.json go here "
                                                "(a local folder or gs://...).")
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/ddpm_jax/xla",
                             "JAX's persistent compilation cache folder ('': none). The environment "
                             "variable JAX_COMPILATION_CACHE_DIR, when set, wins.")
flags.mark_flags_as_required(["config", "workdir"])


def _drop_orbax_info(record: py_logging.LogRecord) -> bool:
    """Orbax logs every file of every save at INFO; keep its warnings and errors only."""
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_drop_orbax_info)
    import jax

    if _CACHE.value and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
    from ddpm_jax import training
    from ddpm_jax.validation import UserError

    try:
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except UserError as e:  # raised before anything is compiled or written
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
