"""Bits/dim by the DDPM variational bound (Ho et al. 2020, Eq. 5; the official `calc_bpd_loop`).

For data x_0 on the 256-level grid in [-1, 1] (bin width 2/255), with paper timesteps t = 1..T
(zero-based index i = t - 1 here):
    -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                              `prior_bpd`
    L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))         `vb_terms_bpd`, i >= 1
    L_0     = E_q -log p(x_0 | x_1), a discretised Gaussian decoder    `vb_terms_bpd`, i = 0
each averaged over pixels and divided by log 2. The expectation over x_t is one sample of q per term
(unbiased; the bound holds in expectation).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion

# The Gaussian KL and the discretised decoder live with the training loss that also uses them.
from ddpm_jax.diffusion import (  # noqa: F401
    BIN,
    Schedule,
    discretized_gaussian_log_likelihood,
    log_normal_interval,
    mean_flat,
    normal_kl,
)


def prior_bpd(s: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim. `[B]`."""
    t = jnp.full((x0.shape[0],), s.num_timesteps - 1, jnp.int32)
    mean = diffusion.extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
    log_var = jnp.log(diffusion.extract(1.0 - s.alphas_cumprod, t, x0.shape))
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(s: Schedule, kind: str, out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, *,
                 variance: str = "fixedlarge", clip_x0: bool = True) -> jax.Array:
    """The bound's term at index t (paper t+1) for the network output `out` at x_t, bits/dim `[B]`:
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1, -log p(x_0 | x_1) for t = 0
    (`diffusion.vb_terms` / log 2). With variance 'learned_range' `out` has 2C channels and p's
    variance is the learned one (`diffusion.p_mean_variance`)."""
    return diffusion.vb_terms(s, kind, out, x0, x_t, t, variance=variance, clip_x0=clip_x0) / math.log(2.0)


def bpd(s: Schedule, kind: str, model_fn: diffusion.ModelFn, x0: jax.Array, key: jax.Array, *,
        variance: str = "fixedlarge", clip_x0: bool = True) -> dict:
    """The full bound for a batch x_0 `[B, ...]` on the 256-level grid, every timestep in one `lax.map`.

    Returns bits/dim: 'total' `[B]` = 'prior' `[B]` + sum over t of 'terms' `[B, T]` ('terms'[:, 0]
    is the decoder L_0, 'terms'[:, t] the KL L_t of the paper's step t+1). Term t uses the noise
    `normal(fold_in(key, t))`. `s` must be the full (not respaced) schedule of the model.
    """
    def term(i):
        t = jnp.full((x0.shape[0],), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, jnp.float32)
        x_t = diffusion.q_sample(s, x0, t, noise)
        out = model_fn(x_t, s.timesteps[t])
        return vb_terms_bpd(s, kind, out, x0, x_t, t, variance=variance, clip_x0=clip_x0)

    terms = jax.lax.map(term, jnp.arange(s.num_timesteps)).T
    prior = prior_bpd(s, x0)
    return {"total": prior + terms.sum(axis=1), "prior": prior, "terms": terms}
