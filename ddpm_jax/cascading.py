"""Cascades (Ho et al. 2022; Imagen, Saharia et al. 2022): a base model, then super-resolution stages.

Stage 0 samples from noise (under the prompts or labels); stage k > 0 is a super-resolution model
(`model.low_res_size` equal to the side of stage k-1's images, or a fraction of it: a stage trained
on crops upscales whole images, `generation.sr_output_size`) that upscales stage k-1's images, row
by row, under the same prompts. Every stage uses its own run's `sampling` section, with any of the
per-stage overrides of `STAGE_FIELDS`; all stages run on all local devices through
`generation.run`.

    from ddpm_jax import cascading
    stages = cascading.load_stages(["runs/shapes_t2i", "runs/shapes_sr"], {"guidance": [3.0, 0.0]}, num_samples=4)
    images = cascading.run(stages, prompts=["a red circle"])  # uint8, one array per stage
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import numpy as np
from ml_collections import ConfigDict

from ddpm_jax import chunk_store, files, generation, image_utils, sampling
from ddpm_jax.validation import UserError, check_output_dir, validate_sampling

# sampling field (and flag) -> type: a value per stage, or one for all (aug_level: SR stages only).
STAGE_FIELDS = {"sampler": str, "steps": int, "guidance": float, "guidance_t_min": float, "guidance_t_max": float,
                "guidance_rescale": float, "eta": float, "aug_level": float, "sr_strength": float,
                "ode_tolerance": float}
KIND_NAMES = {str: "a string", int: "a whole number", float: "a number"}  # as errors name the types


@dataclasses.dataclass
class Stage:
    workdir: str
    config: ConfigDict
    params: object = None
    step: int | None = None  # of the checkpoint read (before: the one asked for; None: the newest)
    ode: dict = dataclasses.field(default_factory=dict)  # after `run`: `generation.ode_fields` of its samples


def per_stage(name: str, values, num_stages: int, kind=None) -> list:
    """`values` (one, or one per stage) of the --`name` flag as a list of `num_stages` values of
    `kind` (default: the field's type in `STAGE_FIELDS`)."""
    kind = kind or STAGE_FIELDS[name]
    if len(values) not in (1, num_stages):
        raise UserError(f"--{name}={','.join(map(str, values))}: give one value, or one per stage ({num_stages}).")
    try:
        typed = [kind(v) for v in values]
    except ValueError:
        raise UserError(f"--{name}={','.join(map(str, values))}: each value must be {KIND_NAMES[kind]}.") from None
    return typed * num_stages if len(typed) == 1 else typed


def choose_checkpoints(values, stages: list[Stage]) -> None:
    """Sets each stage's checkpoint to read from --checkpoint_step `values` (one, or one per stage;
    0: the newest), after checking that the run has it."""
    from ddpm_jax import checkpoints

    flag = f"--checkpoint_step={','.join(map(str, values))}"
    steps = per_stage("checkpoint_step", values, len(stages), int)
    for k, (stage, step) in enumerate(zip(stages, steps)):
        have = checkpoints.steps(stage.workdir)
        if step < 0 or step and step not in have:
            raise UserError(f"{flag}: stage {k} ({stage.workdir}) has no checkpoint of step {step}; it has steps "
                            f"{have} (0: the newest).")
        stage.step = step or None


def load_stages(workdirs: list[str], overrides: dict | None = None, *, num_samples: int | None = None,
                seed: int | None = None, checkpoint_steps: list | None = None,
                text_encoder: str | None = None) -> list[Stage]:
    """The stages' configs (each run's config.json with `overrides` {field: [value per stage or one]}
    written into `sampling`, and `text_encoder` into the `model.text_encoder_path` of the stages of
    precomputed text), checked as a chain, with the checkpoints to read (`checkpoint_steps`:
    `choose_checkpoints`); no checkpoint is read yet."""
    from ddpm_jax import checkpoints

    if len(workdirs) < 1:
        raise UserError("--stages: give the runs of the cascade, base first (e.g. runs/base,runs/sr).")
    stages = []
    for workdir in workdirs:
        if not files.is_file(os.path.join(workdir, checkpoints.CONFIG_FILE)):
            raise UserError(f"--stages: {workdir} is not a training run (no config.json there).")
        stages.append(Stage(workdir, checkpoints.load_config(workdir)))
    for name, values in (overrides or {}).items():
        for stage, value in zip(stages, per_stage(name, values, len(stages))):
            stage.config.sampling[name] = value
    size = stages[0].config.data.image_size  # of the images the stage before makes
    for k, stage in enumerate(stages):
        c = stage.config
        if num_samples is not None:
            c.sampling.num_samples = num_samples
        if seed is not None:
            c.sampling.seed = seed + k
        if text_encoder is not None and c.model.text_encoder == "precomputed":
            c.model.text_encoder_path = text_encoder
        try:
            validate_sampling(c)
        except UserError as e:  # a value set for every stage may fit one and not another: name the stage
            raise UserError(f"stage {k} ({stage.workdir}): {e}") from None
        if k == 0 and c.model.low_res_size:
            raise UserError(f"--stages: the first stage ({stage.workdir}) is a super-resolution model "
                            f"(model.low_res_size={c.model.low_res_size}); the cascade starts with a base model.")
        if k > 0:
            prev = stages[k - 1].config.data
            out = None  # the side this stage makes from the previous one's images (0: its data.image_size)
            if c.model.low_res_size and c.data.channels == prev.channels:
                with contextlib.suppress(UserError):
                    out = generation.sr_output_size(c, (size, size), "")
            if out is None:
                raise UserError(f"--stages: {stage.workdir} upscales {c.model.low_res_size}x{c.model.low_res_size} "
                                f"(model.low_res_size; or larger squares by the same factor) but "
                                f"{stages[k - 1].workdir} makes {size}x{size} images with {prev.channels} "
                                "channels; each stage must upscale the previous one's images.")
            size = out or c.data.image_size
    if checkpoint_steps is not None:
        choose_checkpoints(checkpoint_steps, stages)
    return stages


def check_conditioning(stages: list[Stage], prompts, label) -> None:
    """UserError if the prompts or the label reach no stage (each stage takes what its model reads)."""
    if prompts is not None and all(st.config.model.text_encoder == "none" for st in stages):
        raise UserError("--prompt/--prompts: no stage of this cascade takes text (model.text_encoder='none' in "
                        "every run).")
    if label is not None and not any(st.config.model.num_classes for st in stages):
        raise UserError(f"--label={label}: no stage of this cascade is class-conditional (model.num_classes=0).")


def _stage_request(stage: Stage, previous: np.ndarray | None, prompts, label) -> generation.Request:
    """Stage 0's request, or a later stage's: one row per image of the previous stage."""
    c = stage.config
    text = prompts if c.model.text_encoder != "none" else None
    lab = label if c.model.num_classes else None
    if previous is None:
        return generation.make_request(c, label=lab, prompts=text)
    return generation.paired_request(c, previous, prompts=text, label=lab)


def run(stages: list[Stage], *, prompts: list[str] | None = None, label: str | None = None,
        progress=None, resume_dir: str | None = None) -> list[np.ndarray]:
    """Runs the cascade: uint8 `[N, S_k, S_k, C]` per stage, the rows of every stage in the same
    order (prompt by prompt, `sampling.num_samples` of stage 0 each). Reads each stage's EMA
    params on first use (of checkpoint `stage.step`; None: the newest that can be read).
    resume_dir: each stage keeps its finished batches in RESUME_DIR/stage_K (`generation.run`), so a
    rerun after a stop resumes; the caller clears them (`clear_resume_dir`)."""
    from ddpm_jax import checkpoints

    check_conditioning(stages, prompts, label)
    outputs = []
    for k, stage in enumerate(stages):
        req = _stage_request(stage, outputs[-1] if outputs else None, prompts, label)
        if stage.params is None:
            stage.params, stage.step = checkpoints.load_params(stage.workdir, stage.config, step=stage.step)
        try:
            kept = None if resume_dir is None else os.path.join(resume_dir, f"stage_{k}")
            out = generation.run(stage.config, stage.params, req, progress=progress, uint8=True, resume_dir=kept)
            outputs.append(out["images"])
            stage.ode = generation.ode_fields(out)
        except UserError as e:  # non-finite samples, or no folder for its batches: name the stage
            raise UserError(f"stage {k} ({stage.workdir}): {e}") from None
    return outputs


def clear_resume_dir(resume_dir: str, num_stages: int) -> None:
    """Removes what `run(..., resume_dir=)` kept, once the outputs are written."""
    for k in range(num_stages):
        chunk_store.clear(os.path.join(resume_dir, f"stage_{k}"))
    chunk_store.clear(resume_dir)  # the folder itself, now empty


def side_by_side(outputs: list[np.ndarray], rows: int = 8) -> np.ndarray:
    """uint8 grid: up to `rows` rows, one column per stage, each stage resized (nearest) to the last one's size."""
    size = outputs[-1].shape[1]
    pick = np.unique(np.linspace(0, len(outputs[-1]) - 1, min(rows, len(outputs[-1]))).round().astype(int))
    cells = [np.repeat(np.repeat(o[pick], size // o.shape[1], axis=1), size // o.shape[2], axis=2) for o in outputs]
    return image_utils.make_grid(np.stack(cells, axis=1).reshape((-1,) + cells[-1].shape[1:]), nrow=len(outputs))


def cascade_command(workdirs: list[str], overrides: dict, *, out: str, prompts: list[str] | None = None,
                    label: str | None = None, num_samples: int | None = None, seed: int | None = None,
                    checkpoint_steps: list | None = None, individual: bool = False,
                    text_encoder: str | None = None) -> list[str]:
    """`python -m ddpm_jax.cascade`: runs the stages and writes OUT/stage_K/ (each stage's grid and
    .npz, as `python -m ddpm_jax.sample` writes them) and OUT/cascade.png (the stages side by side).
    Returns the paths written."""
    stages = load_stages(workdirs, overrides, num_samples=num_samples, seed=seed,
                         checkpoint_steps=checkpoint_steps, text_encoder=text_encoder)
    check_conditioning(stages, prompts, label)
    first = _stage_request(stages[0], None, prompts, label)  # checks the base's prompts/label now
    check_output_dir(out)
    partial = os.path.join(out, generation.PARTIAL_DIR)
    outputs = run(stages, prompts=prompts, label=label, progress=generation.ProgressBar(), resume_dir=partial)
    paths = []
    for k, (stage, images) in enumerate(zip(stages, outputs)):
        sp = stage.config.sampling
        evals = f", {stage.ode['ode_sampling_evals']:.1f} network evaluations per image" if stage.ode else ""
        how = sampling.sampler_text(sp.sampler, sp.steps, sp.ode_tolerance, sp.timestep_spacing)
        print(f"stage {k}: {stage.workdir} (step {stage.step}), {images.shape[1]}x{images.shape[2]}, "
              f"{how}{evals}, guidance {sp.guidance:g}", file=sys.stderr)
        paths += generation.write_outputs(os.path.join(out, f"stage_{k}"), images,
                                          first, stages[0].config.model.num_classes,
                                          individual=individual and k == len(stages) - 1)
    paths.append(os.path.join(out, "cascade.png"))
    image_utils.save_png(paths[-1], side_by_side(outputs), scale=max(1, 64 // outputs[-1].shape[1]))
    clear_resume_dir(partial, len(stages))
    print("\n".join(p for p in paths if "/images/" not in p))
    return paths
