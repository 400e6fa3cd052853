"""Class-conditional DDPM on the 8x8 digits with classifier-free guidance (Ho & Salimans 2022).

The digits model (configs/digits.py) plus a 10-class label embedding; training replaces the label
by the null class with probability 0.1, so the one network is conditional and unconditional. The
paper's T = 1000 chain (linear betas 1e-4..0.02), so that 1000-step ancestral sampling and fast
respaced samplers can be compared on it; no in-loop sample grids (`python -m ddpm_jax.sample` and
`python -m ddpm_jax.evaluate accuracy` draw them). Samples with 50 DDIM steps, guidance w = 1:
    python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond
    python -m ddpm_jax.sample --workdir=runs/digits_cond --num_samples=100 --label=all
    python -m ddpm_jax.evaluate accuracy --workdir=runs/digits_cond
"""
from ddpm_jax.defaults import load_config_file


def get_config():
    c = load_config_file("digits.py", relative_to=__file__)
    c.model.num_classes = 10
    c.training.label_dropout = 0.1
    c.training.sample_every = 0
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.sampling.sampler = "ddim"
    c.sampling.steps = 50
    c.sampling.guidance = 1.0
    return c
