"""Trains a DDPM on every local device; resumes from the workdir's latest checkpoint.

    python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits
    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=64

SIGTERM or Ctrl-C saves a checkpoint and exits; the same command resumes. Compiled programs are kept
in JAX's persistent compilation cache (--compilation_cache), so a restart and each in-loop evaluation
after the first load them instead of compiling again. The logic is in `ddpm_jax.training`.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data; keep its log quiet

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import cli  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py.", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and config.json go here (a local folder "
                                         "or gs://...).", flag_values=fv)
    flags.DEFINE_string("compilation_cache", "~/.cache/ddpm_jax/xla", "JAX's persistent compilation cache "
                        "folder ('': none). The environment variable JAX_COMPILATION_CACHE_DIR, when set, wins.",
                        flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.no_arguments(args)
    import jax

    if fv.compilation_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(fv.compilation_cache))
    from ddpm_jax import training

    try:
        training.train_and_evaluate(fv.config, fv.workdir)
    except training.Diverged as e:
        cli.fail(f"training diverged: {e}", status=1)


if __name__ == "__main__":
    cli.run(define_flags, main)
