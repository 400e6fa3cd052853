"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

The paper's CIFAR-10 recipe (configs/cifar10.py) plus a 10-class label embedding trained with label
dropout 0.1 (Ho & Salimans: 0.1-0.2 work best). Guidance trades diversity for fidelity; they report
the best FID at small w (0.1-0.3) and the best Inception Score at larger w.
    python -m ddpm_jax.main --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond
    python -m ddpm_jax.sample --workdir=runs/cifar10_cond --sampler=ddim --steps=100 --guidance=0.3
"""
from ddpm_jax.defaults import load_config_file


def get_config():
    c = load_config_file("cifar10.py", relative_to=__file__)
    c.model.num_classes = 10
    c.training.label_dropout = 0.1
    c.sampling.guidance = 0.3
    return c
