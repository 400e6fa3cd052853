"""The exact denoiser for Gaussian data: a model with a closed-form answer, for testing samplers.

For x_0 ~ N(mu, Sigma) (vectors of d pixels), x_t = a_t x_0 + s_t eps with a_t = sqrt(abar_t),
s_t = sqrt(1 - abar_t) is Gaussian with covariance C_t = a_t^2 Sigma + s_t^2 I, and eps, x_t are
jointly Gaussian with Cov(eps, x_t) = s_t I, so E[eps | x_t] = s_t C_t^{-1} (x_t - a_t mu).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import Schedule


def gaussian_eps_model(s: Schedule, mu: np.ndarray, Sigma: np.ndarray):
    """model_fn(x_t `[B, d]`, t `[B]`) -> E[eps | x_t], built in float64, evaluated in float32.

    `t` indexes `s.alphas_cumprod` of the full schedule whose model timesteps are `s.timesteps`;
    for a respaced schedule pass the original full schedule here.
    """
    abar = np.asarray(s.alphas_cumprod, np.float64)
    a, sd = np.sqrt(abar), np.sqrt(1 - abar)
    mu, Sigma = np.asarray(mu, np.float64), np.asarray(Sigma, np.float64)
    C_inv = np.linalg.inv(a[:, None, None] ** 2 * Sigma + sd[:, None, None] ** 2 * np.eye(len(mu)))
    W = jnp.asarray(sd[:, None, None] * C_inv, jnp.float32)
    a32, mu32 = jnp.asarray(a, jnp.float32), jnp.asarray(mu, jnp.float32)

    def model_fn(x_t, t):
        return jnp.einsum("bij,bj->bi", W[t], x_t - a32[t][:, None] * mu32)

    return model_fn
