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
from jax.scipy.special import log_ndtr

from ddpm_jax import diffusion
from ddpm_jax.diffusion import Schedule

BIN = 1.0 / 255.0  # half the bin width on [-1, 1]


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis: `[B, ...]` -> `[B]`."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log1mexp(d):
    """log(1 - e^d) for d <= 0, accurate at both ends (Maechler 2012)."""
    return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)), jnp.log1p(-jnp.exp(d)))


def log_normal_interval(a, b):
    """log(Phi(b) - Phi(a)) for a < b, elementwise, without cancellation in either tail."""
    flip = a > 0  # both in the upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def discretized_gaussian_log_likelihood(x, mean, log_var):
    """log P(x) for x on the 256-level grid in [-1, 1] under N(mean, e^log_var) integrated over x's
    bin [x - 1/255, x + 1/255]; the end bins extend to -inf and +inf. Elementwise, in nats.

    Uses the exact normal CDF (the official code uses a tanh approximation and clips at 1e-12).
    """
    inv_std = jnp.exp(-0.5 * log_var)
    lower, upper = (x - BIN - mean) * inv_std, (x + BIN - mean) * inv_std
    return jnp.where(x < -1.0 + 1e-3, log_ndtr(upper),
                     jnp.where(x > 1.0 - 1e-3, log_ndtr(-lower), log_normal_interval(lower, upper)))


def prior_bpd(s: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim. `[B]`."""
    t = jnp.full((x0.shape[0],), s.num_timesteps - 1, jnp.int32)
    mean = diffusion.extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
    log_var = jnp.log(diffusion.extract(1.0 - s.alphas_cumprod, t, x0.shape))
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(s: Schedule, kind: str, out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, *,
                 variance: str = "fixedlarge", clip_x0: bool = True) -> jax.Array:
    """The bound's term at index t (paper t+1) for the network output `out` at x_t, bits/dim `[B]`:
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1, -log p(x_0 | x_1) for t = 0."""
    true_mean, _, true_log_var = diffusion.q_posterior(s, x0, x_t, t)
    mean, log_var, _ = diffusion.p_mean_variance(s, kind, out, x_t, t, variance=variance, clip_x0=clip_x0)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, log_var))
    return jnp.where(t == 0, nll, kl) / math.log(2.0)


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
