"""A tiny U-Net and schedule on CIFAR-10 shapes, for CPU tests and smoke runs.
    python -m ddpm_jax.main --config=configs/tiny.py --workdir=runs/tiny
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.get_config()
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.0
    c.diffusion.num_timesteps = 100
    c.diffusion.beta_end = 0.2
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.optim.ema_decay = 0.9
    c.training.batch_size = 16
    c.training.num_train_steps = 20
    c.training.log_every = 5
    c.training.checkpoint_every = 10
    c.training.sample_every = 20
    c.training.num_sample_images = 16
    c.sampling.steps = 100
    c.data.shuffle_buffer = 100
    return c
