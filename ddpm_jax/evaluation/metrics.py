"""Frechet distance, Inception Score and KID from features, feature statistics in pytorch-fid's
`.npz` layout, and Inception features on all local devices (`jax.pmap`).

All statistics are computed on the host in float64 from float32 features.
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import numpy as np
import scipy.linalg
import scipy.special

from ddpm_jax import parallel
from ddpm_jax.evaluation import inception
from ddpm_jax.validation import UserError, load_npz

# ----------------------------------------------------------------------------------------------
# Frechet distance and feature statistics.


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features `[N, D]` -> (mean `[D]`, covariance `[D, D]` with the N - 1 normalisation), float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) for Gaussians N(mu1, S1), N(mu2, S2).

    The square root of the (non-symmetric) product is taken with `scipy.linalg.sqrtm`. Near-singular
    covariances (fewer samples than dimensions) can make it fail or return inf/nan: then both
    covariances get `eps` on the diagonal and it is retried. Round-off leaves a tiny imaginary part,
    which is dropped; a large one (> 1e-3 on the diagonal) means a wrong input and is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}.")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # sqrtm warns on singular input; that is handled below
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(s1.shape[0])
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"sqrtm(S1 S2) has imaginary part {imag:.3g}: covariances are not PSD?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def save_statistics(path: str, features: np.ndarray, keep_features: bool = False) -> dict:
    """Writes {'mu', 'sigma'} of `features` `[N, D]` as pytorch-fid's statistics files do, so either
    tool reads the other's; with `keep_features` also 'features' (float32, needed for KID)."""
    mu, sigma = feature_statistics(features)
    stats = {"mu": mu, "sigma": sigma}
    if keep_features:
        stats["features"] = np.asarray(features, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **stats)
    return stats


def load_statistics(path: str | None, field: str = "eval.reference_stats") -> dict:
    """{'mu', 'sigma'[, 'features']} from a `.npz` written by `save_statistics` or pytorch-fid."""
    if not path or not os.path.isfile(path):
        raise UserError(
            f"{field}={path!r}: no such file. Compute it once with `python -m ddpm_jax.evaluate "
            "reference_stats --config=... --out=stats.npz`, or use a pytorch-fid statistics .npz.")
    f = load_npz(path, field, ("mu",))
    if "sigma" not in f or f["mu"].ndim != 1 or f["sigma"].shape != f["mu"].shape * 2:
        raise UserError(f"{field}={path}: expected 'mu' [D] and 'sigma' [D, D], found "
                        f"{ {k: v.shape for k, v in f.items()} }.")
    return {k: v.astype(np.float32 if k == "features" else np.float64) for k, v in f.items()
            if k in ("mu", "sigma", "features")}


# ----------------------------------------------------------------------------------------------
# Inception Score and KID.


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))) on each of `splits` contiguous chunks of
    `[N, K]` logits, p(y) being that chunk's mean prediction. Returns (mean, std) over chunks."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"need logits [N >= splits={splits}, K], got shape {logits.shape}.")
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for chunk in np.array_split(log_p, splits):
        log_py = scipy.special.logsumexp(chunk, axis=0) - np.log(len(chunk))
        kl = np.sum(np.exp(chunk) * (chunk - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Binkowski et al. 2018: unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over
    `num_subsets` random subsets of `min(subset_size, N1, N2)` rows of each. Returns (mean, std)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need features [N >= 2, D] of equal D, got {f1.shape} and {f2.shape}.")
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    kernel = lambda a, b: (a @ b.T / d + 1.0) ** 3
    mmds = []
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        # Unbiased: within-set sums leave out the diagonal k(x_i, x_i).
        mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2.0 * kxy.mean())
        mmds.append(mmd)
    return float(np.mean(mmds)), float(np.std(mmds))


# ----------------------------------------------------------------------------------------------
# Feature extraction sharded over the local devices.


@functools.cache
def _pmapped_inception():
    """Built once: every call with the same batch shape reuses one compiled program."""
    def outputs(variables, images):
        out = inception.inception_apply(variables, images)
        return {"pool": out["pool"], "logits_unbiased": out["logits_unbiased"]}

    return jax.pmap(outputs, parallel.AXIS_NAME)


def inception_features(replicated_variables, images: np.ndarray, per_device_batch: int = 50) -> dict:
    """uint8 images `[N, H, W, C]` -> {'pool' `[N, 2048]`, 'logits_unbiased' `[N, 1008]`} float32, on all
    devices (of all processes). `replicated_variables`: `parallel.replicate(inception.load_variables(...))`, made
    once by the caller (the in-loop evaluator keeps them across evaluations)."""
    fn = _pmapped_inception()
    return parallel.pad_shard_unpad(lambda c, shard: fn(replicated_variables, shard["images"]),
                                    {"images": np.asarray(images)}, per_device_batch * jax.device_count())


def sample_quality(features: dict, reference: dict, splits: int = 10) -> dict:
    """FID, Inception Score and (when `reference` has 'features') KID of generated images.

    features: `inception_features` of the samples. reference: {'mu', 'sigma'} and optionally
    'features' `[M, 2048]` of the real images. Returns {'fid', 'is', 'is_std'[, 'kid', 'kid_std']}.
    """
    mu, sigma = feature_statistics(features["pool"])
    out = {"fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"])}
    out["is"], out["is_std"] = inception_score(features["logits_unbiased"], splits)
    if "features" in reference:
        out["kid"], out["kid_std"] = kernel_inception_distance(features["pool"], reference["features"])
    return out
