"""Conditioning on a low-resolution image (SR3, Saharia et al. 2021; cascades, Ho et al. 2022).

A super-resolution model (`model.low_res_size` > 0) sees the low-resolution image resized to its
own size and concatenated to x_t on channels (`models.UNet.low_res_input`). Noise-conditioning
augmentation (Ho et al. 2022, Sec. 4.2; Imagen's "noise conditioning augmentation"): in training
the low-resolution image is noised by the forward process to a level s ~ U[0, diffusion.low_res_aug_max]
and s is embedded beside the timestep; at sampling s is fixed (`sampling.aug_level`), so the model
learns to correct the artefacts of a base model's samples rather than copy them.

The level s in [0, 1] is a position on the model's own forward process: abar(s) interpolates
linearly the table [1, abar_0, ..., abar_{T-1}] at s * T, so s = 0 leaves the image exactly as it is
and s = 1 is the last timestep's noise. The table is read from `Schedule.model_log_sigma` (abar =
1 / (1 + sigma^2)), which respaced sampling schedules keep in full, so training and sampling agree.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import Schedule

RESIZE_METHODS = ("bicubic", "nearest", "bilinear")
# Scale of the level passed to the sinusoidal embedding, so levels are spread like timesteps.
LEVEL_EMBEDDING_SCALE = 1000.0


def downsample(x: jax.Array, size: int) -> jax.Array:
    """Area (box-filter) downsampling `[B, H, W, C]` -> `[B, size, size, C]`; H must be a multiple
    of size (antialiased resize otherwise)."""
    B, H, W, C = x.shape
    if H % size == 0 and W % size == 0:
        return x.reshape(B, size, H // size, size, W // size, C).mean(axis=(2, 4))
    return jax.image.resize(x, (B, size, size, C), "linear", antialias=True)


def upsample(x: jax.Array, size: int, method: str = "bicubic") -> jax.Array:
    """`[B, h, w, C]` -> `[B, size, size, C]` with `method` (one of `RESIZE_METHODS`)."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), {"bicubic": "cubic"}.get(method, method))


def level_alpha_bar(s: Schedule, level: jax.Array) -> jax.Array:
    """abar at augmentation levels `[B]` in [0, 1] (see module doc)."""
    abar = jax.nn.sigmoid(-2.0 * s.model_log_sigma.astype(jnp.float32))  # 1 / (1 + sigma^2)
    table = jnp.concatenate([jnp.ones((1,), jnp.float32), abar])
    return jnp.interp(level * (table.shape[0] - 1), jnp.arange(table.shape[0], dtype=jnp.float32), table)


def augment(s: Schedule, low_res: jax.Array, level: jax.Array, noise: jax.Array) -> jax.Array:
    """q(z_s | low_res): sqrt(abar(s)) low_res + sqrt(1 - abar(s)) noise, per example; level 0 returns
    `low_res` exactly."""
    abar = level_alpha_bar(s, level).reshape((-1,) + (1,) * (low_res.ndim - 1))
    return jnp.sqrt(abar) * low_res + jnp.sqrt(1.0 - abar) * noise
