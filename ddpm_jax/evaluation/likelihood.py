"""Bits/dim by the DDPM variational bound (Ho et al. 2020, Eq. 5; the official `calc_bpd_loop`), or by
the probability-flow ODE (Song et al. 2021, Sec. 4.3 and Appendix D.2): `ode_bpd`.

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

from ddpm_jax import diffusion, ode, sampling

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


# ----------------------------------------------------------------------------------------------
# The probability-flow ODE (Song et al. 2021, Eq. 13 and Appendix D.2), in the variance-exploding
# coordinates x_ve = x_t / sqrt(abar) and u = log sigma, sigma = sqrt((1 - abar) / abar), where it is
# EDM's ODE (Karras et al. 2022, Sec. 2 with sigma(t) = t): dx_ve/du = sigma eps_hat = x_ve - D(x_ve; sigma)
# (`sampling.denoised`). Along it, d log p_u(x_ve(u))/du = -div f, so integrating data -> noise
#     log p_0(y) = log N(x_ve(u_1); 0, (1 + sigma_1^2) I) + int_{u_0}^{u_1} div f du.

# -log2 of a bin's width (2/255) per dimension: uniform dequantisation's offset.
DEQUANTIZATION_BITS = math.log2(1.0 / (2.0 * diffusion.BIN))


def _divergence(fn, x: jax.Array, probe: jax.Array | None):
    """(fn(x), div fn per example `[B]`) for fn acting on each example of `[B, ...]` alone: Hutchinson's
    estimate probe^T J probe (one forward-mode product) or, with `probe` None, the exact trace (one
    product per dimension; for small images)."""
    axes = tuple(range(1, x.ndim))
    if probe is not None:
        out, jv = jax.jvp(fn, (x,), (probe,))
        return out, jnp.sum(probe * jv, axis=axes)
    basis = jnp.eye(math.prod(x.shape[1:]), dtype=x.dtype).reshape((-1, 1) + x.shape[1:])
    outs, diag = jax.vmap(lambda e: jax.jvp(fn, (x,), (jnp.broadcast_to(e, x.shape),)))(basis)
    return outs[0], jnp.sum(basis * diag, axis=tuple(range(2, x.ndim + 1))).sum(0)


def ode_log_likelihood(s: Schedule, kind: str, model_fn: diffusion.ModelFn, y: jax.Array, probe: jax.Array | None,
                       *, variance: str = "fixedlarge", sigma_min: float = 0.0, rtol: float = 1e-5,
                       atol: float = 1e-5, max_steps: int = 2000) -> dict:
    """log p(y) in nats `[B]` of the model's probability-flow ODE for points y `[B, ...]` at noise level
    `sigma_min` (0: the model's smallest, timestep 0's, `s.model_log_sigma[0]`; below it the model is
    told timestep 0), integrated to its largest level and the prior N(0, I) of x_T there. `probe`
    `[B, ...]`: Hutchinson's (e.g. Rademacher) vectors, one per example for the whole path; None: the
    exact divergence. Also 'evals' (of f) and 'converged'. The network's x_0 is used unclipped (the
    ODE needs the smooth map).
    """
    opts = sampling.StepOptions(variance=variance, clip_x0=False, threshold="none")
    u0 = s.model_log_sigma[0] if not sigma_min else jnp.log(jnp.float32(sigma_min))
    u1 = s.model_log_sigma[-1]

    def f(state, u):
        drift = lambda x: x - sampling.denoised(s, kind, model_fn, x, jnp.exp(u), opts)
        return _divergence(drift, state[0], probe)

    (x1, delta), evals, done = ode.dormand_prince(f, (y, jnp.zeros(y.shape[0], jnp.float32)), u0, u1, rtol=rtol,
                                                  atol=atol, max_steps=max_steps)
    var1 = 1.0 + jnp.exp(2.0 * u1)  # of x_ve at sigma_1 when x_T ~ N(0, I)
    dims = math.prod(y.shape[1:])
    prior = -0.5 * (jnp.sum(x1 ** 2, axis=tuple(range(1, y.ndim))) / var1 + dims * jnp.log(2 * math.pi * var1))
    return {"log_p": prior + delta, "evals": evals, "converged": done}


def ode_bpd(s: Schedule, kind: str, model_fn: diffusion.ModelFn, x0: jax.Array, key: jax.Array, *,
            variance: str = "fixedlarge", sigma_min: float = 0.0, rtol: float = 1e-5, atol: float = 1e-5,
            max_steps: int = 2000) -> dict:
    """Bits/dim `[B]` ('total') of x_0 `[B, ...]` on the 256-level grid by the probability-flow ODE:
    uniform dequantisation y = x_0 + U(-1/255, 1/255) (key 0 of `key`), Hutchinson's estimate with a
    Rademacher probe (key 1), then -log p(y) / (D log 2) + log2(255 / 2). In expectation over both, an
    upper bound on the model's negative log-likelihood of the 8-bit data (Jensen; Song et al. 2021,
    Appendix D.2, with bins of 2/255). It is loose on data of few levels: a density smoothed at
    sigma_min puts much of its mass outside the bins. 'total' is NaN where the solver did not reach
    the end. `sigma_min`: as `ode_log_likelihood`."""
    y = x0 + jax.random.uniform(jax.random.fold_in(key, 0), x0.shape, jnp.float32, -diffusion.BIN, diffusion.BIN)
    probe = jax.random.rademacher(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
    out = ode_log_likelihood(s, kind, model_fn, y, probe, variance=variance, sigma_min=sigma_min, rtol=rtol,
                             atol=atol, max_steps=max_steps)
    total = -out["log_p"] / (math.prod(x0.shape[1:]) * math.log(2.0)) + DEQUANTIZATION_BITS
    return {"total": jnp.where(out["converged"], total, jnp.nan), "evals": out["evals"],
            "converged": out["converged"]}
