"""DDPM on scikit-learn's 8x8 handwritten digits: ships with the package, trains offline on a CPU.

A small U-Net (8x8 and 4x4, attention at 4x4) for the 1,797 greyscale digits, no flips (a mirrored
digit is not a digit), and a 200-step chain whose linear betas are the paper's scaled by 1000/200,
so that abar_T is as small as with T=1000 and sampling a grid takes seconds. One step per call:
XLA on CPU runs a `lax.scan` of steps much slower than single steps. 3,000 steps of 64, minutes on a CPU:
    python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.get_config()
    c.data.dataset = "digits"
    c.data.image_size = 8
    c.data.channels = 1
    c.data.random_flip = False
    c.data.shuffle_buffer = 1797
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.1
    c.diffusion.num_timesteps = 200
    c.diffusion.beta_start = 5e-4
    c.diffusion.beta_end = 0.1
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.training.batch_size = 64
    c.training.num_train_steps = 3000
    c.training.steps_per_call = 1
    c.training.log_every = 100
    c.training.checkpoint_every = 500
    c.training.sample_every = 1000
    c.training.num_sample_images = 100
    c.sampling.steps = 200
    return c
