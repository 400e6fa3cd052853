"""Generation: samplers by name, classifier-free guidance, image-to-image, inpainting, DDIM inversion.

Every sampler runs as one `lax.scan` (`diffusion.reverse_scan`) over a precomputed plan of steps
(the adaptive ode sampler: one step, a `lax.while_loop` of the solver's).

Levels. A schedule `s` of S steps (the full T, or respaced to S < T by `diffusion.respace_betas`,
Nichol & Dhariwal 2021) has S + 1 levels: level 0 is data, level L > 0 is x at schedule index L - 1
(noise level `s.alphas_cumprod[L - 1]`, model timestep `s.timesteps[L - 1]`), level S is x_T. Step
`i` of a sampler goes from level i + 1 to level i. Step i's noise is `normal(fold_in(key, i))` and
x_T is `normal(fold_in(key, S))`.

A sampler (`Sampler`, registered by name in `SAMPLERS`) is a step function, a plan and an initial
carried state:
    plan(s, start, opts, num_frames) -> (i int32 `[N]`, rows: a pytree of `[N, ...]` arrays, or None)
    init(x) -> state (a pytree; () for one-step samplers)
    step(s, kind, model_fn, x, i, noise, opts, state, row) -> (x after the step, x0_hat, state)
`denoise` scans `step` over the plan from a starting level, carrying (x, state). The default plan
is the schedule's levels, i = start - 1, ..., 0, no rows; a multistep method keeps its history in
the state (`dpm_solver_pp_step`); a method on its own noise levels has its own plan (`heun_plan`;
`ode_plan`, one step that runs an adaptive solver, or one per frame when frames are asked for).
x between steps is always the variance-preserving x at the step's noise level, so frames look alike.
Adding a sampler is one step function (and plan or init when it needs them) and one entry there.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as D
from ddpm_jax import ode, superres
from ddpm_jax.diffusion import ModelFn, Schedule


class StepOptions(NamedTuple):
    """Sampler options (static).

    eta: DDIM's noise scale. variance: `diffusion.variance`; the ancestral sampler uses it, every
    sampler reads only the mean half of a 'learned_range' output. clip_x0, threshold, percentile:
    how every x_0 prediction is kept in range, `diffusion.threshold_x0` with method
    `diffusion.x0_method(clip_x0, threshold)` (threshold 'auto': `clip_x0` decides, 'clip' or 'none').
    s_churn, s_tmin, s_tmax, s_noise: heun's stochastic churn (Karras et al. 2022, Alg. 2);
    s_churn = 0 (the default) is the deterministic Alg. 1. ode_tolerance: the ode sampler's relative
    and absolute tolerance.
    """

    eta: float = 0.0
    variance: str = "fixedlarge"
    clip_x0: bool = True
    threshold: str = "auto"
    percentile: float = 0.995
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    ode_tolerance: float = 1e-5


def step_options(config, **overrides) -> StepOptions:
    """StepOptions from a config: `diffusion.variance`, `diffusion.clip_x0` and `sampling.eta`,
    `threshold`, `threshold_percentile`, `s_churn`, `s_tmin`, `s_tmax`, `s_noise`, `ode_tolerance`;
    keyword arguments override any field (e.g. `eta=` from a flag)."""
    d, sp = config.diffusion, config.sampling
    opts = StepOptions(eta=sp.eta, variance=d.variance, clip_x0=d.clip_x0, threshold=sp.threshold,
                       percentile=sp.threshold_percentile, s_churn=sp.s_churn, s_tmin=sp.s_tmin,
                       s_tmax=sp.s_tmax, s_noise=sp.s_noise, ode_tolerance=sp.ode_tolerance)
    return opts._replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Steps.


def _predict_x0(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, t: jax.Array, opts: StepOptions):
    """The model's x_0 at schedule indices t `[B]` from its mean output, thresholded as `opts` say."""
    out, _ = D.split_output(model_fn(x, s.timesteps[t]).astype(jnp.float32), opts.variance)
    x0 = D.predict_x0(s, kind, out, x, t)
    return D.threshold_x0(x0, D.x0_method(opts.clip_x0, opts.threshold), opts.percentile)


def ancestral_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
                   opts: StepOptions, state=(), row=None):
    """Ho et al. Alg. 2 on `s`; on a respaced schedule this is Nichol & Dhariwal's respaced DDPM (with
    'learned_range' its variance interpolates the respaced chain's beta and beta_tilde)."""
    x, x0 = D.p_sample(s, kind, model_fn, x, i, noise, variance=opts.variance, clip_x0=opts.clip_x0,
                       threshold=opts.threshold, percentile=opts.percentile)
    return x, x0, state


def ddim_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
              opts: StepOptions, state=(), row=None):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z.

    sigma^2 = eta^2 (1 - abar')/(1 - abar) (1 - abar/abar') (Eq. 16) = eta^2 beta_tilde, so eta = 1
    is the ancestral step with sigma^2 = beta_tilde and eta = 0 is deterministic. With clipping or
    thresholding, eps is recomputed from the treated x0 so the step stays on the line through x and
    x0. A learned variance is not used.
    """
    t = jnp.full((x.shape[0],), i, jnp.int32)
    x0 = _predict_x0(s, kind, model_fn, x, t, opts)
    eps = D.predict_eps(s, "x0", x0, x, t)
    abar_prev = D.extract(s.alphas_cumprod_prev, t, x.shape)
    var = opts.eta ** 2 * D.extract(s.posterior_variance, t, x.shape)
    # max(0, .): 1 - abar' - beta_tilde >= 0 exactly, but may round below 0 in float32 when eta = 1.
    x_prev = (jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_prev - var, 0.0)) * eps
              + jnp.sqrt(var) * noise)
    return x_prev, x0, state


def dpm_solver_pp_init(x: jax.Array):
    """DPM-Solver++(2M)'s history: (the previous step's x0_hat `[B, ...]`, whether there was one)."""
    return jnp.zeros_like(x), jnp.zeros((), bool)


def dpm_solver_pp_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
                       opts: StepOptions, state, row=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), data prediction, from level i + 1 to i.

    With alpha_L = sqrt(abar), sigma_L = sqrt(1 - abar) at level L (1 and 0 at level 0) and
    lambda_L = log(alpha_L / sigma_L), h = lambda_i - lambda_{i+1}:
        x_i = (sigma_i / sigma_{i+1}) x - alpha_i (e^{-h} - 1) D
            = (sigma_i / sigma_{i+1}) x + (alpha_i - sigma_i alpha_{i+1} / sigma_{i+1}) D,
        D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev,  r = h_prev / h,  h_prev = lambda_{i+1} - lambda_{i+2},
    x0_hat the (guided, thresholded) data prediction at x and x0_hat_prev the previous step's. The
    first step has no history and the last two steps are lower order, D = x0_hat (DDIM with eta = 0):
    the step into level 1 (the model's smallest timestep; on evenly spaced timesteps its h is several
    times h_prev, and the 2M extrapolation by 1/(2r) makes it worse, not better) and the final step to
    data (sigma = 0, h infinite: x_0 = x0_hat). state: `dpm_solver_pp_init`.
    """
    x0_prev, has_prev = state
    t = jnp.full((x.shape[0],), i, jnp.int32)
    x0 = _predict_x0(s, kind, model_fn, x, t, opts)
    a = jnp.concatenate([jnp.ones((1,)), s.sqrt_alphas_cumprod])  # per level
    sd = jnp.concatenate([jnp.zeros((1,)), s.sqrt_one_minus_alphas_cumprod])
    lam = lambda level: jnp.log(a[level]) - jnp.log(sd[level])
    second = has_prev & (i >= 2)
    # Indices clamped so that h, h_prev are finite wherever they are not used.
    h = jnp.where(second, lam(jnp.maximum(i, 1)) - lam(i + 1), 1.0)
    h_prev = jnp.where(second, lam(i + 1) - lam(jnp.minimum(i + 2, s.num_timesteps)), 1.0)
    d = jnp.where(second, x0 + (x0 - x0_prev) * (h / (2.0 * h_prev)), x0)
    ratio = sd[i] / sd[i + 1]
    return ratio * x + (a[i] - ratio * a[i + 1]) * d, x0, (x0, jnp.ones((), bool))


def heun_plan(s: Schedule, start: int, opts: StepOptions, num_frames: int = 0, rho: float = 7.0):
    """Heun's steps from level `start` of `s`: n = (start + 1) // 2 noise levels, 2n - 1 evaluations.

    Karras et al. 2022 Eq. 5: sigma_k = (sigma_hi^(1/rho) + k/(n-1) (sigma_lo^(1/rho) - sigma_hi^(1/rho)))^rho,
    k = 0..n-1, rho = 7, then 0; sigma = sqrt((1 - abar)/abar), sigma_hi the start level's (for
    generation the model's largest), sigma_lo the model's smallest (`s.model_log_sigma[0]`). Step i
    (i = n-1..0) goes from the i+1-th smallest of these to the i-th (0 for i = 0). Rows: 'sigma',
    'sigma_next', and 'gamma' = min(s_churn/n, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, else 0,
    and never above sigma_max/sigma - 1: churn does not raise the noise beyond the model's largest.
    """
    n = (start + 1) // 2
    hi = s.sqrt_recipm1_alphas_cumprod[start - 1]
    lo = jnp.exp(s.model_log_sigma[0])
    ramp = jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)
    sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho  # decreasing
    levels = jnp.concatenate([jnp.zeros((1,)), sig[::-1]])  # level 0 = data, level n = start
    i = np.arange(n - 1, -1, -1, dtype=np.int32)
    sigma = levels[i + 1]
    churn = (sigma >= opts.s_tmin) & (sigma <= opts.s_tmax)
    top = jnp.maximum(jnp.exp(s.model_log_sigma[-1]) / sigma - 1.0, 0.0)  # >= 0 despite rounding
    gamma = jnp.where(churn, jnp.minimum(min(opts.s_churn / n, math.sqrt(2.0) - 1.0), top), 0.0)
    return i, {"sigma": sigma, "sigma_next": levels[i], "gamma": gamma}


def denoised(s: Schedule, kind: str, model_fn: ModelFn, x_ve: jax.Array, sigma, opts: StepOptions):
    """EDM's D(x; sigma) for the variance-preserving model: x0_hat at x_ve = x_t / sqrt(abar), sigma.

    The model sees x_t = x_ve / sqrt(1 + sigma^2) and the timestep interpolated (as a float) from
    log sigma on its table (`s.model_log_sigma`, `s.model_t`), exact at its own timesteps.
    """
    alpha = jax.lax.rsqrt(1.0 + sigma ** 2)
    x = x_ve * alpha
    t = jnp.interp(jnp.log(sigma), s.model_log_sigma, s.model_t)
    out, _ = D.split_output(model_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32),
                            opts.variance)
    x0 = D.predict_x0_at(kind, out, x, alpha, sigma * alpha)
    return D.threshold_x0(x0, D.x0_method(opts.clip_x0, opts.threshold), opts.percentile)


def heun_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
              opts: StepOptions, state=(), row=None):
    """EDM's 2nd-order sampler (Karras et al. 2022, Alg. 1; Alg. 2 with s_churn > 0), one step from
    row['sigma'] to row['sigma_next'] in the variance-exploding coordinates x_ve = x / sqrt(abar):

        sigma_hat = sigma (1 + gamma), x_hat = x_ve + sqrt(sigma_hat^2 - sigma^2) s_noise z,
        d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat,  x' = x_hat + (sigma_next - sigma_hat) d,
        and where sigma_next > 0: d' = (x' - D(x'; sigma_next)) / sigma_next,
        x' = x_hat + (sigma_next - sigma_hat) (d + d') / 2   (Euler only for the last step, to 0).

    x comes in and goes out variance-preserving (x = x_ve / sqrt(1 + sigma^2)). See `heun_plan`.
    """
    sigma, sigma_next = row["sigma"], row["sigma_next"]
    x_hat = x * jnp.sqrt(1.0 + sigma ** 2)
    if opts.s_churn:
        gamma = row["gamma"]
        # sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(gamma (2 + gamma)): never the root of a rounded negative.
        x_hat = x_hat + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * opts.s_noise * noise
        sigma = sigma * (1.0 + gamma)
    x0 = denoised(s, kind, model_fn, x_hat, sigma, opts)
    d = (x_hat - x0) / sigma

    def heun(_):
        x_next = x_hat + (sigma_next - sigma) * d
        d_next = (x_next - denoised(s, kind, model_fn, x_next, sigma_next, opts)) / sigma_next
        return x_hat + (sigma_next - sigma) * 0.5 * (d + d_next)

    # Euler to sigma = 0 lands on x0_hat: x_hat - sigma d = x0 (written so, without rounding).
    x_next = jax.lax.cond(sigma_next > 0, heun, lambda _: x0, None)
    return x_next * jax.lax.rsqrt(1.0 + sigma_next ** 2), x0, state


ODE_MAX_TRIES = 2000  # the ode sampler's solver steps (accepted or not) before a batch comes out NaN


def ode_plan(s: Schedule, start: int, opts: StepOptions, num_frames: int = 0):
    """One step, the whole path: from level `start`'s sigma (for generation the model's largest) to the
    model's smallest. With `num_frames` > 1 (`--figures`), that many pieces, evenly spaced in log
    sigma, each solved to the tolerance: the frames show the path. Rows: 'sigma', 'sigma_next' (0 for
    the last piece, which ends in D there)."""
    n = max(num_frames, 1)
    log_sigma = jnp.linspace(jnp.log(s.sqrt_recipm1_alphas_cumprod[start - 1]), s.model_log_sigma[0], n + 1)
    return np.zeros(n, np.int32), {"sigma": jnp.exp(log_sigma[:-1]),
                                   "sigma_next": jnp.exp(log_sigma[1:]).at[-1].set(0.0)}


def ode_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
             opts: StepOptions, state=(), row=None):
    """The probability-flow ODE (Song et al. 2021, Eq. 13) solved by Dormand-Prince 5(4) with adaptive
    steps (`ode.dormand_prince`, rtol = atol = `opts.ode_tolerance`), as score_sde's ODE sampler, from
    row['sigma'] to row['sigma_next'], or where that is 0 (the last piece of `ode_plan`) to the model's
    smallest noise level, then x_0 = D(x; sigma_min) there (score_sde's final denoising step); a piece
    before the last returns x at sigma_next as its x0_hat too. In x_ve = x / sqrt(abar) and v = -log sigma:

        dx_ve/dv = D(x_ve; e^-v) - x_ve       (EDM's dx/dsigma = (x - D) / sigma, Karras et al. 2022).

    D's x_0 is thresholded as `opts` say, as in every sampler, so this is the limit of the other
    deterministic samplers (ddim, heun) with the same options as their steps grow; clipping leaves the
    map only Lipschitz, which costs the solver steps where it binds. The step size is shared by the
    batch (the error norm is over all of it), so an image's result moves, within the tolerance, with
    the others in its batch. A batch the solver does not finish in `ODE_MAX_TRIES` comes out NaN.
    """
    sigma, sigma_next, lo = row["sigma"], row["sigma_next"], s.model_log_sigma[0]
    last = sigma_next == 0.0
    f = lambda y, v: denoised(s, kind, model_fn, y, jnp.exp(-v), opts) - y
    y, evals, done = ode.dormand_prince(f, x * jnp.sqrt(1.0 + sigma ** 2), -jnp.log(sigma),
                                        jnp.where(last, -lo, -jnp.log(sigma_next)),  # log 0 unused
                                        rtol=opts.ode_tolerance, atol=opts.ode_tolerance, max_steps=ODE_MAX_TRIES)
    x_next = jax.lax.cond(last, lambda y: denoised(s, kind, model_fn, y, jnp.exp(lo), opts),
                          lambda y: y * jax.lax.rsqrt(1.0 + sigma_next ** 2), y)
    x_next = jnp.where(done, x_next, jnp.nan)
    return x_next, x_next, state + evals + last


def ode_init(x: jax.Array):
    """The ode sampler's state: its network evaluations so far."""
    return jnp.int32(0)


def level_plan(s: Schedule, start: int, opts: StepOptions, num_frames: int = 0):
    """The schedule's own levels: steps i = start - 1, ..., 0, no rows (frames are some of them)."""
    return np.arange(start - 1, -1, -1, dtype=np.int32), None


def no_state(x: jax.Array):
    return ()


def one_per_level(start: int) -> int:
    return start


def heun_evaluations(start: int) -> int:
    """2n - 1 for n = (start + 1) // 2 noise levels (`heun_plan`): at most `start`."""
    return 2 * ((start + 1) // 2) - 1


class Sampler(NamedTuple):
    """A reverse-process method (see the module docstring for the signatures).

    init: the state before the first step, and again after each of RePaint's forward jumps.
    evaluations(start): network evaluations per image from level `start` (guidance's doubled batch
    not counted; None: the method chooses, as ode does). on_levels: its steps go between the
    schedule's levels (inpainting replaces the known region there); heun's and ode's do not.
    """

    step: Callable
    plan: Callable = level_plan
    init: Callable = no_state
    evaluations: Callable[[int], int | None] = one_per_level
    on_levels: bool = True


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(ancestral_step),
    "ddim": Sampler(ddim_step),
    "dpm_solver++": Sampler(dpm_solver_pp_step, init=dpm_solver_pp_init),
    "heun": Sampler(heun_step, plan=heun_plan, evaluations=heun_evaluations, on_levels=False),
    "ode": Sampler(ode_step, plan=ode_plan, init=ode_init, evaluations=lambda start: None, on_levels=False),
}


def sampler_name(sampler: str, steps: int, ode_tolerance: float, spacing: str = "even") -> str:
    """A sampler and what sets its evaluations, for names of files: 'ddim50', 'heun19', 'ode_tol1e-05';
    a timestep spacing other than 'even' is added: 'ddim4_trailing'."""
    name = f"ode_tol{ode_tolerance:g}" if sampler == "ode" else f"{sampler}{steps}"
    return name + (f"_{spacing}" if spacing != "even" else "")


def sampler_text(sampler: str, steps: int, ode_tolerance: float, spacing: str = "even") -> str:
    """The same for people: 'ddim, 50 steps', 'ode, tolerance 1e-05', 'ddim, 4 trailing steps'."""
    if sampler == "ode":
        return f"ode, tolerance {ode_tolerance:g}"
    return f"{sampler}, {steps} {'' if spacing == 'even' else spacing + ' '}steps"


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}: must be one of {sorted(SAMPLERS)}.")
    return SAMPLERS[name]


def get_step(name: str) -> Callable:
    """The step function of sampler `name` (see `Sampler`)."""
    return get_sampler(name).step


def network_evaluations(name: str, steps: int) -> int | None:
    """Network evaluations per image of sampler `name` on a schedule of `steps` levels, from the top
    (what `--steps` counts): `steps` for every sampler but heun, 2 ((steps + 1) // 2) - 1 for heun;
    None for ode (adaptive)."""
    return get_sampler(name).evaluations(steps)


# ----------------------------------------------------------------------------------------------
# Models: a network (and its conditioning, guidance) -> model_fn(x_t, t).

NO_INTERVAL = (0.0, math.inf)  # guidance at every timestep


def null_condition(cond: dict) -> dict:
    """The null condition of classifier-free guidance for `cond`: every row dropped (the model then
    uses the null class or the learned null text, whatever else `cond` holds)."""
    return {**cond, "drop": jnp.ones_like(cond["drop"])}


def rescale_guided(guided: jax.Array, out_cond: jax.Array, phi) -> jax.Array:
    """Guidance rescale (Lin et al. 2024, Eq. 15-16): phi * guided * std(out_cond) / std(guided) +
    (1 - phi) * guided, the stds over each sample's pixels and channels. Large guidance weights
    inflate the guided output's scale, which over-exposes images; this pulls it back to the
    conditional output's."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(out_cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    return phi * guided * ratio + (1.0 - phi) * guided


def guided_model_fn(apply_fn: Callable, cond: dict | None, null_cond: dict | None, guidance,
                    interval: tuple[float, float] = NO_INTERVAL, guide_apply: Callable | None = None,
                    rescale: float = 0.0) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): (1 + w) out(x, cond) - w out(x, null_cond).

    `apply_fn(x [2B, ...], t [2B], cond [2B])` is called once on the conditional and unconditional
    halves stacked. `null_cond` is `null_condition(cond)`, or a negative prompt's condition (it
    then replaces the null text). Combining raw outputs equals combining eps for every
    parameterisation: eps is affine in the output (`diffusion.predict_eps`) and the weights 1 + w,
    -w sum to 1. A network with twice the input's channels (`diffusion.variance='learned_range'`)
    has its mean half guided and its variance half taken from the conditional pass.

    interval (lo, hi): w only where lo <= t <= hi (model timesteps), w = 0 elsewhere: guidance in a
    limited interval (Kynkaanniemi et al. 2024), which leaves the noisiest and the cleanest levels
    to the conditional model alone.

    guide_apply: autoguidance (Karras et al. 2024): the negative half is this other network, a
    weaker version of the model (trained for fewer steps, or smaller), under `null_cond` (the
    prompt itself, as `unet_model_fn` passes it); two passes. It also guides unconditional models
    (cond None).

    rescale phi > 0: `rescale_guided` of the guided output (the mean half) against the conditional one.
    """
    if guide_apply is None:
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)
        halves = lambda x, t: jnp.split(apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2)
    else:
        halves = lambda x, t: (apply_fn(x, t, cond), guide_apply(x, t, null_cond))

    def model_fn(x, t):
        out_cond, out_uncond = halves(x, t)
        w = guidance
        if interval != NO_INTERVAL:
            w = jnp.where((t >= interval[0]) & (t <= interval[1]), guidance, 0.0).reshape((-1,) + (1,) * (x.ndim - 1))
        var = None
        if out_cond.shape[-1] == 2 * x.shape[-1]:
            (out_cond, var), (out_uncond, _) = jnp.split(out_cond, 2, axis=-1), jnp.split(out_uncond, 2, axis=-1)
        guided = (1.0 + w) * out_cond - w * out_uncond
        if rescale:
            guided = rescale_guided(guided, out_cond, rescale)
        return guided if var is None else jnp.concatenate([guided, var], axis=-1)

    return model_fn


def learnt_guidance_model_fn(apply_fn: Callable, cond: dict, guidance,
                             interval: tuple[float, float] = NO_INTERVAL) -> ModelFn:
    """Guidance by a network that learnt it (`UNet.guidance_embedding`, Meng et al. 2023): w is its input
    cond['guidance'], one pass a step; w = 0 outside `interval`, as in `guided_model_fn`."""
    def model_fn(x, t):
        w = jnp.full(t.shape, guidance, jnp.float32)
        if interval != NO_INTERVAL:
            w = jnp.where((t >= interval[0]) & (t <= interval[1]), w, 0.0)
        return apply_fn(x, t, {**cond, "guidance": w})

    return model_fn


def unet_model_fn(model, params, cond: dict | None = None, guidance: float = 0.0,
                  null_cond: dict | None = None, interval: tuple[float, float] = NO_INTERVAL,
                  guide: tuple | None = None, rescale: float = 0.0) -> ModelFn:
    """model_fn for a `UNet` in inference mode, conditioned on `cond` (see `UNet`; None for
    unconditional models). guidance w != 0 uses `guided_model_fn` against `null_cond` (default
    `null_condition(cond)`) in `interval`, rescaled by `rescale`; with `guide` = (guide UNet, its
    params), autoguidance: against the guide network under `null_cond` (default `cond`, the same
    condition). A U-Net that learnt guidance takes w as its input (`learnt_guidance_model_fn`)."""
    apply_fn = lambda x, t, c=None: model.apply({"params": params}, x, t, c)
    if not guidance or (cond is None and guide is None):
        return apply_fn if cond is None else lambda x, t: apply_fn(x, t, cond)
    if model.guidance_embedding:
        if guide is not None or null_cond is not None or rescale:
            raise ValueError("a model that learnt guidance (guidance_embedding) takes w as an input: no "
                             "autoguidance, negative prompt or guidance rescale.")
        return learnt_guidance_model_fn(apply_fn, cond, guidance, interval)
    if guide is not None:
        guide_model, guide_params = guide
        guide_apply = lambda x, t, c: guide_model.apply({"params": guide_params}, x, t, c)
        return guided_model_fn(apply_fn, cond, cond if null_cond is None else null_cond, guidance, interval,
                               guide_apply, rescale)
    return guided_model_fn(apply_fn, cond, null_condition(cond) if null_cond is None else null_cond, guidance,
                           interval, rescale=rescale)


# ----------------------------------------------------------------------------------------------
# Generation and editing.


def denoise(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, x: jax.Array, start: int, *,
            sampler: str = "ancestral", opts: StepOptions = StepOptions(), num_frames: int = 0,
            return_state: bool = False):
    """Runs `sampler` from level `start` (x given there) down to level 0, carrying x and the sampler's
    state in one scan over its plan. Returns x_0 [, frames]; with `return_state`, (that, the sampler's
    final state: ode's network evaluations)."""
    m = get_sampler(sampler)
    i, rows = m.plan(s, start, opts, num_frames)

    def body(x, step_in, state):
        i, row = step_in
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x, _, state = m.step(s, kind, model_fn, x, i, noise, opts, state, row)
        return x, state

    return D.reverse_scan(body, x, (i, rows), num_frames, state=m.init(x), return_state=return_state)


def generate(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, shape, *,
             sampler: str = "ancestral", opts: StepOptions = StepOptions(), num_frames: int = 0,
             x_T: jax.Array | None = None, return_state: bool = False):
    """Samples `shape` images from x_T ~ N(0, I) (or the given x_T) by `sampler` on the S levels of
    `s` (heun: `network_evaluations`, at most S).

    Returns x_0 `[B, ...]`, or (x_0, frames `[F, B, ...]`) with `num_frames > 0`; `return_state`: as
    `denoise`.
    """
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, s.num_timesteps), shape, jnp.float32)
    return denoise(s, kind, model_fn, key, x_T, s.num_timesteps, sampler=sampler, opts=opts,
                   num_frames=num_frames, return_state=return_state)


def strength_to_level(strength: float, num_steps: int) -> int:
    """SDEdit's t0 = strength * T on a schedule of `num_steps`: the level to start the reverse chain."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}: must be in [0, 1].")
    return int(round(strength * num_steps))


def ddim_invert(s: Schedule, kind: str, model_fn: ModelFn, x0: jax.Array, level: int | None = None, *,
                num_frames: int = 0, variance: str = "fixedlarge"):
    """Deterministic DDIM encoding of x_0 up to `level` (default S: x_T); the inverse of `ddim_step`
    with eta = 0 and no clipping, up to evaluating eps at level i instead of i + 1.

    Step i (level i -> i + 1): eps = eps_theta(x, t_i), x0_hat = (x - sqrt(1 - abar') eps)/sqrt(abar'),
    x <- sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps, with abar' the noise level of level i (1 at 0).
    The round-trip error is first order in the step size. `variance`: the model's (only the mean
    half of a 'learned_range' output is read). Returns x `[B, ...]` [, frames].
    """
    level = s.num_timesteps if level is None else level

    def body(x, i):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        out, _ = D.split_output(model_fn(x, s.timesteps[t]).astype(jnp.float32), variance)
        eps = D.predict_eps(s, kind, out, x, t)
        abar_here = D.extract(s.alphas_cumprod_prev, t, x.shape)
        x0 = (x - jnp.sqrt(1.0 - abar_here) * eps) / jnp.sqrt(abar_here)
        return D.extract(s.sqrt_alphas_cumprod, t, x.shape) * x0 + D.extract(
            s.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps

    return D.reverse_scan(body, x0, np.arange(level), num_frames)


def ode_invert(s: Schedule, kind: str, model_fn: ModelFn, x0: jax.Array, level: int, opts: StepOptions):
    """`x0` encoded at `level` along the probability-flow ODE: `ode_step`'s path run upwards, from the
    model's smallest noise level (where x_0 is taken as x) to level's sigma, to `opts.ode_tolerance`
    (Song et al. 2021, Sec. 4.3: the encoding is unique and exact up to the solver). Decoding it by
    `ode_step` under the same `model_fn` and `opts` returns D(x_0; sigma_min) to that tolerance. A
    batch the solver does not finish comes out NaN. Returns (x_level, the network evaluations)."""
    lo, hi = s.model_log_sigma[0], s.sqrt_recipm1_alphas_cumprod[level - 1]
    f = lambda y, u: y - denoised(s, kind, model_fn, y, jnp.exp(u), opts)
    y, evals, done = ode.dormand_prince(f, x0 * jnp.sqrt(1.0 + jnp.exp(2.0 * lo)), lo, jnp.log(hi),
                                        rtol=opts.ode_tolerance, atol=opts.ode_tolerance, max_steps=ODE_MAX_TRIES)
    return jnp.where(done, y * jax.lax.rsqrt(1.0 + hi ** 2), jnp.nan), evals


def noised_to(s: Schedule, kind: str, key: jax.Array, x0: jax.Array, level: int, *, invert: bool = False,
              invert_model_fn: ModelFn | None = None, sampler: str = "ancestral",
              opts: StepOptions = StepOptions()) -> tuple[jax.Array, jax.Array | int]:
    """(`x0` taken to `level`, the network evaluations of `ode_invert` or 0): by q(x_t | x_0) (Eq. 4)
    with the noise of `key`, or with `invert` deterministically under `invert_model_fn`: by
    `ode_invert` for the ode sampler, else by `ddim_invert`."""
    if invert and sampler == "ode":
        return ode_invert(s, kind, invert_model_fn, x0, level, opts)
    if invert:
        return ddim_invert(s, kind, invert_model_fn, x0, level, variance=opts.variance), 0
    t = jnp.full((x0.shape[0],), level - 1, jnp.int32)
    return D.q_sample(s, x0, t, jax.random.normal(key, x0.shape)), 0


def img2img(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, x0: jax.Array, level: int, *,
            sampler: str = "ancestral", opts: StepOptions = StepOptions(), invert: bool = False,
            num_frames: int = 0, invert_model_fn: ModelFn | None = None, return_state: bool = False):
    """SDEdit (Meng et al. 2022): noise `x0` to `level` (see `strength_to_level`) and denoise it.

    The noising is q(x_t | x_0) (Eq. 4), or with `invert` the deterministic `ddim_invert` (ode:
    `ode_invert`) under `invert_model_fn` (default `model_fn`; prompt-to-prompt editing inverts
    under the source prompt and denoises under the target); any sampler denoises (heun from the
    level's noise, in at most `level` evaluations). Level 0 returns `x0` unchanged. Returns x_0
    `[B, ...]` [, frames]; `return_state`: as `denoise` (ode's count includes its encoding's).
    """
    if level == 0:
        out = (x0, x0[None]) if num_frames else x0
        return (out, get_sampler(sampler).init(x0)) if return_state else out
    x, encoding_evals = noised_to(s, kind, jax.random.fold_in(key, s.num_timesteps), x0, level, invert=invert,
                                  invert_model_fn=invert_model_fn or model_fn, sampler=sampler, opts=opts)
    out = denoise(s, kind, model_fn, key, x, level, sampler=sampler, opts=opts, num_frames=num_frames,
                  return_state=return_state)
    if return_state and sampler == "ode":  # its state counts network evaluations
        out = (out[0], out[1] + encoding_evals)
    return out


def repaint_schedule(num_steps: int, jump_length: int = 0, jump_n_sample: int = 1) -> np.ndarray:
    """RePaint's resampling schedule (Lugmayr et al. 2022, Sec. 4.2) as rows (i, up), int32 `[N, 2]`.

    up = 0: reverse step i (level i + 1 -> i); up > 0: forward jump from level i to level i + up.
    On reaching a level L that is a multiple of `jump_length` (0 included, L + jump_length <= S), the
    chain jumps back up `jump_length` levels and comes down again, `jump_n_sample - 1` times, so each
    such stretch is sampled `jump_n_sample` times in all. jump_length 0: no jumps.
    """
    if jump_length < 0 or jump_n_sample < 1:
        raise ValueError(f"jump_length={jump_length} must be >= 0 and jump_n_sample={jump_n_sample} >= 1.")
    if jump_length > num_steps:
        raise ValueError(f"jump_length={jump_length}: must be at most the number of steps ({num_steps}).")
    jumps = dict.fromkeys(range(0, num_steps - jump_length + 1, jump_length), jump_n_sample - 1) if jump_length else {}
    rows, level = [], num_steps
    while level > 0:
        rows.append((level - 1, 0))
        level -= 1
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            rows.append((level, jump_length))
            level += jump_length
    return np.asarray(rows, np.int32)


def inpaint(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, x0: jax.Array, mask: jax.Array, *,
            sampler: str = "ancestral", opts: StepOptions = StepOptions(), jump_length: int = 0,
            jump_n_sample: int = 1, num_frames: int = 0, level: int | None = None, invert: bool = False,
            invert_model_fn: ModelFn | None = None):
    """RePaint (Lugmayr et al. 2022): generates where `mask` is true, keeps `x0` elsewhere.

    From pure noise at the top level, or from `x0` taken to `level` (`noised_to`, with `invert`
    under `invert_model_fn`): the masked part is then edited rather than made anew (DiffEdit's
    decoding, Couairon et al. 2022, with the known part noised by q instead of inverted).

    After every reverse step to level i the known region is replaced by x0 noised to level i
    (q(x_i | x_0), Eq. 4; x0 itself at level 0, so known pixels come back exactly as given);
    resampling jumps go forward with q(x_b | x_a) = N(sqrt(abar_b/abar_a) x_a, (1 - abar_b/abar_a) I).
    Op n's noise comes from fold_in(key, n), as levels repeat. mask: bool, broadcastable to x0.
    Samplers on the schedule's levels only (not heun); a multistep sampler's history restarts after
    each jump (its next step is first order). Raises ValueError otherwise.
    """
    m = get_sampler(sampler)
    if not m.on_levels:
        raise ValueError(f"sampler={sampler!r} cannot inpaint: RePaint replaces the known region at the "
                         f"schedule's levels, and this sampler steps between its own noise levels; use one of "
                         f"{sorted(k for k, v in SAMPLERS.items() if v.on_levels)}.")
    top = s.num_timesteps if level is None else level
    if top == 0:
        return (x0, x0[None]) if num_frames else x0
    ops = repaint_schedule(top, jump_length, jump_n_sample)
    abar = jnp.concatenate([jnp.ones((1,)), s.alphas_cumprod])  # per level

    def body(x, row, state):
        n, i, up = row[0], row[1], row[2]
        k = jax.random.fold_in(key, n)
        normal = lambda j: jax.random.normal(jax.random.fold_in(k, j), x.shape, x.dtype)

        def down(carry):
            x, state = carry
            x, _, state = m.step(s, kind, model_fn, x, i, normal(0), opts, state, None)
            known = jnp.sqrt(abar[i]) * x0 + jnp.sqrt(1.0 - abar[i]) * normal(1)
            return jnp.where(mask, x, known), state

        def jump(carry):
            x, _ = carry
            ratio = abar[i + up] / abar[i]
            x = jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * normal(0)
            return x, m.init(x)

        return jax.lax.cond(up > 0, jump, down, (x, state))

    rows = np.concatenate([np.arange(len(ops), dtype=np.int32)[:, None], ops], axis=1)
    start_key = jax.random.fold_in(key, len(ops))  # op n uses fold_in(key, n), n < len(ops)
    if level is None:
        x = jax.random.normal(start_key, x0.shape, jnp.float32)
    else:
        x, _ = noised_to(s, kind, start_key, x0, level, invert=invert, invert_model_fn=invert_model_fn or model_fn,
                         sampler=sampler, opts=opts)
    return D.reverse_scan(body, x, rows, num_frames, state=m.init(x))


def diffedit_mask(s: Schedule, kind: str, model_fn: ModelFn, ref_model_fn: ModelFn, key: jax.Array,
                  x0: jax.Array, level: int, *, num_draws: int = 10, threshold: float = 0.5, dilation: int = 0,
                  variance: str = "fixedlarge") -> jax.Array:
    """DiffEdit's mask (Couairon et al. 2022, Sec. 3.2): where the target and the reference condition
    disagree about the noise. x0 `[B, H, W, C]` is noised to `level` by q (Eq. 4) `num_draws` times;
    |eps(x_t | target) - eps(x_t | reference)|, averaged over draws and channels, is scaled to
    [0, 1] by its maximum per image and thresholded, then grown by `dilation` pixels (a
    (2 dilation + 1)^2 square): the difference peaks inside an object and fades at its edge, which
    a low threshold would take with background far from it. Returns bool `[B, H, W, 1]`."""
    t = jnp.full((x0.shape[0],), level - 1, jnp.int32)

    def eps(fn, x):
        out, _ = D.split_output(fn(x, s.timesteps[t]).astype(jnp.float32), variance)
        return D.predict_eps(s, kind, out, x, t)

    def body(total, n):
        x = D.q_sample(s, x0, t, jax.random.normal(jax.random.fold_in(key, n), x0.shape))
        return total + jnp.abs(eps(model_fn, x) - eps(ref_model_fn, x)).mean(-1, keepdims=True), None

    diff, _ = jax.lax.scan(body, jnp.zeros(x0.shape[:-1] + (1,), jnp.float32), jnp.arange(num_draws))
    mask = (diff >= threshold * diff.max(axis=(1, 2, 3), keepdims=True)).astype(jnp.float32)
    window = (1, 2 * dilation + 1, 2 * dilation + 1, 1)
    return jax.lax.reduce_window(mask, 0.0, jax.lax.max, window, (1, 1, 1, 1), "SAME") > 0


def forward_trajectory(s: Schedule, key: jax.Array, x0: jax.Array, num_frames: int) -> jax.Array:
    """The forward chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z from x_0 to x_T (Eq. 2),
    as one `lax.scan`; returns `num_frames` evenly spaced snapshots `[F, B, ...]` (x_T last)."""
    def body(x, i):
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return jnp.sqrt(1.0 - s.betas[i]) * x + jnp.sqrt(s.betas[i]) * z

    return D.reverse_scan(body, x0, np.arange(s.num_timesteps), num_frames)[1]


# ----------------------------------------------------------------------------------------------
# One device's batch (`generation` maps it over devices and batches).


class SampleSpec(NamedTuple):
    """What one run does (static). level: None generates; an int edits from that level (SDEdit), or
    with `inpaint` fills the mask (RePaint) from there. guidance 0: no classifier-free guidance;
    guidance_interval: the timesteps it applies to; guidance_rescale its phi (`guided_model_fn`).
    mask_level > 0: inpainting with DiffEdit's mask (`diffedit_mask` at that level)."""

    sampler: str = "ancestral"
    opts: StepOptions = StepOptions()
    guidance: float = 0.0
    guidance_interval: tuple[float, float] = NO_INTERVAL
    guidance_rescale: float = 0.0
    level: int | None = None
    invert: bool = False
    inpaint: bool = False
    jump_length: int = 0
    jump_n_sample: int = 1
    num_frames: int = 0
    mask_level: int = 0
    mask_draws: int = 10
    mask_threshold: float = 0.5
    mask_dilation: int = 0


# fold_in tags of the low-resolution input's augmentation noise and of DiffEdit's mask noise
# (samplers use tags from 0 to their number of steps).
AUG_NOISE_TAG = 2 ** 31 - 1
MASK_NOISE_TAG = 2 ** 31 - 2


def augment_low_res(s: Schedule, batch: dict, key: jax.Array) -> dict:
    """Super-resolution: every condition's 'low_res' noised to its 'aug_level' by
    `superres.augment` (one noise draw, so guidance's two halves see the same input)."""
    c = batch["cond"]
    z = superres.augment(s, c["low_res"], c["aug_level"], jax.random.normal(key, c["low_res"].shape))
    return {k: {**v, "low_res": z} if k.endswith("cond") else v for k, v in batch.items()}


def sample_shard(model, s: Schedule, kind: str, spec: SampleSpec, image_shape, params, key: jax.Array,
                 batch: dict, guide: tuple | None = None) -> dict:
    """One device's images. batch: 'cond' (the U-Net's conditioning, `[b, ...]` leaves; 'drop'
    always, which gives the batch size; unconditional models ignore it), optionally 'null_cond'
    (a negative prompt: guidance's unconditional half) and 'source_cond' (prompt-to-prompt: DDIM
    inversion runs unguided under it), for editing 'x0' `[b, H, W, C]` in [-1, 1], for inpainting
    'mask' bool `[b, H, W, 1]` (with `spec.mask_level`: none, DiffEdit's mask of the prompt against
    'source_cond', or the null text, is made here). guide: (UNet, params) of autoguidance's guide
    network (`unet_model_fn`), None for classifier-free guidance.

    Returns {'images': `[b, H, W, C]`}, with `spec.num_frames` 'frames' `[b, F, H, W, C]`, with
    `spec.mask_level` 'masks' `[b, H, W, 1]`, with the ode sampler 'ode_evals' int `[b]` (the network
    evaluations of the solve that drew each image's batch, guidance's doubled batch counted once).
    """
    conditional = model.num_classes or model.text_encoder != "none" or model.low_res_size
    if model.low_res_size:
        batch = augment_low_res(s, batch, jax.random.fold_in(key, AUG_NOISE_TAG))
    cond = batch["cond"] if conditional else None
    model_fn = unet_model_fn(model, params, cond, spec.guidance, batch.get("null_cond"), spec.guidance_interval,
                             guide, spec.guidance_rescale)
    count = spec.sampler == "ode"  # its state: the network evaluations it chose (it cannot inpaint)
    kw = dict(sampler=spec.sampler, opts=spec.opts, num_frames=spec.num_frames)
    source = batch.get("source_cond")
    invert_model_fn = None if source is None else unet_model_fn(model, params, source)
    extra = {}
    if spec.inpaint:
        mask = batch.get("mask")
        if spec.mask_level:
            reference = unet_model_fn(model, params, null_condition(cond) if source is None else source)
            mask = extra["masks"] = diffedit_mask(
                s, kind, unet_model_fn(model, params, cond), reference, jax.random.fold_in(key, MASK_NOISE_TAG),
                batch["x0"], spec.mask_level, num_draws=spec.mask_draws, threshold=spec.mask_threshold,
                dilation=spec.mask_dilation, variance=spec.opts.variance)
        out = inpaint(s, kind, model_fn, key, batch["x0"], mask, jump_length=spec.jump_length,
                      jump_n_sample=spec.jump_n_sample, level=spec.level, invert=spec.invert,
                      invert_model_fn=invert_model_fn, **kw)
    elif spec.level is not None:
        out = img2img(s, kind, model_fn, key, batch["x0"], spec.level, invert=spec.invert, **kw,
                      invert_model_fn=invert_model_fn, return_state=count)
    else:
        out = generate(s, kind, model_fn, key, (batch["cond"]["drop"].shape[0],) + tuple(image_shape), **kw,
                       return_state=count)
    if count:
        out, evals = out
        extra["ode_evals"] = jnp.full(batch["cond"]["drop"].shape[:1], evals)
    if not spec.num_frames:
        return {"images": out, **extra}
    return {"images": out[0], "frames": jnp.swapaxes(out[1], 0, 1), **extra}
