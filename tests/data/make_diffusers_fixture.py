"""Regenerate the tiny diffusers DDPM fixture in this folder (tests/data/).

Run with a separate virtualenv that has the reference implementation (diffusers + PyTorch), never
from the test suite:

    python3 -m venv /tmp/t5ref
    /tmp/t5ref/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu   # or any CPU-only torch wheel
    /tmp/t5ref/bin/pip install diffusers safetensors numpy
    /tmp/t5ref/bin/python tests/data/make_diffusers_fixture.py

It writes `ddpm_tiny/`, a UNet2DModel in the layout of Ho et al.'s released DDPMs (google/ddpm-cifar10-32's
config keys and values, smaller), with random float16 weights and its scheduler_config.json, the
folder google/ddpm-* checkpoints come in; `ddpm_tiny_adm/`, one with Improved DDPM / ADM's options
(diffusers' default timestep embedding and GroupNorm epsilon, 2 attention heads, scale-shift norm,
residual up/downsampling) and 5 class embeddings;
and `diffusers_reference.npz`, their outputs on fixed inputs computed by diffusers in float32.
Nothing is downloaded.
With a second argument, a folder written by `python -m ddpm_jax.convert to_diffusers`, it instead
loads that folder in diffusers and prints how far its output is from ddpm_jax's (saved there as
`check.npz` by the caller), a by-hand check of the export.
"""

import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "ddpm_tiny")
COND_DIR = os.path.join(HERE, "ddpm_tiny_adm")
NPZ = os.path.join(HERE, "diffusers_reference.npz")


def randomized(model, g):
    """`model` with GroupNorm scales away from 1 and biases away from 0 (a swap or a miss shows), its
    weights float16-exact so that the float16 file holds exactly the model the reference ran."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())
    return model.eval()


def make():
    torch.manual_seed(0)
    ho = dict(in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=32, norm_eps=1e-6,
              attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)
    # ddpm_jax config: ch 32, ch_mult (1, 1), 1 block per level, attention at 8x8 (level 0), image 8x8.
    model = UNet2DModel(sample_size=8, block_out_channels=(32, 32), down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D"), **ho)
    # ddpm_jax config: the same U-Net with Nichol & Dhariwal's options (model.time_embedding='adm', norm_eps
    # 1e-5, attn_head_dim 16, scale_shift_norm, resblock_updown) and 4 classes (5 embeddings: the null class
    # last); attention at 4x4 (level 1). The mid attention's GroupNorm needs attn_norm_num_groups=32 here.
    adm = dict(ho, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, attention_head_dim=16)
    cond = UNet2DModel(sample_size=8, block_out_channels=(32, 32),
                       down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=5,
                       resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, downsample_type="resnet",
                       upsample_type="resnet", **adm)
    g = torch.Generator().manual_seed(1234)
    randomized(model, g)
    randomized(cond, g)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([2, 4, 0])
    with torch.no_grad():
        out = model(x, t).sample.numpy()
        out_cond = cond(x, t, class_labels=y).sample.numpy()
    model.half().save_pretrained(MODEL_DIR, safe_serialization=True)
    cond.half().save_pretrained(COND_DIR, safe_serialization=True)
    for folder in (MODEL_DIR, COND_DIR):
        DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      variance_type="fixed_small", clip_sample=True).save_pretrained(folder)
    nhwc = lambda a: a.transpose(0, 2, 3, 1)
    np.savez(NPZ, x=nhwc(x.numpy()), t=t.numpy().astype(np.int32), eps=nhwc(out), labels=y.numpy().astype(np.int32),
             eps_cond=nhwc(out_cond))
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}: wrote {MODEL_DIR}, {COND_DIR} and {NPZ}")


def check(folder):
    """diffusers' output of an exported folder on the inputs its `check.npz` holds (`x`, `t`, and
    `labels` for a class-conditional run), beside ddpm_jax's (`eps`)."""
    data = np.load(os.path.join(folder, "check.npz"))
    model = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    with torch.no_grad():
        labels = torch.from_numpy(data["labels"]) if "labels" in data else None  # class-conditional runs
        out = model(torch.from_numpy(data["x"].transpose(0, 3, 1, 2)), torch.from_numpy(data["t"]),
                    class_labels=labels).sample
    diff = np.abs(out.numpy().transpose(0, 2, 3, 1) - data["eps"]).max()
    print(f"{folder}: max |diffusers - ddpm_jax| = {diff:.3g} (output scale {np.abs(data['eps']).mean():.3g}); "
          f"params {sum(p.numel() for p in model.parameters()):,}; scheduler {scheduler.config.beta_schedule}, "
          f"{scheduler.config.num_train_timesteps} steps, {scheduler.config.variance_type}, "
          f"{scheduler.config.prediction_type}")


if __name__ == "__main__":
    check(sys.argv[1]) if len(sys.argv) > 1 else make()
