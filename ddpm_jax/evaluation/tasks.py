"""The evaluations that `python -m ddpm_jax.evaluate` and the in-loop hook run, as functions.

Images travel as uint8 `[N, H, W, C]` numpy arrays. TensorFlow is imported only to read a tfds split.
Workdir evaluations sample with the run's `sampling` section, overridden by `eval` (`sampling_config`);
their noise comes from `eval.seed`, the same at every call, so repeated evaluations differ only by
the params.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from ddpm_jax import cascading, chunk_store, diffusion, generation, image_utils, parallel, sampling, superres
from ddpm_jax.evaluation import conditional_accuracy, digits_classifier, inception, likelihood, metrics, shapes_checker
from ddpm_jax.files import is_file, load_npz
from ddpm_jax.models import unet_from_config
from ddpm_jax.validation import UserError, check_output_file, validate_eval, validate_sampling

COMMANDS = ("convert_inception", "reference_stats", "fid", "bpd", "digits", "accuracy", "shapes", "sr", "cascade",
            "clip")
WEIGHTS_FIELD = "--inception_weights / eval.inception_weights"
STATS_FIELD = "--reference_stats / eval.reference_stats"
PARTIAL_SUFFIX = ".partial"  # WORKDIR/eval/NAME.partial: the finished batches of NAME.json (`chunk_store`)


# ----------------------------------------------------------------------------------------------
# Images in.


def eval_split(config: ConfigDict) -> str:
    """`eval.split`, or when unset the dataset's 'test' split if it has one, else `data.split`."""
    if config.eval.split:
        return config.eval.split
    from ddpm_jax import input_pipeline
    # prepared first: an unprepared dataset lists no splits, and its first evaluation read data.split
    splits = input_pipeline.prepared_builder(config.data, config.model).info.splits
    return "test" if "test" in splits else config.data.split


def real_images(config: ConfigDict, split: str,
                max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images `[N, S, S, C]` (S = data.image_size, centre-cropped and resized as for training
    when the dataset's images differ) and labels `[N]` (None if the dataset has none), in split order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from ddpm_jax import input_pipeline  # TensorFlow is only needed here

    d = config.data
    builder = input_pipeline.prepared_builder(d, config.model)
    if split not in builder.info.splits:
        raise UserError(f"split {split!r}: {d.dataset!r} has splits {sorted(builder.info.splits)} "
                        "(set eval.split or --split).")
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
    if max_examples:
        ds = ds.take(max_examples)
    resize = tuple(builder.info.features["image"].shape[:2]) != (d.image_size, d.image_size)
    has_label = "label" in builder.info.features

    def prepare(ex):
        image = ex["image"]
        if resize:  # the training pipeline's crop and resize, back to uint8
            image = tf.cast(tf.round(input_pipeline.to_square(image, d.image_size)), tf.uint8)
        return (image, ex["label"]) if has_label else (image,)

    images, labels = [], []
    for batch in tfds.as_numpy(ds.map(prepare).batch(1000)):
        images.append(batch[0])
        if has_label:
            labels.append(batch[1])
    if not images:
        raise UserError(f"split {split!r} of {d.dataset!r} is empty.")
    return np.concatenate(images), (np.concatenate(labels).astype(np.int32) if has_label else None)


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples from a `.npz`: uint8 images under 'arr_0' (as `python -m ddpm_jax.sample` writes) or
    'images', or float images in [-1, 1]; optional 'labels'. Or a folder of PNG/JPEG images of one
    size (`sample --individual`'s images/, or another program's), read in file-name order, without
    labels. Returns (uint8 `[N, H, W, C]`, labels)."""
    if epath.Path(path).is_dir():
        try:
            return image_utils.load_images(path, channels=None), None
        except (ValueError, OSError) as e:
            raise UserError(f"--samples={path}: {e}") from None
    f = load_npz(path, "--samples", ("arr_0", "images"))
    images, labels = f.get("arr_0", f.get("images")), f.get("labels")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise UserError(f"--samples={path}: images must be [N >= 1, H, W, 1 or 3], got {images.shape}.")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise UserError(f"--samples={path}: images must be uint8, or float in [-1, 1]; got {images.dtype}.")
        if not np.isfinite(images).all():
            raise UserError(f"--samples={path}: {int((~np.isfinite(images)).any(axis=(1, 2, 3)).sum())} images "
                            "have non-finite values.")
        images = image_utils.to_uint8(images)
    if labels is not None and labels.shape != (len(images),):
        raise UserError(f"--samples={path}: 'labels' must be [{len(images)}], got {labels.shape}.")
    return images, labels


def sampling_config(config: ConfigDict):
    """A copy of `config` whose `sampling` section draws `eval.num_samples` with `eval.steps` (0: the
    run's sampling.steps) in batches of `eval.batch_size` from the noise of `eval.seed`; the ode
    sampler to `eval.ode_tolerance`, as bits/dim's ODE."""
    config = config.copy_and_resolve_references()
    e, sp = config.eval, config.sampling
    sp.num_samples, sp.batch_size, sp.seed = e.num_samples, e.batch_size, e.seed
    sp.steps = e.steps or sp.steps
    sp.ode_tolerance = e.ode_tolerance
    return config


def generate(config: ConfigDict, params, progress=None, resume_dir=None, prompts: list[str] | None = None,
             held_out: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """`eval.num_samples` uint8 samples (see `sampling_config`) on all local devices, their labels
    (classes in equal blocks for class-conditional models, else None) and `generation.ode_fields`.
    A text-to-image model draws one sample per held-out caption, or per prompt of `prompts`
    (`caption_samples`, with `held_out`), as papers compute FID (e.g. Imagen's FID-30K on COCO's
    validation captions). `progress`, `resume_dir`: as `generation.run` takes them."""
    if config.model.text_encoder != "none":
        check_caption_sampling(config)
        out = caption_samples(config, params, progress, resume_dir, prompts, held_out)[3]
        return out["images"], None, generation.ode_fields(out)
    config = sampling_config(config)
    req = generation.make_request(config)
    out = generation.run(config, params, req, progress, uint8=True, resume_dir=resume_dir)
    return out["images"], (req.labels if config.model.num_classes else None), generation.ode_fields(out)


def check_caption_sampling(config: ConfigDict) -> None:
    """UserError unless a text-to-image run can embed the captions it is evaluated under."""
    m = config.model
    if not embeds_prompts(m):
        raise UserError(f"model.text_encoder={m.text_encoder!r}: a text-to-image run is evaluated on one sample per "
                        "held-out caption, and this model has no frozen encoder to embed them: set --text_encoder="
                        "T5_FOLDER (model.text_encoder_path), or score samples made elsewhere with --samples.")


# ----------------------------------------------------------------------------------------------
# Metrics.


def inception_weights_file(path: str | None) -> str:
    """The `.npz` of the FID Inception weights; pytorch-fid's `.pth` is converted once to the `.npz`
    of the same name beside it (needs torch). A missing file is a UserError."""
    if path and path.endswith(".pth"):
        npz = os.path.splitext(path)[0] + ".npz"
        if not is_file(npz):
            if not is_file(path):
                raise UserError(f"{WEIGHTS_FIELD}={path}: no such file; download pytorch-fid's weights from "
                                f"{inception.PYTORCH_FID_WEIGHTS_URL}")
            inception.convert_pytorch_fid_weights(path, npz)
            print(f"converted {path} to {npz}")
        return npz
    inception.load_variables(path, WEIGHTS_FIELD)  # fails now, not after sampling
    return path


def reference_statistics(images: np.ndarray, inception_weights: str, out: str, *, keep_features: bool = False,
                         per_device_batch: int = 50) -> dict:
    """Inception pool statistics of real uint8 images, written to `out` in pytorch-fid's layout."""
    variables = parallel.replicate(inception.load_variables(inception_weights, WEIGHTS_FIELD))
    features = metrics.inception_features(variables, images, per_device_batch)
    if jax.process_index():  # every process has the features; process 0 alone writes
        return dict(zip(("mu", "sigma"), metrics.feature_statistics(features["pool"])))
    return metrics.save_statistics(out, features["pool"], keep_features=keep_features)


def fid_is_kid(images: np.ndarray, replicated_variables, reference: dict, *, per_device_batch: int = 50) -> dict:
    """FID and IS (and KID, precision and recall when `reference` keeps features) of uint8 `images`.
    `replicated_variables`: `parallel.replicate(inception.load_variables(...))`; `reference`:
    `metrics.load_statistics(...)`."""
    features = metrics.inception_features(replicated_variables, images, per_device_batch)
    return metrics.sample_quality(features, reference)


def bits_per_dim(config: ConfigDict, params, images: np.ndarray, progress=None, resume_dir=None) -> dict:
    """Bits/dim of uint8 `images` on all local devices, averaged, in batches of `eval.batch_size` with
    the noise of `eval.seed`, by `eval.bpd_method`.

    'vlb', the variational bound (`likelihood.bpd`): 'bpd' (total), 'bpd_prior' (L_T), 'bpd_decoder'
    (L_0), 'bpd_kl' (sum of the KL terms L_1..L_{T-1}) and 'bpd_terms' `[T]` (mean of each term; [0]
    is L_0). 'ode', the probability-flow ODE (`likelihood.ode_bpd`, network in float32, solved to
    `eval.ode_tolerance`): 'bpd', 'ode_evals' (network evaluations per example, mean) and
    'ode_unfinished' (examples whose solve did not finish; 'bpd' is NaN if any). Class-conditional
    models are evaluated with the null label (text models with the null text): the unconditional
    likelihood; super-resolution models given each image's own low-resolution version (level 0).
    `progress(done, total)`: called after each batch; `resume_dir`: finished batches are kept there
    (`chunk_store`; the caller clears it).
    """
    fn = parallel.built_once(("bpd", config.to_json_best_effort(sort_keys=True)), lambda: _pmapped_bpd(config))
    key = jax.random.key(config.eval.seed)
    x0 = image_utils.from_uint8(images)
    cond = generation.unconditional(config, len(images))
    if config.model.low_res_size:
        cond["low_res"] = np.asarray(superres.downsample(x0, config.model.low_res_size))
    inputs = {"x0": x0, "cond": cond}
    out = parallel.pad_shard_unpad(lambda c, shard: fn(params, jax.random.fold_in(key, c), shard), inputs,
                                   config.eval.batch_size, progress,
                                   store=chunk_store.for_model(resume_dir, config, params, computes="bpd"))
    if config.eval.bpd_method == "ode":
        return {"bpd": float(out["total"].mean()), "ode_evals": float(out["evals"].mean()),
                "ode_unfinished": int((~out["converged"]).sum())}
    terms = out["terms"].mean(0)
    return {"bpd": float(out["total"].mean()), "bpd_prior": float(out["prior"].mean()),
            "bpd_decoder": float(terms[0]), "bpd_kl": float(terms[1:].sum()), "bpd_terms": terms}


def _pmapped_bpd(config: ConfigDict):
    c, e = config.diffusion, config.eval
    s = diffusion.schedule_from_config(c)
    model = unet_from_config(config)
    if e.bpd_method == "ode":  # an adaptive solver needs a smooth map: bfloat16's rounding is not
        model = model.clone(dtype=jnp.float32)

    def device_fn(params, key, batch):
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS_NAME))
        model_fn = sampling.unet_model_fn(model, params, batch["cond"])
        if e.bpd_method == "ode":
            out = likelihood.ode_bpd(s, c.model_output, model_fn, batch["x0"], key, variance=c.variance,
                                     sigma_min=e.ode_sigma_min, rtol=e.ode_tolerance, atol=e.ode_tolerance)
            return {**out, "evals": jnp.broadcast_to(out["evals"], out["total"].shape),
                    "converged": jnp.broadcast_to(out["converged"], out["total"].shape)}
        return likelihood.bpd(s, c.model_output, model_fn, batch["x0"], key, variance=c.variance, clip_x0=c.clip_x0)

    return jax.pmap(device_fn, parallel.AXIS_NAME, in_axes=(None, None, 0))


def captions(config: ConfigDict, split: str, max_examples: int) -> list[str]:
    """The first `max_examples` captions (`data.text_feature`, its first caption if it holds several)
    of `split`, in split order."""
    import tensorflow_datasets as tfds

    from ddpm_jax import input_pipeline  # TensorFlow is only needed here

    d = config.data
    builder = input_pipeline.prepared_builder(d, config.model)
    if split not in builder.info.splits:
        raise UserError(f"split {split!r}: {d.dataset!r} has splits {sorted(builder.info.splits)} "
                        "(set eval.split or --split).")
    if d.text_feature.split("/")[0] not in builder.info.features:
        raise UserError(f"data.text_feature={d.text_feature!r}: this run's data ({d.dataset!r}) has no captions "
                        f"there (features {sorted(builder.info.features)}; a folder prepared for precomputed "
                        "embeddings keeps none).")
    ds = builder.as_dataset(split=split, shuffle_files=False).take(max_examples)
    texts = [np.asarray(t).reshape(-1)[0].decode("utf-8") for t in
             tfds.as_numpy(ds.map(lambda ex: input_pipeline.text_feature(ex, d.text_feature)))]
    if not texts:
        raise UserError(f"split {split!r} of {d.dataset!r} is empty.")
    return texts


def caption_samples(config: ConfigDict, params, progress=None, resume_dir=None, prompts: list[str] | None = None,
                    held_out: list[str] | None = None):
    """(split, its first `eval.num_samples` captions, the config that sampled, `generation.run`'s output
    of one uint8 sample per caption, see `sampling_config`), for text-to-image metrics; a caption longer
    than the model reads is cut, as in training. `held_out`: those captions, read before (`captions`).
    `prompts`: the user's instead (their first `eval.num_samples`; split None; one too long is an
    error naming --prompts)."""
    split = None if prompts is not None else eval_split(config)
    if prompts is None and held_out is None:
        held_out = captions(config, split, config.eval.num_samples)
    texts = (prompts if prompts is not None else held_out)[:config.eval.num_samples]
    config = sampling_config(config)
    config.sampling.num_samples = 1  # per caption
    req = generation.make_request(config, prompts=texts, prompt_flag="--prompts" if prompts is not None else None)
    return split, texts, config, generation.run(config, params, req, progress, uint8=True, resume_dir=resume_dir)


def check_clip(config: ConfigDict, samples: bool = False) -> None:
    """UserError unless eval.clip_model is a CLIP checkpoint's folder and, unless scoring `samples`
    (a file), `config` a text-to-image run."""
    from ddpm_jax.evaluation import clip

    if not samples and (config.model.text_encoder == "none" or config.model.low_res_size):
        raise UserError(f"clip scores a text-to-image run's samples against their captions (this one has "
                        f"model.text_encoder={config.model.text_encoder!r}, model.low_res_size="
                        f"{config.model.low_res_size}).")
    if not config.eval.clip_model:
        raise UserError("eval.clip_model='': give --clip_model=FOLDER, a CLIP checkpoint in the Hugging Face layout "
                        "(e.g. openai/clip-vit-large-patch14, downloaded).")
    clip.read_config(config.eval.clip_model)
    if not samples:
        validate_sampling(sampling_config(config))


def _clip_result(scores: np.ndarray, clip_model: str) -> dict:
    return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std()), "num_samples": len(scores),
            "clip_model": clip_model}


def clip_score(config: ConfigDict, params, progress=None, resume_dir=None, prompts: list[str] | None = None) -> dict:
    """The CLIP score (`clip.ClipModel.score`, 100 max(cos, 0)) of one sample for each of the first
    `eval.num_samples` held-out captions (or `prompts`) against it: mean and std over the samples."""
    from ddpm_jax.evaluation import clip

    check_clip(config)
    model = clip.load(config.eval.clip_model)  # before sampling: its errors come first
    split, texts, config, out = caption_samples(config, params, progress, resume_dir, prompts)
    sp = config.sampling
    result = {**_clip_result(model.score(out["images"], texts), config.eval.clip_model), "split": split,
              **sampler_fields(sp), **generation.ode_fields(out), "image_size": config.data.image_size}
    if generation.autoguided(config):
        result.update(guide_workdir=sp.guide_workdir, guide_step=generation.guide_params(config)[1])
    return result


def clip_of_samples(clip_model: str, images: np.ndarray, prompts: list[str], samples: str) -> dict:
    """The CLIP score of uint8 `images` `[N, H, W, C]` drawn for `prompts`, N / P each in prompt order
    (as `sample --prompts` writes them)."""
    from ddpm_jax.evaluation import clip

    if len(images) % len(prompts):
        raise UserError(f"--samples={samples}: {len(images)} images for the {len(prompts)} --prompts; clip reads "
                        "the same number for each prompt, prompt by prompt (as `sample --prompts` writes them).")
    per_prompt = len(images) // len(prompts)
    scores = clip.load(clip_model).score(images, [p for p in prompts for _ in range(per_prompt)])
    return {**_clip_result(scores, clip_model), "num_prompts": len(prompts)}


def embeds_prompts(m: ConfigDict) -> bool:
    """Whether a model (`config.model`) turns text into its condition itself: a trained encoder, or a
    frozen T5 of a precomputed one."""
    return m.text_encoder == "trained" or (m.text_encoder == "precomputed" and bool(m.text_encoder_path))


def check_shapes(config: ConfigDict) -> None:
    """UserError unless `config` is a text-to-image run on RGB `shapes` with valid sampling settings."""
    d, m = config.data, config.model
    if d.dataset != "shapes" or not embeds_prompts(m) or d.channels != 3:
        raise UserError(f"shapes evaluates a text-to-image run on the shapes dataset that embeds captions itself "
                        f"(this one has data.dataset={d.dataset!r}, model.text_encoder={m.text_encoder!r}, "
                        f"model.text_encoder_path={m.text_encoder_path!r}, data.channels={d.channels}).")
    validate_sampling(sampling_config(config))


def shapes(config: ConfigDict, params, progress=None, resume_dir=None) -> dict:
    """Text-to-image on `shapes`: one sample (see `sampling_config`; guidance `sampling.guidance`) for
    each of the first `eval.num_samples` captions of the held-out split, checked by
    `shapes_checker` at the model's resolution. Rates over all images ('colour', 'count', 'shape',
    'all'), over two-object captions ('relation', 'reversed': the opposite one), and split by
    one/two objects ('*_one', '*_two'). `progress`, `resume_dir`: as `generation.run` takes them."""
    check_shapes(config)
    split, texts, config, out = caption_samples(config, params, progress, resume_dir)
    v = shapes_checker.per_image(out["images"], texts)
    two = v["two_objects"]
    rate = lambda x: float(x.mean()) if x.size else float("nan")
    result = {k: rate(v[k]) for k in ("colour", "count", "shape", "all")}
    result.update({k: rate(v[k][two]) for k in ("relation", "reversed")})
    for k in ("colour", "count", "shape", "all"):
        result[f"{k}_one"], result[f"{k}_two"] = rate(v[k][~two]), rate(v[k][two])
    sp = config.sampling
    result.update(split=split, num_samples=len(texts), num_two_objects=int(two.sum()), **sampler_fields(sp),
                  **generation.ode_fields(out), image_size=config.data.image_size)
    if generation.autoguided(config):
        result.update(guide_workdir=sp.guide_workdir, guide_step=generation.guide_params(config)[1])
    return result


def digits(images: np.ndarray, labels: np.ndarray | None, classifier_path: str | None = None,
           reference: np.ndarray | None = None) -> dict:
    """The offline digits metrics (`digits_classifier.digits_metrics`) of uint8 8x8 samples."""
    if images.shape[1:] != (8, 8, 1):
        raise UserError(f"digits metrics need 8x8 greyscale digits; these images are {images.shape[1:]}.")
    params = digits_classifier.load_or_fit(classifier_path)
    return digits_classifier.digits_metrics(params, images, labels, reference)


# ----------------------------------------------------------------------------------------------
# `python -m ddpm_jax.evaluate COMMAND`.


def write_result(workdir: str | None, name: str, result: dict) -> None:
    """Prints `result` as JSON (without per-term arrays) and writes it to WORKDIR/eval/NAME.json
    (process 0 only)."""
    if jax.process_index():
        return
    printable = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items()}
    print(json.dumps({k: v for k, v in printable.items() if k != "bpd_terms"}, indent=1))
    if workdir:
        path = epath.Path(workdir, "eval", f"{name}.json")  # a local folder or gs://... (a workdir on a bucket)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(printable, indent=1))
        print(f"wrote {path}")


def reference_stats_command(config: ConfigDict, out: str, *, num_examples: int | None = None, keep_features=False,
                            per_device_batch: int = 50) -> None:
    """Statistics of `eval.split` (default `data.split`) of the config's dataset, written to `out`."""
    validate_eval(config)
    check_output_file(out, "--out")
    weights = inception_weights_file(config.eval.inception_weights)
    split = config.eval.split or config.data.split
    images, _ = real_images(config, split, num_examples)
    stats = reference_statistics(images, weights, out, keep_features=keep_features, per_device_batch=per_device_batch)
    if not jax.process_index():
        print(f"wrote {out}: statistics of {len(images)} images of {config.data.dataset}/{split} "
              f"({stats['mu'].shape[0]}-d)")


# `evaluate cascade`'s flags besides --stages: those of `cascading.STAGE_FIELDS` set that field of
# every stage, as one value does in `python -m ddpm_jax.cascade`.
CASCADE_FLAGS = ("num_samples", "split", "seed", "text_encoder", *cascading.STAGE_FIELDS)
_UNNAMED = ("text_encoder",)  # flags that do not change a result: not in its file's name


def cascade_command(workdirs: list[str] | None, given: dict | None = None,
                    checkpoint_steps: list | None = None) -> dict:
    """`evaluate cascade --stages=...`: `super_resolution.cascade`, written to the base run's
    eval/cascade_step_S0_RUN1-S1...[_FLAGVALUE...].json, RUN1 the second stage's run folder's name and
    S0, S1 the steps read. `given`: the evaluation flags that were set ({flag: value}), from
    `CASCADE_FLAGS`; `checkpoint_steps`: as `cascading.choose_checkpoints` takes them."""
    from ddpm_jax.evaluation import super_resolution

    given = given or {}
    if not workdirs:
        raise UserError("cascade needs --stages=BASE_RUN,SR_RUN,... (the cascade's runs, base first).")
    for flag in given:
        if flag not in CASCADE_FLAGS:
            raise UserError(f"--{flag} does not apply to cascade; it takes --{', --'.join(CASCADE_FLAGS)}.")
    overrides = {flag: [value] for flag, value in given.items() if flag in cascading.STAGE_FIELDS}
    run_name = lambda workdir: os.path.basename(os.path.normpath(workdir))
    settings = "".join(f"_{flag}{value:g}" if isinstance(value, float) else f"_{flag}{value}"
                       for flag, value in sorted(given.items()) if flag not in _UNNAMED)
    # The steps read are known once read; until then the batches are kept under the steps asked for.
    asked = f"_checkpoints{'-'.join(map(str, checkpoint_steps))}" if checkpoint_steps else ""
    partial = os.path.join(workdirs[0], "eval", f"cascade{''.join('_' + run_name(w) for w in workdirs[1:])}{asked}"
                                                f"{settings}{PARTIAL_SUFFIX}")
    result = super_resolution.cascade(workdirs, given.get("num_samples"), given.get("split"), overrides,
                                      seed=given.get("seed"), checkpoint_steps=checkpoint_steps,
                                      text_encoder=given.get("text_encoder"),
                                      progress=generation.ProgressBar() if jax.process_index() == 0 else None,
                                      resume_dir=partial)
    # Named by every later stage's run and step, and by every flag given, so no other cascade or
    # setting overwrites the result.
    base, *later = result["stages"]
    runs = "".join(f"_{run_name(st['workdir'])}-{st['step']}" for st in later)
    write_result(workdirs[0], f"cascade_step_{base['step']}{runs}{settings}", result)
    cascading.clear_resume_dir(partial, len(workdirs))
    return result


def sampler_fields(sp: ConfigDict) -> dict:
    """How a result's samples were drawn, for its JSON: sampler, steps (ode: its tolerance too), guidance."""
    ode = {"ode_tolerance": sp.ode_tolerance} if sp.sampler == "ode" else {}
    rescale = {"guidance_rescale": sp.guidance_rescale} if sp.guidance and sp.guidance_rescale else {}
    spacing = {"timestep_spacing": sp.timestep_spacing} if sp.timestep_spacing != "even" else {}
    return {"sampler": sp.sampler, "steps": sp.steps, **spacing, **ode, "guidance": sp.guidance, **rescale}


def sampling_name(config: ConfigDict) -> str:
    """How the samples of a result were drawn from the model, for its file name: sampler and steps
    (ode: its tolerance), the timestep spacing when not 'even', eta, guidance w, its rescale phi (when
    guided and not 0) and (when guided, but not at every t) its interval, autoguidance's guide run
    (the last part of its path, and `sampling.guide_checkpoint_step` when given), the noise seed when
    not 0, and how many captions or scenes (`eval.num_samples`); e.g.
    'ddim50_eta1_w3_t150-inf_seed1_n1000', 'ddim4_trailing_w0_n1000', 'ddim50_eta1_w2_guide-t2i_2k_n500',
    'ddim50_eta1_w2_guide-t2i_steps_step2000_n500', 'ode_tol1e-05_w0_n1000'.
    Results of other settings get other files."""
    sp = sampling_config(config).sampling
    interval = (sp.guidance_t_min, sp.guidance_t_max)
    unguided_or_every_t = not sp.guidance or interval == sampling.NO_INTERVAL
    guide = os.path.basename(os.path.normpath(sp.guide_workdir)) if generation.autoguided(config) else ""
    guide += f"_step{sp.guide_checkpoint_step}" if guide and sp.guide_checkpoint_step else ""
    how = sampling.sampler_name(sp.sampler, sp.steps, sp.ode_tolerance, sp.timestep_spacing)
    rescale = f"_rescale{sp.guidance_rescale:g}" if sp.guidance and sp.guidance_rescale else ""
    return (f"{how}{f'_eta{sp.eta:g}' if sp.eta else ''}_w{sp.guidance:g}{rescale}"
            f"{'' if unguided_or_every_t else '_t{:g}-{:g}'.format(*interval)}{f'_guide-{guide}' if guide else ''}"
            f"{f'_seed{sp.seed}' if sp.seed else ''}_n{sp.num_samples}")


def _enough_for_inception_score(n: int, what: str):
    if n < metrics.IS_SPLITS:
        raise UserError(f"{what}: {n} images; the Inception Score is computed over {metrics.IS_SPLITS} splits, so "
                        f"fid needs at least {metrics.IS_SPLITS} (papers use 50,000).")


def workdir_command(command: str, workdir: str | None, config: ConfigDict, *, samples: str | None = None,
                    reference_split: str | None = None, num_examples: int | None = None,
                    per_device_batch: int = 50, settings=(), num_per_class: int = 100,
                    out: str | None = None, step: int | None = None, prompts: str | None = None) -> dict:
    """`fid`, `bpd`, `digits`, `accuracy`, `shapes`, `sr` or `clip` on the run in `workdir` (with `config`, its
    config.json and the flags; its newest checkpoint, or checkpoint `step`) or, for fid/digits/clip, on a
    `samples` .npz (clip: scored against the `prompts` file's lines, which also replace the held-out captions).
    Checks every input before the checkpoint is read; writes WORKDIR/eval/COMMAND_step_N_{`sampling_name`}.json
    for what samples the model (fid, digits, shapes; sr: COMMAND_step_N_aug{aug_level}_s{sr_strength}_{the
    same}.json; shapes and sr with `eval.split` set: COMMAND_step_N_{split}_...),
    bpd_step_N[_ode_tol{ode_tolerance}[_smin{ode_sigma_min}]]_{split}_n{examples}[_seed{seed}].json, and
    COMMAND_{the .npz's name}.json for --samples.
    Returns the result."""
    from ddpm_jax import checkpoints

    validate_eval(config)
    from ddpm_jax.evaluation import super_resolution

    if command not in COMMANDS or command in ("convert_inception", "reference_stats", "cascade"):
        raise UserError(f"{command!r}: COMMAND is one of {COMMANDS}.")
    if out is not None and command != "accuracy":
        raise UserError(f"--out={out}: {command} writes WORKDIR/eval/; --out applies to accuracy (its grids), "
                        "convert_inception and reference_stats.")
    if samples is not None and command in ("bpd", "accuracy", "shapes", "sr"):
        raise UserError(f"--samples applies to fid, digits and clip; {command} needs the model (--workdir).")
    if samples is None and not workdir:
        raise UserError(f"{command} needs --workdir (a training run) or, for fid, digits and clip, --samples.")
    if prompts is not None and command not in ("clip", "fid"):
        raise UserError(f"--prompts={prompts}: applies to clip and fid (the captions to sample under).")
    if prompts is not None and command == "fid" and (samples is not None or config.model.text_encoder == "none"):
        raise UserError(f"--prompts={prompts}: fid samples a text-to-image run's --workdir under them.")
    if samples is not None and command == "clip" and prompts is None:
        raise UserError(f"--samples={samples}: give --prompts=FILE too, the prompts the samples were drawn for.")
    prompt_list = None if prompts is None else generation.read_prompts(prompts)
    if prompt_list is not None and samples is None:  # what is sampled, for the result's name and fields
        config.eval.num_samples = min(config.eval.num_samples, len(prompt_list))
    if samples is not None and step is not None:
        raise UserError(f"--checkpoint_step={step} chooses the checkpoint to sample; --samples={samples} scores "
                        "that file instead: give one of them.")
    e = config.eval
    if command == "fid":
        weights = inception_weights_file(e.inception_weights)
        stats = e.reference_stats
        if not stats:
            raise UserError(f"{STATS_FIELD}=None: give the reference statistics .npz (see `reference_stats`).")
        if reference_split and not is_file(stats):
            if samples is not None:
                raise UserError("--reference_split reads the dataset of a --workdir's run; with --samples make "
                                "the statistics first with `reference_stats --config=...`.")
            config = config.copy_and_resolve_references()
            config.eval.split = reference_split
            reference_stats_command(config, stats, per_device_batch=per_device_batch)
        reference = metrics.load_statistics(stats, STATS_FIELD)
        if reference["mu"].shape != (inception.POOL_DIM,):
            raise UserError(f"{STATS_FIELD}={stats}: its statistics are {len(reference['mu'])}-d; FID here uses the "
                            f"{inception.POOL_DIM}-d Inception pool features (make them with `reference_stats`).")
        if samples is None:
            _enough_for_inception_score(e.num_samples, "eval.num_samples")
            if config.model.text_encoder != "none":
                check_caption_sampling(config)
    if command == "accuracy":
        plans = conditional_accuracy.parse_settings(config, settings)
    if command == "shapes":
        check_shapes(config)
    if command == "clip":
        check_clip(config, samples=samples is not None)
    if command == "sr":
        super_resolution.check_sr(config)
    elif config.model.low_res_size and command != "bpd":
        raise UserError(f"{command} samples from noise; this run is a super-resolution model "
                        f"(model.low_res_size={config.model.low_res_size}): use `evaluate sr` or `evaluate cascade`.")
    images = labels = None
    ode = {}  # the ode sampler's evaluations per image, where the command samples by it
    if samples is not None:
        images, labels = load_samples(samples)
        if command == "fid":
            _enough_for_inception_score(len(images), f"--samples={samples}")
    else:
        params, step = checkpoints.load_params(workdir, config, step=step)
    name = command if step is None else f"{command}_step_{step}"
    progress = generation.ProgressBar() if jax.process_index() == 0 else None  # of sampling or bits/dim

    if command == "accuracy":
        out = out or os.path.join(workdir, "accuracy")
        table = conditional_accuracy.run(config, params, plans, num_per_class=num_per_class, out=out)
        if not jax.process_index():
            print(f"step {step}, {num_per_class} samples per class, classifier: evaluation.digits_classifier\n")
            print(table)
        return {"table": table}
    # Every setting that changes the numbers is in the name, so results of other settings get other files.
    how = sampling_name(config)
    split_name = lambda split: re.sub(r"[^\w.-]+", "-", split)  # e.g. train[:10%] -> train-10-
    given_split = f"_{split_name(e.split)}" if e.split else ""  # shapes, sr: the held-out split unless given
    base = lambda path: split_name(os.path.basename(os.path.normpath(path)))
    stem = lambda path: os.path.splitext(base(path))[0]
    captions_name = f"_{stem(prompts)}" if prompts else given_split  # clip, a text model's fid
    partial = lambda name: os.path.join(workdir, "eval", name + PARTIAL_SUFFIX)  # until the result is written
    if command == "shapes":
        name = f"{name}{given_split}_{how}"
        result = shapes(config, params, progress, partial(name))
    elif command == "clip":  # named by the CLIP's folder too: another CLIP gives other scores
        if images is not None:
            name = f"{name}_{base(e.clip_model)}_{stem(samples)}"
            result = clip_of_samples(e.clip_model, images, prompt_list, samples)
        else:
            name = f"{name}{captions_name}_{base(e.clip_model)}_{how}"
            result = clip_score(config, params, progress, partial(name), prompt_list)
    elif command == "sr":
        name = f"{name}{given_split}_aug{config.sampling.aug_level:g}_s{config.sampling.sr_strength:g}_{how}"
        result = super_resolution.sr(config, params, progress, partial(name))
    elif command == "bpd":
        split = eval_split(config)
        images, _ = real_images(config, split, num_examples)
        ode = f"_ode_tol{e.ode_tolerance:g}{f'_smin{e.ode_sigma_min:g}' if e.ode_sigma_min else ''}" \
            if e.bpd_method == "ode" else ""
        name = f"{name}{ode}_{split_name(split)}_n{len(images)}{f'_seed{e.seed}' if e.seed else ''}"
        result = bits_per_dim(config, params, images, progress, partial(name))
        result.update(split=split, num_examples=len(images), bpd_method=e.bpd_method)
    else:
        texts = {}  # a text model's samples: one per held-out caption (or --prompts line)
        if images is None and config.model.text_encoder != "none":
            texts = {"split": None if prompts else eval_split(config), "prompts": prompts}
            name = f"{name}{captions_name}"
        if images is None:
            name = f"{name}_{how}"
            images, labels, ode = generate(config, params, progress, partial(name), prompt_list)
        else:
            name = f"{name}_{os.path.splitext(os.path.basename(os.path.normpath(samples)))[0]}"
        if command == "fid":
            variables = parallel.replicate(inception.load_variables(weights, WEIGHTS_FIELD))
            result = fid_is_kid(images, variables, reference, per_device_batch=per_device_batch)
        else:
            result = digits(images, labels, e.digits_classifier)
        result.update(num_samples=len(images), **ode, **{k: v for k, v in texts.items() if v is not None})
    result.update(step=step)
    write_result(workdir, name, result)
    if workdir:
        chunk_store.clear(partial(name))
    return result
