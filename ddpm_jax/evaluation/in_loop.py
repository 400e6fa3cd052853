"""Evaluation inside the training loop, every `eval.eval_every` steps, as TensorBoard scalars.

What runs follows the config: on `eval.num_samples` samples the digits metrics (digits datasets)
and FID/IS/KID (when `eval.inception_weights` and `eval.reference_stats` are set); bits/dim on
`eval.bpd_examples` examples of the evaluation split (when > 0). Everything it needs is checked and
loaded when it is built, before training compiles anything.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from ddpm_jax.evaluation import digits_classifier, inception, metrics, tasks


def check_config(config) -> None:
    """Raises ValueError naming the `eval` field when it cannot work."""
    e = config.eval
    for name in ("eval_every", "num_samples", "bpd_examples", "batch_size", "steps"):
        value = e[name]
        if not isinstance(value, int) or value < 0 or (name == "batch_size" and value == 0):
            raise ValueError(f"eval.{name}={value!r}: must be a {'positive' if name == 'batch_size' else 'non-negative'} "
                             "integer.")
    if e.steps > config.diffusion.num_timesteps:
        raise ValueError(f"eval.steps={e.steps}: at most diffusion.num_timesteps={config.diffusion.num_timesteps} "
                         "(0: sampling.steps).")
    if bool(e.inception_weights) != bool(e.reference_stats):
        raise ValueError("eval.inception_weights and eval.reference_stats: FID needs both (or neither); got "
                         f"{e.inception_weights!r} and {e.reference_stats!r}.")
    if e.num_samples and e.num_samples < 2:
        raise ValueError(f"eval.num_samples={e.num_samples}: need at least 2 for a covariance (or 0: none).")


class Evaluator:
    """`Evaluator(config)(step, params, writer)`: params are one host copy (not replicated)."""

    def __init__(self, config):
        check_config(config)
        e = config.eval
        self.config = config
        self.fid = bool(e.inception_weights)
        if self.fid:
            self.variables = inception.load_variables(e.inception_weights)
            self.reference = metrics.load_statistics(e.reference_stats)
        self.digits = config.data.dataset == "digits" and e.num_samples > 0
        if self.digits:
            self.classifier = digits_classifier.load_or_fit(e.digits_classifier)
            self.real_digits = digits_classifier.real_digits()[0]
        self.bpd_images = None
        if e.bpd_examples:
            self.bpd_images = tasks.real_images(config, tasks.eval_split(config), e.bpd_examples)[0]

    def __call__(self, step: int, params, writer) -> dict:
        e = self.config.eval
        out = {}
        if self.fid or self.digits:
            images, labels = tasks.generate(self.config, params, e.num_samples, batch_size=e.batch_size,
                                            seed=step, steps=e.steps)
            if self.digits:
                out.update(digits_classifier.digits_metrics(self.classifier, images, labels, self.real_digits))
            if self.fid:
                out.update(tasks.fid_is_kid(images, e.inception_weights, e.reference_stats,
                                            variables=self.variables, reference=self.reference))
        if self.bpd_images is not None:
            bpd = tasks.bits_per_dim(self.config, params, self.bpd_images, batch_size=e.batch_size, seed=step)
            out.update({k: v for k, v in bpd.items() if np.ndim(v) == 0})
        out = {k: float(v) for k, v in out.items()}
        writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
        logging.info("eval at step %d: %s", step, out)
        return out
