"""The U-Net's params to and from diffusers' `UNet2DModel` checkpoints: Ho et al.'s released DDPMs.

The DDPM checkpoints of Ho et al. 2020 (CIFAR-10, CelebA-HQ, LSUN church, bedroom and cat) are
distributed as diffusers folders (google/ddpm-cifar10-32, google/ddpm-ema-church-256, ...): a
`config.json` of a `UNet2DModel`, the weights as `diffusion_pytorch_model.safetensors`, and a
`scheduler_config.json`; or the pipeline layout with those in `unet/` and `scheduler/`. That model
is this U-Net with other names (`down_blocks.1.resnets.0.conv1` for `down_1_block_0/conv1`), torch's
weight layouts, and the up path counted from the bottom. `load_params` reads such a folder (made
by the user; nothing is downloaded) for a config whose U-Net it matches, `to_tensors` and
`write_folder` make one from this U-Net's params; `import_run` and `export_run` do so for a run
(`python -m ddpm_jax.convert`). Class labels convert too: `num_classes` classes and the null class are
`UNet2DModel`'s `num_class_embeds = num_classes + 1` class embeddings, added to the timestep embedding.
So do `UNet2DModel`s with Nichol & Dhariwal's choices (diffusers' own defaults among them): multi-head
attention, scale-shift norm, residual resampling, their timestep embedding, epsilon and padding are the
U-Net's `model.*` fields, which `unet_config` writes and `check_unet_config` names.
"""
from __future__ import annotations

import json
import re

import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from ddpm_jax import checkpoints, files, locking, validation
from ddpm_jax.train_state import create_train_state, init_params
from ddpm_jax.validation import UserError

CONFIG, WEIGHTS, SCHEDULER = "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"
# UNet2DModel's defaults (diffusers 0.42), for keys an older config.json lacks, as diffusers reads it.
UNET_DEFAULTS = {"sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
                 "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
                 "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D", "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
                 "upsample_type": "conv", "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
                 "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
                 "add_attention": True, "class_embed_type": None, "num_class_embeds": None}
# The config fields that decide each key of config.json that depends on the config, in the order checked.
FIELDS = {"block_out_channels": "model.ch * model.ch_mult", "layers_per_block": "model.num_res_blocks",
          "down_block_types": "model.attn_resolutions and model.resblock_updown",
          "up_block_types": "model.attn_resolutions and model.resblock_updown",
          "in_channels": "data.channels", "out_channels": "data.channels", "sample_size": "data.image_size",
          "num_class_embeds": "model.num_classes + 1 (the null class last)",
          "attention_head_dim": "model.attn_head_dim", "resnet_time_scale_shift": "model.scale_shift_norm",
          "attn_norm_num_groups": "model.scale_shift_norm", "downsample_type": "model.resblock_updown",
          "upsample_type": "model.resblock_updown", "flip_sin_to_cos": "model.time_embedding",
          "freq_shift": "model.time_embedding", "norm_eps": "model.norm_eps",
          "downsample_padding": "model.downsample_padding"}
# Older diffusers wrote the attention's projections under these names.
LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
_INNER = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q",
          "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OUTER = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
          "temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
          "mid_block_1": "mid_block.resnets.0", "mid_block_2": "mid_block.resnets.1",
          "mid_attn_1": "mid_block.attentions.0", "label_emb": "class_embedding"}


def check_convertible(config: ConfigDict, flag: str) -> None:
    """A UserError naming the field when `config`'s U-Net has a part `UNet2DModel` lacks."""
    m = config.model
    for field, value, plain in (("model.text_encoder", m.text_encoder, "none"),
                                ("model.low_res_size", m.low_res_size, 0),
                                ("model.coord_channels", m.coord_channels, False),
                                ("model.attn_position", m.attn_position, False),
                                ("model.guidance_embedding", m.guidance_embedding, False)):
        if value != plain:
            raise UserError(f"{flag}: {field}={value!r}; diffusers' UNet2DModel layout is Ho et al.'s U-Net, "
                            f"unconditional or of class labels ({field}={plain!r}).")
    if config.diffusion.variance == "learned_range":
        raise UserError(f"{flag}: diffusion.variance='learned_range' (2C outputs); diffusers' DDPM layout has fixed "
                        "variances (fixedlarge or fixedsmall).")
    widths = [m.ch * mult for mult in m.ch_mult]
    if any(w % 32 for w in widths):
        raise UserError(f"{flag}: model.ch * model.ch_mult = {widths}; UNet2DModel's GroupNorm needs multiples of 32.")


def block_type(side: str, attends: bool, resblock: bool) -> str:
    """UNet2DModel's name of a `side` ('Down' or 'Up') block: with attention, or (not) resampling by a resblock."""
    return f"Attn{side}Block2D" if attends else f"Resnet{side}sampleBlock2D" if resblock else f"{side}Block2D"


def unet_config(config: ConfigDict) -> dict:
    """The `UNet2DModel` config.json of `config`'s U-Net (with Ho et al.'s choices, google/ddpm-cifar10-32's)."""
    m, side = config.model, config.data.image_size
    attends = [side // 2 ** level in m.attn_resolutions for level in range(len(m.ch_mult))]
    ddpm, resampling = m.time_embedding == "ddpm", "resnet" if m.resblock_updown else "conv"
    return {"_class_name": "UNet2DModel", "sample_size": side, "in_channels": config.data.channels,
            "out_channels": config.data.channels, "center_input_sample": False, "time_embedding_type": "positional",
            "time_embedding_dim": None, "freq_shift": 1 if ddpm else 0, "flip_sin_to_cos": not ddpm,
            "down_block_types": [block_type("Down", a, m.resblock_updown and level < len(attends) - 1)
                                 for level, a in enumerate(attends)],
            "mid_block_type": "UNetMidBlock2D",
            "up_block_types": [block_type("Up", a, m.resblock_updown and level > 0)
                               for level, a in reversed(list(enumerate(attends)))],
            "block_out_channels": [m.ch * mult for mult in m.ch_mult], "layers_per_block": m.num_res_blocks,
            "mid_block_scale_factor": 1, "downsample_padding": 0 if m.downsample_padding == "same" else 1,
            "downsample_type": resampling, "upsample_type": resampling, "dropout": m.dropout, "act_fn": "silu",
            "attention_head_dim": m.attn_head_dim or None, "norm_num_groups": 32,
            # diffusers leaves the middle attention without a GroupNorm under scale_shift unless this is set
            "attn_norm_num_groups": 32 if m.scale_shift_norm else None, "norm_eps": m.norm_eps,
            "resnet_time_scale_shift": "scale_shift" if m.scale_shift_norm else "default",
            "add_attention": True, "class_embed_type": None,
            "num_class_embeds": m.num_classes + 1 if m.num_classes else None}  # the null class last


def scheduler_config(config: ConfigDict) -> dict:
    """A `DDPMScheduler` config.json of `config.diffusion`."""
    d = config.diffusion
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start,
            "beta_end": d.beta_end, "beta_schedule": BETA_SCHEDULES[d.beta_schedule], "trained_betas": None,
            "variance_type": {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[d.variance],
            "clip_sample": d.clip_x0, "clip_sample_range": 1.0, "prediction_type": PREDICTION_TYPES[d.model_output],
            "rescale_betas_zero_snr": d.zero_terminal_snr}


def tensor_name(path: tuple[str, ...], levels: int, ndim: int) -> tuple[str, str]:
    """(the diffusers tensor name, its conversion) of the `ndim`-D param at `path` (module, ..., leaf) of
    a U-Net with `levels` resolutions. Conversions: '' as is, 'conv' a 3x3 kernel (torch `[O, I, h, w]`,
    Flax `[h, w, I, O]`), 'shortcut' a 1x1 conv stored `[O, I, 1, 1]` (here a Dense `[I, O]`), 'linear'
    a torch Linear `[O, I]` (Dense `[I, O]`)."""
    module, *inner, leaf = path
    match = re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", module)
    if match:
        side, level, part, i = match.groups()
        block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{levels - 1 - int(level)}"
        outer = block + {"block": f".resnets.{i}", "attn": f".attentions.{i}", "downsample": ".downsamplers.0",
                         "upsample": ".upsamplers.0"}[part]
        outer += ".conv" if part in ("downsample", "upsample") and not inner else ""  # a conv, not a resblock
    else:
        outer = _OUTER[module]
    inner = [_INNER.get(n, n) for n in inner if n != "GroupNorm_0"]
    name = ".".join([outer, *inner, "bias" if leaf == "bias" else "weight"])
    if leaf != "kernel":
        return name, ""
    return name, "conv" if ndim == 4 else "shortcut" if inner == ["conv_shortcut"] else "linear"


def _to_ours(value: np.ndarray, how: str) -> np.ndarray:
    if how == "conv":
        return value.transpose(2, 3, 1, 0)
    if how in ("shortcut", "linear"):  # older files keep the attention's projections as [O, I, 1, 1] too
        return (value[:, :, 0, 0] if value.ndim == 4 and value.shape[2:] == (1, 1) else value).T
    return value


def _to_torch(value: np.ndarray, how: str) -> np.ndarray:
    if how == "conv":
        return value.transpose(3, 2, 0, 1)
    if how == "shortcut":
        return value.T[:, :, None, None]
    return value.T if how == "linear" else value


def _names(config: ConfigDict) -> tuple[dict, dict]:
    """(param path -> (tensor name, conversion), the params' shapes) of `config`'s U-Net."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    paths = [(tuple(k.key for k in p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    return {p: tensor_name(p, len(config.model.ch_mult), leaf.ndim) for p, leaf in paths}, shapes


def to_tensors(params, config: ConfigDict) -> dict[str, np.ndarray]:
    """`UNet2DModel`'s state dict (float32 numpy, torch layouts) of this U-Net's `params`."""
    names, _ = _names(config)
    flat = {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {name: np.ascontiguousarray(_to_torch(np.asarray(flat[p], np.float32), how))
            for p, (name, how) in names.items()}


def _locate(folder: str, flag: str) -> tuple[epath.Path, epath.Path | None]:
    """(the folder with the U-Net's config.json and weights, the scheduler's config.json or None)."""
    root = epath.Path(folder)
    if (root / "unet" / CONFIG).is_file():  # a pipeline: model_index.json, unet/, scheduler/
        scheduler = root / "scheduler" / SCHEDULER
        return root / "unet", scheduler if scheduler.is_file() else None
    if not (root / CONFIG).is_file():
        raise UserError(f"{flag}={folder}: no {CONFIG} (nor unet/{CONFIG}) there; give the folder of a diffusers "
                        f"UNet2DModel ({CONFIG} and {WEIGHTS}) or of a pipeline with one in unet/.")
    return root, root / SCHEDULER if (root / SCHEDULER).is_file() else None


def _read_json(path: epath.Path, flag: str) -> dict:
    try:
        value = json.loads(path.read_text())
        assert isinstance(value, dict)
        return value
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise UserError(f"{flag}: {path} is not a JSON object.") from None


def check_unet_config(stored: dict, config: ConfigDict, flag: str) -> None:
    """A UserError naming the key (and the config field it should match) where the checkpoint's
    config.json describes another network than `config`'s U-Net."""
    if stored.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{flag}: {CONFIG} is a {stored['_class_name']}'s; this reads UNet2DModel (the DDPM U-Net).")
    ours = unet_config(config)
    stored = {**UNET_DEFAULTS, **stored}
    widths = [c for c, t in zip(ours["block_out_channels"], ours["down_block_types"]) if t.startswith("Attn")]
    heads = lambda head_dim: [w // head_dim if head_dim else 1 for w in [*widths, ours["block_out_channels"][-1]]]
    if heads(stored["attention_head_dim"]) == heads(ours["attention_head_dim"]):  # the same heads, however named
        stored["attention_head_dim"] = ours["attention_head_dim"]
    if stored["time_embedding_dim"] == 4 * config.model.ch:
        stored["time_embedding_dim"] = None
    if stored["attn_norm_num_groups"] == 32 and stored["resnet_time_scale_shift"] == "default":
        stored["attn_norm_num_groups"] = None  # the same GroupNorm of 32 groups
    if config.model.resblock_updown:  # no strided conv to pad
        stored["downsample_padding"] = ours["downsample_padding"]
    for key, side in (("down_block_types", "Down"), ("up_block_types", "Up")):
        types = list(stored[key])  # each path's last block does not resample: both names are the same block
        if types and types[-1] == f"Resnet{side}sampleBlock2D":
            types[-1] = f"{side}Block2D"
        stored[key] = types
    size = stored["sample_size"]
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:  # [H, W] of a square model
        stored["sample_size"] = size[0]
    for key in [*FIELDS, *(k for k in ours if k not in FIELDS)]:
        if key in ("_class_name", "dropout"):  # dropout only matters to training, and this config sets it
            continue
        value, got = ours[key], stored.get(key)
        if isinstance(got, list | tuple) and isinstance(value, list):
            got = list(got)
        if key == "sample_size" and got is None:
            continue
        if got != value:
            where = f"{FIELDS[key]} of the config" if key in FIELDS else "this U-Net"
            raise UserError(f"{flag}: {CONFIG} has {key}={got!r}, but {where} makes {value!r}.")


def check_scheduler_config(stored: dict, config: ConfigDict, flag: str) -> None:
    """A UserError naming the diffusion.* field that disagrees with the checkpoint's noise schedule or
    what its network predicts (what the weights mean); its variance and clipping are sampling
    choices, left to the config."""
    d = config.diffusion
    schedule = stored.get("beta_schedule", "linear")
    checks = [("num_timesteps", stored.get("num_train_timesteps", 1000), d.num_timesteps),
              ("beta_schedule", schedule, BETA_SCHEDULES[d.beta_schedule]),
              ("model_output", stored.get("prediction_type", "epsilon"), PREDICTION_TYPES[d.model_output]),
              ("zero_terminal_snr", stored.get("rescale_betas_zero_snr", False), d.zero_terminal_snr)]
    if schedule == "linear":
        checks += [("beta_start", stored.get("beta_start", 1e-4), d.beta_start),
                   ("beta_end", stored.get("beta_end", 0.02), d.beta_end)]
    if stored.get("trained_betas") is not None:
        raise UserError(f"{flag}: {SCHEDULER} lists its own betas (trained_betas); the config's schedule is "
                        f"diffusion.beta_schedule, one of {tuple(BETA_SCHEDULES)}.")
    for field, got, value in checks:
        if not (np.isclose(got, value, rtol=1e-6) if isinstance(value, float) else got == value):
            raise UserError(f"{flag}: {SCHEDULER} has {got!r} where the config has diffusion.{field}="
                            f"{getattr(d, field)!r}.")


def load_params(folder: str, config: ConfigDict, flag: str = "--diffusers") -> dict:
    """Float32 params of `config`'s U-Net from the diffusers folder `folder`, after checking that its
    config.json (and scheduler_config.json, if any) describe that network and diffusion."""
    check_convertible(config, "--config")
    unet_dir, scheduler = _locate(folder, flag)
    where = f"{flag}={folder}"
    check_unet_config(_read_json(unet_dir / CONFIG, where), config, where)
    if scheduler is not None:
        check_scheduler_config(_read_json(scheduler, where), config, where)
    weights = unet_dir / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{where}: no {WEIGHTS} in {unet_dir} (PyTorch pickles are not read: load the model in "
                        "diffusers and save it with save_pretrained(folder, safe_serialization=True)).")
    stored = set(files.safetensors_names(str(weights)))
    names, shapes = _names(config)
    chosen = {}
    for path, (name, how) in names.items():
        legacy = next((name.replace(new, old) for new, old in LEGACY_NAMES.items() if f".{new}." in name), None)
        if name not in stored and legacy not in stored:
            raise UserError(f"{where}: {WEIGHTS} has no tensor {name!r}, which the U-Net of {CONFIG} has.")
        chosen[name if name in stored else legacy] = path, how
    extra = sorted(stored - chosen.keys())
    if extra:
        raise UserError(f"{where}: {WEIGHTS} has {len(extra)} tensors this U-Net has no place for, e.g. {extra[0]!r}.")
    params: dict = {}
    for name, value in files.load_safetensors(str(weights), list(chosen)).items():
        path, how = chosen[name]
        converted = _to_ours(value.astype(np.float32), how)
        expected = files.place_tensor(params, shapes, path, converted)
        if expected is not None:
            raise UserError(f"{where}: tensor {name!r} has shape {value.shape}, but the config's U-Net takes "
                            f"{expected} (converted from torch's layout).")
    return params


def write_folder(out: str, params, config: ConfigDict) -> None:
    """Writes `params` of `config`'s U-Net as a diffusers `DDPMPipeline` folder: `model_index.json`,
    `unet/` (config.json, diffusion_pytorch_model.safetensors), `scheduler/` (scheduler_config.json)."""
    root = epath.Path(out)
    (root / "unet").mkdir(parents=True, exist_ok=True)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    files.save_safetensors(str(root / "unet" / WEIGHTS), to_tensors(params, config), {"format": "pt"})
    (root / "unet" / CONFIG).write_text(json.dumps(unet_config(config), indent=2))
    (root / "scheduler" / SCHEDULER).write_text(json.dumps(scheduler_config(config), indent=2))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
         "unet": ["diffusers", "UNet2DModel"]}, indent=2))


def import_run(folder: str, config: ConfigDict, workdir: str) -> int:
    """Makes `workdir` a run of `config` at step 0 whose params and EMA are the diffusers folder's
    weights (sampled, evaluated, or fine-tuned by training on, like any run); returns their count.
    Everything is checked before anything is written; a workdir that holds a run is refused."""
    validation.validate_data_and_model(config, reads_data=False)  # what the weights are; training's
    validation.validate_diffusion(config)  # fields are checked when it trains
    validation.check_output_dir(workdir, "--workdir")
    if checkpoints.steps(workdir) or (epath.Path(workdir) / checkpoints.CONFIG_FILE).exists():
        raise UserError(f"--workdir={workdir}: already holds a run; give a new folder (nothing is overwritten).")
    params = load_params(folder, config)
    with locking.workdir_lock(workdir):
        manager = checkpoints.checkpoint_manager(workdir, keep=config.training.keep_checkpoints)
        try:
            checkpoints.save_train_state(manager, jax.device_get(create_train_state(config, config.seed, params)),
                                         {"position": 0})
        finally:
            manager.wait_until_finished()
            manager.close()
        checkpoints.write_config(workdir, config)  # last: a folder with a config.json holds a whole run
    return sum(p.size for p in jax.tree.leaves(params))


def export_run(workdir: str, out: str, step: int | None = None, use_ema: bool = True) -> int:
    """Writes the run's checkpoint `step` (None: the newest; EMA params unless `use_ema` is False) to
    `out` as a diffusers pipeline folder (`write_folder`); returns the step. An `out` that holds a
    model is refused."""
    config = checkpoints.load_config(workdir)
    check_convertible(config, f"--workdir={workdir}")
    validation.check_output_dir(out, "--out")
    if (epath.Path(out) / "unet" / WEIGHTS).exists():
        raise UserError(f"--out={out}: already holds a diffusers model; give a new folder (nothing is overwritten).")
    params, step = checkpoints.load_params(workdir, config, use_ema=use_ema, step=step)
    write_folder(out, params, config)
    return step
