"""DDPM on CIFAR-10, the official recipe of Ho et al. 2020 (FID 3.17).

Adam 2e-4 with 5000 warmup steps, gradient clip 1.0, batch 128, EMA 0.9999, dropout 0.1, 800k steps,
random flips, linear betas 1e-4..0.02 over T=1000, fixedlarge variance. bfloat16 compute.
    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.get_config()
    c.model.dtype = "bfloat16"
    return c
