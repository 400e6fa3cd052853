"""DDPM on the 100 LFW face crops that ship inside scikit-image: offline, about 15 minutes on a CPU.

A demonstration, not a benchmark: 100 images are far too few to learn faces in general; the model
can at best reproduce these hundred. The 25x25 greyscale crops are resized to 16x16 and flipped at
random (a mirrored face is still a face). A small U-Net (16, 8 and 4 pixels; attention at 8x8) and the
digits config's 200-step chain (the paper's linear betas scaled by 1000/200), 2,000 steps of 32:
    python -m ddpm_jax.main --config=configs/faces.py --workdir=runs/faces
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.get_config()
    c.data.dataset = "faces"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.random_flip = True
    c.data.shuffle_buffer = 100
    c.model.ch = 32
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.dropout = 0.1
    c.diffusion.num_timesteps = 200
    c.diffusion.beta_start = 5e-4
    c.diffusion.beta_end = 0.1
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.training.batch_size = 32
    c.training.num_train_steps = 2000
    c.training.steps_per_call = 1  # XLA on CPU runs a lax.scan of steps slower than single steps
    c.training.log_every = 100
    c.training.checkpoint_every = 500
    c.training.sample_every = 1000
    c.training.num_sample_images = 64
    c.sampling.steps = 200
    return c
