"""Every field ddpm_jax reads, with the DDPM CIFAR-10 values (Ho et al. 2020): `ddpm_jax/defaults.py`.
    python -m ddpm_jax.main --config=configs/default.py --workdir=runs/default
"""
from ddpm_jax.defaults import get_config  # noqa: F401
