"""Bits/dim by the variational bound and by the probability-flow ODE against exact answers for
(discretised) Gaussian data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_helpers import GAUSS_MU, GAUSS_SIGMA, continuous_eps_model, gaussian_eps_model
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import log_ndtr, ndtr
from scipy.stats import multivariate_normal

from ddpm_jax import diffusion as D
from ddpm_jax.evaluation import likelihood as L

GRID = np.arange(256) / 127.5 - 1.0  # the 256 values of uint8 images on [-1, 1]
W = 2.0 / 255.0  # bin width


def _bin_edges():
    lo, hi = GRID - W / 2, GRID + W / 2
    lo[0], hi[-1] = -np.inf, np.inf
    return lo, hi


def _log_interval(a, b):
    """log(Phi(b) - Phi(a)), float64, with the upper tail mirrored."""
    flip = a > 0
    lo, hi = np.where(flip, -b, a), np.where(flip, -a, b)
    return log_ndtr(hi) + np.log1p(-np.exp(log_ndtr(lo) - log_ndtr(hi)))


def test_normal_kl_and_decoder_closed_forms():
    # KL of 1-d normals against a direct numerical integral of p log(p/q).
    x = np.linspace(-12, 12, 200_001)
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 1.7
    p = np.exp(-(x - m1) ** 2 / (2 * v1)) / np.sqrt(2 * np.pi * v1)
    q = np.exp(-(x - m2) ** 2 / (2 * v2)) / np.sqrt(2 * np.pi * v2)
    kl = np.sum(p * np.log(p / q)) * (x[1] - x[0])
    np.testing.assert_allclose(L.normal_kl(m1, np.log(v1), m2, np.log(v2)), kl, rtol=1e-5)
    # The decoder's bins partition the line: probabilities over the 256 levels sum to 1, for means
    # inside, at the edge of and far outside [-1, 1], and for tiny and large scales.
    for mean, std in [(0.1, 0.01), (-1.0, 0.003), (1.0, 0.5), (3.0, 0.05), (0.0, 1e-4)]:
        logp = L.discretized_gaussian_log_likelihood(jnp.asarray(GRID, jnp.float32), mean, 2 * np.log(std))
        assert np.isfinite(logp).all() or std < 1e-3  # far bins may underflow to -inf at tiny scales
        np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(), 1.0, atol=1e-5)
    # Far in either tail the log-probability stays accurate (no cancellation to log 0).
    lo, hi = _bin_edges()
    x = jnp.asarray(GRID[[40, 200]], jnp.float32)
    got = L.discretized_gaussian_log_likelihood(x, jnp.asarray([0.9, -0.9]), 2 * np.log(0.05))
    want = _log_interval((lo[[40, 200]] - [0.9, -0.9]) / 0.05, (hi[[40, 200]] - [0.9, -0.9]) / 0.05)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert (want < -200).all()


class _LinearGaussianBound:
    """The bound of the linear-Gaussian model in float64, written out independently of the package.

    With a = sqrt(abar_t), s = sqrt(1 - abar_t) and the model eps_hat = k (x_t - a mu),
    k = s / (a^2 v + s^2), the error of the model's posterior mean is
    c1 (x0 - x0_hat) = c1 (s k (x0 - mu) - (1 - s k) (s / a) eps), linear in x0 and eps.
    """

    def __init__(self, betas, variance, mu, v):
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        self.a, self.s = np.sqrt(abar), np.sqrt(1.0 - abar)
        self.post_var = betas * (1.0 - abar_prev) / (1.0 - abar)  # 0 at t = 0, never used there
        self.var_p = betas if variance == "fixedlarge" else self.post_var
        self.c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.sk = self.s * self.s / (self.a ** 2 * v[:, None] + self.s ** 2)  # [d, T]
        self.mu = mu

    def _x0_err(self, x0, eps, t):
        """x0 - x0_hat at step t: x0 `[N, d]`, eps `[..., N, d]` (broadcast)."""
        sk = self.sk[:, t]
        return sk * (x0 - self.mu) - (1 - sk) * self.s[t] / self.a[t] * eps

    def _kl(self, err2, t):
        """KL(q || p) at steps t >= 1 given E(m_q - m_p)^2 = c1^2 E err^2."""
        pv, qv = self.var_p[t], self.post_var[t]
        return 0.5 * (np.log(pv) - np.log(qv) - 1 + qv / pv + self.c1[t] ** 2 * err2 / pv)

    def _decoder_nll(self, x0, err):
        """-log P(x0) under N(x0_hat, post_var[1]) on x0's bin (both variances use post_var[1])."""
        lo, hi = _bin_edges()
        idx = np.round((x0 + 1) * 127.5).astype(int)
        x0_hat, std0 = x0 - err, np.sqrt(self.post_var[1])
        return -_log_interval((lo[idx] - x0_hat) / std0, (hi[idx] - x0_hat) / std0)

    def prior(self, x0):
        s2 = self.s[-1] ** 2
        return (0.5 * (-np.log(s2) - 1 + s2 + self.a[-1] ** 2 * x0 ** 2)).mean(-1) / np.log(2)

    def terms_given_noise(self, x0, eps):
        """Each term for the noise eps `[T, N, d]` that x_t was drawn with: bits/dim `[N, T]`."""
        T = len(self.a)
        err = np.stack([self._x0_err(x0, eps[i], i) for i in range(T)])  # [T, N, d]
        kl = np.stack([self._kl(err[i] ** 2, i) for i in range(1, T)])
        nll0 = self._decoder_nll(x0, err[0])
        return np.concatenate([nll0[None], kl]).mean(-1).T / np.log(2)

    def expected(self, x0, quad_points=80):
        """E over the noise of the whole bound, per example: bits/dim `[N]`. KL terms in closed form
        (E err^2 = (s k (x0 - mu))^2 + ((1 - s k) s / a)^2), the decoder by Gauss-Hermite."""
        T = len(self.a)
        kl = sum(self._kl(self._x0_err(x0, 0.0, i) ** 2 + ((1 - self.sk[:, i]) * self.s[i] / self.a[i]) ** 2, i)
                 for i in range(1, T))
        z, wq = hermegauss(quad_points)
        nll0 = sum(w / np.sqrt(2 * np.pi) * self._decoder_nll(x0, self._x0_err(x0, zj, 0)) for zj, w in zip(z, wq))
        return self.prior(x0) + (kl + nll0).mean(-1) / np.log(2)


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_bpd_exact_for_discretised_gaussian_data(variance):
    """The bound with the exact Gaussian denoiser on 4 independent pixels x_0 ~ N(mu, sd^2) rounded
    to the 256 levels of [-1, 1] (T = 1000, the paper's linear schedule), against float64 answers.

    1. Every term, per example, equals the closed form for the noise `L.bpd` drew (rtol 1e-4, or
       2e-5 bits/dim absolute: float32 round-off of the KL's cancelling terms is ~1e-5).
    2. Not below the truth: the exact expected bound (closed form over the noise, summed over the
       256 levels of each pixel) is >= the data's true NLL, its entropy H = -sum_g P(g) log2 P(g),
       P(g) the Gaussian mass of g's bin; and the Monte-Carlo bound over the examples is >= their
       true NLL minus 3 standard errors.
    3. Close: within 0.25 bits/dim (fixedlarge) / 0.9 (fixedsmall) of H. The bound of a DDPM with
       fixed reverse variances is not tight even with the optimal mean: its exact expected gap here
       is 0.16 / 0.79 bits/dim, mostly from the first steps, where the true reverse process of
       discretised data is sharper than any Gaussian step. The tolerances are those gaps plus ~0.1.
    And the Monte-Carlo mean agrees with the exact expectation within 4 standard errors.
    """
    T, N = 1000, 2000
    betas = np.linspace(1e-4, 0.02, T)
    mu, sd = np.array([-0.3, 0.0, 0.2, 0.4]), np.array([0.2, 0.3, 0.25, 0.35])
    lo, hi = _bin_edges()
    P = ndtr((hi[None] - mu[:, None]) / sd[:, None]) - ndtr((lo[None] - mu[:, None]) / sd[:, None])  # [d, 256]
    entropy = -(P * np.log2(P)).sum(1).mean()
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(256, N, p=p) for p in P], axis=1)
    x0 = GRID[idx]
    true_nll = -np.log2(P[np.arange(4), idx]).mean(1)  # [N]
    # The model is the exact denoiser for the Gaussian with the discretised data's moments
    # (Sheppard's correction: rounding adds W^2 / 12 to the variance).
    v = sd ** 2 + W ** 2 / 12
    s = D.make_schedule(betas)
    model = gaussian_eps_model(s, mu, np.diag(v))
    key = jax.random.key(0)
    out = jax.jit(lambda x: L.bpd(s, "eps", model, x, key, variance=variance, clip_x0=False))(
        jnp.asarray(x0, jnp.float32))
    total, terms = np.asarray(out["total"], np.float64), np.asarray(out["terms"], np.float64)
    assert terms.shape == (N, T) and out["prior"].shape == (N,)
    np.testing.assert_allclose(total, np.asarray(out["prior"]) + terms.sum(1), rtol=1e-5)

    ref = _LinearGaussianBound(betas, variance, mu, v)
    eps = np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x0.shape))(
        jnp.arange(T)), np.float64)  # the documented noise of term t
    np.testing.assert_allclose(terms, ref.terms_given_noise(x0, eps), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out["prior"], ref.prior(x0), rtol=1e-3, atol=1e-6)

    expected = ref.expected(x0)
    diff = total - expected
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(N), (diff.mean(), diff.std() / np.sqrt(N))

    per_level = np.stack([_LinearGaussianBound(betas, variance, mu[i:i + 1], v[i:i + 1]).expected(GRID[:, None])
                          for i in range(4)])  # [d, 256]: pixels are independent
    gap = (P * per_level).sum(1).mean() - entropy
    tol = {"fixedlarge": 0.25, "fixedsmall": 0.9}[variance]
    assert 0 < gap < tol, gap
    excess = total - true_nll
    assert excess.mean() > -3 * excess.std() / np.sqrt(N)
    assert abs(total.mean() - entropy) < tol


def _pushforward_log_p(s, mu, Sigma, y, sig0=None):
    """log p(y) of the exact probability-flow ODE of N(mu, Sigma) data, float64: its marginals in x_ve
    are N(mu, Sigma + sigma^2 I), so the flow from sigma_0 to sigma_1 is affine, x -> mu + M (x - mu),
    M = (Sigma + sigma_1^2 I)^(1/2) (Sigma + sigma_0^2 I)^(-1/2), and the prior N(0, (1 + sigma_1^2) I)
    pulled back through it gives log N(mu + M (y - mu); 0, (1 + sigma_1^2) I) + log det M. sigma_0:
    `sig0`, default the schedule's smallest."""
    table = np.exp(np.asarray(s.model_log_sigma, np.float64)[[0, -1]])
    sig0, sig1 = sig0 or table[0], table[1]
    lam, Q = np.linalg.eigh(Sigma)
    M = Q @ np.diag(np.sqrt((lam + sig1 ** 2) / (lam + sig0 ** 2))) @ Q.T
    x1 = mu + (y - mu) @ M.T
    prior = multivariate_normal(np.zeros(len(mu)), (1 + sig1 ** 2) * np.eye(len(mu)))
    return prior.logpdf(x1) + np.log(np.linalg.det(M)), sig0


def test_ode_log_likelihood_of_gaussian_data_is_exact():
    """The probability-flow ODE with the exact denoiser of correlated Gaussian data (T = 1000, the
    paper's schedule) and the exact divergence: log p(y) equals the float64 pushforward of the prior
    through the exact flow (error 2e-3 nats measured at tolerance 1e-4, 2e-5 at 1e-6; also from
    sigma_min = 0.1),
    which is the data's own log N(y; mu, Sigma + sigma_0^2 I) up to the prior's mismatch (< 0.01).
    Hutchinson's estimate averaged over all 16 sign vectors of 4 dimensions is the exact trace (the
    cross terms cancel), while single probes scatter."""
    s = D.make_schedule(np.linspace(1e-4, 0.02, 1000))
    model = continuous_eps_model(s, GAUSS_MU, GAUSS_SIGMA)
    y = GAUSS_MU + np.random.default_rng(0).standard_normal((6, 4)) @ np.linalg.cholesky(GAUSS_SIGMA).T
    want, sig0 = _pushforward_log_p(s, GAUSS_MU, GAUSS_SIGMA, y)
    errors = []
    for tol in (1e-4, 1e-6):
        out = jax.jit(lambda y: L.ode_log_likelihood(s, "eps", model, y, None, rtol=tol, atol=tol))(
            jnp.asarray(y, jnp.float32))
        assert bool(out["converged"])
        errors.append(np.abs(np.asarray(out["log_p"], np.float64) - want).max())
    assert errors[0] < 5e-3 and errors[1] < errors[0] / 10, errors
    data = multivariate_normal(GAUSS_MU, GAUSS_SIGMA + sig0 ** 2 * np.eye(4)).logpdf(y)
    np.testing.assert_allclose(want, data, atol=0.01)
    # from a higher level than the model's smallest (sigma_min)
    out = jax.jit(lambda y: L.ode_log_likelihood(s, "eps", model, y, None, sigma_min=0.1))(jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(out["log_p"], _pushforward_log_p(s, GAUSS_MU, GAUSS_SIGMA, y, 0.1)[0], atol=2e-3)

    signs = jnp.asarray(np.stack(np.meshgrid(*[[-1.0, 1.0]] * 4), -1).reshape(16, 4), jnp.float32)
    out = jax.jit(lambda y: L.ode_log_likelihood(s, "eps", model, y, signs))(jnp.asarray(np.repeat(y[:1], 16, 0),
                                                                                           jnp.float32))
    log_p = np.asarray(out["log_p"], np.float64)
    assert abs(log_p.mean() - want[0]) < 1e-3 and log_p.std() > 0.1, (log_p.mean() - want[0], log_p.std())


def test_ode_bpd_of_discretised_gaussian_data():
    """ode_bpd on 4 independent pixels x_0 ~ N(mu, sd^2) rounded to the 256 levels (the VLB test's
    data and model): per example, uniform dequantisation's expectation in closed form,
    E_u -log2 N(x_0 + u; mu, c) / d + log2(255/2) with c = v + sigma_0^2 and E u^2 = W^2/12, agrees
    with the mean over examples within 4 standard errors + 2e-4, with no trend in x_0 - mu (the noise
    is centred on the bins); and the bound holds: above the data's
    entropy, within 0.08 bits/dim of it (measured 0.05, against 0.16 for the variational bound)."""
    T, N = 1000, 2000
    mu, sd = np.array([-0.3, 0.0, 0.2, 0.4]), np.array([0.2, 0.3, 0.25, 0.35])
    lo, hi = _bin_edges()
    P = ndtr((hi[None] - mu[:, None]) / sd[:, None]) - ndtr((lo[None] - mu[:, None]) / sd[:, None])
    entropy = -(P * np.log2(P)).sum(1).mean()
    rng = np.random.default_rng(0)
    x0 = GRID[np.stack([rng.choice(256, N, p=p) for p in P], axis=1)]
    v = sd ** 2 + W ** 2 / 12
    s = D.make_schedule(np.linspace(1e-4, 0.02, T))
    out = jax.jit(lambda x: L.ode_bpd(s, "eps", continuous_eps_model(s, mu, np.diag(v)), x, jax.random.key(0)))(
        jnp.asarray(x0, jnp.float32))
    assert bool(out["converged"]) and out["total"].shape == (N,)
    total = np.asarray(out["total"], np.float64)
    c = v + np.exp(2 * np.float64(s.model_log_sigma[0]))
    nats = (0.5 * np.log(2 * np.pi * c) + ((x0 - mu) ** 2 + W ** 2 / 12) / (2 * c)).sum(1)
    diff = total - (nats / (4 * np.log(2)) + np.log2(127.5))
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(N) + 2e-4, (diff.mean(), diff.std() / np.sqrt(N))
    # The noise is centred on each bin: what is left does not grow with x_0 - mu (a shift u0 would add
    # u0 sum (x_0 - mu) / c / (d log 2) to each example).
    g = ((x0 - mu) / c).sum(1)
    fit = diff * g
    assert abs(fit.mean()) < 4 * fit.std() / np.sqrt(N), (fit.mean(), fit.std() / np.sqrt(N))
    se = total.std() / np.sqrt(N)
    assert -3 * se < total.mean() - entropy < 0.08, (total.mean(), entropy)


@pytest.mark.slow
def test_bpd_on_unet_batch_shapes_and_sharding():
    """bpd through the U-Net: finite terms of the right shapes, and under pmap (one key per device)
    each device's examples get the same values as one device computing that shard alone."""
    from configs import tiny
    from ddpm_jax.models import unet_from_config
    config = tiny.get_config()
    config.diffusion.num_timesteps = 10
    config.model.ch, config.model.ch_mult, config.model.attn_resolutions = 16, (1,), ()
    model = unet_from_config(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))["params"]
    s = D.schedule_from_config(config.diffusion)
    n = jax.local_device_count()
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 2, 8, 8, 3)) / 127.5 - 1, jnp.float32)
    keys = jax.random.split(jax.random.key(1), n)
    fn = lambda p, x, key: L.bpd(s, "eps", lambda x_t, t: model.apply({"params": p}, x_t, t), x, key)
    sharded = jax.pmap(fn, in_axes=(None, 0, 0))(params, x0, keys)
    assert sharded["terms"].shape == (n, 2, 10) and np.isfinite(sharded["total"]).all()
    last = jax.jit(fn)(params, x0[-1], keys[-1])
    np.testing.assert_allclose(sharded["total"][-1], last["total"], rtol=1e-5)
    np.testing.assert_allclose(sharded["terms"][-1], last["terms"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_learned_range_bound_at_the_ends_of_its_range():
    # Bits/dim read the variance half of a 'learned_range' output: a raw output of -1 is beta_tilde
    # (fixedsmall) at every t, +1 is beta (fixedlarge) for t >= 1 (fixedlarge's t = 0 uses beta_tilde_1,
    # learned_range's beta_0), and 0 is neither.
    T = 100
    s = D.make_schedule(np.linspace(1e-3, 0.1, T))
    model = gaussian_eps_model(s, np.zeros(3), np.diag([0.05, 0.1, 0.2]))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(np.round(rng.normal(0, 0.3, (64, 3)).clip(-1, 1) * 127.5) / 127.5, jnp.float32)
    key = jax.random.key(0)
    with_v = lambda r: (lambda x, t: jnp.concatenate([model(x, t), jnp.full_like(x, r)], -1))
    run = lambda fn, variance: np.asarray(jax.jit(lambda x: L.bpd(s, "eps", fn, x, key, variance=variance,
                                                               clip_x0=False))(x0)["terms"])
    small, large = run(model, "fixedsmall"), run(model, "fixedlarge")
    np.testing.assert_allclose(run(with_v(-1.0), "learned_range"), small, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(with_v(1.0), "learned_range")[:, 1:], large[:, 1:], rtol=1e-5, atol=1e-6)
    mid = run(with_v(0.0), "learned_range")[:, 1:]
    assert np.abs(mid - small[:, 1:]).max() > 1e-3 and np.abs(mid - large[:, 1:]).max() > 1e-4
