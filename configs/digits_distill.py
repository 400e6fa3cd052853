"""Progressive distillation (Salimans & Ho 2022) of the digits DDPM, one halving per run.

The teacher predicts v (the paper's parameterisation for few steps; the student keeps the teacher's),
and each student samples with deterministic DDIM on trailing timesteps in `sampling.steps` steps, half
its teacher's. The first run distills the 200-step DDPM sampled with 16 DDIM steps into 8; each later
run halves its teacher's steps (docs/samplers.md has the loop and what it measured):
    python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits_v --config.diffusion.model_output=v
    python -m ddpm_jax.main --config=configs/digits_distill.py --workdir=runs/digits_d8 \\
        --config.distill.teacher=runs/digits_v --config.sampling.steps=8
    python -m ddpm_jax.main --config=configs/digits_distill.py --workdir=runs/digits_d4 \\
        --config.distill.teacher=runs/digits_d8 --config.sampling.steps=4
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.load_config_file("digits.py", relative_to=__file__)
    c.diffusion.model_output = "v"
    c.distill.teacher = "runs/digits_v"
    c.sampling.sampler = "ddim"
    c.sampling.timestep_spacing = "trailing"
    c.sampling.steps = 8
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.995  # 0.999 would leave 0.999^1000 = 37% of the teacher in the EMA at the end
    c.training.num_train_steps = 1000
    c.optim.decay_steps = c.training.get_ref("num_train_steps")  # each round's learning rate decays to 0
    c.training.sample_every = 500
    return c
