"""Frechet distance, Inception Score, KID, precision/recall and feature statistics files against closed forms
and brute force."""
import re

import numpy as np
import pytest
from scipy.stats import special_ortho_group

from ddpm_jax.evaluation import metrics as M
from ddpm_jax.validation import UserError


def _psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-10)
    # The same rotated by one orthogonal Q (FD is invariant) is no longer diagonal.
    Q = special_ortho_group.rvs(d, random_state=1)
    got = M.frechet_distance(Q @ mu1, Q @ np.diag(a) @ Q.T, Q @ mu2, Q @ np.diag(b) @ Q.T)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    # Non-commuting: Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}), a symmetric eigenproblem.
    s1, s2 = _psd(rng, d), _psd(rng, d)
    w, V = np.linalg.eigh(s1)
    r1 = V @ np.diag(np.sqrt(w)) @ V.T
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    np.testing.assert_allclose(M.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-8)
    # Scalars: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
    np.testing.assert_allclose(M.frechet_distance(1.0, 4.0, -1.0, 9.0), 4.0 + 1.0)


def test_frechet_distance_of_samples_and_singular_covariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    mu, sigma = M.feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T))
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Fewer samples than dimensions (rank 10 in 64-d) as with small sample counts in 2048-d: finite,
    # ~0 against itself, and equal to the low-rank closed form for two shifted copies.
    y = rng.normal(size=(11, 64))
    mu, sigma = M.feature_statistics(y)
    fd_self = M.frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(fd_self) and abs(fd_self) < 1e-4
    shift = np.full(64, 0.5)
    np.testing.assert_allclose(M.frechet_distance(mu, sigma, mu + shift, sigma), 64 * 0.25, atol=1e-4)
    with pytest.raises(ValueError, match="statistics do not match"):
        M.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_inception_score_closed_forms():
    # One-hot predictions spread evenly over K classes: IS = K exactly; identical predictions: 1.
    K, n = 10, 1000
    logits = np.full((n, K), -1e4)
    logits[np.arange(n), np.arange(n) % K] = 0.0
    mean, std = M.inception_score(logits, splits=10)
    np.testing.assert_allclose([mean, std], [K, 0.0], atol=1e-6)
    np.testing.assert_allclose(M.inception_score(np.tile(np.arange(K), (n, 1)), splits=10)[0], 1.0, rtol=1e-9)
    # A general case against the definition exp(E KL(p(y|x) || p(y))), one split.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1)))
    np.testing.assert_allclose(M.inception_score(logits, splits=1)[0], want, rtol=1e-10)


def test_kid_is_the_unbiased_mmd():
    """One subset holding all rows is the U-statistic written out as loops; same distribution
    averages to ~0 (unbiased, not positive like the biased V-statistic); a shift is clearly > 0."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    m = 12
    want = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    got, std = M.kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    np.testing.assert_allclose([got, std], [want, 0.0], rtol=1e-10, atol=1e-12)

    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    same, same_std = M.kernel_inception_distance(x, y, num_subsets=20, subset_size=500)
    shifted, _ = M.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=500)
    assert abs(same) < same_std  # per-subset spread; the mean over subsets is closer to 0
    assert shifted > 0.1 > 20 * same_std


def _brute_force_precision_recall(real, fake, k):
    """The paper's definition point by point, distances from explicit differences."""
    def radii(x):  # distance to the k-th nearest other point (itself left out by index)
        return np.array([np.sort(np.delete(np.linalg.norm(x - x[i], axis=1), i))[k - 1] for i in range(len(x))])

    def inside(points, manifold):
        r = radii(manifold)
        return np.array([np.any(np.linalg.norm(manifold - p, axis=1) <= r) for p in points])

    return inside(fake, real).mean(), inside(real, fake).mean(), radii(real)


def test_precision_recall_matches_brute_force():
    """Random sets of other sizes and k (in blocks of 7, which divide none of them), and sets on a small
    integer grid drawn with replacement: duplicate points and distances exactly equal to a radius, where
    float64 is exact, so counting ties as inside and leaving out only the point itself show."""
    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=(37, 6)), rng.normal(size=(23, 6)) + 0.3, 3),
             (rng.normal(size=(20, 4)), rng.normal(size=(45, 4)) * 1.5, 1),
             (rng.integers(0, 4, (40, 3)).astype(np.float32), rng.integers(1, 6, (31, 3)).astype(np.float32), 3),
             (rng.integers(0, 4, (50, 2)).astype(np.float32), rng.integers(2, 6, (12, 2)).astype(np.float32), 5)]
    # 2048-d float features with six rows of 5 copies each (radius 0), away from the rest, and fake copies
    # of them: inside only at distance 0, which a copy's distance, one row at a time, rounds off
    # differently from the radii's, in a block of all rows.
    real = rng.uniform(size=(37, 2048)).astype(np.float32)
    fake = rng.uniform(size=(11, 2048)).astype(np.float32) + 0.1
    for i in range(6):
        real[6 * i:6 * i + 5] = real[6 * i] + 2.0 * (i + 1)
        fake[i] = real[6 * i]
    cases.append((real, fake, 3))
    for real, fake, k in cases:
        precision, recall, radii = _brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), k)
        assert 0 < precision < 1 and 0 < recall < 1, (precision, recall)  # neither trivially 0 nor 1
        atol = 1e-13 * np.max(np.sum(np.square(real, dtype=np.float64), axis=1))  # round-off goes with the norms
        got = M.knn_radii(real, k, block_size=7)
        np.testing.assert_allclose(got, radii ** 2, rtol=1e-10, atol=atol)
        assert got.min() >= 0  # squared distances, round-off or not (np.sqrt of them is no nan)
        assert M.precision_recall(real, fake, k, block_size=7) == (precision, recall)
        assert M.precision_recall(real, fake, k, block_size=1, real_radii=M.knn_radii(real, k)) == (precision, recall)
        assert M.precision_recall(fake, real, k) == (recall, precision)  # the definition is symmetric


def test_precision_recall_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    assert M.precision_recall(x, x) == (1.0, 1.0)
    assert M.precision_recall(x, x[rng.permutation(50)]) == (1.0, 1.0)
    assert M.precision_recall(x, rng.normal(size=(30, 8)) + 100.0) == (0.0, 0.0)  # far apart
    # Four modes, each a 3x3 grid of spacing 1 in its own plane, 1000 apart: within a mode every point's
    # 3rd neighbour is at 1 (sqrt 2 at the corners). The fake set is two of the modes moved by < 0.1 per
    # point, so its radii are > 0.8: each fake point is inside its real point's ball and each real point
    # of those modes inside its fake point's ball, and nothing reaches another mode.
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(9, 2).astype(float)
    modes = []
    for i in range(4):
        m = np.zeros((9, 8))
        m[:, 2 * i:2 * i + 2] = grid
        m[:, 0] += 1000.0 * i
        modes.append(m)
    real = np.concatenate(modes)
    jitter = rng.normal(size=(18, 8))
    fake = real[:18] + 0.09 * jitter / np.linalg.norm(jitter, axis=1, keepdims=True)
    np.testing.assert_allclose(np.sqrt(M.knn_radii(real))[:9], [np.sqrt(2), 1, np.sqrt(2), 1, 1, 1, np.sqrt(2), 1,
                                                                 np.sqrt(2)], rtol=1e-12)
    assert M.precision_recall(real, fake) == (1.0, 0.5)
    assert M.precision_recall(fake, real) == (0.5, 1.0)  # a fake set with modes the real one lacks


def test_precision_recall_blocks_and_bad_input():
    """Blocks that do not divide either set give what one block of everything gives, radii given or not."""
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(103, 16)).astype(np.float32), rng.normal(size=(57, 16)).astype(np.float32) + 0.5
    whole = M.precision_recall(real, fake, block_size=1000)
    assert 0.2 < whole[0] < 0.9 and 0.2 < whole[1] < 0.9, whole
    for block in (1, 10, 56):
        assert M.precision_recall(real, fake, block_size=block) == whole
        np.testing.assert_allclose(M.knn_radii(real, block_size=block), M.knn_radii(real, block_size=1000),
                                   rtol=1e-12)
    assert M.precision_recall(real, fake, real_radii=M.knn_radii(real)) == whole
    with pytest.raises(ValueError, match=r"equal D, got \(103, 16\) \(real\) and \(57, 8\) \(fake\)"):
        M.precision_recall(real, fake[:, :8])
    with pytest.raises(ValueError, match=r"N >= k \+ 1 = 4"):
        M.precision_recall(real, fake[:3])
    with pytest.raises(ValueError, match=r"real_radii must be \[103\]"):
        M.precision_recall(real, fake, real_radii=np.ones(5))
    with pytest.raises(ValueError, match=r"N >= k \+ 1 rows"):
        M.knn_radii(real[:3])


def test_sample_quality_adds_precision_recall_with_reference_features():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.5
    features = {"pool": fake, "logits_unbiased": rng.normal(size=(30, 5))}
    reference = dict(zip(("mu", "sigma"), M.feature_statistics(real)))
    assert set(M.sample_quality(features, reference)) == {"fid", "is", "is_std"}
    reference["features"] = real
    out = M.sample_quality(features, reference)
    assert (out["precision"], out["recall"]) == M.precision_recall(real, fake) and "kid" in out
    reference["radii"] = np.zeros(40)  # given radii are used: only exact copies of real points would count
    assert M.sample_quality(features, reference)["precision"] == 0.0


def test_statistics_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 5)).astype(np.float32)
    M.save_statistics(str(tmp_path / "s.npz"), f)
    with np.load(tmp_path / "s.npz") as z:  # pytorch-fid's layout: exactly 'mu' and 'sigma'
        assert sorted(z.files) == ["mu", "sigma"] and z["sigma"].shape == (5, 5)
    stats = M.load_statistics(str(tmp_path / "s.npz"))
    np.testing.assert_allclose(stats["mu"], f.mean(0), rtol=1e-6)
    M.save_statistics(str(tmp_path / "k.npz"), f, keep_features=True)
    np.testing.assert_array_equal(M.load_statistics(str(tmp_path / "k.npz"))["features"], f)
    with pytest.raises(UserError, match="eval.reference_stats"):
        M.load_statistics(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", m=1)
    with pytest.raises(UserError, match="'mu'"):
        M.load_statistics(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "bad2.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(UserError, match=r"'mu' \[D\] and 'sigma' \[D, D\]"):
        M.load_statistics(str(tmp_path / "bad2.npz"))
    # Kept features that KID or precision/recall cannot use: named, with the way out.
    for name, features in (("dim", f[:, :4]), ("few", f[:3])):
        np.savez(tmp_path / f"{name}.npz", mu=f.mean(0), sigma=np.cov(f.T), features=features)
        want = rf"{name}.npz: 'features' must be \[M >= 4, D=5\].*found {re.escape(str(features.shape))}.*keep_features"
        with pytest.raises(UserError, match=want):
            M.load_statistics(str(tmp_path / f"{name}.npz"))
