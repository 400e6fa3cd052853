"""Progressive distillation (Salimans & Ho 2022, Alg. 2): a student that takes in one deterministic DDIM
step what its teacher takes in two.

A student of N steps samples with DDIM (eta 0) on the N 'trailing' timesteps
(`diffusion.trailing_timesteps`); its teacher on the 2N, every other one of which is the student's.
An example of a training batch draws a student step i, noises x_0 to the student's timestep there
(z_t, Eq. 4 as in any training step), takes the teacher's two DDIM steps from z_t down to the
student's next level (z_t''), and solves for the x_0 with which one DDIM step from z_t lands exactly on
z_t'' (`target`). The student is trained on that x_0, and on the noise it implies, with the run's
usual loss in its own parameterisation: predicting v, the x_0 error weighted by SNR + 1 (the paper's
Sec. 4); eps, by SNR, which the paper finds fails at few steps.

One training run is one halving: its config names the teacher run (`distill.teacher`) and the student's
steps (`sampling.steps`); the student starts from the teacher's EMA params and is the next run's
teacher (docs/samplers.md). Pure functions; the train step (`training.train_step`) calls
`training_targets`.

Guided distillation (Meng et al. 2023): a first stage (`distill.mode='guidance'`, configs/distill_guidance.py)
trains a student with the guidance weight w as an input (`model.guidance_embedding`) on its
classifier-free guided teacher's output at every timestep, w ~ U[distill.guidance_min,
distill.guidance_max] per example; progressive rounds of that student then keep w as an input, teacher
and student alike, so the last student samples guided with any w in the range, in a few steps of one
network evaluation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from ddpm_jax import checkpoints
from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax.diffusion import ModelFn, Schedule
from ddpm_jax.validation import UserError


def schedules(diffusion_config, num_steps: int) -> tuple[Schedule, Schedule]:
    """(the student's schedule of `num_steps` trailing timesteps, the teacher's of twice as many).
    Student index i is teacher index 2i + 1: the same timestep, the same alpha_bar."""
    return (D.schedule_from_config(diffusion_config, num_steps, "trailing"),
            D.schedule_from_config(diffusion_config, 2 * num_steps, "trailing"))


def target(student: Schedule, teacher: Schedule, kind: str, teacher_fn: ModelFn, z_t: jax.Array, i: jax.Array,
           opts: S.StepOptions) -> jax.Array:
    """The student's x_0 target `[B, ...]` for z_t `[B, ...]` at its schedule indices i int `[B]`.

    The teacher's DDIM steps (eta 0, x_0 treated as `opts` say) go from teacher index 2i + 1 to 2i and
    from 2i to z_t'' at the student's next level, alpha'' = sqrt(alpha_bar_prev[i]) (1 at i = 0:
    the clean image). A student's DDIM step from z_t with x_0 is z'' = alpha'' x_0 + sigma''
    (z_t - alpha x_0) / sigma, so x_0 = (z_t'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha).
    """
    opts = opts._replace(eta=0.0)
    zeros = jnp.zeros_like(z_t)
    z_mid, _, _ = S.ddim_step(teacher, kind, teacher_fn, z_t, 2 * i + 1, zeros, opts)
    z_end, _, _ = S.ddim_step(teacher, kind, teacher_fn, z_mid, 2 * i, zeros, opts)
    abar = D.extract(student.alphas_cumprod, i, z_t.shape)
    abar_end = D.extract(student.alphas_cumprod_prev, i, z_t.shape)
    ratio = jnp.sqrt((1.0 - abar_end) / (1.0 - abar))
    return (z_end - ratio * z_t) / (jnp.sqrt(abar_end) - ratio * jnp.sqrt(abar))


def teacher_model_fn(config: ConfigDict, model, teacher_params, cond: dict) -> ModelFn:
    """The teacher's model_fn under `cond` (as the student gets it, dropped rows included; a dropped
    row's guided output is its unconditional one). Guided with weight `distill.guidance`; a
    student with `model.guidance_embedding` has each example's w in cond['guidance']: its teacher in
    the first stage (`distill.mode='guidance'`) is the same U-Net without that input, guided with w
    by two passes, and in later rounds a student of the same kind, which takes w as its input."""
    if config.model.guidance_embedding and config.distill.mode == "guidance":
        teacher = model.clone(guidance_embedding=False)
        apply_fn = lambda x, t, c: teacher.apply({"params": teacher_params}, x, t, c)
        plain = {k: v for k, v in cond.items() if k != "guidance"}
        w = cond["guidance"].reshape((-1, 1, 1, 1))
        return S.guided_model_fn(apply_fn, plain, S.null_condition(plain), w)
    return S.unet_model_fn(model, teacher_params, cond, guidance=config.distill.guidance)


def training_targets(config: ConfigDict, model, teacher_params, z_t: jax.Array, i: jax.Array,
                     cond: dict) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) the student is trained on at z_t `[B, ...]` under `cond`, where eps = (z_t - alpha
    x_0) / sigma, so that the run's loss applies unchanged. Progressive distillation
    (`distill.mode='progressive'`): `target` of the teacher (`teacher_model_fn`) at the student's
    schedule indices i `[B]`. Meng et al.'s first stage ('guidance'): the x_0 of the guided teacher's
    output at timesteps i `[B]`, and its eps (unclipped: the student learns the output itself, which
    its sampler then treats as any model's)."""
    teacher_fn = teacher_model_fn(config, model, teacher_params, cond)
    kind = config.diffusion.model_output
    if config.distill.mode == "guidance":
        s = D.schedule_from_config(config.diffusion)
        out = jax.lax.stop_gradient(teacher_fn(z_t, i))
        return D.predict_x0(s, kind, out, z_t, i), D.predict_eps(s, kind, out, z_t, i)
    student, teacher = schedules(config.diffusion, config.sampling.steps)
    x0 = jax.lax.stop_gradient(target(student, teacher, kind, teacher_fn, z_t, i, S.step_options(config)))
    abar = D.extract(student.alphas_cumprod, i, z_t.shape)
    return x0, (z_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def student_config(teacher: str, config_file: str, mode: str,
                   num_train_steps: int) -> tuple[ConfigDict, ConfigDict]:
    """(a student's config, its teacher's) for configs/distill.py and distill_guidance.py: the config.json
    of the run at `teacher` (the --config's ARG after `config_file`), with `distill.teacher` and `mode`
    set and the training settings measured on the digits: `num_train_steps` of Adam from 2e-4 decaying
    to 0, no warmup, EMA 0.995 (0.999 would leave 37% of the teacher's params after 1,000 steps)."""
    if not teacher:
        raise UserError(f"name the run to distill after a colon, e.g. "
                        f"--config=configs/{config_file}:runs/digits_cond_v.")
    teacher_config = checkpoints.load_config(teacher)
    c = teacher_config.copy_and_resolve_references()
    c.distill.update(teacher=teacher, teacher_checkpoint_step=0, mode=mode, guidance=0.0)
    c.optim.update(learning_rate=2e-4, warmup_steps=0, ema_decay=0.995)
    c.training.num_train_steps = num_train_steps
    c.training.allow_config_change = False  # a resume must read the same teacher, whatever the teacher's run allowed
    c.optim.decay_steps = c.training.get_ref("num_train_steps")  # the learning rate decays to 0 over the run
    return c, teacher_config


def load_teacher(config: ConfigDict) -> tuple[ConfigDict, dict]:
    """(a copy of `config` with `distill.teacher_checkpoint_step` set to the step read, the teacher's EMA
    params on the host) of `distill.teacher`'s checkpoint of that step (0: its newest readable one)."""
    path, step = config.distill.teacher, config.distill.teacher_checkpoint_step
    teacher = config.copy_and_resolve_references()
    if config.distill.mode == "guidance":  # the first stage's teacher has no w input
        teacher.model.guidance_embedding = False
    try:
        params, step = checkpoints.load_params(path, teacher, step=step or None, flag="distill.teacher_checkpoint_step")
    except UserError as e:  # its message says --workdir: name the field it came from
        raise UserError(f"distill.teacher: {e}") from None
    config = config.copy_and_resolve_references()
    config.distill.teacher_checkpoint_step = step
    return config, params
