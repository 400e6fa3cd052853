"""Denoising networks."""
from ddpm_jax.models.unet import UNet, unet_from_config

__all__ = ["UNet", "unet_from_config"]
