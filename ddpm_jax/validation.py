"""Checks a config before anything is compiled or written; every error names the field and what is valid.

`validate_config` needs neither TensorFlow nor data; the dataset itself (name, features) is checked by
`input_pipeline.check_dataset`.
"""
from __future__ import annotations

import jax

from ddpm_jax import diffusion, sampling
from ddpm_jax.train_state import init_params

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("xla", "cudnn")


class UserError(ValueError):
    """A config value (or flag) that cannot work; the message names the field and what is valid."""


def _require(ok: bool, message: str):
    if not ok:
        raise UserError(message)


def _positive_int(config, path: str):
    value = config
    for part in path.split("."):
        value = value[part]
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{path}={value!r}: must be a positive integer.")
    return value


def _one_of(value, path: str, valid):
    _require(value in valid, f"{path}={value!r}: must be one of {tuple(valid)}.")


def unet_resolutions(image_size: int, ch_mult) -> tuple[int, ...]:
    """The feature-map sizes the U-Net works at, one per `ch_mult` level (it halves between levels)."""
    return tuple(image_size // 2 ** level for level in range(len(ch_mult)))


def validate_data_and_model(config):
    d, m = config.data, config.model
    size = _positive_int(config, "data.image_size")
    _one_of(d.channels, "data.channels", (1, 3))
    _positive_int(config, "data.shuffle_buffer")
    _positive_int(config, "model.ch")
    _require(len(m.ch_mult) > 0 and all(isinstance(c, int) and c > 0 for c in m.ch_mult),
             f"model.ch_mult={tuple(m.ch_mult)}: must be a non-empty tuple of positive integers.")
    _positive_int(config, "model.num_res_blocks")
    levels = len(m.ch_mult)
    _require(size % 2 ** (levels - 1) == 0,
             f"data.image_size={size} is not divisible by 2**(len(model.ch_mult) - 1)="
             f"{2 ** (levels - 1)}: the U-Net halves the image {levels - 1} times; use fewer "
             f"ch_mult levels or an image size that is a multiple of {2 ** (levels - 1)}.")
    reached = unet_resolutions(size, m.ch_mult)
    for r in m.attn_resolutions:
        _require(r in reached,
                 f"model.attn_resolutions={tuple(m.attn_resolutions)} contains {r}, which the U-Net never "
                 f"reaches with data.image_size={size} and model.ch_mult={tuple(m.ch_mult)}: valid "
                 f"resolutions are {reached}.")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout!r}: must be in [0, 1).")
    _require(isinstance(m.num_classes, int) and m.num_classes >= 0,
             f"model.num_classes={m.num_classes!r}: must be 0 (unconditional) or the number of classes.")
    _one_of(m.dtype, "model.dtype", DTYPES)
    _one_of(m.attention, "model.attention", ATTENTION_KERNELS)
    if m.attention == "cudnn":
        _require(m.dtype != "float32", f"model.attention='cudnn' needs model.dtype bfloat16 or float16 (got "
                                       f"{m.dtype!r}); use model.attention='xla' for float32.")
        _require(jax.default_backend() == "gpu", f"model.attention='cudnn' needs an NVIDIA GPU; this process "
                                                 f"runs on {jax.default_backend()!r}: use model.attention='xla'.")
    try:  # trace the U-Net abstractly (nothing is compiled) to catch channel counts it cannot use
        jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    except ValueError as e:
        raise UserError(
            f"model.ch={m.ch}, model.ch_mult={tuple(m.ch_mult)}: the U-Net cannot be built ({e}). Its "
            f"GroupNorm takes 32 groups, so every channel count, skip concatenations included, must be "
            f"below 32 or a multiple of 32: a model.ch that is a multiple of 32 always works.") from None


def validate_diffusion(config):
    c = config.diffusion
    _positive_int(config, "diffusion.num_timesteps")
    _one_of(c.beta_schedule, "diffusion.beta_schedule", diffusion.BETA_SCHEDULES)
    _one_of(c.model_output, "diffusion.model_output", diffusion.MODEL_OUTPUTS)
    _one_of(c.variance, "diffusion.variance", diffusion.VARIANCES)
    if c.beta_schedule == "linear":
        _require(0.0 < c.beta_start <= c.beta_end <= 1.0,
                 f"diffusion.beta_start={c.beta_start}, diffusion.beta_end={c.beta_end}: need "
                 f"0 < beta_start <= beta_end <= 1.")
    _require(_is_number(c.vlb_weight) and c.vlb_weight >= 0,
             f"diffusion.vlb_weight={c.vlb_weight!r}: must be a number >= 0 (lambda of L_hybrid = L_simple + "
             f"lambda L_vlb, used with diffusion.variance='learned_range'; 0.001 in Nichol & Dhariwal 2021).")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_sampling(config):
    """The `sampling` section's sampler, steps and the options of the samplers (eta, thresholding,
    heun's churn). Raises UserError naming the field and what is valid."""
    sp = config.sampling
    _one_of(sp.sampler, "sampling.sampler", sorted(sampling.SAMPLERS))
    T = config.diffusion.num_timesteps
    _require(isinstance(sp.steps, int) and not isinstance(sp.steps, bool) and 1 <= sp.steps <= T,
             f"sampling.steps={sp.steps!r}: must be an integer from 1 to diffusion.num_timesteps={T} (network "
             f"evaluations; fewer than {T} respaces the chain).")
    _require(_is_number(sp.eta) and 0.0 <= sp.eta <= 1.0,
             f"sampling.eta={sp.eta!r}: must be in [0, 1] (ddim: 0 deterministic, 1 the ancestral variance).")
    _require(sp.threshold in ("auto",) + diffusion.THRESHOLDS,
             f"sampling.threshold={sp.threshold!r}: must be one of {('auto',) + diffusion.THRESHOLDS} ('auto': "
             f"as diffusion.clip_x0 says, 'clip' or 'none').")
    _require(_is_number(sp.threshold_percentile) and 0.0 < sp.threshold_percentile <= 1.0,
             f"sampling.threshold_percentile={sp.threshold_percentile!r}: must be in (0, 1] (a quantile of |x0|, "
             f"0.995 in Saharia et al. 2022).")
    for name in ("s_churn", "s_tmin", "s_noise"):
        value = sp[name]
        _require(_is_number(value) and value >= 0, f"sampling.{name}={value!r}: must be a number >= 0.")
    _require(_is_number(sp.s_tmax) and sp.s_tmax >= sp.s_tmin,
             f"sampling.s_tmax={sp.s_tmax!r}: must be a number >= sampling.s_tmin={sp.s_tmin!r} (inf: no upper "
             f"bound).")


def validate_training(config, num_devices: int):
    t, o = config.training, config.optim
    batch = _positive_int(config, "training.batch_size")
    _require(batch % num_devices == 0,
             f"training.batch_size={batch} is not divisible by {num_devices} devices: use a multiple of "
             f"{num_devices}, e.g. {max(1, round(batch / num_devices)) * num_devices}.")
    k = _positive_int(config, "training.steps_per_call")
    for name in ("num_train_steps", "log_every", "checkpoint_every"):
        value = _positive_int(config, f"training.{name}")
        _require(value % k == 0, f"training.{name}={value} is not a multiple of training.steps_per_call={k}: "
                                 f"steps advance {k} at a time.")
    _require(isinstance(t.sample_every, int) and t.sample_every >= 0 and t.sample_every % k == 0,
             f"training.sample_every={t.sample_every!r}: must be 0 (no samples) or a multiple of "
             f"training.steps_per_call={k}.")
    if t.sample_every:
        _positive_int(config, "training.num_sample_images")
    _positive_int(config, "training.keep_checkpoints")
    _require(isinstance(t.profile_steps, int) and t.profile_steps >= 0,
             f"training.profile_steps={t.profile_steps!r}: must be 0 (no profile) or a number of steps.")
    _require(0.0 <= t.label_dropout <= 1.0, f"training.label_dropout={t.label_dropout!r}: must be in [0, 1].")
    _require(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate!r}: must be positive.")
    _require(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
             f"optim.warmup_steps={o.warmup_steps!r}: must be a non-negative integer.")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip!r}: must be >= 0 (0 turns clipping off).")
    _require(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay!r}: must be in [0, 1).")


def validate_config(config, num_devices: int | None = None):
    """Raises UserError (a ValueError) naming the first bad field. `num_devices`: all JAX devices."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    validate_data_and_model(config)
    validate_diffusion(config)
    validate_training(config, num_devices)
