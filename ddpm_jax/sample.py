"""Samples from a trained run: generation, classifier-free guidance, image-to-image, inpainting, figures.

    python -m ddpm_jax.sample --workdir=runs/digits_cond --sampler=ddim --steps=50 --guidance=2 --num_samples=100
    python -m ddpm_jax.sample --workdir=runs/digits_cond --init_images=in/ --strength=0.6 --label=3
    python -m ddpm_jax.sample --workdir=runs/digits --init_images=in/ --mask=mask.png --jump_length=10 --jump_n_sample=5

Loads the run's config.json and its latest checkpoint (EMA params unless --noema). Writes to --out
(default WORKDIR/samples): `samples.png` (a grid; one row per class with --label=all), `samples.npz`
(`arr_0`: uint8 `[N, H, W, C]`, the form FID tools read; `labels` for class-conditional models),
`images/NNNNNN.png` with --individual, and with --figures `forward_process.png` (x_0 noised step by
step to x_T) and `reverse_process.png` (the sampler's trajectory from noise to image).
Flags left unset take their value from the config's `sampling` section.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ddpm_jax import defaults
from ddpm_jax import diffusion as D
from ddpm_jax import image_utils
from ddpm_jax import sampling as S
from ddpm_jax.models import unet_from_config

FIGURE_ROWS = 8  # images in each process figure


def define_flags():
    """The command-line flags (defined only when run as a program, so importing defines none)."""
    flags.DEFINE_string("workdir", None, "A training run's --workdir.")
    flags.DEFINE_string("out", None, "Output folder (default WORKDIR/samples).")
    flags.DEFINE_integer("num_samples", None, "Images to make (default 64, or one per --init_images image).")
    flags.DEFINE_integer("batch_size", 256, "Images per device call, over all local devices.")
    flags.DEFINE_string("sampler", None, f"One of {sorted(S.SAMPLERS)} (default sampling.sampler).")
    flags.DEFINE_integer("steps", None, "Sampler steps; fewer than diffusion.num_timesteps respaces.")
    flags.DEFINE_float("eta", None, "DDIM noise: 0 deterministic, 1 as ancestral (ddim only).")
    flags.DEFINE_float("guidance", None, "Classifier-free guidance weight w >= 0 (class-conditional models).")
    flags.DEFINE_string("label", None, "A class index, 'all' (the classes in equal blocks; the default for "
                                       "class-conditional models) or 'null' (unconditional).")
    flags.DEFINE_integer("seed", 0, "Base random seed.")
    flags.DEFINE_string("init_images", None, "Image-to-image / inpainting input: a PNG or a folder of them.")
    flags.DEFINE_float("strength", None, "Image-to-image: noise the inputs to t = strength * T, in [0, 1].")
    flags.DEFINE_bool("invert", False, "Image-to-image: reach t by DDIM inversion instead of adding noise.")
    flags.DEFINE_string("mask", None, "Inpainting: a PNG (or folder), white where to generate, black to keep.")
    flags.DEFINE_integer("jump_length", None, "Inpainting: RePaint resampling jump length (0: no jumps).")
    flags.DEFINE_integer("jump_n_sample", None, "Inpainting: times each jump stretch is sampled.")
    flags.DEFINE_bool("individual", False, "Also write each image as images/NNNNNN.png.")
    flags.DEFINE_bool("figures", False, "Also draw the forward and reverse process figures.")
    flags.DEFINE_bool("ema", True, "Use the EMA params (--noema: the raw params).")


@dataclasses.dataclass
class Request:
    """A validated sampling request. Arrays are `[N, ...]`: labels int32, x0 float32 in [-1, 1], mask bool."""

    num_samples: int
    batch_size: int
    seed: int
    steps: int
    spec: S.SampleSpec
    labels: np.ndarray
    label: str | None  # as given: a class, 'all', 'null', or None for unconditional models
    x0: np.ndarray | None = None
    mask: np.ndarray | None = None


def sampling_defaults(config):
    """The run's `sampling` section on top of the current defaults (older runs lack newer fields)."""
    sampling = defaults.get_config().sampling
    sampling.update(config.get("sampling", {}))
    return sampling


def parse_labels(label: str | None, num_classes: int, n: int) -> np.ndarray:
    """int32 `[n]` labels for --label (0 for unconditional models, which ignore them)."""
    if not num_classes:
        if label is not None:
            raise ValueError(f"--label={label}: this run's model is unconditional (model.num_classes=0).")
        return np.zeros(n, np.int32)
    label = "all" if label is None else label
    if label == "all":
        return (np.arange(n) * num_classes // n).astype(np.int32)
    if label == "null":
        return np.full(n, num_classes, np.int32)
    if not label.lstrip("-").isdigit() or not 0 <= int(label) < num_classes:
        raise ValueError(f"--label={label}: must be 'all', 'null' or a class in [0, {num_classes - 1}].")
    return np.full(n, int(label), np.int32)


def _load(flag: str, path: str, **kw) -> np.ndarray:
    try:
        return image_utils.load_images(path, **kw)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"--{flag}={path}: {e}") from None


def make_request(config, *, num_samples=None, batch_size=256, sampler=None, steps=None, eta=None,
                 guidance=None, label=None, seed=0, init_images=None, strength=None, invert=False, mask=None,
                 jump_length=None, jump_n_sample=None) -> Request:
    """Checks the flags against the run's config and reads the input images; every error names its
    flag and what would be valid, before anything is compiled or written."""
    d, T, K = config.data, config.diffusion.num_timesteps, config.model.num_classes
    sp = sampling_defaults(config)
    sampler = sampler or sp.sampler
    S.get_step(sampler)
    steps = sp.steps if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"--steps={steps}: must be between 1 and diffusion.num_timesteps={T}.")
    eta = sp.eta if eta is None else eta
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta={eta}: must be in [0, 1].")
    if eta and sampler != "ddim":
        raise ValueError(f"--eta={eta} applies to --sampler=ddim only (this is --sampler={sampler}).")
    guidance = sp.guidance if guidance is None else guidance
    if guidance < 0:
        raise ValueError(f"--guidance={guidance}: must be >= 0.")
    if guidance and not K:
        raise ValueError(f"--guidance={guidance} needs a class-conditional model; this run has "
                         f"model.num_classes=0 (train one with e.g. configs/digits_cond.py).")
    for flag, value in (("strength", strength), ("mask", mask)):
        if value is not None and init_images is None:
            raise ValueError(f"--{flag} edits the --init_images; give --init_images too.")
    if invert and (init_images is None or mask is not None):
        raise ValueError("--invert applies to image-to-image: give --init_images without --mask.")
    if mask is not None and strength is not None:
        raise ValueError("--strength applies to image-to-image; with --mask the masked part is generated "
                         "from noise (drop one of the two).")
    if mask is None and (jump_length or jump_n_sample):
        raise ValueError("--jump_length/--jump_n_sample apply to inpainting: give --mask too.")

    x0 = mask_arr = None
    level = None
    jl = sp.jump_length if jump_length is None else jump_length
    jn = sp.jump_n_sample if jump_n_sample is None else jump_n_sample
    if init_images is not None:
        imgs = _load("init_images", init_images, image_size=d.image_size, channels=d.channels)
        num_samples = len(imgs) if num_samples is None else num_samples
        x0 = image_utils.from_uint8(imgs[np.arange(num_samples) % len(imgs)])
        if mask is None:
            level = S.strength_to_level(sp.strength if strength is None else strength, steps)
        else:
            m = _load("mask", mask, channels=1)
            if m.shape[1:3] != (d.image_size, d.image_size):
                raise ValueError(f"--mask={mask}: the mask is {m.shape[2]}x{m.shape[1]}; it must be "
                                 f"{d.image_size}x{d.image_size}, the size the model samples at.")
            if len(m) not in (1, len(imgs)):
                raise ValueError(f"--mask={mask}: {len(m)} masks for {len(imgs)} --init_images; give one "
                                 f"mask or one per image.")
            mask_arr = (m >= 128)[np.arange(num_samples) % len(m)]
            try:
                S.repaint_schedule(steps, jl, jn)
            except ValueError as e:
                raise ValueError(f"--jump_length/--jump_n_sample: {e}") from None
    num_samples = 64 if num_samples is None else num_samples
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num_samples={num_samples} and --batch_size={batch_size}: must be >= 1.")
    labels = parse_labels(label, K, num_samples)
    c = config.diffusion
    spec = S.SampleSpec(sampler=sampler, opts=S.StepOptions(eta, c.variance, c.clip_x0), guidance=guidance,
                        level=level, invert=invert, inpaint=mask_arr is not None, jump_length=jl,
                        jump_n_sample=jn)
    return Request(num_samples, batch_size, seed, steps, spec, labels, label if K else None, x0, mask_arr)


def run(config, params, req: Request, spec: S.SampleSpec | None = None, progress=None) -> dict:
    """Samples `req` on all local devices: {'images': float `[N, H, W, C]` [, 'frames']}. `spec`
    overrides `req.spec` (the figures use it to add frames)."""
    model = unet_from_config(config)
    s = D.schedule_from_config(config.diffusion, req.steps)
    d = config.data
    spec = spec or req.spec
    inputs = {"labels": req.labels}
    if req.x0 is not None:
        inputs["x0"] = req.x0
    if req.mask is not None:
        inputs["mask"] = req.mask
    fn = lambda p, k, b: S.sample_shard(model, s, config.diffusion.model_output, spec,
                                        (d.image_size, d.image_size, d.channels), p, k, b)
    return S.pmap_batches(fn, params, jax.random.key(req.seed), inputs, req.batch_size, progress)


def process_figures(config, params, req: Request) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grids (rows: images, columns: steps): the sampler's reverse trajectory from noise for
    FIGURE_ROWS of the request's rows (evenly spaced, so several classes with --label=all; its own
    samples, drawn again), and the forward process from x_0 (those samples, or the inputs) to x_T."""
    rows = np.unique(np.linspace(0, req.num_samples - 1, min(FIGURE_ROWS, req.num_samples)).round().astype(int))
    pick = lambda a: None if a is None else a[rows]
    some = dataclasses.replace(req, num_samples=len(rows), batch_size=len(rows), labels=req.labels[rows],
                               x0=pick(req.x0), mask=pick(req.mask))
    num_frames = sampling_defaults(config).num_frames
    rev = run(config, params, some, req.spec._replace(num_frames=num_frames))
    x0 = rev["images"] if req.x0 is None else some.x0
    full = D.schedule_from_config(config.diffusion)
    frames = jax.jit(S.forward_trajectory, static_argnums=3)(full, jax.random.key(req.seed + 1), jnp.asarray(x0),
                                                             num_frames)
    fwd = np.concatenate([np.asarray(x0)[:, None], np.swapaxes(np.asarray(frames), 0, 1)], axis=1)
    grid = lambda f: image_utils.make_grid(image_utils.to_uint8(f.reshape((-1,) + f.shape[2:])), nrow=f.shape[1])
    return grid(fwd), grid(rev["frames"])


def write_outputs(out: str, images: np.ndarray, req: Request, num_classes: int, *, individual=False,
                  figures=None) -> list[str]:
    """Writes the grid, the .npz, optionally each image and the figures; returns the paths written."""
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from ddpm_jax import checkpoints

    F = flags.FLAGS
    if not F.workdir:
        raise app.UsageError("--workdir is required: a training run's folder.")
    try:
        config = checkpoints.load_config(F.workdir)
        req = make_request(
            config, num_samples=F.num_samples, batch_size=F.batch_size, sampler=F.sampler, steps=F.steps,
            eta=F.eta, guidance=F.guidance, label=F.label, seed=F.seed, init_images=F.init_images,
            strength=F.strength, invert=F.invert, mask=F.mask, jump_length=F.jump_length,
            jump_n_sample=F.jump_n_sample)
        params, step = checkpoints.load_params(F.workdir, config, use_ema=F.ema)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    out = F.out or os.path.join(F.workdir, "samples")
    print(f"step {step} ({'EMA' if F.ema else 'raw'} params), {req.spec.sampler}, {req.steps} steps, "
          f"guidance {req.spec.guidance}, {jax.local_device_count()} devices -> {out}", file=sys.stderr)
    images = run(config, params, req, progress=ProgressBar())["images"]
    figures = process_figures(config, params, req) if F.figures else None
    paths = write_outputs(out, images, req, config.model.num_classes, individual=F.individual, figures=figures)
    print("\n".join(p for p in paths if "/images/" not in p))


if __name__ == "__main__":
    define_flags()
    app.run(main)
