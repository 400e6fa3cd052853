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
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from ddpm_jax import diffusion as D
from ddpm_jax import image_utils, parallel
from ddpm_jax import sampling as S
from ddpm_jax.models import unet_from_config
from ddpm_jax.validation import UserError, check_output_dir, validate_sampling

FIGURE_ROWS = 8  # images in each process figure
_FORWARD = 2 ** 31 - 1  # fold_in tag of the forward-process figure's noise; no batch index reaches it


@dataclasses.dataclass
class Request:
    """A checked request. Arrays are `[N, ...]`: labels int32, x0 float32 in [-1, 1], mask bool."""

    num_samples: int
    spec: S.SampleSpec
    labels: np.ndarray
    label: str | None  # as given: a class, 'all', 'null', or None for unconditional models
    x0: np.ndarray | None = None
    mask: np.ndarray | None = None


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


def _load(flag: str, path: str, **kw) -> np.ndarray:
    try:
        return image_utils.load_images(path, **kw)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--{flag}={path}: {e}") from None


def make_request(config: ConfigDict, *, label: str | None = None, init_images: str | None = None,
                 mask: str | None = None, invert: bool = False, given: frozenset[str] = frozenset()) -> Request:
    """Checks `config.sampling` and the inputs against the model and reads the input images; every
    error is a UserError naming its flag or field. `given`: the flags the user set explicitly
    (--strength, --jump_length, ... make sense only with some inputs)."""
    validate_sampling(config)
    d, sp, K = config.data, config.sampling, config.model.num_classes
    if init_images is None and ("strength" in given or mask is not None):
        raise UserError(f"--{'mask' if mask is not None else 'strength'} edits the --init_images; give "
                        "--init_images too.")
    if invert and (init_images is None or mask is not None):
        raise UserError("--invert applies to image-to-image: give --init_images without --mask.")
    if mask is not None and "strength" in given:
        raise UserError("--strength applies to image-to-image; with --mask the masked part is generated "
                        "from noise (drop one of the two).")
    if mask is None and {"jump_length", "jump_n_sample"} & given:
        raise UserError("--jump_length/--jump_n_sample apply to inpainting: give --mask too.")

    num_samples, x0, mask_arr, level = sp.num_samples, None, None, None
    if init_images is not None:
        images = _load("init_images", init_images, image_size=d.image_size, channels=d.channels)
        num_samples = sp.num_samples if "num_samples" in given else len(images)
        x0 = image_utils.from_uint8(images[np.arange(num_samples) % len(images)])
        if mask is None:
            level = S.strength_to_level(sp.strength, sp.steps)
        else:
            m = _load("mask", mask, channels=1)
            if m.shape[1:3] != (d.image_size, d.image_size):
                raise UserError(f"--mask={mask}: the mask is {m.shape[2]}x{m.shape[1]}; it must be "
                                f"{d.image_size}x{d.image_size}, the size the model samples at.")
            if len(m) not in (1, len(images)):
                raise UserError(f"--mask={mask}: {len(m)} masks for {len(images)} --init_images; give one "
                                "mask or one per image.")
            mask_arr = (m >= 128)[np.arange(num_samples) % len(m)]
    spec = S.SampleSpec(sampler=sp.sampler, opts=S.step_options(config), guidance=sp.guidance, level=level,
                        invert=invert, inpaint=mask_arr is not None, jump_length=sp.jump_length,
                        jump_n_sample=sp.jump_n_sample)
    return Request(num_samples, spec, parse_labels(label, K, num_samples), label if K else None, x0, mask_arr)


def pmapped_sampler(config: ConfigDict, spec: S.SampleSpec):
    """The pmapped `(params, key, shard) -> {'images'[, 'frames']}` of a config and a request kind,
    built once per (config, spec) and reused. params are not replicated (in_axes None)."""
    return parallel.built_once(("sample", config.to_json_best_effort(sort_keys=True), spec),
                               lambda: _build_sampler(config, spec))


def _build_sampler(config: ConfigDict, spec: S.SampleSpec):
    d = config.data
    model = unet_from_config(config)
    s = D.schedule_from_config(config.diffusion, config.sampling.steps)
    kind, shape = config.diffusion.model_output, (d.image_size, d.image_size, d.channels)

    def device_fn(params, key, shard):
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS_NAME))
        return S.sample_shard(model, s, kind, spec, shape, params, key, shard)

    return jax.pmap(device_fn, parallel.AXIS_NAME, in_axes=(None, None, 0))


def run(config: ConfigDict, params, req: Request, progress=None) -> dict:
    """Samples `req` on all devices in batches of `sampling.batch_size`: {'images': float `[N, H, W,
    C]` in [-1, 1][, 'frames' `[N, F, H, W, C]` when `req.spec.num_frames`]}. With several processes
    every process calls it and gets every image.

    Batch c uses fold_in(key, c), device d in it fold_in(that, d), key = key(sampling.seed).
    """
    fn = pmapped_sampler(config, req.spec)
    key = jax.random.key(config.sampling.seed)
    inputs = {"labels": req.labels}
    if req.x0 is not None:
        inputs["x0"] = req.x0
    if req.mask is not None:
        inputs["mask"] = req.mask
    return parallel.pad_shard_unpad(lambda c, shard: fn(params, jax.random.fold_in(key, c), shard), inputs,
                                    config.sampling.batch_size, progress)


def process_figures(config: ConfigDict, params, req: Request) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grids (rows: images, columns: steps): the sampler's reverse trajectory from noise for
    FIGURE_ROWS of the request's rows (evenly spaced, so several classes with --label=all; its own
    samples, drawn again), and the forward process from x_0 (those samples, or the inputs) to x_T."""
    rows = np.unique(np.linspace(0, req.num_samples - 1, min(FIGURE_ROWS, req.num_samples)).round().astype(int))
    pick = lambda a: None if a is None else a[rows]
    num_frames = config.sampling.num_frames
    some = Request(len(rows), req.spec._replace(num_frames=num_frames), req.labels[rows], req.label,
                   pick(req.x0), pick(req.mask))
    rev = run(config, params, some)
    x0 = rev["images"] if req.x0 is None else some.x0
    full = D.schedule_from_config(config.diffusion)
    key = jax.random.fold_in(jax.random.key(config.sampling.seed), _FORWARD)
    frames = jax.jit(S.forward_trajectory, static_argnums=3)(full, key, jnp.asarray(x0), num_frames)
    fwd = np.concatenate([np.asarray(x0)[:, None], np.swapaxes(np.asarray(frames), 0, 1)], axis=1)
    grid = lambda f: image_utils.make_grid(image_utils.to_uint8(f.reshape((-1,) + f.shape[2:])), nrow=f.shape[1])
    return grid(fwd), grid(rev["frames"])


def write_outputs(out: str, images: np.ndarray, req: Request, num_classes: int, *, individual=False,
                  figures=None) -> list[str]:
    """Writes the grid, the .npz, optionally each image and the figures; returns the paths written.

    Non-finite samples (a diverged model) are a UserError rather than images of garbage.
    """
    if not np.isfinite(images).all():
        raise UserError(f"{int((~np.isfinite(images)).any(axis=(1, 2, 3)).sum())} of {len(images)} samples "
                        "are not finite: the checkpoint's params are broken (a diverged run?).")
    os.makedirs(out, exist_ok=True)
    u8 = image_utils.to_uint8(images)
    scale = max(1, 32 // u8.shape[1])
    per_class = req.label == "all" and req.num_samples % num_classes == 0
    paths = [os.path.join(out, "samples.png"), os.path.join(out, "samples.npz")]
    image_utils.save_png(paths[0], image_utils.make_grid(
        u8, nrow=req.num_samples // num_classes if per_class else None), scale)
    np.savez(paths[1], arr_0=u8, **({"labels": req.labels} if num_classes else {}))
    if individual:
        for i, img in enumerate(u8):
            paths.append(os.path.join(out, "images", f"{i:06d}.png"))
            image_utils.save_png(paths[-1], img)
    for name, grid in zip(("forward_process.png", "reverse_process.png"), figures or ()):
        paths.append(os.path.join(out, name))
        image_utils.save_png(paths[-1], grid, scale)
    return paths


def sample_workdir(workdir: str, config: ConfigDict, *, out: str | None = None, label: str | None = None,
                   init_images: str | None = None, mask: str | None = None, invert: bool = False,
                   ema: bool = True, individual: bool = False, figures: bool = False,
                   given: frozenset[str] = frozenset()) -> list[str]:
    """`python -m ddpm_jax.sample`: samples the run in `workdir` with `config` (its config.json with
    the flags written in) and writes the files to `out` (default WORKDIR/samples). Every input is
    checked before the checkpoint is read. Returns the paths written (and prints them); with several
    processes all sample and process 0 writes (the others return [])."""
    from ddpm_jax import checkpoints

    req = make_request(config, label=label, init_images=init_images, mask=mask, invert=invert, given=given)
    out = out or os.path.join(workdir, "samples")
    check_output_dir(out)
    params, step = checkpoints.load_params(workdir, config, use_ema=ema)
    sp = config.sampling
    is_main = jax.process_index() == 0  # every process samples on its devices; process 0 alone writes
    if is_main:
        print(f"step {step} ({'EMA' if ema else 'raw'} params), {sp.sampler}, {sp.steps} steps, guidance "
              f"{sp.guidance}, {jax.device_count()} device(s) -> {out}", file=sys.stderr)
    images = run(config, params, req, progress=ProgressBar() if is_main else None)["images"]
    grids = process_figures(config, params, req) if figures else None
    if not is_main:
        return []
    paths = write_outputs(out, images, req, config.model.num_classes, individual=individual, figures=grids)
    print("\n".join(p for p in paths if "/images/" not in p))
    return paths


class ProgressBar:
    """`progress(done, total)` callback drawing a one-line bar with rate and time left on stderr."""

    def __init__(self, what="images", stream=sys.stderr):
        self.what, self.stream, self.start = what, stream, time.time()

    def __call__(self, done: int, total: int):
        dt = time.time() - self.start
        bar = "#" * (30 * done // total)
        left = dt / done * (total - done)
        self.stream.write(f"\r[{bar:<30}] {done}/{total} {self.what}, {done / dt:.1f}/s, {left:.0f}s left")
        self.stream.write("\n" if done == total else "")
        self.stream.flush()
