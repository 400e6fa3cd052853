"""Text-to-image at 64x64 from a folder of captioned images, for accelerators: the base model of an
Imagen-like cascade, whose second stage is configs/sr_64_256.py. Unmeasured: no run of it has been
trained.

Imagen's recipe (Saharia et al. 2022) at a smaller size: the text is a frozen T5-XXL's token
embeddings (4096 wide, up to 128 tokens; `ddpm_jax.t5` reads the checkpoint you downloaded,
`python -m ddpm_jax.embed` writes them beside the captions), attended to at 32, 16 and 8 and pooled
into the timestep embedding; the text is dropped 10% of the time for classifier-free guidance, and
sampling thresholds x0 dynamically (the 99.5th percentile). The U-Net has the sizes of
guided-diffusion's ImageNet 64x64 model (Dhariwal & Nichol 2021: 192 channels, ch_mult (1, 2, 3, 4),
3 res blocks, attention at 32, 16 and 8, dropout 0.1, learned variances, cosine schedule) in this
project's DDPM blocks: 281M parameters with the text layers. It predicts v, as configs/shapes_t2i.py
(on the shapes the same model predicting eps never learned relations; docs/text_to_image.md).
    python -m ddpm_jax.embed --config=configs/t2i_64.py --config.data.data_dir=/data/captioned_images \\
        --config.model.text_encoder_path=/data/t5-v1_1-xxl
    python -m ddpm_jax.main --config=configs/t2i_64.py --workdir=runs/t2i_64 \\
        --config.data.data_dir=/data/captioned_images --config.model.text_encoder_path=/data/t5-v1_1-xxl
    python -m ddpm_jax.cascade --stages=runs/t2i_64,runs/sr_64_256 --prompt="a corgi in a red hat on a beach"
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.get_config()
    c.data.dataset = "folder"
    c.data.image_size = 64
    c.data.random_flip = False  # captions may say left or right
    c.data.max_text_len = 128  # as configs/sr_64_256.py: one `embed` serves both stages
    c.model.ch = 192
    c.model.ch_mult = (1, 2, 3, 4)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (32, 16, 8)
    c.model.dropout = 0.1
    c.model.dtype = "bfloat16"
    c.model.text_encoder = "precomputed"
    c.model.text_emb_dim = 4096  # T5-XXL's d_model
    c.model.text_encoder_dtype = "bfloat16"  # T5-XXL's float32 encoder (19 GB) in 9.5 GB on every device
    c.model.text_width = 512
    c.diffusion.beta_schedule = "cosine"
    c.diffusion.variance = "learned_range"
    c.diffusion.model_output = "v"
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 1000
    c.training.batch_size = 256
    c.training.num_train_steps = 500_000
    c.training.text_dropout = 0.1
    c.training.num_sample_images = 16
    c.sampling.sampler = "ddim"
    c.sampling.steps = 250
    c.sampling.eta = 1.0
    c.sampling.guidance = 4.0
    c.sampling.threshold = "dynamic"
    return c
