"""Converts U-Net weights between a run and a diffusers folder: Ho et al.'s released DDPMs in, your runs out.

    # google/ddpm-cifar10-32, downloaded by you, as a run at step 0 (sample, evaluate or fine-tune it)
    python -m ddpm_jax.convert from_diffusers --diffusers=ddpm-cifar10-32 --config=configs/cifar10.py \\
        --workdir=runs/ddpm_cifar10_released
    # a run's newest checkpoint (EMA params) as a diffusers DDPMPipeline folder
    python -m ddpm_jax.convert to_diffusers --workdir=runs/digits --out=exported/digits

`from_diffusers` checks the folder's config.json and scheduler_config.json against the config (the
U-Net's widths, blocks and attention; the noise schedule and what the network predicts) before it
writes anything. The logic is in `ddpm_jax.diffusers_weights`; docs/diffusers.md has the recipes.
"""
import jax
from absl import flags, logging
from ml_collections import config_flags

from ddpm_jax import cli, diffusers_weights
from ddpm_jax.validation import UserError

COMMANDS = ("from_diffusers", "to_diffusers")


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "from_diffusers: the config whose U-Net the weights are, e.g. "
                                    "configs/cifar10.py (--config.a.b=v overrides).", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("diffusers", None, "from_diffusers: a diffusers UNet2DModel folder (config.json, "
                        "diffusion_pytorch_model.safetensors[, scheduler_config.json]) or a pipeline folder with "
                        "unet/ and scheduler/.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "from_diffusers: the new run's folder; to_diffusers: the run to export.",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "to_diffusers: the pipeline folder to write (model_index.json, unet/, "
                        "scheduler/).", flag_values=fv)
    flags.DEFINE_integer("checkpoint_step", None, "to_diffusers: the run's checkpoint of this step (0 or unset: "
                         "the newest).", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("ema", True, "to_diffusers: the EMA params (--noema: the raw params).", flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    if len(args) != 1 or args[0] not in COMMANDS:
        raise UserError(f"usage: python -m ddpm_jax.convert COMMAND [--flags]; COMMAND is one of {COMMANDS}.")
    if jax.process_count() > 1:
        raise UserError("convert runs as one process: on a pod slice or cluster, run it on one host with "
                        "--num_processes=1 (the run it writes is then read by every host).")
    needs = ("diffusers", "config", "workdir") if args[0] == "from_diffusers" else ("workdir", "out")
    for name in needs:
        if fv[name].value is None:
            raise UserError(f"--{name} is required for {args[0]}.")
    if args[0] == "from_diffusers":
        count = diffusers_weights.import_run(fv.diffusers, fv.config, fv.workdir)
        logging.info("Wrote %s: step 0, params and EMA from %s (%d parameters).", fv.workdir, fv.diffusers, count)
    else:
        step = diffusers_weights.export_run(fv.workdir, fv.out, fv.checkpoint_step or None, fv.ema)
        logging.info("Wrote %s: the %s params of step %d of %s.", fv.out, "EMA" if fv.ema else "raw", step,
                     fv.workdir)


if __name__ == "__main__":
    cli.run(define_flags, main)
