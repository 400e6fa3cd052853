"""DDPM on CelebA-HQ 256x256, the official recipe (Ho et al. 2020 App. B; `scripts/run_celebahq.py`).

The 114M-parameter U-Net `unet2d16b2c112244` of the official code: ch 128, ch_mult (1, 1, 2, 2, 4, 4),
2 res blocks per level, attention at 16x16, dropout 0.0. Adam 2e-5 (the paper lowered it from 2e-4
for 256x256, which trained unstably) with 5,000 warmup steps, gradient clipping at 1, batch 64, EMA
0.9999, random flips, T = 1000 linear betas 1e-4..0.02, sampling variance beta_tilde_t, 0.5M steps.
bfloat16 compute (the official code computes in float32).

The data is a folder of the 30,000 CelebA-HQ images (any size >= 256, e.g. the 1024x1024 PNGs or a
256x256 export); tfds's `celeb_a_hq` needs a manual download and conversion, so the folder route is the
default (docs/data.md). On a TPU v4-32 pod slice (4 hosts; each needs the folder, or all share it):
    launch/create_vm.sh --accelerator=v4-32 --spot
    launch/setup_vm.sh --worker=all
    launch/train.sh --worker=all --config=configs/celebahq256.py --workdir=gs://BUCKET/runs/celebahq256 \
        -- --config.data.data_dir=/data/celebahq
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.get_config()
    c.data.dataset = "folder"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.random_flip = True
    c.data.shuffle_buffer = 50_000  # as the official input pipeline
    c.model.ch = 128
    c.model.ch_mult = (1, 1, 2, 2, 4, 4)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_schedule = "linear"
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    # The official 256x256 scripts sample with diffusion_utils.GaussianDiffusion, whose reverse variance
    # is the posterior's beta_tilde_t; the CIFAR-10 script (diffusion_utils_2) uses beta_t.
    c.diffusion.variance = "fixedsmall"
    c.optim.learning_rate = 2e-5
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.9999
    c.training.batch_size = 64
    c.training.num_train_steps = 500_000
    c.training.num_sample_images = 16  # 1000 steps of a 256x256 U-Net: keep the in-loop grid small
    return c
