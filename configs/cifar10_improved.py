"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021), with the flags of the authors' README for it.

128 channels, 3 residual blocks per level, attention at 16x16 and 8x8 with 4 heads of 64 channels,
scale-shift norm (the timestep scales and shifts each block's second GroupNorm), dropout 0.3; learned
variances trained with L_hybrid (lambda 0.001), a cosine schedule over T = 4000; Adam 1e-4 without
warmup or gradient clipping, batch 128, EMA 0.9999, random flips. Their PyTorch code's timestep
embedding, GroupNorm epsilon (1e-5) and downsampling padding are set as well. One difference: their
code rescales t to [0, 1000) before embedding it, here t in [0, 4000) is embedded. Their code trains
until stopped; 500k steps here. Learned variances keep samples good with far fewer steps (--steps=100).
    python -m ddpm_jax.main --config=configs/cifar10_improved.py --workdir=runs/cifar10_improved
    python -m ddpm_jax.sample --workdir=runs/cifar10_improved --steps=100
"""
from ddpm_jax.defaults import load_config_file


def get_config():
    c = load_config_file("cifar10.py", relative_to=__file__)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (16, 8)
    c.model.attn_head_dim = 64
    c.model.scale_shift_norm = True
    c.model.dropout = 0.3
    c.model.time_embedding = "adm"
    c.model.norm_eps = 1e-5
    c.model.downsample_padding = "symmetric"
    c.diffusion.num_timesteps = 4000
    c.diffusion.beta_schedule = "cosine"
    c.diffusion.variance = "learned_range"
    c.diffusion.vlb_weight = 0.001
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 0.0
    c.training.num_train_steps = 500_000
    c.sampling.steps = 4000
    return c
