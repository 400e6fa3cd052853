"""Guided distillation's first stage (Meng et al. 2023): a student that takes the guidance weight w as an
input and gives in one network evaluation what its class- or text-conditional teacher gives guided
with w in two, for every w in [distill.guidance_min, distill.guidance_max] (0 to 4 here).

The run to distill follows a colon; the student takes its model, data, diffusion and sampler from the
teacher's config.json, adds the embedding of w (model.guidance_embedding), starts from the teacher's
EMA params and learns the guided output at every timestep, w drawn per example. It samples with any
sampler at sampling.guidance = w; configs/distill.py then halves its steps, w staying an input
(docs/samplers.md):
    python -m ddpm_jax.main --config=configs/distill_guidance.py:runs/digits_cond_v --workdir=runs/digits_cond_w
    python -m ddpm_jax.sample --workdir=runs/digits_cond_w --guidance=2
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_cond_w --workdir=runs/digits_cond_w8
"""
from ddpm_jax import distillation


def get_config(teacher: str = ""):
    c, _ = distillation.student_config(teacher, "distill_guidance.py", "guidance", num_train_steps=2000)
    c.model.guidance_embedding = True
    c.distill.update(guidance_min=0.0, guidance_max=4.0)
    return c
