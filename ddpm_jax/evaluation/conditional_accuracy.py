"""Does a class-conditional digits model draw the class it is asked for? Per-class accuracy by sampler.

For each sampler setting it draws `num_per_class` samples of every class and classifies them with
`evaluation.digits_classifier`, a CNN fitted on the real digits that the diffusion model never saw;
it writes one grid per setting (one row per class) and returns a markdown table.

    python -m ddpm_jax.evaluate accuracy --workdir=runs/digits_cond --settings=ddim:50,ddim:10,ddim:50:0
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from ddpm_jax import generation, image_utils, sampling
from ddpm_jax.validation import UserError, check_output_dir, validate_sampling

DEFAULT_SETTINGS = ("ddim:50", "ancestral:1000", "ddim:10", "ddim:50:0")


def parse_settings(config: ConfigDict, settings) -> list[tuple[str, object]]:
    """'sampler:steps[:guidance]' strings (guidance defaults to the run's sampling.guidance) -> a list
    of (name, config) with the setting written into `sampling`, each checked."""
    if config.data.dataset != "digits" or not config.model.num_classes:
        raise UserError(f"accuracy needs a class-conditional digits run (data.dataset={config.data.dataset!r}, "
                        f"model.num_classes={config.model.num_classes}).")
    plans = []
    for setting in settings or DEFAULT_SETTINGS:
        parts = setting.split(":")
        try:
            sampler, steps, guidance = parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else None
            if len(parts) > 3:
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(f"--settings: {setting!r} is not sampler:steps[:guidance], e.g. ddim:50:1.") from None
        c = config.copy_and_resolve_references()
        c.sampling.sampler, c.sampling.steps = sampler, steps
        c.sampling.guidance = c.sampling.guidance if guidance is None else guidance
        c.sampling.eta = 0.0
        c.sampling.ode_tolerance = c.eval.ode_tolerance  # --ode_tolerance, as for evaluate's other commands
        validate_sampling(c)
        spacing = "" if c.sampling.timestep_spacing == "even" else f" {c.sampling.timestep_spacing}"
        how = f"ode tol {c.sampling.ode_tolerance:g}" if sampler == "ode" else f"{sampler} {steps}{spacing} steps"
        plans.append((f"{how}, w={c.sampling.guidance:g}", c))
    return plans


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of the samples of each class `[num_classes]` that the classifier assigns to it."""
    return np.array([np.mean(predicted[labels == k] == k) for k in range(num_classes)])


def evaluate(config: ConfigDict, params, classifier, num_per_class: int) -> dict:
    """Samples `num_per_class` of every class with `config.sampling` and classifies them: {'per_class'
    `[K]`, 'accuracy', 'digits_fd' (against all real digits), 'seconds' (sampling wall time,
    compilation included), 'images' uint8, 'labels'}."""
    from ddpm_jax.evaluation import digits_classifier

    K = config.model.num_classes
    config = config.copy_and_resolve_references()
    config.sampling.num_samples = K * num_per_class
    req = generation.make_request(config, label="all")
    start = time.time()
    images = generation.run(config, params, req, uint8=True)["images"]
    seconds = time.time() - start
    predicted = digits_classifier.features_and_logits(classifier, images)[1].argmax(-1)
    fd = digits_classifier.digits_metrics(classifier, images)["digits_fd"]
    return {"per_class": per_class_accuracy(predicted, req.labels, K),
            "accuracy": float(np.mean(predicted == req.labels)), "digits_fd": fd, "seconds": seconds,
            "images": images, "labels": req.labels}


def markdown_table(rows: list[tuple[str, dict]], num_classes: int) -> str:
    """One row per setting: per-class accuracy in %, overall, digits_fd, sampling seconds."""
    head = "| setting | " + " | ".join(str(k) for k in range(num_classes)) + " | all | digits_fd | seconds |"
    lines = [head, "|---" * (num_classes + 4) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.0f}" for a in r["per_class"])
                     + f" | {100 * r['accuracy']:.1f} | {r['digits_fd']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run(config: ConfigDict, params, plans, *, num_per_class: int, out: str) -> str:
    """Evaluates every (name, config) of `parse_settings`, writes a grid per setting to `out`, and
    returns the markdown table."""
    from ddpm_jax.evaluation import digits_classifier

    check_output_dir(out, "accuracy output folder")
    classifier = digits_classifier.load_or_fit(config.eval.digits_classifier)
    rows = []
    for name, c in plans:
        r = evaluate(c, params, classifier, num_per_class)
        sp = c.sampling
        if not jax.process_index():  # every process sampled; process 0 alone writes
            grid = image_utils.make_grid(r["images"], nrow=num_per_class)
            how = sampling.sampler_name(sp.sampler, sp.steps, sp.ode_tolerance, sp.timestep_spacing)
            image_utils.save_png(os.path.join(out, f"{how}_w{sp.guidance:g}.png"), grid, scale=4)
            print(f"{name}: {100 * r['accuracy']:.1f}% in {r['seconds']:.0f}s", file=sys.stderr)
        rows.append((name, r))
    return markdown_table(rows, config.model.num_classes)
