"""Generation: samplers by name, classifier-free guidance, image-to-image, inpainting, DDIM inversion.

Every sampler runs as one `lax.scan` (`diffusion.reverse_scan`) over a precomputed index sequence.

Levels. A schedule `s` of S steps (the full T, or respaced to S < T by `diffusion.respace_betas`,
Nichol & Dhariwal 2021) has S + 1 levels: level 0 is data, level L > 0 is x at schedule index L - 1
(noise level `s.alphas_cumprod[L - 1]`, model timestep `s.timesteps[L - 1]`), level S is x_T. Step
`i` of a sampler goes from level i + 1 to level i. Step i's noise is `normal(fold_in(key, i))` and
x_T is `normal(fold_in(key, S))`.

A step function has the signature
    step(s, kind, model_fn, x, i, noise, opts) -> (x at level i, x0_hat)
and `SAMPLERS` maps a name to one; adding a sampler is one function and one entry there.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as D
from ddpm_jax.diffusion import ModelFn, Schedule


class StepOptions(NamedTuple):
    """Sampler options (static). eta: DDIM noise scale; variance, clip_x0: as `diffusion.p_mean_variance`."""

    eta: float = 0.0
    variance: str = "fixedlarge"
    clip_x0: bool = True


# ----------------------------------------------------------------------------------------------
# Steps.


def ancestral_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
                   opts: StepOptions):
    """Ho et al. Alg. 2 on `s`; on a respaced schedule this is Nichol & Dhariwal's respaced DDPM."""
    return D.p_sample(s, kind, model_fn, x, i, noise, variance=opts.variance, clip_x0=opts.clip_x0)


def ddim_step(s: Schedule, kind: str, model_fn: ModelFn, x: jax.Array, i, noise: jax.Array,
              opts: StepOptions):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z.

    sigma^2 = eta^2 (1 - abar')/(1 - abar) (1 - abar/abar') (Eq. 16) = eta^2 beta_tilde, so eta = 1
    is the ancestral step with sigma^2 = beta_tilde and eta = 0 is deterministic. With clipping, eps
    is recomputed from the clipped x0 so the step stays on the line through x and x0.
    """
    t = jnp.full((x.shape[0],), i, jnp.int32)
    x0 = D.predict_x0(s, kind, model_fn(x, s.timesteps[t]).astype(jnp.float32), x, t)
    if opts.clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    eps = D.predict_eps(s, "x0", x0, x, t)
    abar_prev = D.extract(s.alphas_cumprod_prev, t, x.shape)
    var = opts.eta ** 2 * D.extract(s.posterior_variance, t, x.shape)
    # max(0, .): 1 - abar' - beta_tilde >= 0 exactly, but may round below 0 in float32 when eta = 1.
    x_prev = (jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_prev - var, 0.0)) * eps
              + jnp.sqrt(var) * noise)
    return x_prev, x0


SAMPLERS: dict[str, Callable] = {"ancestral": ancestral_step, "ddim": ddim_step}


def get_step(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}: must be one of {sorted(SAMPLERS)}.")
    return SAMPLERS[name]


# ----------------------------------------------------------------------------------------------
# Models: a network (and its conditioning, guidance) -> model_fn(x_t, t).


def null_condition(cond: dict) -> dict:
    """The null condition of classifier-free guidance for `cond`: every row dropped (the model then
    uses the null class or the learned null text, whatever else `cond` holds)."""
    return {**cond, "drop": jnp.ones_like(cond["drop"])}


def guided_model_fn(apply_fn: Callable, cond: dict, null_cond: dict, guidance) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): (1 + w) out(x, cond) - w out(x, null_cond).

    `apply_fn(x [2B, ...], t [2B], cond [2B])` is called once on the conditional and unconditional
    halves stacked. `null_cond` is `null_condition(cond)`, or a negative prompt's condition (it
    then replaces the null text). Combining raw outputs equals combining eps for every
    parameterisation: eps is affine in the output (`diffusion.predict_eps`) and the weights 1 + w,
    -w sum to 1.
    """
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)

    def model_fn(x, t):
        out_cond, out_uncond = jnp.split(apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2)
        return (1.0 + guidance) * out_cond - guidance * out_uncond

    return model_fn


def unet_model_fn(model, params, cond: dict | None = None, guidance: float = 0.0,
                  null_cond: dict | None = None) -> ModelFn:
    """model_fn for a `UNet` in inference mode, conditioned on `cond` (see `UNet`; None for
    unconditional models). guidance w != 0 uses `guided_model_fn` against `null_cond` (default
    `null_condition(cond)`)."""
    apply_fn = lambda x, t, c=None: model.apply({"params": params}, x, t, c)
    if cond is None:
        return apply_fn
    if not guidance:
        return lambda x, t: apply_fn(x, t, cond)
    return guided_model_fn(apply_fn, cond, null_condition(cond) if null_cond is None else null_cond, guidance)


# ----------------------------------------------------------------------------------------------
# Generation and editing.


def denoise(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, x: jax.Array, start: int, *,
            sampler: str = "ancestral", opts: StepOptions = StepOptions(), num_frames: int = 0):
    """Runs `sampler` from level `start` (x given there) down to level 0. Returns x_0 [, frames]."""
    step = get_step(sampler)

    def body(x, i):
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return step(s, kind, model_fn, x, i, noise, opts)[0]

    return D.reverse_scan(body, x, np.arange(start - 1, -1, -1), num_frames)


def generate(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, shape, *,
             sampler: str = "ancestral", opts: StepOptions = StepOptions(), num_frames: int = 0,
             x_T: jax.Array | None = None):
    """Samples `shape` images from x_T ~ N(0, I) (or the given x_T) in S steps of `sampler`.

    Returns x_0 `[B, ...]`, or (x_0, frames `[F, B, ...]`) with `num_frames > 0`.
    """
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, s.num_timesteps), shape, jnp.float32)
    return denoise(s, kind, model_fn, key, x_T, s.num_timesteps, sampler=sampler, opts=opts,
                   num_frames=num_frames)


def strength_to_level(strength: float, num_steps: int) -> int:
    """SDEdit's t0 = strength * T on a schedule of `num_steps`: the level to start the reverse chain."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}: must be in [0, 1].")
    return int(round(strength * num_steps))


def ddim_invert(s: Schedule, kind: str, model_fn: ModelFn, x0: jax.Array, level: int | None = None, *,
                num_frames: int = 0):
    """Deterministic DDIM encoding of x_0 up to `level` (default S: x_T); the inverse of `ddim_step`
    with eta = 0 and no clipping, up to evaluating eps at level i instead of i + 1.

    Step i (level i -> i + 1): eps = eps_theta(x, t_i), x0_hat = (x - sqrt(1 - abar') eps)/sqrt(abar'),
    x <- sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps, with abar' the noise level of level i (1 at 0).
    The round-trip error is first order in the step size. Returns x `[B, ...]` [, frames].
    """
    level = s.num_timesteps if level is None else level

    def body(x, i):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        eps = D.predict_eps(s, kind, model_fn(x, s.timesteps[t]).astype(jnp.float32), x, t)
        abar_here = D.extract(s.alphas_cumprod_prev, t, x.shape)
        x0 = (x - jnp.sqrt(1.0 - abar_here) * eps) / jnp.sqrt(abar_here)
        return D.extract(s.sqrt_alphas_cumprod, t, x.shape) * x0 + D.extract(
            s.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps

    return D.reverse_scan(body, x0, np.arange(level), num_frames)


def img2img(s: Schedule, kind: str, model_fn: ModelFn, key: jax.Array, x0: jax.Array, level: int, *,
            sampler: str = "ancestral", opts: StepOptions = StepOptions(), invert: bool = False,
            num_frames: int = 0, invert_model_fn: ModelFn | None = None):
    """SDEdit (Meng et al. 2022): noise `x0` to `level` (see `strength_to_level`) and denoise it.

    The noising is q(x_t | x_0) (Eq. 4), or with `invert` the deterministic `ddim_invert` under
    `invert_model_fn` (default `model_fn`; prompt-to-prompt editing inverts under the source
    prompt and denoises under the target). Level 0 returns `x0` unchanged. Returns x_0 `[B, ...]`
    [, frames].
    """
    if level == 0:
        return (x0, x0[None]) if num_frames else x0
    if invert:
        x = ddim_invert(s, kind, invert_model_fn or model_fn, x0, level)
    else:
        t = jnp.full((x0.shape[0],), level - 1, jnp.int32)
        x = D.q_sample(s, x0, t, jax.random.normal(jax.random.fold_in(key, s.num_timesteps), x0.shape))
    return denoise(s, kind, model_fn, key, x, level, sampler=sampler, opts=opts, num_frames=num_frames)


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
            jump_n_sample: int = 1, num_frames: int = 0):
    """RePaint (Lugmayr et al. 2022): generates where `mask` is true, keeps `x0` elsewhere.

    After every reverse step to level i the known region is replaced by x0 noised to level i
    (q(x_i | x_0), Eq. 4; x0 itself at level 0, so known pixels come back exactly as given);
    resampling jumps go forward with q(x_b | x_a) = N(sqrt(abar_b/abar_a) x_a, (1 - abar_b/abar_a) I).
    Op n's noise comes from fold_in(key, n), as levels repeat. mask: bool, broadcastable to x0.
    """
    step = get_step(sampler)
    ops = repaint_schedule(s.num_timesteps, jump_length, jump_n_sample)
    abar = jnp.concatenate([jnp.ones((1,)), s.alphas_cumprod])  # per level

    def body(x, row):
        n, i, up = row[0], row[1], row[2]
        k = jax.random.fold_in(key, n)
        normal = lambda j: jax.random.normal(jax.random.fold_in(k, j), x.shape, x.dtype)

        def down(x):
            x = step(s, kind, model_fn, x, i, normal(0), opts)[0]
            known = jnp.sqrt(abar[i]) * x0 + jnp.sqrt(1.0 - abar[i]) * normal(1)
            return jnp.where(mask, x, known)

        def jump(x):
            ratio = abar[i + up] / abar[i]
            return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * normal(0)

        return jax.lax.cond(up > 0, jump, down, x)

    rows = np.concatenate([np.arange(len(ops), dtype=np.int32)[:, None], ops], axis=1)
    x_T = jax.random.normal(jax.random.fold_in(key, len(ops)), x0.shape, jnp.float32)
    return D.reverse_scan(body, x_T, rows, num_frames)


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
    with `inpaint` fills the mask (RePaint). guidance 0: no classifier-free guidance."""

    sampler: str = "ancestral"
    opts: StepOptions = StepOptions()
    guidance: float = 0.0
    level: int | None = None
    invert: bool = False
    inpaint: bool = False
    jump_length: int = 0
    jump_n_sample: int = 1
    num_frames: int = 0


def sample_shard(model, s: Schedule, kind: str, spec: SampleSpec, image_shape, params, key: jax.Array,
                 batch: dict) -> dict:
    """One device's images. batch: 'cond' (the U-Net's conditioning, `[b, ...]` leaves; 'drop'
    always, which gives the batch size; unconditional models ignore it), optionally 'null_cond'
    (a negative prompt: guidance's unconditional half) and 'source_cond' (prompt-to-prompt: DDIM
    inversion runs unguided under it), for editing 'x0' `[b, H, W, C]` in [-1, 1], for inpainting
    'mask' bool `[b, H, W, 1]`.

    Returns {'images': `[b, H, W, C]`} and with `spec.num_frames` 'frames' `[b, F, H, W, C]`.
    """
    conditional = model.num_classes or model.text_encoder != "none"
    cond = batch["cond"] if conditional else None
    model_fn = unet_model_fn(model, params, cond, spec.guidance, batch.get("null_cond"))
    kw = dict(sampler=spec.sampler, opts=spec.opts, num_frames=spec.num_frames)
    if spec.inpaint:
        out = inpaint(s, kind, model_fn, key, batch["x0"], batch["mask"], jump_length=spec.jump_length,
                      jump_n_sample=spec.jump_n_sample, **kw)
    elif spec.level is not None:
        source = batch.get("source_cond")
        out = img2img(s, kind, model_fn, key, batch["x0"], spec.level, invert=spec.invert, **kw,
                      invert_model_fn=None if source is None else unet_model_fn(model, params, source))
    else:
        out = generate(s, kind, model_fn, key, (batch["cond"]["drop"].shape[0],) + tuple(image_shape), **kw)
    if not spec.num_frames:
        return {"images": out}
    return {"images": out[0], "frames": jnp.swapaxes(out[1], 0, 1)}
