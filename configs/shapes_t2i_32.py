"""Text-to-image on `shapes` at the dataset's 32x32, for accelerators: a larger U-Net and text encoder.

The recipe of configs/shapes_t2i.py (byte tokens, a jointly trained text encoder, pooled text in the
timestep embedding, text keys/values in the attention at 16x16, 8x8 and the middle, 10% null text,
no flips) scaled up: ch 128, two blocks per level, a 4-block text encoder of width 256, batch 128,
30k steps, bfloat16 compute. Unmeasured until trained (docs/text_to_image.md):
    python -m ddpm_jax.main --config=configs/shapes_t2i_32.py --workdir=runs/shapes_t2i_32
    python -m ddpm_jax.evaluate shapes --workdir=runs/shapes_t2i_32
"""
from ddpm_jax.defaults import load_config_file


def get_config():
    c = load_config_file("shapes_t2i.py", relative_to=__file__)
    c.data.image_size = 32
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16, 8)
    c.model.dropout = 0.1
    c.model.dtype = "bfloat16"
    c.model.text_width = 256
    c.model.text_depth = 4
    c.model.text_heads = 4
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 1000
    c.optim.ema_decay = 0.9999
    c.training.batch_size = 128
    c.training.num_train_steps = 30_000
    c.training.checkpoint_every = 2500
    c.training.log_every = 100
    c.training.sample_every = 5000
    c.eval.num_samples = 1000
    return c
