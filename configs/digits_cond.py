"""Class-conditional DDPM on the 8x8 digits with classifier-free guidance (Ho & Salimans 2022).

The digits recipe plus a 10-class label embedding; training replaces the label by the null class
with probability 0.1, so the one network is conditional and unconditional. Samples with 50 DDIM
steps and guidance w = 1 by default:
    python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond
    python -m ddpm_jax.sample --workdir=runs/digits_cond --num_samples=100 --label=all
"""
from configs import digits


def get_config():
    c = digits.get_config()
    c.model.num_classes = 10
    c.training.label_dropout = 0.1
    c.sampling.sampler = "ddim"
    c.sampling.steps = 50
    c.sampling.guidance = 1.0
    return c
