"""The DDPM diffusion process (Ho et al. 2020): schedules, q, posterior, loss and the reverse step.

Pure functions of arrays; no Flax. Every schedule quantity is computed once in float64 with numpy
and stored as float32. Shapes: images `x` are `[B, ...]`, timesteps `t` are int `[B]`.

Paper equation -> function:
  Eq. 4   q(x_t | x_0)                      `q_sample`
  Eq. 6-7 q(x_{t-1} | x_t, x_0)              `q_posterior`
  Eq. 11  mu_theta from eps_theta            `p_mean_variance` (via `predict_x0`)
  Eq. 14  L_simple                           `l_simple` (weighted per timestep: `loss_weight`)
  Alg. 2  one ancestral step                 `p_sample` (the loop: `sampling.generate`)
  Eq. 5   L_{t-1} and L_0 of the bound        `vb_terms` (also `evaluation.likelihood`)
Nichol & Dhariwal 2021:
  Eq. 15  learned variance interpolation     `p_mean_variance(variance='learned_range')`
  Eq. 16  L_hybrid = L_simple + lambda L_vlb `training_loss`
Saharia et al. 2022 (Imagen), dynamic thresholding of x_0: `threshold_x0`.
Hang et al. 2023, Min-SNR-gamma loss weighting: `loss_weight`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

MODEL_OUTPUTS = ("eps", "x0", "v")
VARIANCES = ("fixedlarge", "fixedsmall", "learned_range")
BETA_SCHEDULES = ("linear", "cosine")
LOSS_WEIGHTINGS = ("none", "min_snr")
THRESHOLDS = ("none", "clip", "dynamic")  # and "auto": as clip_x0 says (`x0_method`)
TIMESTEP_SPACINGS = ("even", "trailing")  # `respaced_timesteps`


# ----------------------------------------------------------------------------------------------
# Schedules.


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.: betas linear in t. Returns float64 `[T]`."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, Eq. 17: alphas_cumprod = cos^2(((t/T + s)/(1 + s)) pi/2), betas <= 0.999."""
    f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    t = np.arange(num_timesteps + 1, dtype=np.float64)
    return np.minimum(1 - f(t[1:]) / f(t[:-1]), max_beta)


def get_betas(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_timesteps, beta_start, beta_end)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"diffusion.beta_schedule={name!r}: must be one of {BETA_SCHEDULES}.")


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Sec. 3.1 (their Algorithm 1): sqrt(abar_t) shifted so that its last value is 0
    (x_T is pure noise, SNR 0, as sampling assumes) and scaled so that its first stays; the betas of
    that, the last one 1. float64 `[T]`."""
    r = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    r = (r - r[-1]) * r[0] / (r[0] - r[-1])
    abar = r * r
    return 1.0 - np.append(abar[0], abar[1:] / abar[:-1])


# Samplers that step in finite log-SNR or sigma (DPM-Solver++, Heun, the probability-flow ODE) start
# at sigma_T, infinite with zero terminal SNR; these step on the schedule's own levels.
ZERO_SNR_SAMPLERS = ("ancestral", "ddim")


class Schedule(NamedTuple):
    """All per-timestep constants, float32 `[T]` each (a pytree, so it can be passed through jit).

    `timesteps[i]` is the timestep the model is told for step i: `arange(T)` for the full schedule,
    the kept original timesteps for a respaced one.

    `model_t` and `model_log_sigma` (float32 `[K]`, not `[S]`) are the model's own timesteps and
    log sigma_t = log sqrt((1 - abar_t)/abar_t) at each, increasing: the table on which samplers in
    continuous noise levels (`sampling.heun_step`) interpolate the timestep to tell the model. For
    the full schedule K = T; a respaced one keeps the full table when made with `model_betas`
    (as `schedule_from_config` does), else it has only its own S levels.
    """

    timesteps: jax.Array
    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    model_t: jax.Array
    model_log_sigma: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(betas: np.ndarray, timesteps: np.ndarray | None = None,
                  model_betas: np.ndarray | None = None) -> Schedule:
    """Derives every schedule quantity from `betas` in float64, then stores float32.

    timesteps: the model timesteps of a respaced chain (default `arange(S)`); model_betas: the
    model's own (full) betas, for the `model_t`/`model_log_sigma` table (default: this chain's).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must be a 1-d array with values in (0, 1].")
    alphas_cumprod = np.cumprod(1.0 - betas)
    if model_betas is None:
        model_t = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
        model_abar = alphas_cumprod
    else:
        model_abar = np.cumprod(1.0 - np.asarray(model_betas, np.float64))
        model_t = np.arange(len(model_abar))
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    with np.errstate(divide="ignore"):  # zero terminal SNR: 1/abar_T and log sigma_T are inf
        q = dict(
            timesteps=np.arange(len(betas)) if timesteps is None else np.asarray(timesteps),
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            # beta_tilde_0 = 0, so its log is clipped to the value at t=1 (as in the official code); a
            # chain of one step has none: beta_0 then.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1] if len(betas) > 1 else betas[0],
                                                            posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            model_t=model_t,
            model_log_sigma=0.5 * (np.log1p(-model_abar) - np.log(model_abar)),
        )
    return Schedule(**{
        k: jnp.asarray(v, jnp.int32 if k == "timesteps" else jnp.float32) for k, v in q.items()})


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """Nichol & Dhariwal's respacing: betas of the sub-chain that visits only `use_timesteps`.

    beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}} keeps abar at every kept step, so q(x_t | x_0) is
    unchanged there. Returns (float64 betas `[S]`, int timesteps `[S]`).
    """
    use_timesteps = np.unique(np.asarray(use_timesteps, dtype=np.int64))
    if use_timesteps[0] < 0 or use_timesteps[-1] >= len(betas):
        raise ValueError(f"timesteps must lie in [0, {len(betas) - 1}].")
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))[use_timesteps]
    return 1.0 - abar / np.append(1.0, abar[:-1]), use_timesteps


def even_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` timesteps spread evenly over [0, T-1], always including both ends."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps={num_steps}: must be between 1 and num_timesteps={num_timesteps}.")
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64))


def trailing_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """'Trailing' spacing (Lin et al. 2024, Sec. 3.3): round(j T / N) - 1 for j = 1..N
    (halves rounded up), so the last step starts at T - 1 and the first at T/N - 1; the steps between
    0 and the clean image are as long as the others. The timesteps of N steps are every other one of
    2N's (j T / N = 2j T / 2N), the nested grids of progressive distillation (`distillation`)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps={num_steps}: must be between 1 and num_timesteps={num_timesteps}.")
    j = np.arange(1, num_steps + 1, dtype=np.int64)
    return (2 * j * num_timesteps + num_steps) // (2 * num_steps) - 1


def respaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "even") -> np.ndarray:
    """The timesteps a chain of `num_steps` steps visits: `even_timesteps` or `trailing_timesteps`."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r}: must be one of {TIMESTEP_SPACINGS}.")
    return (even_timesteps if spacing == "even" else trailing_timesteps)(num_timesteps, num_steps)


def schedule_from_config(diffusion_config, num_steps: int | None = None, spacing: str = "even") -> Schedule:
    """The config's schedule (with `zero_terminal_snr`, rescaled so); respaced to `num_steps` timesteps
    when given, spaced as `spacing` says (`respaced_timesteps`)."""
    c = diffusion_config
    betas = get_betas(c.beta_schedule, c.num_timesteps, c.beta_start, c.beta_end)
    if c.zero_terminal_snr:
        betas = zero_terminal_snr(betas)
    if num_steps is None or num_steps == c.num_timesteps:
        return make_schedule(betas)
    use = respaced_timesteps(c.num_timesteps, num_steps, spacing)
    return make_schedule(*respace_betas(betas, use), model_betas=betas)


def extract(a: jax.Array, t: jax.Array, x_shape) -> jax.Array:
    """a[t] for a batch of timesteps, reshaped `[B, 1, ..., 1]` to broadcast against `x_shape`."""
    return jnp.take(a, t, axis=0).reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


# ----------------------------------------------------------------------------------------------
# Forward process and posterior.


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_posterior(s: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """Eq. 6-7: mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    mean = (extract(s.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(s.posterior_mean_coef2, t, x_t.shape) * x_t)
    return (mean, extract(s.posterior_variance, t, x_t.shape),
            extract(s.posterior_log_variance_clipped, t, x_t.shape))


# ----------------------------------------------------------------------------------------------
# Parameterisations: the network predicts eps (the paper), x_0, or v = sqrt(abar) eps - sqrt(1-abar) x_0.


def _check_model_output(kind: str):
    if kind not in MODEL_OUTPUTS:
        raise ValueError(f"diffusion.model_output={kind!r}: must be one of {MODEL_OUTPUTS}.")


def predict_x0(s: Schedule, kind: str, out: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """x_0 implied by the network output `out` of parameterisation `kind`."""
    _check_model_output(kind)
    if kind == "eps":
        return (extract(s.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * out)
    if kind == "x0":
        return out
    return (extract(s.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * out)


def predict_eps(s: Schedule, kind: str, out: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """eps implied by the network output `out` of parameterisation `kind`."""
    _check_model_output(kind)
    if kind == "eps":
        return out
    if kind == "x0":  # (x_t - sqrt(abar) x0) / sqrt(1 - abar): finite at zero terminal SNR, where abar = 0
        return ((x_t - extract(s.sqrt_alphas_cumprod, t, x_t.shape) * out)
                / extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape))
    return (extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
            + extract(s.sqrt_alphas_cumprod, t, x_t.shape) * out)


def predict_x0_at(kind: str, out: jax.Array, x_t: jax.Array, alpha, sigma) -> jax.Array:
    """`predict_x0` at any noise level x_t = alpha x_0 + sigma eps (alpha, sigma broadcastable to x_t),
    for samplers between the discrete timesteps."""
    _check_model_output(kind)
    if kind == "eps":
        return (x_t - sigma * out) / alpha
    if kind == "x0":
        return out
    return alpha * x_t - sigma * out


def model_target(s: Schedule, kind: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What a network of parameterisation `kind` is trained to output."""
    _check_model_output(kind)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    return (extract(s.sqrt_alphas_cumprod, t, x0.shape) * noise
            - extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)


def model_output_from_eps(s: Schedule, kind: str, eps: jax.Array, x_t: jax.Array, t: jax.Array):
    """Inverse of `predict_eps`: the output of parameterisation `kind` that implies `eps`."""
    x0 = predict_x0(s, "eps", eps, x_t, t)
    return model_target(s, kind, x0, eps, t)


# ----------------------------------------------------------------------------------------------
# Learned variances (Nichol & Dhariwal 2021) and x_0 thresholding (Saharia et al. 2022).


def split_output(out: jax.Array, variance: str) -> tuple[jax.Array, jax.Array | None]:
    """(the parameterisation's output `[B, ..., C]`, the variance interpolation v `[B, ..., C]` or None).

    With variance 'learned_range' the network outputs 2C channels (Nichol & Dhariwal 2021, Sec. 3.1):
    the first C are the output of `kind` (eps, x0 or v), the last C the raw variance output r
    (`p_mean_variance`; unconstrained, r = -1 and +1 give beta_tilde and beta). With a fixed variance
    it outputs C channels, returned as they are.
    """
    if variance != "learned_range":
        return out, None
    if out.shape[-1] % 2:
        raise ValueError(f"diffusion.variance='learned_range' needs a network with twice the image channels; "
                         f"this one outputs {out.shape[-1]}.")
    mean_out, v = jnp.split(out, 2, axis=-1)
    return mean_out, v


def x0_method(clip_x0: bool = True, threshold: str = "auto") -> str:
    """How x_0 predictions are kept in range: `threshold`, or for 'auto' 'clip' if `clip_x0` else 'none'
    (`diffusion.clip_x0` means 'clip')."""
    method = ("clip" if clip_x0 else "none") if threshold == "auto" else threshold
    if method not in THRESHOLDS:
        raise ValueError(f"sampling.threshold={method!r}: must be one of {('auto',) + THRESHOLDS}.")
    return method


def threshold_x0(x0: jax.Array, method: str = "clip", percentile: float = 0.995) -> jax.Array:
    """x_0 predictions `[B, ...]` kept in [-1, 1].

    'none': unchanged. 'clip': clip(x0, -1, 1). 'dynamic' (Saharia et al. 2022, Imagen, Sec. 2.3):
    s = max(1, the `percentile` quantile of |x0| over each example's pixels, linearly interpolated
    as `np.quantile`), x0 = clip(x0, -s, s) / s; examples with s = 1 are just clipped.
    """
    if method == "none":
        return x0
    if method == "clip":
        return jnp.clip(x0, -1.0, 1.0)
    if method == "dynamic":
        q = jnp.quantile(jnp.abs(x0).reshape(x0.shape[0], -1), percentile, axis=1)
        s = jnp.maximum(q, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s
    raise ValueError(f"sampling.threshold={method!r}: must be one of {THRESHOLDS}.")


# ----------------------------------------------------------------------------------------------
# The variational bound's terms (Ho et al. Eq. 5), in nats; `evaluation.likelihood` has bits/dim.

BIN = 1.0 / 255.0  # half the bin width of 8-bit data on [-1, 1]


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


def vb_terms(s: Schedule, kind: str, out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, *,
             variance: str = "fixedlarge", clip_x0: bool = True) -> jax.Array:
    """The bound's term at index t (paper t+1) for the network output `out` at x_t, nats/dim `[B]`:
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1, -log p(x_0 | x_1) for t = 0 (x_0 on
    the 256-level grid)."""
    true_mean, _, true_log_var = q_posterior(s, x0, x_t, t)
    mean, log_var, _ = p_mean_variance(s, kind, out, x_t, t, variance=variance, clip_x0=clip_x0)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, log_var))
    return jnp.where(t == 0, nll, kl)


# ----------------------------------------------------------------------------------------------
# Training loss.


def l_simple(s: Schedule, kind: str, out: jax.Array, x0: jax.Array, noise: jax.Array,
             t: jax.Array) -> jax.Array:
    """Eq. 14: squared error of the network output against its target, mean over pixels. `[B]`."""
    err = jnp.square(out.astype(jnp.float32) - model_target(s, kind, x0, noise, t))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def loss_weight(s: Schedule, kind: str, t: jax.Array, weighting: str = "none", gamma: float = 5.0) -> jax.Array:
    """The weight `[B]` of each example's L_simple term.

    'none': 1, the paper's L_simple for every parameterisation. 'min_snr' (Hang et al. 2023, Min-SNR-gamma):
    the error in x_0 weighted by min(SNR_t, gamma), SNR_t = abar_t / (1 - abar_t), written for the
    network's target: since |eps - eps_hat|^2 = SNR_t |x_0 - x0_hat|^2 and |v - v_hat|^2 = (SNR_t + 1)
    |x_0 - x0_hat|^2, the weight is min(SNR_t, gamma) / SNR_t for eps, min(SNR_t, gamma) for x0 and
    min(SNR_t, gamma) / (SNR_t + 1) for v.
    """
    _check_model_output(kind)
    if weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"diffusion.loss_weighting={weighting!r}: must be one of {LOSS_WEIGHTINGS}.")
    abar = jnp.take(s.alphas_cumprod, t)
    snr = abar / (1.0 - abar)
    weight = jnp.minimum(snr, gamma)
    return {"eps": weight / snr, "x0": weight, "v": weight / (snr + 1.0)}[kind]


def training_loss(s: Schedule, kind: str, out: jax.Array, x0: jax.Array, x_t: jax.Array, noise: jax.Array,
                  t: jax.Array, *, variance: str = "fixedlarge", vlb_weight: float = 0.001,
                  weighting: str = "none", gamma: float = 5.0) -> jax.Array:
    """The per-example training loss `[B]` for the network output `out` at x_t = q_sample(x0, t, noise).

    Fixed variances: L_simple (Eq. 14), each example's term times `loss_weight(weighting, gamma)`.
    'learned_range': Nichol & Dhariwal's L_hybrid = L_simple + lambda L_vlb (their Eq. 16), lambda =
    `vlb_weight`, where L_vlb = T L_t is the one-timestep estimate of L_0 + ... + L_{T-1} (L_T has no
    parameters) in bits/dim, as in the authors' code (at T = 1000 lambda T L_t is their `vb` term).
    L_vlb sees the mean output through a stop-gradient, so it trains only the variance half and the
    (weighted) L_simple only the mean half; no x_0 clipping. L_vlb is never reweighted: it is the bound.
    """
    weight = loss_weight(s, kind, t, weighting, gamma)
    if variance != "learned_range":
        return weight * l_simple(s, kind, out, x0, noise, t)
    mean_out, v = split_output(out.astype(jnp.float32), variance)
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), v], axis=-1)
    l_vlb = s.num_timesteps * vb_terms(s, kind, frozen, x0, x_t, t, variance=variance, clip_x0=False)
    return weight * l_simple(s, kind, mean_out, x0, noise, t) + vlb_weight * l_vlb / math.log(2.0)


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """t ~ Uniform{0, ..., T-1} (the paper's 1..T, zero-based). `[B]` int32."""
    return jax.random.randint(key, (batch_size,), 0, num_timesteps)


# ----------------------------------------------------------------------------------------------
# Reverse process.


def p_mean_variance(s: Schedule, kind: str, out: jax.Array, x_t: jax.Array, t: jax.Array, *,
                    variance: str = "fixedlarge", clip_x0: bool = True, threshold: str = "auto",
                    percentile: float = 0.995):
    """Mean and log variance of p(x_{t-1} | x_t) given the network output; also the x_0 estimate.

    variance: 'fixedlarge' sigma_t^2 = beta_t (the paper's CIFAR-10 choice; at t=0 the posterior
    variance, as in the official code), 'fixedsmall' sigma_t^2 = beta_tilde_t, or 'learned_range'
    (Nichol & Dhariwal 2021, Eq. 15): `out` has 2C channels, the last C a raw output r and
    log sigma_t^2 = v log beta_t + (1 - v) log beta_tilde_t with v = (r + 1)/2 (beta_tilde_0 = 0 is
    clipped to beta_tilde_1, as in their code). On a respaced schedule beta and beta_tilde are the
    respaced chain's. The x_0 estimate is treated by `threshold_x0(x0_method(clip_x0, threshold))`.
    """
    out, v = split_output(out.astype(jnp.float32), variance)
    if variance == "fixedlarge":
        log_var = extract(jnp.log(jnp.append(s.posterior_variance[1], s.betas[1:])), t, x_t.shape)
    elif variance == "fixedsmall":
        log_var = extract(s.posterior_log_variance_clipped, t, x_t.shape)
    elif variance == "learned_range":
        frac = (v + 1.0) / 2.0
        log_var = (frac * extract(jnp.log(s.betas), t, x_t.shape)
                   + (1.0 - frac) * extract(s.posterior_log_variance_clipped, t, x_t.shape))
    else:
        raise ValueError(f"diffusion.variance={variance!r}: must be one of {VARIANCES}.")
    x0 = threshold_x0(predict_x0(s, kind, out, x_t, t), x0_method(clip_x0, threshold), percentile)
    mean, _, _ = q_posterior(s, x0, x_t, t)
    return mean, log_var, x0


ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], model timesteps [B]) -> out


def p_sample(s: Schedule, kind: str, model_fn: ModelFn, x_t: jax.Array, i: jax.Array,
             noise: jax.Array, *, variance: str = "fixedlarge", clip_x0: bool = True,
             threshold: str = "auto", percentile: float = 0.995):
    """One ancestral step (Alg. 2) from schedule index `i` (a scalar): returns (x_{i-1}, x0_hat)."""
    t = jnp.full((x_t.shape[0],), i, jnp.int32)
    out = model_fn(x_t, s.timesteps[t])
    mean, log_var, x0 = p_mean_variance(s, kind, out, x_t, t, variance=variance, clip_x0=clip_x0,
                                        threshold=threshold, percentile=percentile)
    # No noise is added at the last step (t = 0).
    x_prev = mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * noise
    return x_prev, x0


def frame_indices(num_steps: int, num_frames: int) -> np.ndarray:
    """Scan positions (0 = first step) after which a frame is kept, evenly spaced, last one included."""
    return np.unique(np.round(np.linspace(0, num_steps - 1, num_frames)).astype(np.int32))


def reverse_scan(step_fn: Callable, x_T: jax.Array, indices, num_frames: int = 0, state=None,
                 return_state: bool = False):
    """Runs `x = step_fn(x, i)` for each row i of `indices`, in order, as one `lax.scan`.

    indices: int `[N]` (schedule indices), or any pytree of arrays with leading axis N (one row per
    step). With `state` (a pytree: a multistep sampler's history) the step is
    `x, state = step_fn(x, i, state)` and the state is carried along with x. With `num_frames > 0`
    it also returns `[F, B, ...]` snapshots of x after F evenly spaced steps (the last is the final
    x), written into a buffer in the carry rather than stacking all steps. Returns x, or (x, frames);
    with `return_state`, (that, the final state).
    """
    if isinstance(indices, (tuple, dict)):
        indices = jax.tree.map(jnp.asarray, indices)
    else:
        indices = jnp.asarray(indices, jnp.int32)
    num_steps = jax.tree.leaves(indices)[0].shape[0]
    if state is None:
        fn, state = (lambda x, i, st: (step_fn(x, i), st)), ()
    else:
        fn = step_fn
    if not num_frames:
        (x, state), _ = jax.lax.scan(lambda c, i: (fn(c[0], i, c[1]), None), (x_T, state), indices)
        return (x, state) if return_state else x
    keep = frame_indices(num_steps, num_frames)
    # slot[n] is where step n's output goes; steps that are not kept write to a spare last slot.
    slot = np.full(num_steps, len(keep), np.int32)
    slot[keep] = np.arange(len(keep))

    def body(carry, inputs):
        x, st, frames = carry
        i, k = inputs
        x, st = fn(x, i, st)
        return (x, st, jax.lax.dynamic_update_index_in_dim(frames, x, k, 0)), None

    frames = jnp.zeros((len(keep) + 1,) + x_T.shape, x_T.dtype)
    (x, state, frames), _ = jax.lax.scan(body, (x_T, state, frames), (indices, jnp.asarray(slot)))
    return ((x, frames[:-1]), state) if return_state else (x, frames[:-1])
