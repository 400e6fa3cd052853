"""The DDPM diffusion process (Ho et al. 2020): schedules, q, posterior, loss and the reverse step.

Pure functions of arrays; no Flax. Every schedule quantity is computed once in float64 with numpy
and stored as float32. Shapes: images `x` are `[B, ...]`, timesteps `t` are int `[B]`.

Paper equation -> function:
  Eq. 4   q(x_t | x_0)                      `q_sample`
  Eq. 6-7 q(x_{t-1} | x_t, x_0)              `q_posterior`
  Eq. 11  mu_theta from eps_theta            `p_mean_variance` (via `predict_x0`)
  Eq. 14  L_simple                           `l_simple`
  Alg. 2  one ancestral step                 `p_sample` (the loop: `sampling.generate`)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MODEL_OUTPUTS = ("eps", "x0", "v")
VARIANCES = ("fixedlarge", "fixedsmall")
BETA_SCHEDULES = ("linear", "cosine")


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


class Schedule(NamedTuple):
    """All per-timestep constants, float32 `[T]` each (a pytree, so it can be passed through jit).

    `timesteps[i]` is the timestep the model is told for step i: `arange(T)` for the full schedule,
    the kept original timesteps for a respaced one.
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

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(betas: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
    """Derives every schedule quantity from `betas` in float64, then stores float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must be a 1-d array with values in (0, 1].")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
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
        # beta_tilde_0 = 0, so its log is clipped to the value at t=1 (as in the official code).
        posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
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


def schedule_from_config(diffusion_config, num_steps: int | None = None) -> Schedule:
    """The config's schedule; respaced to `num_steps` evenly spaced timesteps when given."""
    c = diffusion_config
    betas = get_betas(c.beta_schedule, c.num_timesteps, c.beta_start, c.beta_end)
    if num_steps is None or num_steps == c.num_timesteps:
        return make_schedule(betas)
    return make_schedule(*respace_betas(betas, even_timesteps(c.num_timesteps, num_steps)))


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
    if kind == "x0":
        return ((extract(s.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - out)
                / extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.shape))
    return (extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
            + extract(s.sqrt_alphas_cumprod, t, x_t.shape) * out)


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
# Training loss.


def l_simple(s: Schedule, kind: str, out: jax.Array, x0: jax.Array, noise: jax.Array,
             t: jax.Array) -> jax.Array:
    """Eq. 14: squared error of the network output against its target, mean over pixels. `[B]`."""
    err = jnp.square(out.astype(jnp.float32) - model_target(s, kind, x0, noise, t))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """t ~ Uniform{0, ..., T-1} (the paper's 1..T, zero-based). `[B]` int32."""
    return jax.random.randint(key, (batch_size,), 0, num_timesteps)


# ----------------------------------------------------------------------------------------------
# Reverse process.


def p_mean_variance(s: Schedule, kind: str, out: jax.Array, x_t: jax.Array, t: jax.Array, *,
                    variance: str = "fixedlarge", clip_x0: bool = True):
    """Mean and log variance of p(x_{t-1} | x_t) given the network output; also the x_0 estimate.

    variance: 'fixedlarge' sigma_t^2 = beta_t (the paper's CIFAR-10 choice; at t=0 the posterior
    variance, as in the official code) or 'fixedsmall' sigma_t^2 = beta_tilde_t.
    """
    if variance == "fixedlarge":
        log_var = jnp.log(jnp.append(s.posterior_variance[1], s.betas[1:]))
    elif variance == "fixedsmall":
        log_var = s.posterior_log_variance_clipped
    else:
        raise ValueError(f"diffusion.variance={variance!r}: must be one of {VARIANCES}.")
    x0 = predict_x0(s, kind, out.astype(jnp.float32), x_t, t)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _, _ = q_posterior(s, x0, x_t, t)
    return mean, extract(log_var, t, x_t.shape), x0


ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], model timesteps [B]) -> out


def p_sample(s: Schedule, kind: str, model_fn: ModelFn, x_t: jax.Array, i: jax.Array,
             noise: jax.Array, *, variance: str = "fixedlarge", clip_x0: bool = True):
    """One ancestral step (Alg. 2) from schedule index `i` (a scalar): returns (x_{i-1}, x0_hat)."""
    t = jnp.full((x_t.shape[0],), i, jnp.int32)
    out = model_fn(x_t, s.timesteps[t])
    mean, log_var, x0 = p_mean_variance(s, kind, out, x_t, t, variance=variance, clip_x0=clip_x0)
    # No noise is added at the last step (t = 0).
    x_prev = mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * noise
    return x_prev, x0


def frame_indices(num_steps: int, num_frames: int) -> np.ndarray:
    """Scan positions (0 = first step) after which a frame is kept, evenly spaced, last one included."""
    return np.unique(np.round(np.linspace(0, num_steps - 1, num_frames)).astype(np.int32))


def reverse_scan(step_fn: Callable, x_T: jax.Array, indices, num_frames: int = 0):
    """Runs `x = step_fn(x, i)` for each schedule index in `indices`, in order, as one `lax.scan`.

    Carries only the images. With `num_frames > 0` it also returns `[F, B, ...]` snapshots of x after
    F evenly spaced steps (the last is the final x), written into a buffer in the carry rather than
    stacking all steps. Returns x, or (x, frames).
    """
    indices = jnp.asarray(indices, jnp.int32)
    if not num_frames:
        x, _ = jax.lax.scan(lambda x, i: (step_fn(x, i), None), x_T, indices)
        return x
    keep = frame_indices(len(indices), num_frames)
    # slot[n] is where step n's output goes; steps that are not kept write to a spare last slot.
    slot = np.full(len(indices), len(keep), np.int32)
    slot[keep] = np.arange(len(keep))

    def body(carry, inputs):
        x, frames = carry
        i, k = inputs
        x = step_fn(x, i)
        return (x, jax.lax.dynamic_update_index_in_dim(frames, x, k, 0)), None

    frames = jnp.zeros((len(keep) + 1,) + x_T.shape, x_T.dtype)
    (x, frames), _ = jax.lax.scan(body, (x_T, frames), (indices, jnp.asarray(slot)))
    return x, frames[:-1]
