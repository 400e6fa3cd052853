"""Frechet distance, Inception Score, KID and improved precision/recall from features, feature
statistics in pytorch-fid's `.npz` layout, and Inception features on all local devices (`jax.pmap`).

All statistics are computed on the host in float64 from float32 features.
"""
from __future__ import annotations

import functools
import warnings

import jax
import numpy as np
import scipy.linalg
import scipy.special

from ddpm_jax import parallel
from ddpm_jax.evaluation import inception
from ddpm_jax.files import is_file, load_npz, save_npz
from ddpm_jax.validation import UserError

IS_SPLITS = 10  # the Inception Score's chunks, as in Salimans et al. 2016's code
PR_NEIGHBOURS = 3  # k of improved precision/recall, as in its paper and the ADM evaluator (Dhariwal & Nichol 2021)

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
    tool reads the other's; with `keep_features` also 'features' (float32, needed for KID and precision/recall)."""
    mu, sigma = feature_statistics(features)
    stats = {"mu": mu, "sigma": sigma}
    if keep_features:
        stats["features"] = np.asarray(features, np.float32)
    save_npz(path, **stats)
    return stats


def load_statistics(path: str | None, field: str = "eval.reference_stats") -> dict:
    """{'mu', 'sigma'[, 'features']} from a `.npz` written by `save_statistics` or pytorch-fid."""
    if not is_file(path):
        raise UserError(
            f"{field}={path!r}: no such file. Compute it once with `python -m ddpm_jax.evaluate "
            "reference_stats --config=... --out=stats.npz`, or use a pytorch-fid statistics .npz.")
    f = load_npz(path, field, ("mu",))
    if "sigma" not in f or f["mu"].ndim != 1 or f["sigma"].shape != f["mu"].shape * 2:
        raise UserError(f"{field}={path}: expected 'mu' [D] and 'sigma' [D, D], found "
                        f"{ {k: v.shape for k, v in f.items()} }.")
    features = f.get("features")
    if features is not None and (features.shape[1:] != f["mu"].shape or len(features) < PR_NEIGHBOURS + 1):
        raise UserError(f"{field}={path}: 'features' must be [M >= {PR_NEIGHBOURS + 1}, D={len(f['mu'])}] for KID "
                        f"and precision/recall, found {features.shape}; make it from more images or without "
                        "--keep_features.")
    return {k: v.astype(np.float32 if k == "features" else np.float64) for k, v in f.items()
            if k in ("mu", "sigma", "features")}


# ----------------------------------------------------------------------------------------------
# Inception Score and KID.


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
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
# Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991).


def _squared_distances(a, a_sq, b, b_sq) -> np.ndarray:
    """||a_i - b_j||^2 `[A, B]` of float64 rows a `[A, D]`, b `[B, D]` with squared norms a_sq `[A]`, b_sq `[B]`.

    Expanded as |a|^2 + |b|^2 - 2 a.b so that the work is one matrix product. From float32 features
    every product is exact in float64 and the sums are off by at most ~D * 1.1e-16 of the squared
    norms (2e-13 at D = 2048); in float32 that bound would be ~1e-4 of them, lost to the cancellation.
    """
    d = a @ b.T
    d *= -2.0
    d += a_sq[:, None]
    d += b_sq[None, :]
    return np.maximum(d, 0.0, out=d)  # round-off can take a zero distance below 0


def _float64_rows(x, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features `[N, D]` as float64 and their squared norms `[N]`."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: need features [N, D], got shape {x.shape}.")
    return x, np.einsum("nd,nd->n", x, x)


def knn_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, block_size: int = 1000) -> np.ndarray:
    """features `[N, D]` -> `[N]` float64: the squared distance from each row to its k-th nearest
    other row (a duplicate of the row counts as a neighbour at distance 0; the row itself does not).

    Rows go `block_size` at a time against all N: memory ~2 * block_size * N * 8 bytes (0.8 GB for
    N = 50,000 at 1000) besides the float64 copy of the features (N * D * 8 bytes).
    """
    x, x_sq = _float64_rows(features, "knn_radii")
    if len(x) < k + 1 or k < 1 or block_size < 1:
        raise ValueError(f"knn_radii: need k >= 1, block_size >= 1 and N >= k + 1 rows; got k={k}, "
                         f"block_size={block_size}, features {x.shape}.")
    radii = np.empty(len(x))
    for start in range(0, len(x), block_size):
        stop = min(start + block_size, len(x))
        d = _squared_distances(x[start:stop], x_sq[start:stop], x, x_sq)
        d[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        radii[start:stop] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, block_size: int = 1000,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall of features fake `[N, D]` against real `[M, D]` (Kynkaanniemi et
    al. 2019): each set's manifold is the union of balls around its points, of radius the distance to
    the point's k-th nearest neighbour in the set (`knn_radii`). precision: the fraction of fake rows
    inside the real manifold; recall: the fraction of real rows inside the fake manifold.

    real_radii: `knn_radii(real, k)` when already known (the reference's are the same at every
    evaluation). Memory as `knn_radii`, with max(M, N) for N: 3.4 GB at the peak for 50,000 2048-d
    features of each, which took 7 minutes on 2 CPU cores (~3 products of 50,000 x 2048 x 50,000).
    """
    real, real_sq = _float64_rows(real, "precision_recall: real")
    fake, fake_sq = _float64_rows(fake, "precision_recall: fake")
    if real.shape[1] != fake.shape[1] or min(len(real), len(fake)) < k + 1:
        raise ValueError(f"precision_recall: need features [N >= k + 1 = {k + 1}, D] of equal D, got "
                         f"{real.shape} (real) and {fake.shape} (fake).")
    if real_radii is None:
        real_radii = knn_radii(real, k, block_size)
    elif np.shape(real_radii) != (len(real),):
        raise ValueError(f"precision_recall: real_radii must be [{len(real)}], got {np.shape(real_radii)}.")
    fake_radii = knn_radii(fake, k, block_size)
    # Inside means distance <= radius; round-off (see `_squared_distances`) could put a point on the
    # boundary (a duplicate of a point whose radius is 0, say) just outside. The slack, 1e-10 of the
    # largest squared norm, is ~50 times the worst case of that round-off on both sides at D = 2048, and
    # far below the float32 resolution of the features themselves (6e-8).
    slack = 1e-10 * max(real_sq.max(), fake_sq.max())
    real_radii, fake_radii = real_radii + slack, fake_radii + slack
    fake_inside = np.empty(len(fake), bool)
    real_inside = np.zeros(len(real), bool)
    # One pass over the fake-real distances serves both: rows for precision, columns for recall.
    for start in range(0, len(fake), block_size):
        stop = min(start + block_size, len(fake))
        d = _squared_distances(fake[start:stop], fake_sq[start:stop], real, real_sq)
        fake_inside[start:stop] = (d <= real_radii[None, :]).any(axis=1)
        real_inside |= (d <= fake_radii[start:stop, None]).any(axis=0)
    return float(fake_inside.mean()), float(real_inside.mean())


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


def sample_quality(features: dict, reference: dict, splits: int = IS_SPLITS) -> dict:
    """FID, Inception Score and (when `reference` has 'features') KID and precision/recall of
    generated images.

    features: `inception_features` of the samples. reference: {'mu', 'sigma'} and optionally
    'features' `[M, 2048]` of the real images and their 'radii' `[M]` (`knn_radii`, else computed here).
    Returns {'fid', 'is', 'is_std'[, 'kid', 'kid_std', 'precision', 'recall']}.
    """
    mu, sigma = feature_statistics(features["pool"])
    out = {"fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"])}
    out["is"], out["is_std"] = inception_score(features["logits_unbiased"], splits)
    if "features" in reference:
        out["kid"], out["kid_std"] = kernel_inception_distance(features["pool"], reference["features"])
        out["precision"], out["recall"] = precision_recall(reference["features"], features["pool"],
                                                           real_radii=reference.get("radii"))
    return out
