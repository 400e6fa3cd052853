"""Evaluation inside the training loop, every `eval.eval_every` steps, as TensorBoard scalars.

What runs follows the config: on `eval.num_samples` samples the digits metrics (digits datasets)
and FID/IS (when `eval.inception_weights` and `eval.reference_stats` are set; also KID and
precision/recall when the reference statistics keep their features); the CLIP score (text models,
when `eval.clip_model` is set; `tasks.clip_score`). A text model's samples are one per held-out
caption, the same for FID and the CLIP score (`tasks.generate`). Bits/dim on
`eval.bpd_examples` examples of the evaluation split (when > 0). Everything it needs is checked and
loaded when it is built, before training compiles anything. The sampling noise (`eval.seed`) and
the pmapped functions are the same at every evaluation: the curves move only with the params, and
nothing is compiled again.
"""
from __future__ import annotations

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ddpm_jax import parallel
from ddpm_jax.evaluation import clip, digits_classifier, inception, metrics, tasks
from ddpm_jax.validation import validate_eval


class Evaluator:
    """`Evaluator(config)(step, params, writer)`: params are one host copy (not replicated)."""

    def __init__(self, config: ConfigDict):
        validate_eval(config, in_loop=True)
        e = config.eval
        self.config = config
        self.fid = bool(e.inception_weights)
        if self.fid:
            weights = tasks.inception_weights_file(e.inception_weights)
            self.variables = parallel.replicate(inception.load_variables(weights, tasks.WEIGHTS_FIELD))
            self.reference = metrics.load_statistics(e.reference_stats, tasks.STATS_FIELD)
            if "features" in self.reference:  # precision/recall's radii of the reference: the same at every evaluation
                self.reference["radii"] = metrics.knn_radii(self.reference["features"])
        self.digits = config.data.dataset == "digits" and e.num_samples > 0
        if self.digits:
            self.classifier = digits_classifier.load_or_fit(e.digits_classifier)
            self.real_digits = digits_classifier.real_digits()[0]
        self.clip = None
        if e.clip_model and e.num_samples:
            tasks.check_clip(config)
            self.clip = clip.load(e.clip_model)
        self.captions = None  # a text model's samples: one per held-out caption, for FID and CLIP alike
        if config.model.text_encoder != "none" and (self.fid or self.clip):
            tasks.check_caption_sampling(config)
            self.captions = tasks.captions(config, tasks.eval_split(config), e.num_samples)
        self.bpd_images = None
        if e.bpd_examples:
            self.bpd_images = tasks.real_images(config, tasks.eval_split(config), e.bpd_examples)[0]

    def __call__(self, step: int, params, writer) -> dict:
        out = {}
        if self.fid or self.digits or self.clip:
            images, labels, ode = tasks.generate(self.config, params, held_out=self.captions)
            out.update(ode)
            if self.digits:
                out.update(digits_classifier.digits_metrics(self.classifier, images, labels, self.real_digits))
            if self.fid:
                out.update(tasks.fid_is_kid(images, self.variables, self.reference))
            if self.clip is not None:
                out["clip_score"] = self.clip.score(images, self.captions[:len(images)]).mean()
        if self.bpd_images is not None:
            bpd = tasks.bits_per_dim(self.config, params, self.bpd_images)
            out.update({k: v for k, v in bpd.items() if np.ndim(v) == 0})
        out = {k: float(v) for k, v in out.items()}
        writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
        logging.info("eval at step %d: %s", step, out)
        return out
