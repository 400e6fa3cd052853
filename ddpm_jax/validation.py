"""Every check of user input, before anything is compiled or written: one error type, `UserError`,
whose message names the field, flag or file and what would be valid (commands print it as one line).

`validate_config` (training) checks every section; `validate_sampling` and `validate_eval` are what
the sample and evaluate commands check after their flags are written into the config. None of them
needs TensorFlow or data; the dataset itself is checked by `input_pipeline.check_dataset`.
"""
from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from ddpm_jax import diffusion, sampling, superres
from ddpm_jax.models.unet import DOWNSAMPLE_PADDING, TEXT_ATTENTION, TEXT_ENCODERS, TIME_EMBEDDINGS
from ddpm_jax.train_state import init_params

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("xla", "cudnn")
# The diffusion process and what the network's output means.
_DIFFUSION_FIELDS = ("diffusion.num_timesteps", "diffusion.beta_schedule", "diffusion.beta_start", "diffusion.beta_end",
                     "diffusion.model_output", "diffusion.variance")
# What autoguidance's guide run (sampling.guide_workdir) shares with the run it guides: the same input,
# condition and output meaning, so the two outputs combine linearly. Its size and training may differ.
GUIDE_FIELDS = ("data.image_size", "data.channels", "data.max_text_len", "model.num_classes", "model.text_encoder",
                "model.text_emb_dim", "model.low_res_size") + _DIFFUSION_FIELDS


class UserError(ValueError):
    """Input that cannot work (a config value, flag or file); the message names it and what is valid."""


BPD_METHODS = ("vlb", "ode")  # `evaluation.likelihood.bpd`, `ode_bpd`
DISTILL_MODES = ("progressive", "guidance")  # `distillation.training_targets`


def _require(ok: bool, message: str):
    if not ok:
        raise UserError(message)


def _positive_int(config: ConfigDict, path: str):
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


def validate_data_and_model(config: ConfigDict, reads_data: bool = True):
    d, m = config.data, config.model
    size = _positive_int(config, "data.image_size")
    _one_of(d.channels, "data.channels", (1, 3))
    _require(not reads_data or d.dataset != "folder" or bool(d.data_dir),
             "data.dataset='folder' needs data.data_dir=PATH, the folder of images to train on.")
    _positive_int(config, "data.shuffle_buffer")
    _non_negative_int(d.random_crop, "data.random_crop")
    _require(d.random_crop == 0 or d.random_crop >= size,
             f"data.random_crop={d.random_crop}: the images are made this size and cropped to "
             f"data.image_size={size}, so it must be 0 (no crop) or at least {size}.")
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
    validate_text(config, reads_data)
    validate_low_res(config)
    _require(isinstance(m.guidance_embedding, bool),
             f"model.guidance_embedding={m.guidance_embedding!r}: must be True or False.")
    _require(not m.guidance_embedding or m.num_classes or m.text_encoder != "none",
             "model.guidance_embedding=True: the guidance weight is an input of class- or text-conditional models; "
             "this one has model.num_classes=0 and model.text_encoder='none'.")
    _non_negative_int(m.attn_head_dim, "model.attn_head_dim")
    if m.attn_head_dim:  # every attention layer's channels: its level's, and the middle's (the last level's)
        widths = sorted({m.ch * m.ch_mult[reached.index(r)] for r in m.attn_resolutions} | {m.ch * m.ch_mult[-1]})
        _require(all(w % m.attn_head_dim == 0 for w in widths),
                 f"model.attn_head_dim={m.attn_head_dim}: must divide the channels of every attention layer "
                 f"{widths} (0: one head of all channels).")
    _one_of(m.time_embedding, "model.time_embedding", TIME_EMBEDDINGS)
    _one_of(m.downsample_padding, "model.downsample_padding", tuple(DOWNSAMPLE_PADDING))
    _require(_is_number(m.norm_eps) and m.norm_eps > 0, f"model.norm_eps={m.norm_eps!r}: must be a positive number.")
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


def validate_text(config: ConfigDict, reads_data: bool = True):
    """The text-conditioning fields (`model.text_*`, `data.max_text_len`, `data.random_flip`); with
    `reads_data`, also the frozen encoder's config.json."""
    d, m = config.data, config.model
    _one_of(m.text_encoder, "model.text_encoder", TEXT_ENCODERS)
    _one_of(m.text_attention, "model.text_attention", TEXT_ATTENTION)
    _one_of(m.text_encoder_dtype, "model.text_encoder_dtype", ("", "bfloat16", "float32"))  # t5.load's
    _positive_int(config, "model.text_encoder_shards")
    _require(not m.text_encoder_path or m.text_encoder == "precomputed",
             f"model.text_encoder_path={m.text_encoder_path!r}: a frozen encoder gives precomputed embeddings; set "
             f"model.text_encoder='precomputed' (model.text_encoder={m.text_encoder!r}).")
    _require(not d.embed_captions or (m.text_encoder == "precomputed" and m.text_encoder_path),
             f"data.embed_captions=True: captions are embedded by the frozen T5 of a precomputed model; set "
             f"model.text_encoder='precomputed' (is {m.text_encoder!r}) and model.text_encoder_path=T5_FOLDER "
             f"(is {m.text_encoder_path!r}).")
    if m.text_encoder == "none":
        return
    _require(not m.num_classes, f"model.num_classes={m.num_classes} and model.text_encoder={m.text_encoder!r}: "
                                "a model is conditioned on labels or on text, not both; set one to 0/'none'.")
    _require(m.attention == "xla", f"model.attention={m.attention!r}: text models mask padded tokens, which "
                                   "only model.attention='xla' takes.")
    for name in ("text_width", "text_depth", "text_heads"):
        _positive_int(config, f"model.{name}")
    _require(isinstance(d.max_text_len, int) and d.max_text_len >= 2,
             f"data.max_text_len={d.max_text_len!r}: must be an integer >= 2 (BOS and at least one byte).")
    if m.text_encoder == "trained":
        _require(m.text_width % m.text_heads == 0, f"model.text_width={m.text_width} does not split into "
                                                   f"model.text_heads={m.text_heads} heads.")
    else:
        _positive_int(config, "model.text_emb_dim")
        if m.text_encoder_path and reads_data:
            check_text_encoder(config)
    # Flipping an image swaps left and right but not the words: the caption would lie.
    _require(not (d.random_flip and d.dataset == "shapes"),
             "data.random_flip=True with a text model on 'shapes': flips swap left and right in the image "
             "but not in the caption; set data.random_flip=False.")


def check_text_encoder(config: ConfigDict):
    """UserError unless model.text_encoder_path is a T5 folder whose width is model.text_emb_dim and
    which model.text_encoder_shards can split."""
    from ddpm_jax import t5  # imported here: t5 imports this module

    m = config.model
    t5_config = t5.read_config(m.text_encoder_path)
    t5.check_shards(t5_config, m.text_encoder_shards)
    width = t5_config.d_model
    _require(width == m.text_emb_dim, f"model.text_emb_dim={m.text_emb_dim}: the encoder in model.text_encoder_path="
                                      f"{m.text_encoder_path!r} makes {width}-wide embeddings; set "
                                      f"model.text_emb_dim={width}.")


def validate_low_res(config: ConfigDict):
    """The super-resolution fields (`model.low_res_size`, `model.low_res_resize`,
    `diffusion.low_res_aug_max`)."""
    m, size = config.model, config.data.image_size
    _require(isinstance(m.low_res_size, int) and not isinstance(m.low_res_size, bool) and 0 <= m.low_res_size < size,
             f"model.low_res_size={m.low_res_size!r}: must be 0 (no low-resolution input) or an integer below "
             f"data.image_size={size}, the size of the low-resolution input.")
    _one_of(m.low_res_resize, "model.low_res_resize", superres.RESIZE_METHODS)
    a = config.diffusion.low_res_aug_max
    _require(_is_number(a) and 0.0 <= a <= 1.0, f"diffusion.low_res_aug_max={a!r}: must be in [0, 1] (the largest "
                                                "noise-augmentation level of the low-resolution input).")


def validate_diffusion(config: ConfigDict):
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
    _one_of(c.loss_weighting, "diffusion.loss_weighting", diffusion.LOSS_WEIGHTINGS)
    _require(isinstance(c.zero_terminal_snr, bool),
             f"diffusion.zero_terminal_snr={c.zero_terminal_snr!r}: True or False.")
    _require(not c.zero_terminal_snr or c.model_output == "v",
             f"diffusion.zero_terminal_snr=True with diffusion.model_output={c.model_output!r}: at the last step "
             "x_t is pure noise, where x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by 0; predict 'v' "
             "(as Lin et al. 2024).")
    _require(_is_number(c.min_snr_gamma) and c.min_snr_gamma > 0,
             f"diffusion.min_snr_gamma={c.min_snr_gamma!r}: must be a number > 0 (the cap on SNR_t of "
             f"diffusion.loss_weighting='min_snr'; 5 in Hang et al. 2023).")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_training(config: ConfigDict, num_devices: int):
    t, o = config.training, config.optim
    batch = _positive_int(config, "training.batch_size")
    _require(batch % num_devices == 0,
             f"training.batch_size={batch} is not divisible by {num_devices} devices: use a multiple of "
             f"{num_devices}, e.g. {max(1, round(batch / num_devices)) * num_devices}.")
    accum, per_device = _positive_int(config, "training.grad_accum_steps"), batch // num_devices
    divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
    _require(per_device % accum == 0,
             f"training.grad_accum_steps={accum} does not divide the {per_device} examples per device "
             f"(training.batch_size={batch} over {num_devices} device{'s' if num_devices > 1 else ''}): use one of "
             f"{divisors}.")
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
    lr = config.model.low_res_size
    for field, value in (("training.sample_every", t.sample_every), ("eval.eval_every", config.eval.eval_every)):
        _require(not (lr and value), f"{field}={value}: a super-resolution model (model.low_res_size={lr}) "
                                     "has no in-training samples or evaluation; set it to 0 and use `python -m "
                                     "ddpm_jax.evaluate sr` or `sample --low_res` on its checkpoints.")
    _positive_int(config, "training.keep_checkpoints")
    _positive_int(config, "training.stop_check_every")
    _require(isinstance(t.profile_steps, int) and t.profile_steps >= 0,
             f"training.profile_steps={t.profile_steps!r}: must be 0 (no profile) or a number of steps.")
    _one_of(t.nonfinite, "training.nonfinite", ("stop", "skip"))
    _require(0.0 <= t.label_dropout <= 1.0, f"training.label_dropout={t.label_dropout!r}: must be in [0, 1].")
    _require(0.0 <= t.text_dropout <= 1.0, f"training.text_dropout={t.text_dropout!r}: must be in [0, 1].")
    _require(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate!r}: must be positive.")
    _require(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
             f"optim.warmup_steps={o.warmup_steps!r}: must be a non-negative integer.")
    _require(isinstance(o.decay_steps, int) and (o.decay_steps == 0 or o.decay_steps > o.warmup_steps),
             f"optim.decay_steps={o.decay_steps!r}: must be 0 (constant after warmup) or a step after "
             f"optim.warmup_steps={o.warmup_steps}.")
    _require(not o.decay_steps or o.decay_steps >= t.num_train_steps,
             f"optim.decay_steps={o.decay_steps}: the learning rate would be 0 for the last steps of "
             f"training.num_train_steps={t.num_train_steps}; set it to at least that (or 0: no decay).")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip!r}: must be >= 0 (0 turns clipping off).")
    for name in ("b1", "b2"):
        _require(0.0 <= o[name] < 1.0, f"optim.{name}={o[name]!r}: must be in [0, 1).")
    _require(o.eps > 0, f"optim.eps={o.eps!r}: must be positive.")
    _require(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay!r}: must be in [0, 1).")


def _non_negative_int(value, path: str):
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"{path}={value!r}: must be a non-negative integer.")


def validate_sampling(config: ConfigDict):
    """The `sampling` section against the model it samples (labels, T): sampler, steps, the samplers'
    options (eta, thresholding, heun's churn), guidance, editing and batch fields."""
    sp, T = config.sampling, config.diffusion.num_timesteps
    _one_of(sp.sampler, "sampling.sampler", sorted(sampling.SAMPLERS))
    _require(isinstance(sp.steps, int) and not isinstance(sp.steps, bool) and 1 <= sp.steps <= T,
             f"sampling.steps={sp.steps!r}: must be an integer from 1 to diffusion.num_timesteps={T} (network "
             f"evaluations; fewer than {T} respaces the chain).")
    _one_of(sp.timestep_spacing, "sampling.timestep_spacing", diffusion.TIMESTEP_SPACINGS)
    _require(_is_number(sp.eta) and 0.0 <= sp.eta <= 1.0,
             f"sampling.eta={sp.eta!r}: must be in [0, 1] (ddim: 0 deterministic, 1 the ancestral variance).")
    _require(not sp.eta or sp.sampler == "ddim",
             f"sampling.eta={sp.eta} applies to sampling.sampler='ddim' only (this is {sp.sampler!r}).")
    _require(not config.diffusion.zero_terminal_snr or sp.sampler in diffusion.ZERO_SNR_SAMPLERS,
             f"sampling.sampler={sp.sampler!r} steps in log sigma, infinite at the last step of this run's zero "
             f"terminal SNR schedule (diffusion.zero_terminal_snr=True); use one of {diffusion.ZERO_SNR_SAMPLERS}.")
    _require(sp.threshold in ("auto",) + diffusion.THRESHOLDS,
             f"sampling.threshold={sp.threshold!r}: must be one of {('auto',) + diffusion.THRESHOLDS} ('auto': "
             f"as diffusion.clip_x0 says, 'clip' or 'none').")
    _require(_is_number(sp.threshold_percentile) and 0.0 < sp.threshold_percentile <= 1.0,
             f"sampling.threshold_percentile={sp.threshold_percentile!r}: must be in (0, 1] (a quantile of |x0|, "
             f"0.995 in Saharia et al. 2022).")
    for name in ("s_churn", "s_tmin", "s_noise"):
        value = sp[name]
        _require(_is_number(value) and value >= 0, f"sampling.{name}={value!r}: must be a number >= 0.")
    _require(_is_number(sp.ode_tolerance) and 0 < sp.ode_tolerance < 1,
             f"sampling.ode_tolerance={sp.ode_tolerance!r}: the ode sampler's relative and absolute tolerance, in "
             "(0, 1) (e.g. 1e-5; larger is faster and coarser).")
    _require(_is_number(sp.s_tmax) and sp.s_tmax >= sp.s_tmin,
             f"sampling.s_tmax={sp.s_tmax!r}: must be a number >= sampling.s_tmin={sp.s_tmin!r} (inf: no upper "
             f"bound).")
    _require(_is_number(sp.guidance) and sp.guidance >= 0, f"sampling.guidance={sp.guidance!r}: must be >= 0.")
    _require(_is_number(sp.guidance_t_min) and _is_number(sp.guidance_t_max)
             and 0 <= sp.guidance_t_min <= sp.guidance_t_max,
             f"sampling.guidance_t_min={sp.guidance_t_min!r}, sampling.guidance_t_max={sp.guidance_t_max!r}: need "
             "0 <= guidance_t_min <= guidance_t_max (model timesteps; inf: no upper bound).")
    _require(_is_number(sp.guidance_rescale) and 0 <= sp.guidance_rescale <= 1,
             f"sampling.guidance_rescale={sp.guidance_rescale!r}: phi of guidance rescale, in [0, 1] (0: off).")
    _require(not sp.guidance or config.model.num_classes or config.model.text_encoder != "none" or sp.guide_workdir,
             f"sampling.guidance={sp.guidance} needs a class- or text-conditional model (classifier-free) or "
             "sampling.guide_workdir (autoguidance); this one has model.num_classes=0 and "
             "model.text_encoder='none' (train one with e.g. configs/digits_cond.py).")
    for name, off in (("guidance_rescale", 0.0), ("guide_workdir", "")):
        _require(not (sp.guidance and config.model.guidance_embedding and sp[name] != off),
                 f"sampling.{name}={sp[name]!r}: this model learnt guidance (model.guidance_embedding) and takes w "
                 f"as an input, so there is no conditional output apart from the guided one; set {off!r}.")
    _non_negative_int(sp.guide_checkpoint_step, "sampling.guide_checkpoint_step")
    _require(not sp.guide_checkpoint_step or sp.guide_workdir,
             f"sampling.guide_checkpoint_step={sp.guide_checkpoint_step}: a checkpoint of sampling.guide_workdir, "
             "which is not set.")
    if sp.guide_workdir and sp.guidance:  # unguided, the guide is not used (generation.autoguided)
        check_guide(config)
    _require(_is_number(sp.strength) and 0.0 <= sp.strength <= 1.0,
             f"sampling.strength={sp.strength!r}: must be in [0, 1].")
    _require(_is_number(sp.aug_level) and 0.0 <= sp.aug_level <= 1.0,
             f"sampling.aug_level={sp.aug_level!r}: must be in [0, 1] (0: the low-resolution input as it is).")
    _require(_is_number(sp.sr_strength) and 0.0 <= sp.sr_strength <= 1.0,
             f"sampling.sr_strength={sp.sr_strength!r}: must be in [0, 1] (1: from pure noise; below 1: from the "
             "upsampled input noised to t = sr_strength * T).")
    for name in ("mask_strength", "mask_threshold"):
        _require(_is_number(sp[name]) and 0.0 < sp[name] <= 1.0, f"sampling.{name}={sp[name]!r}: must be in (0, 1].")
    _positive_int(config, "sampling.mask_draws")
    _non_negative_int(sp.mask_dilation, "sampling.mask_dilation")
    _non_negative_int(sp.jump_length, "sampling.jump_length")
    _require(sp.jump_length <= sp.steps,
             f"sampling.jump_length={sp.jump_length}: at most sampling.steps={sp.steps}.")
    _positive_int(config, "sampling.jump_n_sample")
    _positive_int(config, "sampling.num_frames")
    _positive_int(config, "sampling.num_samples")
    _positive_int(config, "sampling.batch_size")
    _non_negative_int(sp.seed, "sampling.seed")


def _other_run(config: ConfigDict, field: str, fields, hint: str, why: str) -> ConfigDict:
    """The config of the run whose --workdir is config field `field`, or a UserError: no config.json
    there (`hint` says what to give), or it differs from `config` in one of `fields` (`why` it must not)."""
    from ddpm_jax import checkpoints, files  # they import this module

    section, name = field.split(".")
    path = config[section][name]
    _require(files.is_file(os.path.join(path, checkpoints.CONFIG_FILE)),
             f"{field}={path!r}: no {checkpoints.CONFIG_FILE} there; {hint}")
    other = checkpoints.load_config(path)
    for f in fields:
        section, name = f.split(".")
        ours, theirs = config[section][name], other[section][name]
        _require(ours == theirs, f"{field}={path}: its {f}={theirs!r} differs from this run's {ours!r}; {why}")
    return other


def _has_checkpoint(path: str, step: int, step_field: str, field: str):
    from ddpm_jax import checkpoints

    _require(not step or step in checkpoints.steps(path),
             f"{step_field}={step}: {field}={path} has no checkpoint of that step (see its "
             f"{checkpoints.CHECKPOINT_DIR}/ folder).")


def check_guide(config: ConfigDict) -> ConfigDict:
    """The config of `sampling.guide_workdir`'s run, or a UserError naming the first of `GUIDE_FIELDS`
    in which it differs from `config` (the run it guides)."""
    guide = _other_run(config, "sampling.guide_workdir", GUIDE_FIELDS,
                       "give the --workdir of a training run of the same model, e.g. the same config trained for "
                       "fewer steps.",
                       "the guide must be a version of the same model (the same data, conditioning and diffusion; "
                       "only its size and training may differ).")
    _has_checkpoint(config.sampling.guide_workdir, config.sampling.guide_checkpoint_step,
                    "sampling.guide_checkpoint_step", "sampling.guide_workdir")
    return guide


def teacher_fields(config: ConfigDict) -> tuple[str, ...]:
    """What a distilled student shares with its teacher (`distill.teacher`): every `model.*` field that
    shapes or changes the params' meaning (not how they are computed: dtype, kernels, remat, dropout,
    where a frozen T5 is read), the images, and the diffusion process and its parameterisation."""
    compute_only = ("dtype", "attention", "remat", "dropout", "text_encoder_path", "text_encoder_dtype",
                    "text_encoder_shards")
    return (tuple(f"model.{name}" for name in config.model if name not in compute_only)
            + ("data.image_size", "data.channels", "data.max_text_len") + _DIFFUSION_FIELDS
            + ("diffusion.zero_terminal_snr",))


def validate_distill(config: ConfigDict):
    """The `distill` section: the mode, the guidance weights, the student's sampler (progressive
    rounds), and the teacher run against it (`teacher_fields`; a teacher that is itself a student of
    progressive distillation took twice `sampling.steps`)."""
    d, sp, m, T = config.distill, config.sampling, config.model, config.diffusion.num_timesteps
    _non_negative_int(d.teacher_checkpoint_step, "distill.teacher_checkpoint_step")
    _one_of(d.mode, "distill.mode", DISTILL_MODES)
    _require(_is_number(d.guidance) and d.guidance >= 0, f"distill.guidance={d.guidance!r}: must be >= 0.")
    _require(_is_number(d.guidance_min) and _is_number(d.guidance_max) and 0 <= d.guidance_min <= d.guidance_max,
             f"distill.guidance_min={d.guidance_min!r}, distill.guidance_max={d.guidance_max!r}: need 0 <= "
             "guidance_min <= guidance_max (the range of w a student with model.guidance_embedding learns).")
    if not d.teacher:
        for name in ("teacher_checkpoint_step", "guidance"):
            _require(not d[name], f"distill.{name}={d[name]}: applies to distill.teacher, which is not set.")
        _require(d.mode == "progressive", f"distill.mode={d.mode!r}: applies to distill.teacher, which is not set.")
        _require(not m.guidance_embedding, "model.guidance_embedding=True: the student learns w from a guided "
                                           "teacher; set distill.teacher (configs/distill_guidance.py does).")
        return
    _require(not d.guidance or m.num_classes or m.text_encoder != "none",
             f"distill.guidance={d.guidance}: classifier-free guidance of the teacher needs a class- or "
             "text-conditional model; this one has model.num_classes=0 and model.text_encoder='none'.")
    _require(not (d.guidance and m.guidance_embedding),
             f"distill.guidance={d.guidance}: a student with model.guidance_embedding learns every w in "
             "[distill.guidance_min, distill.guidance_max] instead; set distill.guidance=0.")
    _require(not (d.guidance and sp.guidance),
             f"sampling.guidance={sp.guidance}: the student learns its teacher guided with distill.guidance="
             f"{d.guidance}, so it samples guided with sampling.guidance=0; set that.")
    _require(config.diffusion.variance != "learned_range",
             "diffusion.variance='learned_range': distillation trains the model's mean output, not a learned "
             "variance; distill a teacher with 'fixedlarge' or 'fixedsmall'.")
    fields = teacher_fields(config)
    if d.mode == "guidance":
        _require(d.guidance or m.guidance_embedding,
                 "distill.mode='guidance': the student learns its teacher's guided output; set distill.guidance=w, "
                 "or model.guidance_embedding=True to learn every w in a range (configs/distill_guidance.py).")
        fields = tuple(f for f in fields if f != "model.guidance_embedding")
    else:
        _require(sp.sampler == "ddim" and sp.eta == 0 and sp.timestep_spacing == "trailing",
                 f"distill.teacher is set, so the run learns deterministic DDIM steps on trailing timesteps; this "
                 f"config samples with sampling.sampler={sp.sampler!r}, eta={sp.eta}, timestep_spacing="
                 f"{sp.timestep_spacing!r}: set 'ddim', 0 and 'trailing' (configs/distill.py does).")
        _require(2 * sp.steps <= T, f"sampling.steps={sp.steps}: the student's steps; its teacher takes twice as "
                                    f"many, at most diffusion.num_timesteps={T}.")
    teacher = _other_run(config, "distill.teacher", fields,
                         "give the --workdir of the training run to distill (a DDPM, or the last round's student).",
                         "the student starts from the teacher's params and keeps its model and diffusion process.")
    learnt = teacher.distill.guidance or teacher.model.guidance_embedding
    _require(not (d.guidance or d.mode == "guidance") or not learnt,
             f"distill.teacher={d.teacher} learnt its own teacher's guidance already; distil it with "
             "distill.mode='progressive' and distill.guidance=0 (configs/distill.py).")
    _require(not (teacher.distill.teacher and teacher.distill.mode == "progressive" and d.mode == "progressive")
             or teacher.sampling.steps == 2 * sp.steps,
             f"sampling.steps={sp.steps}: distill.teacher={d.teacher} is a student of {teacher.sampling.steps} steps, "
             f"so this round's student takes {teacher.sampling.steps // 2} (half as many).")
    _has_checkpoint(d.teacher, d.teacher_checkpoint_step, "distill.teacher_checkpoint_step", "distill.teacher")


def validate_eval(config: ConfigDict, in_loop: bool = False):
    """The `eval` section (`python -m ddpm_jax.evaluate`; `in_loop`: evaluation during training)."""
    e, T = config.eval, config.diffusion.num_timesteps
    for name in ("eval_every", "num_samples", "bpd_examples", "steps", "seed"):
        _non_negative_int(e[name], f"eval.{name}")
    _positive_int(config, "eval.batch_size")
    _require(e.steps <= T, f"eval.steps={e.steps}: at most diffusion.num_timesteps={T} (0: sampling.steps).")
    _require(not in_loop or bool(e.inception_weights) == bool(e.reference_stats),
             "eval.inception_weights and eval.reference_stats: FID in the training loop needs both (or "
             f"neither); got {e.inception_weights!r} and {e.reference_stats!r}.")
    _require(e.num_samples != 1, "eval.num_samples=1: need at least 2 for a covariance (or 0: none).")
    _one_of(e.bpd_method, "eval.bpd_method", BPD_METHODS)
    _require(not (config.diffusion.zero_terminal_snr and e.bpd_method == "ode"),
             "eval.bpd_method='ode' solves the probability-flow ODE from sigma_T, infinite with "
             "diffusion.zero_terminal_snr=True; use 'vlb'.")
    _require(0 < e.ode_tolerance < 1, f"eval.ode_tolerance={e.ode_tolerance}: the ODE solver's relative and absolute "
                                      "tolerance, in (0, 1) (e.g. 1e-5).")
    _require(0 <= e.ode_sigma_min < 1, f"eval.ode_sigma_min={e.ode_sigma_min}: the noise level (std) the ODE starts "
                                       "from, in [0, 1) (0: the model's smallest; e.g. 1e-3).")


def validate_config(config: ConfigDict, num_devices: int | None = None, reads_data: bool = True):
    """Raises UserError naming the first bad field of a training config. `num_devices`: all JAX devices;
    `reads_data` False: where the dataset is not asked (the benchmark makes its own batches)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    validate_data_and_model(config, reads_data)
    validate_diffusion(config)
    validate_training(config, num_devices)
    validate_sampling(config)
    validate_distill(config)
    validate_eval(config, in_loop=True)


def check_output_dir(out: str, flag: str = "--out") -> None:
    """A UserError unless `out` is (or can be made) a writable folder: checked before any work.
    Bucket paths (gs://...) are not checked here; their writes report their own errors."""
    if "://" in out:
        return
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag}={out}: {parent} is a file; give a folder.")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag}={out}: {parent} is not writable.")


def check_output_file(path: str, flag: str) -> None:
    """A UserError unless `path` can be written as a file (its folder exists or can be made); bucket
    paths are not checked."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag}={path}: is a folder; give a file name.")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)
