"""Frechet distance, Inception Score, KID and feature statistics files against closed forms."""
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
