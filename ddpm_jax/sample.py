"""Samples from a trained run: generation, classifier-free guidance, image-to-image, inpainting, figures.

    python -m ddpm_jax.sample --workdir=runs/digits_cond --sampler=ddim --steps=50 --guidance=2 --num_samples=100
    python -m ddpm_jax.sample --workdir=runs/digits_cond --init_images=in/ --strength=0.6 --label=3
    python -m ddpm_jax.sample --workdir=runs/digits --init_images=in/ --mask=mask.png --jump_length=10 --jump_n_sample=5
    python -m ddpm_jax.sample --workdir=runs/shapes_t2i --prompt="a red circle above a blue square" --guidance=3

Loads the run's config.json and its latest checkpoint (EMA params unless --noema). Writes to --out
(default WORKDIR/samples): `samples.png` (a grid; one row per class with --label=all), `samples.npz`
(`arr_0`: uint8 `[N, H, W, C]`, the form FID tools read; `labels` for class-conditional models),
`images/NNNNNN.png` with --individual, and with --figures `forward_process.png` (x_0 noised step by
step to x_T) and `reverse_process.png` (the sampler's trajectory from noise to image).
--steps, --guidance and the other sampling flags set the fields of the config's `sampling` section
(`cli.SAMPLE_FLAGS`); unset, the run's values hold. The logic is in `ddpm_jax.generation`.
"""
from __future__ import annotations

from absl import flags

from ddpm_jax import checkpoints, cli, generation


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "A training run's --workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder (default WORKDIR/samples).", flag_values=fv)
    cli.define_config_flags(fv, cli.SAMPLE_FLAGS)
    flags.DEFINE_string("label", None, "A class index, 'all' (the classes in equal blocks; the default for "
                                       "class-conditional models) or 'null' (unconditional).", flag_values=fv)
    flags.DEFINE_string("prompt", None, "Text models: the prompt (each prompt gets --num_samples images).",
                        flag_values=fv)
    flags.DEFINE_string("prompts", None, "Text models: a file of prompts, one per line; the grid has one row per "
                                         "prompt.", flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "Text models with --guidance: guide away from this prompt "
                                                 "(it replaces the null text).", flag_values=fv)
    flags.DEFINE_string("source_prompt", None, "Prompt-to-prompt editing with --invert: DDIM inversion runs under "
                                               "this prompt (what the --init_images show), sampling under --prompt.",
                        flag_values=fv)
    flags.DEFINE_string("prompt_embedding", None, "Models with model.text_encoder='precomputed': a .npz with "
                                                  "'text_emb' [L, D] or [P, L, D] and optionally 'text_mask'.",
                        flag_values=fv)
    flags.DEFINE_string("init_images", None, "Image-to-image / inpainting input: a PNG or a folder of them.",
                        flag_values=fv)
    flags.DEFINE_bool("invert", False, "Image-to-image: reach t by DDIM inversion instead of adding noise.",
                      flag_values=fv)
    flags.DEFINE_string("low_res", None, "Super-resolution models: the low-resolution input, a PNG or a folder "
                        "of them at the model's model.low_res_size, or larger squares (upscaled by the same "
                        "factor).", flag_values=fv)
    flags.DEFINE_string("mask", None, "Inpainting: a PNG (or folder), white where to generate, black to keep; "
                        "'auto': DiffEdit's mask, where --prompt and --source_prompt (or the null text) disagree.",
                        flag_values=fv)
    flags.DEFINE_bool("individual", False, "Also write each image as images/NNNNNN.png (numbered images "
                      "beyond this run's count, from an earlier run, are removed).", flag_values=fv)
    flags.DEFINE_bool("figures", False, "Also draw the forward and reverse process figures.", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Use the EMA params (--noema: the raw params).", flag_values=fv)
    flags.DEFINE_integer("checkpoint_step", None, "Sample the run's checkpoint of this step (0 or unset: the newest).",
                         lower_bound=0, flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.no_arguments(args)
    config = cli.apply_flags(checkpoints.load_config(fv.workdir), fv, cli.SAMPLE_FLAGS)
    generation.sample_workdir(
        fv.workdir, config, out=fv.out, label=fv.label, prompt=fv.prompt, prompts_file=fv.prompts,
        prompt_embedding=fv.prompt_embedding, negative_prompt=fv.negative_prompt, source_prompt=fv.source_prompt,
        init_images=fv.init_images, mask=fv.mask, low_res=fv.low_res, invert=fv.invert, ema=fv.ema,
        step=fv.checkpoint_step or None, individual=fv.individual, figures=fv.figures,
        given=frozenset(name for name in cli.SAMPLE_FLAGS if fv[name].present))


if __name__ == "__main__":
    cli.run(define_flags, main)
