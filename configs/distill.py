"""Progressive distillation (Salimans & Ho 2022) of a training run, one halving per run.

The run to distill, the teacher, follows a colon; the student takes its model, data and diffusion from
the teacher's config.json, starts from its EMA params, and learns to sample in `sampling.steps`
deterministic DDIM steps on trailing timesteps, half the teacher's (8, from 16, for a DDPM teacher;
docs/samplers.md has the rounds on the digits and what they measured):
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_v --workdir=runs/digits_d8
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_d8 --workdir=runs/digits_d4
A conditional teacher guided with weight w (the student samples with it learnt, at sampling.guidance 0):
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_cond_v --workdir=runs/digits_cond_d8 \
        --config.distill.guidance=1
A student of configs/distill_guidance.py (Meng et al.'s first stage) keeps w as its input in every round:
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_cond_w --workdir=runs/digits_cond_w8
The training settings are those measured on the digits (1,000 steps a round); a larger model wants more
steps (training.num_train_steps, which the learning rate's decay follows) and a slower EMA.
"""
from ddpm_jax import distillation


def get_config(teacher: str = ""):
    c, t = distillation.student_config(teacher, "distill.py", "progressive", num_train_steps=1000)
    halves = bool(t.distill.teacher) and t.distill.mode == "progressive"  # a student of a student: half its steps
    c.sampling.update(sampler="ddim", eta=0.0, timestep_spacing="trailing", guidance=0.0,
                      steps=t.sampling.steps // 2 if halves else 8)
    return c
