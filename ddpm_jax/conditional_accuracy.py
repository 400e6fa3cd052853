"""Does a class-conditional digits model draw the class it is asked for? Per-class accuracy by sampler.

For each sampler setting it draws `num_per_class` samples of every class and classifies them with
`evaluation.digits_classifier`, a CNN fitted on the real digits that the diffusion model never saw;
it writes one grid per setting (one row per class) and prints a markdown table.

    python -m ddpm_jax.conditional_accuracy --workdir=runs/digits_cond --out=runs/digits_cond/accuracy
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

from ddpm_jax import image_utils
from ddpm_jax import sample as sample_cli


def define_flags():
    """The command-line flags (defined only when run as a program, so importing defines none)."""
    flags.DEFINE_string("workdir", None, "A class-conditional digits training run.")
    flags.DEFINE_string("out", None, "Where the grids go (default WORKDIR/accuracy).")
    flags.DEFINE_integer("num_per_class", 100, "Samples of every class per setting.")
    flags.DEFINE_float("guidance", None, "Guidance weight (default the run's sampling.guidance).")
    flags.DEFINE_integer("batch_size", 500, "Images per device call.")
    flags.DEFINE_list("settings", ["ddim:50", "ancestral:1000", "ddim:10", "ddim:50:0"],
                      "sampler:steps[:guidance] settings to compare (guidance defaults to --guidance).")


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of the samples of each class `[num_classes]` that the classifier assigns to it."""
    return np.array([np.mean(predicted[labels == k] == k) for k in range(num_classes)])


def evaluate(config, params, classifier, *, sampler: str, steps: int, guidance: float, num_per_class: int,
             batch_size: int = 500, seed: int = 0) -> dict:
    """Samples `num_per_class` of every class and classifies them: {'per_class' `[K]`, 'accuracy',
    'seconds' (sampling wall time, compilation included), 'images' uint8 `[K * n, H, W, C]`, 'labels'}."""
    from ddpm_jax.evaluation import digits_classifier

    K = config.model.num_classes
    req = sample_cli.make_request(config, num_samples=K * num_per_class, batch_size=batch_size, sampler=sampler,
                                  steps=steps, guidance=guidance, label="all", seed=seed)
    start = time.time()
    images = image_utils.to_uint8(sample_cli.run(config, params, req)["images"])
    seconds = time.time() - start
    predicted = digits_classifier.features_and_logits(classifier, images)[1].argmax(-1)
    return {"per_class": per_class_accuracy(predicted, req.labels, K), "accuracy": float(np.mean(predicted == req.labels)),
            "seconds": seconds, "images": images, "labels": req.labels}


def markdown_table(rows: list[tuple[str, dict]], num_classes: int) -> str:
    """One row per setting: per-class accuracy in %, overall, sampling seconds."""
    head = "| setting | " + " | ".join(str(k) for k in range(num_classes)) + " | all | seconds |"
    lines = [head, "|---" * (num_classes + 3) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.0f}" for a in r["per_class"])
                     + f" | {100 * r['accuracy']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from ddpm_jax import checkpoints
    from ddpm_jax.evaluation import digits_classifier

    F = flags.FLAGS
    try:
        config = checkpoints.load_config(F.workdir)
        if config.data.dataset != "digits" or not config.model.num_classes:
            raise ValueError(f"--workdir={F.workdir}: needs a class-conditional digits run (data.dataset="
                             f"{config.data.dataset}, model.num_classes={config.model.num_classes}).")
        params, step = checkpoints.load_params(F.workdir, config)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    classifier = digits_classifier.load_or_fit()
    guidance = sample_cli.sampling_defaults(config).guidance if F.guidance is None else F.guidance
    out = F.out or os.path.join(F.workdir, "accuracy")
    rows = []
    for setting in F.settings:
        sampler, steps, *w = setting.split(":")
        w = float(w[0]) if w else guidance
        name = f"{sampler} {steps} steps, w={w:g}"
        r = evaluate(config, params, classifier, sampler=sampler, steps=int(steps), guidance=w,
                     num_per_class=F.num_per_class, batch_size=F.batch_size)
        grid = image_utils.make_grid(r["images"], nrow=F.num_per_class)
        image_utils.save_png(os.path.join(out, f"{sampler}_{steps}_w{w:g}.png"), grid, scale=4)
        print(f"{name}: {100 * r['accuracy']:.1f}% in {r['seconds']:.0f}s", file=sys.stderr)
        rows.append((name, r))
    print(f"step {step}, {F.num_per_class} samples per class, classifier: evaluation.digits_classifier\n")
    print(markdown_table(rows, config.model.num_classes))


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("workdir")
    app.run(main)
