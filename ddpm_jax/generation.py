"""Sampling a trained model on all devices: requests, batched runs, output files, figures.

`config.sampling` says how to sample (sampler, steps, guidance, ...; the sample command's flags
write into it); a `Request` adds what to sample (labels, input images, a mask) after checking it
against the model. `run` draws the images in device batches through one pmapped function per
(config, request kind), built once and reused (the training grid, the sample command and
evaluation all go through it); `write_outputs` and `process_figures` make the files.

    config = checkpoints.load_config("runs/digits_cond")
    params, step = checkpoints.load_params("runs/digits_cond", config)
    config.sampling.update(sampler="ddim", steps=50, guidance=1.0, num_samples=100)
    images = generation.run(config, params, generation.make_request(config, label="all"))["images"]
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from ddpm_jax import chunk_store, files, image_utils, parallel, superres, t5, text
from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax.models import unet_from_config
from ddpm_jax.train_state import example_cond
from ddpm_jax.validation import UserError, check_guide, check_output_dir, check_text_encoder, validate_sampling

FIGURE_ROWS = 8  # images in each process figure
AUTO_MASK = "auto"  # --mask=auto: DiffEdit's mask, computed from the prompts
PARTIAL_DIR = "partial"  # OUT/partial: the batches sampled so far (`chunk_store`), gone once the files are written
_FORWARD = 2 ** 31 - 1  # fold_in tag of the forward-process figure's noise; no batch index reaches it


@dataclasses.dataclass
class Request:
    """A checked request. Arrays are `[N, ...]`: cond (the U-Net's conditioning, see `models.UNet`;
    'drop' always), x0 float32 in [-1, 1], mask bool. null_cond: a negative prompt's condition
    (guidance's unconditional half; default the null condition); source_cond: the condition DDIM
    inversion runs under (prompt-to-prompt editing). prompts: the distinct prompts, each on
    `num_samples // len(prompts)` consecutive rows. image_size: the side of the images made (a
    super-resolution model upscaling larger inputs than it was trained on), 0 for data.image_size."""

    num_samples: int
    spec: S.SampleSpec
    cond: dict
    label: str | None  # as given: a class, 'all', 'null', or None for unconditional models
    x0: np.ndarray | None = None
    mask: np.ndarray | None = None
    null_cond: dict | None = None
    source_cond: dict | None = None
    prompts: list[str] | None = None
    image_size: int = 0

    @property
    def labels(self) -> np.ndarray:
        """int32 `[N]` class labels (zeros for models without classes)."""
        return self.cond.get("label", np.zeros(self.num_samples, np.int32))


def parse_labels(label: str | None, num_classes: int, n: int) -> np.ndarray:
    """int32 `[n]` labels for --label (0 for unconditional models, which ignore them)."""
    if not num_classes:
        if label is not None:
            raise UserError(f"--label={label}: this run's model is unconditional (model.num_classes=0).")
        return np.zeros(n, np.int32)
    label = "all" if label is None else label
    if label == "all":
        return (np.arange(n) * num_classes // n).astype(np.int32)
    if label == "null":
        return np.full(n, num_classes, np.int32)
    if not label.lstrip("-").isdigit() or not 0 <= int(label) < num_classes:
        raise UserError(f"--label={label}: must be 'all', 'null' or a class in [0, {num_classes - 1}].")
    return np.full(n, int(label), np.int32)


def unconditional(config: ConfigDict, n: int) -> dict:
    """The null condition of `n` rows for `config.model` (any kind; unconditional models ignore it)."""
    return {**jax.tree.map(np.asarray, example_cond(config, n)), "drop": np.ones(n, bool)}


def read_prompts(path: str) -> list[str]:
    """The prompts of a --prompts file, one per non-empty line (surrounding spaces dropped)."""
    if not files.is_file(path):
        raise UserError(f"--prompts={path}: no such file.")
    try:
        prompts = [line.strip() for line in epath.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"--prompts={path}: not UTF-8 text.") from None
    if not prompts:
        raise UserError(f"--prompts={path}: the file has no prompts (one per line).")
    return prompts


def text_cond(config: ConfigDict, texts: list[str], flag: str | None) -> dict:
    """{'tokens', 'mask', 'drop' (False)} of `texts` for a trained text encoder, or {'text_emb', 'mask',
    'drop'} from the frozen encoder of a precomputed one; a text longer than the model reads
    (`data.max_text_len` tokens, BOS or EOS included) is a UserError naming `flag`, or, with `flag`
    None (a dataset's captions), cut as training cuts it."""
    if config.model.text_encoder == "precomputed":
        check_text_encoder(config)
        emb, mask = t5.from_config(config.model).embed(texts, config.data.max_text_len, flag)
        return {"text_emb": emb, "mask": mask, "drop": np.zeros(len(texts), bool)}
    limit = config.data.max_text_len - 1
    for t in texts:
        if flag is not None and len(t.encode("utf-8")) > limit:
            raise UserError(f"{flag}={t!r}: {len(t.encode('utf-8'))} bytes; this model reads at most {limit} "
                            f"(data.max_text_len={config.data.max_text_len} tokens, BOS included).")
    tokens, mask = text.tokenize(texts, config.data.max_text_len)
    return {"tokens": tokens, "mask": mask, "drop": np.zeros(len(texts), bool)}


def embedding_cond(config: ConfigDict, path: str) -> dict:
    """{'text_emb' `[P, L, D]`, 'mask', 'drop'} from a --prompt_embedding .npz holding 'text_emb'
    `[L, D]` or `[P, L, D]` and optionally 'text_mask' (bool, `[L]` / `[P, L]`; default all True)."""
    f = files.load_npz(path, "--prompt_embedding", ("text_emb",))
    emb = f["text_emb"]
    emb = emb[None] if emb.ndim == 2 else emb
    D = config.model.text_emb_dim
    if emb.ndim != 3 or emb.shape[2] != D or not np.issubdtype(emb.dtype, np.floating) or 0 in emb.shape:
        raise UserError(f"--prompt_embedding={path}: 'text_emb' must be float [L, {D}] or [P, L, {D}] "
                        f"(model.text_emb_dim={D}), got {f['text_emb'].dtype} {f['text_emb'].shape}.")
    mask = np.broadcast_to(f.get("text_mask", np.ones(emb.shape[:2], bool)), emb.shape[:2]).astype(bool)
    if not mask.any(1).all():
        raise UserError(f"--prompt_embedding={path}: every prompt needs a True entry in 'text_mask'.")
    return {"text_emb": emb.astype(np.float32), "mask": mask, "drop": np.zeros(len(emb), bool)}


def conditioning(config: ConfigDict, *, label=None, prompts=None, prompt_embedding=None, negative_prompt=None,
                 source_prompt=None, prompt_flag: str | None = "--prompt") -> tuple[dict, dict | None, dict | None,
                                                                                str | None]:
    """(cond, null_cond, source_cond, label) of one row per prompt (one row, or the classes, when
    there are none), checked against the model: prompts and embeddings need a text model of their
    kind, labels a class-conditional one. A text model without prompts samples the null text."""
    m = config.model
    given_text = [f for f, v in (("--prompt", prompts), ("--prompt_embedding", prompt_embedding),
                                 ("--negative_prompt", negative_prompt), ("--source_prompt", source_prompt))
                  if v is not None]
    if m.text_encoder == "none":
        if given_text:
            raise UserError(f"{given_text[0]}: this run's model takes no text (model.text_encoder='none').")
        return {"drop": np.zeros(1, bool)}, None, None, label  # labels: `make_request`
    if label is not None:
        raise UserError(f"--label={label}: this run's model is conditioned on text; give --prompt.")
    if m.text_encoder == "precomputed":
        others = [f for f in given_text if f != "--prompt_embedding"]  # text, embedded by a frozen encoder
        if others and prompt_embedding is not None:
            raise UserError(f"{others[0]} and --prompt_embedding: give text or its embedding, not both.")
        if others and not m.text_encoder_path:
            raise UserError(f"{others[0]}: this model reads precomputed text embeddings (model.text_encoder="
                            "'precomputed') and has no frozen encoder to embed text (model.text_encoder_path, "
                            "--text_encoder=T5_FOLDER); give --prompt_embedding=FILE.npz.")
        if prompt_embedding is not None:
            return embedding_cond(config, prompt_embedding), None, None, None
        if not others:
            emb = np.zeros((1, 1, m.text_emb_dim), np.float32)
            return {"text_emb": emb, "mask": np.ones((1, 1), bool), "drop": np.ones(1, bool)}, None, None, None
    if prompt_embedding is not None:
        raise UserError("--prompt_embedding: this model encodes text itself (model.text_encoder='trained'); "
                        "give --prompt.")
    if negative_prompt is not None and not config.sampling.guidance:
        raise UserError("--negative_prompt replaces the null text in classifier-free guidance; set --guidance > 0.")
    if negative_prompt is not None and m.guidance_embedding:
        raise UserError("--negative_prompt: this model learnt guidance against the null text "
                        "(model.guidance_embedding) and takes w as an input; it cannot guide away from another prompt.")
    cond = text_cond(config, list(prompts or [""]), prompt_flag)
    if prompts is None:
        cond["drop"][:] = True
    null = None if negative_prompt is None else text_cond(config, [negative_prompt], "--negative_prompt")
    source = None if source_prompt is None else text_cond(config, [source_prompt], "--source_prompt")
    return cond, null, source, None


def _load(flag: str, path: str, **kw) -> np.ndarray:
    try:
        return image_utils.load_images(path, **kw)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--{flag}={path}: {e}") from None


def make_request(config: ConfigDict, *, label: str | None = None, prompts: list[str] | None = None,
                 prompt_embedding: str | None = None, negative_prompt: str | None = None,
                 source_prompt: str | None = None, init_images: str | None = None, mask: str | None = None,
                 low_res: str | np.ndarray | None = None, invert: bool = False,
                 given: frozenset[str] = frozenset(), prompt_flag: str | None = "--prompt") -> Request:
    """Checks `config.sampling` and the inputs against the model and reads the input images; every
    error is a UserError naming its flag or field. `given`: the flags the user set explicitly
    (--strength, --jump_length, ... make sense only with some inputs). `prompt_flag`: named by the error
    of a prompt too long for the model; None (a dataset's captions): cut as in training.

    Text models take `prompts` (or a `prompt_embedding` file); each prompt gets `sampling.num_samples`
    rows (with --init_images: the inputs, each edited under every prompt), prompt by prompt.
    Super-resolution models take `low_res` (a PNG or folder, or uint8 `[N, h, h, C]`): by default one
    row per input, each upscaled under every prompt, as --init_images; inputs larger than
    model.low_res_size are upscaled by the same factor (the U-Net is convolutional; its attention
    layers stay at their levels), e.g. whole images by a stage trained on crops."""
    validate_sampling(config)
    d, sp = config.data, config.sampling
    auto_mask = mask == AUTO_MASK
    if init_images is None and ("strength" in given or mask is not None):
        raise UserError(f"--{'mask' if mask is not None else 'strength'} edits the --init_images; give "
                        "--init_images too.")
    if invert and init_images is None:
        raise UserError("--invert applies to editing: give --init_images too.")
    if invert and mask is not None and "strength" not in given:
        raise UserError("--invert with --mask needs --strength, the level the inputs are inverted to (without it "
                        "the masked part is generated from noise).")
    if source_prompt is not None and not (invert or auto_mask):
        raise UserError("--source_prompt is the prompt DDIM inversion runs under, or the reference of "
                        f"--mask={AUTO_MASK}: give --invert (and --init_images) or --mask={AUTO_MASK} too.")
    if auto_mask and not (config.model.num_classes or config.model.text_encoder != "none"):
        raise UserError(f"--mask={AUTO_MASK} (DiffEdit) compares two conditions of the model; this run's model is "
                        "unconditional: give a mask image.")
    if auto_mask and config.model.text_encoder != "none" and prompts is None and prompt_embedding is None:
        raise UserError(f"--mask={AUTO_MASK} (DiffEdit) finds where the --prompt and the --source_prompt (default: "
                        "the null text) disagree: give --prompt.")
    if mask is None and {"jump_length", "jump_n_sample"} & given:
        raise UserError("--jump_length/--jump_n_sample apply to inpainting: give --mask too.")
    if "ode_tolerance" in given and sp.sampler != "ode":
        raise UserError(f"--ode_tolerance applies to --sampler=ode (this is {sp.sampler!r}).")
    if mask is not None and not S.get_sampler(sp.sampler).on_levels:
        raise UserError(f"--mask with --sampler={sp.sampler}: inpainting (RePaint) replaces the known region at the "
                        f"schedule's levels, and {sp.sampler} steps between its own noise levels; use one of "
                        f"{sorted(k for k, v in S.SAMPLERS.items() if v.on_levels)}.")
    cond, null_cond, source_cond, label = conditioning(
        config, label=label, prompts=prompts, prompt_embedding=prompt_embedding, negative_prompt=negative_prompt,
        source_prompt=source_prompt, prompt_flag=prompt_flag)
    num_prompts = len(cond["drop"]) if config.model.text_encoder != "none" else 1

    per_prompt, x0, mask_arr, level = sp.num_samples, None, None, None
    low_res_rows, image_size = None, 0
    if config.model.low_res_size:
        if low_res is None:
            raise UserError(f"--low_res: this run's model is a super-resolution model (model.low_res_size="
                            f"{config.model.low_res_size}); give --low_res=PNG_OR_FOLDER of the inputs.")
        if init_images is not None:
            raise UserError("--init_images: editing is not supported by super-resolution models (give --low_res only).")
        lr = low_res if isinstance(low_res, np.ndarray) else _load("low_res", low_res, channels=d.channels)
        image_size = sr_output_size(config, lr.shape[1:3], low_res if isinstance(low_res, str) else "images")
        per_prompt = sp.num_samples if "num_samples" in given else len(lr)
        low_res_rows = image_utils.from_uint8(lr[np.arange(per_prompt) % len(lr)])
        if sp.sr_strength < 1.0:  # SDEdit from the upsampled input instead of pure noise
            x0 = upsampled(config, low_res_rows, image_size)
            level = S.strength_to_level(sp.sr_strength, sp.steps)
    elif low_res is not None:
        raise UserError("--low_res: this run's model is not a super-resolution model (model.low_res_size=0).")
    if init_images is not None:
        images = _load("init_images", init_images, image_size=d.image_size, channels=d.channels)
        per_prompt = sp.num_samples if "num_samples" in given else len(images)
        x0 = image_utils.from_uint8(images[np.arange(per_prompt) % len(images)])
        if mask is None or "strength" in given:
            level = S.strength_to_level(sp.strength, sp.steps)
        if mask is not None and not auto_mask:
            m = _load("mask", mask, channels=1)
            if m.shape[1:3] != (d.image_size, d.image_size):
                raise UserError(f"--mask={mask}: the mask is {m.shape[2]}x{m.shape[1]}; it must be "
                                f"{d.image_size}x{d.image_size}, the size the model samples at.")
            if len(m) not in (1, len(images)):
                raise UserError(f"--mask={mask}: {len(m)} masks for {len(images)} --init_images; give one "
                                "mask or one per image.")
            mask_arr = (m >= 128)[np.arange(per_prompt) % len(m)]
    n = per_prompt * num_prompts
    # Prompt p on rows p * per_prompt ...; the inputs repeat for every prompt.
    cond = jax.tree.map(lambda a: np.repeat(a, per_prompt, axis=0), cond)
    x0, mask_arr = (None if a is None else np.tile(a, (num_prompts,) + (1,) * (a.ndim - 1)) for a in (x0, mask_arr))
    labels = parse_labels(label, config.model.num_classes, n)  # checks --label on every model
    if config.model.num_classes:
        cond["label"] = labels
    if low_res_rows is not None:
        cond["low_res"] = np.tile(low_res_rows, (num_prompts, 1, 1, 1))
        cond["aug_level"] = np.full(n, sp.aug_level, np.float32)
    # A negative or source prompt replaces the text only; the rows keep their labels and images.
    rows = lambda c: None if c is None else {**cond, **jax.tree.map(lambda a: np.repeat(a, n, axis=0), c)}
    spec = S.SampleSpec(sampler=sp.sampler, opts=S.step_options(config),
                        guidance=sp.guidance, guidance_interval=(sp.guidance_t_min, sp.guidance_t_max),
                        guidance_rescale=sp.guidance_rescale,
                        level=level, invert=invert, inpaint=mask is not None,
                        jump_length=sp.jump_length, jump_n_sample=sp.jump_n_sample,
                        mask_level=max(1, S.strength_to_level(sp.mask_strength, sp.steps)) if auto_mask else 0,
                        mask_draws=sp.mask_draws, mask_threshold=sp.mask_threshold, mask_dilation=sp.mask_dilation)
    return Request(n, spec, cond, label if config.model.num_classes else None, x0, mask_arr, rows(null_cond),
                   rows(source_cond), list(prompts) if prompts is not None else None, image_size)


def sr_output_size(config: ConfigDict, input_hw: tuple[int, int], name: str) -> int:
    """The side of the images a super-resolution model makes from inputs of `input_hw`: square inputs
    of low_res_size make data.image_size, larger ones as much larger; the U-Net needs a side that
    halves evenly at each of its levels. Anything else is a UserError naming --low_res=`name`."""
    d, m = config.data, config.model
    h, w = input_hw
    side, rem = divmod(h * d.image_size, m.low_res_size)
    halvings = 2 ** (len(m.ch_mult) - 1)
    if h != w or h < m.low_res_size or rem or side % halvings:
        raise UserError(f"--low_res={name}: the inputs are {w}x{h}; this model upscales {m.low_res_size}x"
                        f"{m.low_res_size} (model.low_res_size) to {d.image_size}x{d.image_size}, and square inputs "
                        f"at least that large whose upscaled side is a multiple of {halvings}.")
    return 0 if side == d.image_size else side


def paired_request(config: ConfigDict, low_res: np.ndarray, *, prompts: list[str] | None = None,
                   label: str | None = None) -> Request:
    """A super-resolution request of one row per uint8 image `low_res[i]` `[N, h, h, C]` (rather than
    each input under every prompt): with prompts, the N // len(prompts) rows of each prompt in turn
    (the order in which a base model's request made them)."""
    config = config.copy_and_resolve_references()
    config.sampling.num_samples = len(low_res) // (len(prompts) if prompts else 1)
    req = make_request(config, prompts=prompts, label=label, low_res=low_res[:1], given=frozenset({"num_samples"}))
    rows = image_utils.from_uint8(low_res)
    replace = lambda cond: None if cond is None else {**cond, "low_res": rows}
    return dataclasses.replace(req, cond=replace(req.cond), null_cond=replace(req.null_cond),
                               source_cond=replace(req.source_cond),
                               x0=None if req.x0 is None else upsampled(config, rows, req.image_size))


def upsampled(config: ConfigDict, low_res: np.ndarray, image_size: int = 0) -> np.ndarray:
    """float `[N, h, h, C]` low-res inputs resized to `image_size` (default `data.image_size`) as
    the model resizes them."""
    size = image_size or config.data.image_size
    return np.asarray(superres.upsample(low_res, size, config.model.low_res_resize))


def pmapped_sampler(config: ConfigDict, spec: S.SampleSpec, image_size: int = 0):
    """The pmapped `(params, key, shard) -> {'images'[, 'frames']}` of a config, a request kind and
    the side of the images (default `data.image_size`), built once per (config, spec, side) and
    reused. params are not replicated (in_axes None)."""
    side = image_size or config.data.image_size
    return parallel.built_once(("sample", config.to_json_best_effort(sort_keys=True), spec, side),
                               lambda: _build_sampler(config, spec, side))


def _build_sampler(config: ConfigDict, spec: S.SampleSpec, side: int):
    model = unet_from_config(config)
    guide_model = unet_from_config(check_guide(config)) if autoguided(config) else None
    if config.sampling.sampler == "ode":  # in bfloat16 the solver's error estimate would measure rounding
        model = model.clone(dtype=jnp.float32)
        guide_model = guide_model and guide_model.clone(dtype=jnp.float32)
    s = D.schedule_from_config(config.diffusion, config.sampling.steps, config.sampling.timestep_spacing)
    kind, shape = config.diffusion.model_output, (side, side, config.data.channels)

    def device_fn(params, key, shard):
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS_NAME))
        if guide_model is None:
            return S.sample_shard(model, s, kind, spec, shape, params, key, shard)
        params, guide_params = params
        return S.sample_shard(model, s, kind, spec, shape, params, key, shard, guide=(guide_model, guide_params))

    return jax.pmap(device_fn, parallel.AXIS_NAME, in_axes=(None, None, 0))


def autoguided(config: ConfigDict) -> bool:
    """Whether `config` samples with autoguidance: guided (w > 0) by a `sampling.guide_workdir` run."""
    return bool(config.sampling.guide_workdir and config.sampling.guidance)


def guide_params(config: ConfigDict):
    """(EMA params, step) of `sampling.guide_workdir`'s checkpoint `sampling.guide_checkpoint_step` (0: its newest),
    read once per process."""
    from ddpm_jax import checkpoints

    path, step = config.sampling.guide_workdir, config.sampling.guide_checkpoint_step

    def load():
        try:
            return checkpoints.load_params(path, check_guide(config), step=step or None,
                                           flag="sampling.guide_checkpoint_step")
        except UserError as e:  # its message says --workdir: name the field it came from
            raise UserError(f"sampling.guide_workdir: {e}") from None

    return parallel.built_once(("guide", path, step), load)


def run(config: ConfigDict, params, req: Request, progress=None, *, uint8: bool = False,
        resume_dir: str | None = None) -> dict:
    """Samples `req` on all devices in batches of `sampling.batch_size`: {'images': float `[N, H, W,
    C]` in [-1, 1][, 'frames' `[N, F, H, W, C]` when `req.spec.num_frames`]}. With several processes
    every process calls it and gets every image. With `autoguided(config)` the guide's params
    (`guide_params`) travel beside `params`.

    Batch c uses fold_in(key, c), device d in it fold_in(that, d), key = key(sampling.seed).
    uint8: 'images' come as uint8 (`image_utils.to_uint8`), each batch checked: non-finite samples
    are a UserError as soon as a batch has one. resume_dir: finished batches are kept there
    (`chunk_store`), so a rerun of the same config, params and request after a stop computes only
    the rest; the caller `chunk_store.clear`s it when its results are written.
    """
    fn = pmapped_sampler(config, req.spec, req.image_size)
    if autoguided(config):
        params = (params, guide_params(config)[0])
    key = jax.random.key(config.sampling.seed)
    inputs = {name: value for name, value in (("cond", req.cond), ("null_cond", req.null_cond),
                                              ("source_cond", req.source_cond), ("x0", req.x0), ("mask", req.mask))
              if value is not None}
    store = chunk_store.for_model(resume_dir, config, params, spec=repr(req.spec), image_size=req.image_size,
                                  uint8=uint8)
    post = (lambda c, out: _checked_uint8(c, out, config.sampling.sampler)) if uint8 else None
    return parallel.pad_shard_unpad(lambda c, shard: fn(params, jax.random.fold_in(key, c), shard), inputs,
                                    config.sampling.batch_size, progress, post=post, store=store)


def ode_fields(result: dict) -> dict:
    """{'ode_sampling_evals': network evaluations per image, mean} of a `run` result drawn by the ode
    sampler, for a result's JSON (bits/dim by ODE records its own as 'ode_evals'); {} for the other
    samplers."""
    return {"ode_sampling_evals": float(np.mean(result["ode_evals"]))} if "ode_evals" in result else {}


def _checked_uint8(c: int, out: dict, sampler: str) -> dict:
    """A batch's outputs with its images as uint8, after checking that they are finite."""
    bad = int((~np.isfinite(out["images"])).any(axis=tuple(range(1, out["images"].ndim))).sum())
    if bad:
        why = "the checkpoint's params are broken (a diverged run?)"
        if sampler == "ode":
            why = f"the ode solver did not reach --ode_tolerance in {S.ODE_MAX_TRIES:,} tries, or {why}"
        raise UserError(f"{bad} of the {len(out['images'])} samples of batch {c} are not finite: {why}.")
    return {**out, "images": image_utils.to_uint8(out["images"])}


def process_figures(config: ConfigDict, params, req: Request) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grids (rows: images, columns: steps): the sampler's reverse trajectory from noise for
    FIGURE_ROWS of the request's rows (evenly spaced, so several classes with --label=all; its own
    samples, drawn again), and the forward process from x_0 (those samples, or the inputs) to x_T."""
    rows = np.unique(np.linspace(0, req.num_samples - 1, min(FIGURE_ROWS, req.num_samples)).round().astype(int))
    pick = lambda a: None if a is None else jax.tree.map(lambda v: v[rows], a)
    num_frames = config.sampling.num_frames
    some = dataclasses.replace(req, num_samples=len(rows), spec=req.spec._replace(num_frames=num_frames),
                               cond=pick(req.cond), x0=pick(req.x0), mask=pick(req.mask),
                               null_cond=pick(req.null_cond), source_cond=pick(req.source_cond), prompts=None)
    rev = run(config, params, some)
    x0 = rev["images"] if req.x0 is None else some.x0
    full = D.schedule_from_config(config.diffusion)
    key = jax.random.fold_in(jax.random.key(config.sampling.seed), _FORWARD)
    frames = jax.jit(S.forward_trajectory, static_argnums=3)(full, key, jnp.asarray(x0), num_frames)
    fwd = np.concatenate([np.asarray(x0)[:, None], np.swapaxes(np.asarray(frames), 0, 1)], axis=1)
    grid = lambda f: image_utils.make_grid(image_utils.to_uint8(f.reshape((-1,) + f.shape[2:])), nrow=f.shape[1])
    return grid(fwd), grid(rev["frames"])


def write_outputs(out: str, images: np.ndarray, req: Request, num_classes: int, *, individual=False,
                  figures=None, masks=None) -> list[str]:
    """Writes the grid, the .npz of uint8 `images` `[N, H, W, C]`, optionally each image, the figures
    and DiffEdit's masks (bool `[N, H, W, 1]`, as masks.png and in the .npz); returns the paths written."""
    epath.Path(out).mkdir(parents=True, exist_ok=True)  # a local folder or gs://... (a workdir on a bucket)
    scale = max(1, 32 // images.shape[1])
    per_class = req.label == "all" and req.num_samples % num_classes == 0
    nrow = (req.num_samples // num_classes if per_class else
            req.num_samples // len(req.prompts) if req.prompts and len(req.prompts) > 1 else None)
    paths = [os.path.join(out, "samples.png"), os.path.join(out, "samples.npz")]
    image_utils.save_png(paths[0], image_utils.make_grid(images, nrow=nrow), scale)
    extra = {"labels": req.labels} if num_classes else {}
    if req.prompts:  # each image's prompt, as unicode (readable without pickles)
        extra["prompts"] = np.repeat(np.asarray(req.prompts), req.num_samples // len(req.prompts))
    if masks is not None:
        extra["masks"] = masks
        paths.append(os.path.join(out, "masks.png"))
        image_utils.save_png(paths[-1], image_utils.make_grid(masks.astype(np.uint8) * 255, nrow=nrow, pad_value=128),
                              scale)
    files.save_npz(paths[1], arr_0=images, **extra)
    if individual:
        for i, img in enumerate(images):
            paths.append(os.path.join(out, "images", f"{i:06d}.png"))
            image_utils.save_png(paths[-1], img)
        # An earlier, larger run's numbered images would mix into a folder that FID tools read whole.
        for path in epath.Path(out, "images").iterdir():
            if re.fullmatch(r"\d{6,}\.png", path.name) and int(path.name[:-4]) >= len(images):
                path.unlink()
    for name, grid in zip(("forward_process.png", "reverse_process.png"), figures or ()):
        paths.append(os.path.join(out, name))
        image_utils.save_png(paths[-1], grid, scale)
    return paths


def sample_workdir(workdir: str, config: ConfigDict, *, out: str | None = None, label: str | None = None,
                   prompt: str | None = None, prompts_file: str | None = None, prompt_embedding: str | None = None,
                   negative_prompt: str | None = None, source_prompt: str | None = None,
                   init_images: str | None = None, mask: str | None = None, low_res: str | None = None,
                   invert: bool = False, ema: bool = True, step: int | None = None, individual: bool = False,
                   figures: bool = False, given: frozenset[str] = frozenset()) -> list[str]:
    """`python -m ddpm_jax.sample`: samples the run in `workdir` with `config` (its config.json with
    the flags written in) from its newest checkpoint or checkpoint `step`, and writes the files to `out`
    (default WORKDIR/samples). Every input is
    checked before the checkpoint is read. Returns the paths written (and prints them); with several
    processes all sample and process 0 writes (the others return [])."""
    from ddpm_jax import checkpoints

    if prompt is not None and prompts_file is not None:
        raise UserError("--prompt and --prompts: give one prompt or a file of them, not both.")
    if prompts_file is not None and config.model.text_encoder == "none":
        raise UserError("--prompts: this run's model takes no text (model.text_encoder='none').")
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file) if prompts_file is not None else None
    req = make_request(config, label=label, prompts=prompts, prompt_embedding=prompt_embedding,
                       negative_prompt=negative_prompt, source_prompt=source_prompt, init_images=init_images,
                       mask=mask, low_res=low_res, invert=invert, given=given)
    out = out or os.path.join(workdir, "samples")
    check_output_dir(out)
    params, step = checkpoints.load_params(workdir, config, use_ema=ema, step=step)
    sp = config.sampling
    is_main = jax.process_index() == 0  # every process samples on its devices; process 0 alone writes
    if is_main:
        guide = f" (autoguidance by {sp.guide_workdir} step {guide_params(config)[1]})" if autoguided(config) else ""
        how = S.sampler_text(sp.sampler, sp.steps, sp.ode_tolerance, sp.timestep_spacing)
        print(f"step {step} ({'EMA' if ema else 'raw'} params), {how}, guidance "
              f"{sp.guidance}{guide}, {jax.device_count()} device(s) -> {out}", file=sys.stderr)
    partial = os.path.join(out, PARTIAL_DIR)
    result = run(config, params, req, progress=ProgressBar() if is_main else None, uint8=True, resume_dir=partial)
    grids = process_figures(config, params, req) if figures else None
    paths = []
    if is_main:
        paths = write_outputs(out, result["images"], req, config.model.num_classes, individual=individual,
                              figures=grids, masks=result.get("masks"))
        if "ode_evals" in result:
            print(f"ode: {ode_fields(result)['ode_sampling_evals']:.1f} network evaluations per image",
                  file=sys.stderr)
        print("\n".join(p for p in paths if "/images/" not in p))
    chunk_store.clear(partial)
    return paths


class ProgressBar:
    """`progress(done, total)` callback drawing a one-line bar with rate and time left on stderr;
    `progress(done, total, resumed=True)`: `done` were read from an earlier run, not computed now.
    A pass that reaches `total` ends its line; the next pass (a cascade's next stage) is timed anew."""

    def __init__(self, what="images", stream=None):
        self.what, self.stream, self.start = what, stream or sys.stderr, time.time()  # sys.stderr of now
        self.resumed = 0

    def __call__(self, done: int, total: int, resumed: bool = False):
        if resumed:
            self.stream.write(f"resuming: {done}/{total} {self.what} read from the last run\n")
            self.resumed, self.start = (0 if done == total else done), time.time()
            return
        rate = (done - self.resumed) / max(time.time() - self.start, 1e-6)
        bar = "#" * (30 * done // total)
        self.stream.write(f"\r[{bar:<30}] {done}/{total} {self.what}, {rate:.1f}/s, {(total - done) / rate:.0f}s left")
        if done == total:
            self.stream.write("\n")
            self.resumed, self.start = 0, time.time()
        self.stream.flush()
