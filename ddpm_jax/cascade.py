"""Runs a cascade: a base model, then super-resolution stages, under the same prompts (Imagen-style).

    python -m ddpm_jax.cascade --stages=runs/shapes_t2i,runs/shapes_sr \\
        --prompt="a red circle above a blue square" --guidance=3,0 --steps=50,25 --aug_level=0.1

--stages lists the runs, base first; each later one a super-resolution model of the previous
stage's size. --sampler, --steps, --guidance (its interval --guidance_t_min, --guidance_t_max, its --guidance_rescale),
--eta and --aug_level take one value for every stage or one per stage (aug_level is read by
super-resolution stages only); unset, each run's own `sampling` section holds. --checkpoint_step
chooses each run's checkpoint the same way (0: the run's newest, the default); --text_encoder names the
frozen T5 of the stages that read precomputed text embeddings, if it has moved since training. Writes
OUT/stage_K/samples.png and .npz per stage and OUT/cascade.png (the stages side by side). The logic
is in `ddpm_jax.cascading`.
"""
from __future__ import annotations

from absl import flags

from ddpm_jax import cascading, cli, generation
from ddpm_jax.validation import UserError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("stages", None, "The cascade's training runs, base first: DIR,DIR,...", flag_values=fv)
    flags.DEFINE_string("out", "cascade_samples", "Output folder.", flag_values=fv)
    flags.DEFINE_string("prompt", None, "Text models: the prompt.", flag_values=fv)
    flags.DEFINE_string("prompts", None, "Text models: a file of prompts, one per line.", flag_values=fv)
    flags.DEFINE_string("label", None, "Class-conditional stages: a class, 'all' or 'null'.", flag_values=fv)
    flags.DEFINE_integer("num_samples", None, "Images per prompt (default: the base run's sampling.num_samples).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", None, "Base seed (stage K uses seed + K; default each run's).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_bool("individual", False, "Also write each final image as stage_K/images/NNNNNN.png.",
                      flag_values=fv)
    flags.DEFINE_string("text_encoder", None, "Stages of precomputed text embeddings: the frozen T5's folder that "
                        "embeds the prompts (default: each run's model.text_encoder_path).", flag_values=fv)
    flags.DEFINE_list("checkpoint_step", None, "The runs' checkpoints of these steps: one, or one per stage "
                      "(0: the newest, the default).", flag_values=fv)
    for name in cascading.STAGE_FIELDS:
        flags.DEFINE_list(name, None, f"sampling.{name}: one value, or one per stage.", flag_values=fv)
    flags.mark_flag_as_required("stages", flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.no_arguments(args)
    if fv.prompt is not None and fv.prompts is not None:
        raise UserError("--prompt and --prompts: give one prompt or a file of them, not both.")
    prompts = [fv.prompt] if fv.prompt is not None else generation.read_prompts(fv.prompts) if fv.prompts else None
    overrides = {name: fv[name].value for name in cascading.STAGE_FIELDS if fv[name].value is not None}
    cascading.cascade_command(fv.stages, overrides, out=fv.out, prompts=prompts, label=fv.label,
                              num_samples=fv.num_samples, seed=fv.seed,
                              checkpoint_steps=fv.checkpoint_step, individual=fv.individual,
                              text_encoder=fv.text_encoder)


if __name__ == "__main__":
    cli.run(define_flags, main)
