"""Super-resolution 16x16 -> 32x32 on the offline `shapes` scenes, text-conditioned (SR3 / Imagen).

The U-Net generates the 32x32 scene from pure noise (SR3), predicting v, given its caption and the
scene area-downsampled to 16x16, resized back bicubically and concatenated to x_t; in training the
16x16 input is noised to a random level in [0, 0.3] (noise-conditioning augmentation,
`ddpm_jax.superres`), at sampling to `sampling.aug_level`. 3,000 steps of 32: 40 minutes on the idle
2-core CPU. It is the second stage of the cascade after configs/shapes_t2i.py, where it redraws the
base model's wrong shapes from the caption (shape 94.6% against 83.4% for bicubic upsampling; with
levels up to 0.15 or 1,500 steps it kept them; docs/super_resolution.md):
    python -m ddpm_jax.main --config=configs/shapes_sr.py --workdir=runs/shapes_sr
    python -m ddpm_jax.sample --workdir=runs/shapes_sr --low_res=PNG_OR_DIR --prompt="a red circle" --aug_level=0
    python -m ddpm_jax.evaluate sr --workdir=runs/shapes_sr
    python -m ddpm_jax.cascade --stages=runs/shapes_t2i,runs/shapes_sr --prompt="a red circle above a blue square"
"""
from ddpm_jax.defaults import load_config_file


def get_config():
    c = load_config_file("shapes_t2i.py", relative_to=__file__)
    c.data.image_size = 32
    c.model.low_res_size = 16  # the base model's U-Net (ch 32, ch_mult (1, 2, 2), text at 8x8) at 32x32
    c.model.low_res_resize = "bicubic"
    # Levels up to 0.3 (abar 0.40 at the top; our reading: they hide a shape's outline, not its colour
    # and place, so the outline must come from the caption): in the cascade shape 94.2% vs 88.6% with
    # levels up to 0.15 (both 3,000 steps). On real inputs 29.9 dB (0.15, 1,500 steps: 26.4).
    c.diffusion.low_res_aug_max = 0.3
    # v-prediction: trained like this, the eps-predicting model failed from pure noise (PSNR 7 dB;
    # its x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) blows up its errors at high noise), the
    # v-predicting one reached 26.5 dB in the same 1,500 steps (docs/super_resolution.md).
    c.diffusion.model_output = "v"
    c.training.num_train_steps = 3000  # cascade shape 84.0 / 90.0 / 94.2% at 1,500 / 2,000 / 3,000
    c.training.sample_every = 0  # no in-training grid for super-resolution models
    c.sampling.steps = 25
    c.sampling.eta = 1.0  # as the base config; from noise 26.5 dB vs 25.9 at eta 0
    c.sampling.guidance = 0.0
    # The level at sampling, for the cascade (the base model's samples are not the data): at 0.2 its
    # relation rate is 90.6% against the base's 89.4% (0.1: 89.0%), on 1,000 other captions 92.4% at
    # both; shape and all correct alike (docs/super_resolution.md). Clean inputs: --aug_level=0 (31.6 dB;
    # 0.2: 25.9 dB).
    c.sampling.aug_level = 0.2
    c.sampling.sr_strength = 1.0  # SR3: from pure noise
    return c
