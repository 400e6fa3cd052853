"""Super-resolution and cascade evaluations (`python -m ddpm_jax.evaluate sr` and `cascade`).

`sr`: held-out images area-downsampled to the model's `model.low_res_size`, upscaled by the model
and by bicubic interpolation, both compared with the originals: PSNR and SSIM (scikit-image,
uint8 data range 255, SSIM's 7x7 window on every channel), the consistency of the output with its
input (MSE between the output area-downsampled and the input, on [-1, 1]) and, on `shapes`, the
shapes checker's rates under the images' captions (the originals' too, the checker's ceiling).

`cascade`: the cascade (`ddpm_jax.cascading`) under the first `eval.num_samples` held-out captions,
one image each; the checker's rates at every stage, and of the base samples upscaled bicubically
to the final size (what the super-resolution stages must beat).
"""
from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ddpm_jax import cascading, generation, image_utils, superres
from ddpm_jax.evaluation import shapes_checker
from ddpm_jax.evaluation import tasks as T
from ddpm_jax.validation import UserError

CHECKS = ("colour", "count", "shape", "relation", "all")


def check_sr(config: ConfigDict) -> None:
    if not config.model.low_res_size:
        raise UserError(f"sr evaluates a super-resolution run (model.low_res_size > 0); this one has "
                        f"model.low_res_size={config.model.low_res_size}.")
    T.validate_sampling(T.sampling_config(config))


def shape_rates(images: np.ndarray, captions: list[str]) -> dict:
    """The shapes checker's rates ('relation' over two-object captions only)."""
    v = shapes_checker.per_image(images, captions)
    two = v["two_objects"]
    return {k: float(v[k][two].mean() if k == "relation" else v[k].mean()) for k in CHECKS}


def image_metrics(out: np.ndarray, originals: np.ndarray, low_res: np.ndarray) -> dict:
    """PSNR, SSIM (means over images) and the consistency MSE of uint8 `out` against the originals
    and the uint8 low-res inputs."""
    psnr = [peak_signal_noise_ratio(o, x, data_range=255) for o, x in zip(originals, out)]
    ssim = [structural_similarity(o, x, data_range=255, channel_axis=-1, win_size=7) for o, x in zip(originals, out)]
    down = np.asarray(superres.downsample(image_utils.from_uint8(out), low_res.shape[1]))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
            "consistency_mse": float(np.mean((down - image_utils.from_uint8(low_res)) ** 2))}


def bicubic(low_res: np.ndarray, size: int) -> np.ndarray:
    return image_utils.to_uint8(superres.upsample(image_utils.from_uint8(low_res), size, "bicubic"))


def sr(config: ConfigDict, params, progress=None, resume_dir=None) -> dict:
    """See the module doc: {'model': {...}, 'bicubic': {...}[, 'originals': {...}], ...}. `progress`,
    `resume_dir`: as `generation.run` takes them."""
    check_sr(config)
    split = T.eval_split(config)
    originals, _ = T.real_images(config, split, config.eval.num_samples)
    low_res = image_utils.to_uint8(superres.downsample(image_utils.from_uint8(originals), config.model.low_res_size))
    text = config.model.text_encoder != "none"
    captions = T.captions(config, split, len(originals)) if text or config.data.dataset == "shapes" else None
    config = T.sampling_config(config)
    req = generation.paired_request(config, low_res, prompts=captions if text else None)
    drawn = generation.run(config, params, req, progress, uint8=True, resume_dir=resume_dir)
    out = drawn["images"]
    up = bicubic(low_res, config.data.image_size)
    result = {"model": image_metrics(out, originals, low_res), "bicubic": image_metrics(up, originals, low_res)}
    if config.data.dataset == "shapes":
        for name, images in (("model", out), ("bicubic", up), ("originals", originals)):
            result.setdefault(name, {}).update(shape_rates(images, captions))
    sp = config.sampling
    result.update(split=split, num_examples=len(originals), **T.sampler_fields(sp), **generation.ode_fields(drawn),
                  aug_level=sp.aug_level, low_res_size=config.model.low_res_size, image_size=config.data.image_size)
    return result


def cascade(workdirs: list[str], num_samples: int | None = None, split: str | None = None,
            overrides: dict | None = None, seed: int | None = None, checkpoint_steps: list | None = None,
            progress=None, resume_dir: str | None = None, text_encoder: str | None = None) -> dict:
    """The cascade under held-out `shapes` captions: rates per stage and of bicubic-upscaled base
    samples. `overrides` (per-stage sampling fields), `seed`, `checkpoint_steps` and `text_encoder`: as
    `cascading.load_stages` takes them; `progress` and `resume_dir`: as `cascading.run`."""
    stages = cascading.load_stages(workdirs, overrides, seed=seed, checkpoint_steps=checkpoint_steps,
                                   text_encoder=text_encoder)
    base = stages[0].config
    if base.data.dataset != "shapes" or not T.embeds_prompts(base.model):
        raise UserError(f"cascade evaluates a text-to-image cascade on shapes whose base embeds captions itself (the "
                        f"base run {workdirs[0]} has data.dataset={base.data.dataset!r}, model.text_encoder="
                        f"{base.model.text_encoder!r}, model.text_encoder_path={base.model.text_encoder_path!r}).")
    split = split or T.eval_split(base)
    texts = T.captions(base, split, num_samples or base.eval.num_samples)
    for stage in stages:
        stage.config.sampling.num_samples = 1
    outputs = cascading.run(stages, prompts=texts, progress=progress, resume_dir=resume_dir)
    result = {f"stage_{k}": {"size": o.shape[1], **shape_rates(o, texts)} for k, o in enumerate(outputs)}
    if len(outputs) > 1:
        result["bicubic_base"] = {"size": outputs[-1].shape[1],
                                  **shape_rates(bicubic(outputs[0], outputs[-1].shape[1]), texts)}
    result["stages"] = [{"workdir": st.workdir, "step": st.step,
                         **{k: st.config.sampling[k] for k in ("seed", *cascading.STAGE_FIELDS)}, **st.ode}
                        for st in stages]
    result.update(split=split, num_samples=len(texts))
    return result
