"""Text-conditioned super-resolution 64x64 -> 256x256, for accelerators: the second stage of an
Imagen-like cascade. Unmeasured: no run of it has been trained (docs/super_resolution.md).

Sizes of guided-diffusion's 64 -> 256 upsampler (Dhariwal & Nichol 2021; its README: 192 channels,
ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 32, 16 and 8, learned variances, linear
betas, T = 1000, Adam 1e-4) in this project's DDPM blocks (no scale-shift norm, convolutional
up/downsampling); text from a frozen encoder's precomputed embeddings (T5-XXL: 4096 wide, as
Imagen; up to 128 tokens) in `NAME.npz` beside each image of a folder (docs/data.md; `python -m ddpm_jax.embed`
writes them with a T5 checkpoint you downloaded, as for the base stage configs/t2i_64.py); noise
conditioning augmentation up to level 0.3 in training and 0.12 at sampling: DeepFloyd IF's stage II
samples at noise level 250 of 1000 on a cosine schedule, abar 0.847, which the linear schedule
reaches at t = 124. It predicts v and samples from pure noise at DDIM eta 1, as configs/shapes_sr.py:
on the CPU stage predicting eps failed from pure noise (7.1 dB against 26.4 dB with v;
docs/super_resolution.md). Sampling also takes larger inputs than 64x64 (`--low_res` of 128x128
makes 512x512).
    python -m ddpm_jax.main --config=configs/sr_64_256.py --workdir=runs/sr_64_256 \\
        --config.data.data_dir=/data/captioned_images --config.model.text_encoder_path=/data/t5-v1_1-xxl
    python -m ddpm_jax.sample --workdir=runs/sr_64_256 --low_res=base_samples/ --prompt="a corgi in a red hat"
"""
from ddpm_jax.defaults import load_config_file


def get_config():
    c = load_config_file("celebahq256.py", relative_to=__file__)
    c.data.random_flip = False  # captions may say left or right
    c.data.max_text_len = 128
    c.model.low_res_size = 64
    c.model.ch = 192
    c.model.attn_resolutions = (32, 16, 8)
    c.model.text_encoder = "precomputed"
    c.model.text_emb_dim = 4096
    c.model.text_encoder_dtype = "bfloat16"  # T5-XXL's float32 encoder (19 GB) in 9.5 GB on every device
    c.model.text_width = 512
    c.model.remat = True
    c.diffusion.variance = "learned_range"
    c.diffusion.model_output = "v"
    c.diffusion.low_res_aug_max = 0.3
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 1000
    c.training.sample_every = 0  # super-resolution: `evaluate sr` and `sample --low_res` instead
    c.training.num_train_steps = 500_000
    c.sampling.sampler = "ddim"
    c.sampling.steps = 250
    c.sampling.eta = 1.0
    c.sampling.aug_level = 0.12
    return c
