"""The diffusion math against float64 recomputations, closed forms and an exactly solvable model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_helpers import GAUSS_MU, GAUSS_SIGMA, check_gaussian_samples

from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax.analytic import gaussian_eps_model


def _abar64(betas):
    out, p = [], 1.0
    for b in betas:  # an independent, loop-based product
        p *= 1.0 - b
        out.append(p)
    return np.array(out)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_matches_float64_recomputation(name):
    T = 1000
    betas = D.get_betas(name, T)
    s = D.make_schedule(betas)
    abar = _abar64(betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    expected = dict(
        betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=abar ** 0.5, sqrt_one_minus_alphas_cumprod=(1 - abar) ** 0.5,
        sqrt_recip_alphas_cumprod=abar ** -0.5, sqrt_recipm1_alphas_cumprod=(1 / abar - 1) ** 0.5,
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        posterior_mean_coef1=betas * abar_prev ** 0.5 / (1 - abar),
        posterior_mean_coef2=(1 - abar_prev) * (1 - betas) ** 0.5 / (1 - abar))
    for k, v in expected.items():
        got = np.asarray(getattr(s, k))
        assert got.dtype == np.float32, k
        np.testing.assert_allclose(got, v, rtol=2e-6, atol=1e-30, err_msg=k)


def test_schedule_closed_forms():
    lin = D.get_betas("linear", 1000)
    assert lin[0] == 1e-4 and lin[-1] == 0.02
    np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / 999)
    # Cosine: abar_t = f(t)/f(0) with f(t) = cos^2(((t/T + s)/(1+s)) pi/2) wherever beta is unclipped.
    T, s = 1000, 0.008
    abar = np.cumprod(1 - D.get_betas("cosine", T))
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(1, T + 1)
    np.testing.assert_allclose(abar[:900], (f(t) / f(0))[:900], rtol=1e-9)
    assert D.get_betas("cosine", T).max() == 0.999
    # Posterior mean of a noiseless x_t = sqrt(abar_t) x0 is sqrt(abar_{t-1}) x0.
    sch = D.make_schedule(lin)
    np.testing.assert_allclose(
        sch.posterior_mean_coef1 + sch.posterior_mean_coef2 * sch.sqrt_alphas_cumprod,
        sch.alphas_cumprod_prev ** 0.5, rtol=1e-5)


def test_q_sample_moments():
    s = D.make_schedule(D.linear_betas(1000))
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    for t in [0, 10, 500, 999]:
        tt = jnp.full((n,), t)
        x = D.q_sample(s, x0, tt, jax.random.normal(jax.random.key(t), x0.shape))
        a = float(s.alphas_cumprod[t])
        # Standard errors: sqrt((1-a)/n) ~ 0.0022 for the mean, ~0.003 relative for the variance.
        np.testing.assert_allclose(float(x.mean()), 0.7 * a ** 0.5, atol=0.01)
        np.testing.assert_allclose(float(x.var()), 1 - a, rtol=0.02, atol=1e-6)


def test_posterior_matches_bayes_rule_numerically():
    s = D.make_schedule(D.linear_betas(1000))
    betas = D.linear_betas(1000)
    abar = _abar64(betas)
    grid = np.linspace(-6, 6, 400_001)
    for t, x0, xt in [(1, 0.3, 0.25), (50, -0.8, 0.1), (700, 0.5, -1.2), (999, 0.9, 2.0)]:
        # p(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0).
        log_p = (-(xt - np.sqrt(1 - betas[t]) * grid) ** 2 / (2 * betas[t])
                 - (grid - np.sqrt(abar[t - 1]) * x0) ** 2 / (2 * (1 - abar[t - 1])))
        p = np.exp(log_p - log_p.max())
        p /= p.sum()
        mean = (p * grid).sum()
        var = (p * (grid - mean) ** 2).sum()
        m, v, logv = D.q_posterior(s, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t]))
        np.testing.assert_allclose(float(m[0, 0]), mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(v[0, 0]), var, rtol=1e-3)
        np.testing.assert_allclose(float(logv[0, 0]), np.log(var), atol=1e-3)


@pytest.mark.parametrize("kind", D.MODEL_OUTPUTS)
def test_parameterisations_round_trip(kind):
    s = D.make_schedule(D.linear_betas(1000))
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 100, 500, 900, 999])
    x_t = D.q_sample(s, x0, t, eps)
    out = D.model_target(s, kind, x0, eps, t)
    np.testing.assert_allclose(D.predict_x0(s, kind, out, x_t, t), x0, atol=2e-3 if kind == "eps" else 1e-4)
    np.testing.assert_allclose(D.predict_eps(s, kind, out, x_t, t), eps, atol=2e-3 if kind == "x0" else 1e-4)
    np.testing.assert_allclose(D.model_output_from_eps(s, kind, eps, x_t, t), out, atol=2e-3)


def test_l_simple_is_per_example_mse():
    s = D.make_schedule(D.linear_betas(10, 0.1, 0.2))
    x0, eps = jnp.zeros((2, 3, 3, 1)), jnp.ones((2, 3, 3, 1))
    out = jnp.stack([jnp.ones((3, 3, 1)), jnp.full((3, 3, 1), 3.0)])
    np.testing.assert_allclose(D.l_simple(s, "eps", out, x0, eps, jnp.array([1, 2])), [0.0, 4.0])


def test_respacing_keeps_alphas_cumprod():
    betas = D.linear_betas(1000)
    use = D.even_timesteps(1000, 50)
    assert len(use) == 50 and use[0] == 0 and use[-1] == 999
    new_betas, ts = D.respace_betas(betas, use)
    np.testing.assert_allclose(np.cumprod(1 - new_betas), _abar64(betas)[use], rtol=1e-12)
    s = D.make_schedule(new_betas, ts)
    np.testing.assert_array_equal(s.timesteps, use)


def test_reverse_scan_frames():
    step = lambda x, i: x + i
    x, frames = D.reverse_scan(step, jnp.zeros(2), jnp.arange(9, -1, -1), num_frames=4)
    assert frames.shape == (4, 2)
    np.testing.assert_allclose(x, [45.0, 45.0])
    # Frames after scan positions 0, 3, 6, 9 (evenly spaced): running sums 9, 9+8+7+6, +5+4+3, +2+1+0.
    np.testing.assert_allclose(frames[:, 0], [9.0, 30.0, 42.0, 45.0])


@pytest.mark.parametrize("variance", D.VARIANCES)
def test_ancestral_sampler_is_exact_for_gaussian_data(variance):
    s = D.make_schedule(D.linear_betas(1000))
    model_fn = gaussian_eps_model(s, GAUSS_MU, GAUSS_SIGMA)
    # clip_x0 off: clipping is a heuristic for images in [-1, 1]; it is not part of the exact reverse process.
    opts = S.StepOptions(variance=variance, clip_x0=False)
    run = jax.jit(lambda key: S.generate(s, "eps", model_fn, key, (20_000, 4), opts=opts))
    x = run(jax.random.key(1))
    # With T=1000 the discretisation error of the reverse chain is far below the statistical error:
    # allow 2e-4 on top of 5 standard errors (std error of a covariance entry here is ~2e-4).
    check_gaussian_samples(x, bias=2e-4)
    # A wrong model (eps = 0) must fail the same check: the test can tell.
    bad = jax.jit(lambda key: S.generate(s, "eps", lambda x, t: jnp.zeros_like(x), key, (20_000, 4),
                                         opts=opts))(jax.random.key(1))
    with pytest.raises(AssertionError):
        check_gaussian_samples(bad, bias=2e-4)


def test_sampler_frames_end_at_sample():
    s = D.make_schedule(D.linear_betas(100, 1e-3, 0.1))
    model_fn = gaussian_eps_model(s, GAUSS_MU, GAUSS_SIGMA)
    x, frames = S.generate(s, "eps", model_fn, jax.random.key(0), (8, 4), num_frames=5)
    assert frames.shape == (5, 8, 4)
    np.testing.assert_array_equal(frames[-1], x)
    np.testing.assert_array_equal(x, S.generate(s, "eps", model_fn, jax.random.key(0), (8, 4)))


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        D.get_betas("quadratic", 10)
    s = D.make_schedule(D.linear_betas(10, 0.1, 0.2))
    with pytest.raises(ValueError, match="model_output"):
        D.predict_x0(s, "score", jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="variance"):
        D.p_mean_variance(s, "eps", jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32),
                          variance="learned")
