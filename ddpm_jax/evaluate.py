"""Evaluation from the command line: FID / IS / KID / precision and recall, reference statistics, bits/dim,
digits and shapes rates.

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
    python -m ddpm_jax.evaluate bpd --workdir=runs/cifar10 [--split=test] [--num_examples=10000] [--bpd_method=ode]
    python -m ddpm_jax.evaluate digits --workdir=runs/digits [--samples=samples.npz]
    python -m ddpm_jax.evaluate accuracy --workdir=runs/digits_cond --settings=ddim:50,ddim:10,ddim:50:0
    python -m ddpm_jax.evaluate shapes --workdir=runs/shapes_t2i [--num_samples=500] [--guidance=0]
    python -m ddpm_jax.evaluate sr --workdir=runs/shapes_sr [--aug_level=0.1]
    python -m ddpm_jax.evaluate clip --workdir=runs/shapes_t2i --clip_model=clip-vit-base-patch32
    python -m ddpm_jax.evaluate clip --samples=samples.npz --prompts=prompts.txt --clip_model=clip-vit-base-patch32
    python -m ddpm_jax.evaluate cascade --stages=runs/shapes_t2i,runs/shapes_sr [--num_samples=500] \\
        [--guidance_t_min=150]

Workdir commands read the run's config.json and its latest checkpoint (--checkpoint_step=N: that of step N; EMA
params), print the metrics and write them to WORKDIR/eval/{command}_step_{step}_...json, named by the settings
(fid, digits, shapes: ..._{sampler}{steps}[_eta{eta}]_w{guidance}[_t{min}-{max} if guided][_guide-{guide run's
folder}[_step{guide_checkpoint_step}]]
[_seed{seed}]_n{num_samples}.json, `tasks.sampling_name`; sr: ..._aug{aug_level}_s{sr_strength}_{the same}.json;
shapes, sr and a text-to-image run's fid given --split: ..._step_{step}_{split}_... (fid given --prompts=F:
..._step_{step}_F_...); clip: ..._step_{step}_{the CLIP's folder}_{the same};
bpd: ...[_ode_tol{tolerance}[_smin{sigma_min}]]_{split}_n{examples}[_seed{seed}].json; with --samples=F.npz:
{command}_F.json).
--num_samples, --steps and the other evaluation flags set the fields of the config's `eval` section
(`cli.EVAL_FLAGS`; --guidance, --guide_workdir, --sampler and --eta set sampling's; --text_encoder, a moved frozen
T5's folder, model.text_encoder_path); unset, the run's values hold. For cascade, the sampling flags (and
--steps) set that field of every stage, and --checkpoint_step chooses each stage's checkpoint (one step, or one
per stage; 0: the newest); the result file, BASE_RUN/eval/cascade_step_{step}_{run}-{step}..., is named by the
later stages' runs and the flags given (but --text_encoder). The logic is in `ddpm_jax.evaluation.tasks`.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from ddpm_jax import checkpoints, cli, defaults
from ddpm_jax.evaluation import conditional_accuracy, inception, tasks
from ddpm_jax.validation import UserError


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "reference_stats: the config naming the dataset "
                                    "(data.dataset, data_dir, image_size).", flag_values=fv, lock_config=False)
    flags.DEFINE_string("workdir", None, "A training run's --workdir (fid, bpd, digits, accuracy, shapes, sr, clip).",
                        flag_values=fv)
    flags.DEFINE_list("stages", None, "cascade: the cascade's runs, base first (each with its own sampling "
                      "settings).", flag_values=fv)
    flags.DEFINE_list("checkpoint_step", None, "Workdir commands: the run's checkpoint of this step; cascade: one "
                      "step, or one per stage (0 or unset: the newest).", flag_values=fv)
    flags.DEFINE_string("samples", None, "fid/digits: a .npz of samples (uint8 under 'arr_0' or 'images'; "
                        "'labels' optional) or a folder of PNG/JPEG images, instead of sampling the workdir's "
                        "model.", flag_values=fv)
    flags.DEFINE_string("prompts", None, "clip, and fid of a text-to-image run: a file of prompts, one per line, "
                        "sampled in place of the held-out captions (the first --num_samples, one sample each); "
                        "clip with --samples: the prompts the samples were drawn for, in the order `sample "
                        "--prompts` writes them.", flag_values=fv)
    flags.DEFINE_string("pth", None, "convert_inception: pytorch-fid's weights file.", flag_values=fv)
    flags.DEFINE_string("out", None, "convert_inception / reference_stats: the .npz to write; accuracy: the folder "
                        "of its grids (default WORKDIR/accuracy).", flag_values=fv)
    cli.define_config_flags(fv, cli.EVAL_FLAGS)
    flags.DEFINE_bool("keep_features", False, "reference_stats: also store the features, which KID and "
                      "precision/recall need.", flag_values=fv)
    flags.DEFINE_string("reference_split", None, "fid: if --reference_stats does not exist yet, first compute "
                        "it from this split of the run's dataset (e.g. train) and save it there.", flag_values=fv)
    flags.DEFINE_integer("num_examples", None, "reference_stats / bpd: examples of the split (default: all).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("per_device_batch", 50, "Inception images per device per call.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_list("settings", list(conditional_accuracy.DEFAULT_SETTINGS), "accuracy: sampler:steps[:guidance] "
                      "settings to compare (guidance defaults to the run's sampling.guidance).", flag_values=fv)
    flags.DEFINE_integer("num_per_class", 100, "accuracy: samples of every class per setting.", lower_bound=1,
                         flag_values=fv)


def _required(fv, name):
    if fv[name].value is None:
        raise UserError(f"--{name} is required for this command.")
    return fv[name].value


def _one_step(values: list[str] | None) -> int | None:
    """A workdir command's --checkpoint_step: one step (None: the newest, as 0 is)."""
    if values is not None and (len(values) != 1 or not values[0].isdigit()):
        raise UserError(f"--checkpoint_step={','.join(values)}: give one step (a whole number) of the --workdir run; "
                        "one per stage is for cascade.")
    return (int(values[0]) or None) if values else None


def main(fv: flags.FlagValues, args: list[str]) -> None:
    if len(args) != 1 or args[0] not in tasks.COMMANDS:
        raise UserError(f"usage: python -m ddpm_jax.evaluate COMMAND [--flags]; COMMAND is one of {tasks.COMMANDS}.")
    command = args[0]
    if fv.checkpoint_step is not None and command in ("convert_inception", "reference_stats"):
        raise UserError(f"--checkpoint_step={','.join(fv.checkpoint_step)}: chooses the checkpoint of a run; "
                        f"{command} has none.")
    if command == "convert_inception":
        inception.convert_pytorch_fid_weights(_required(fv, "pth"), _required(fv, "out"))
        print(f"wrote {fv.out}")
    elif command == "reference_stats":
        config = cli.apply_flags(_required(fv, "config"), fv, cli.EVAL_FLAGS)
        tasks.reference_stats_command(config, _required(fv, "out"), num_examples=fv.num_examples,
                                      keep_features=fv.keep_features, per_device_batch=fv.per_device_batch)
    elif command == "cascade":
        tasks.cascade_command(fv.stages, {f: fv[f].value for f in cli.EVAL_FLAGS if fv[f].value is not None},
                              checkpoint_steps=fv.checkpoint_step)
    else:
        config = checkpoints.load_config(fv.workdir) if fv.samples is None or fv.workdir else defaults.get_config()
        tasks.workdir_command(command, fv.workdir, cli.apply_flags(config, fv, cli.EVAL_FLAGS), samples=fv.samples,
                              reference_split=fv.reference_split, num_examples=fv.num_examples,
                              per_device_batch=fv.per_device_batch, settings=fv.settings,
                              num_per_class=fv.num_per_class, out=fv.out, step=_one_step(fv.checkpoint_step),
                              prompts=fv.prompts)


if __name__ == "__main__":
    cli.run(define_flags, main)
