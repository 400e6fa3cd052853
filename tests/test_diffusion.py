"""The diffusion math against float64 recomputations, closed forms and an exactly solvable model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_helpers import GAUSS_MU, GAUSS_SIGMA, check_gaussian_samples, gaussian_eps_model, gaussian_v_model

from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S


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


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
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


def test_thresholding_exact_on_a_hand_made_x0():
    # Example 0: |x0| = 0.01, 0.02, ..., 2.00 (signs alternate). numpy's (linear) 0.995 quantile sits at
    # position 199 * 0.995 = 198.005 of the sorted values: 1.99 + 0.005 * 0.01 = 1.99005 = s, so
    # x0 -> clip(x0, -s, s) / s: -2.00 -> -1 exactly and every other value divided by s.
    # Example 1: all |x0| <= 0.5, s = max(1, 0.5) = 1: unchanged.
    a = np.arange(1, 201) / 100.0 * np.where(np.arange(200) % 2, -1.0, 1.0)
    b = np.linspace(-0.5, 0.5, 200)
    x0 = jnp.asarray(np.stack([a, b]).reshape(2, 10, 20), jnp.float32)
    out = np.asarray(D.threshold_x0(x0, "dynamic", 0.995), np.float64).reshape(2, 200)
    s = 1.99005
    np.testing.assert_allclose(out[0], np.clip(a, -s, s) / s, rtol=1e-6)
    assert out[0][199] == -1.0 and np.abs(out[0]).max() == 1.0
    np.testing.assert_array_equal(out[1], np.asarray(x0[1]).ravel())
    # The percentile is the one asked for: 0.9 -> position 179.1 -> 1.80 + 0.1 * 0.01 = 1.801.
    out = np.asarray(D.threshold_x0(x0, "dynamic", 0.9), np.float64).reshape(2, 200)
    np.testing.assert_allclose(out[0], np.clip(a, -1.801, 1.801) / 1.801, rtol=1e-6)
    # Against numpy's quantile on random images `[B, H, W, C]`, per example.
    x = np.random.default_rng(0).normal(0, 1.5, (3, 8, 8, 3))
    q = np.maximum(np.quantile(np.abs(x).reshape(3, -1), 0.995, axis=1), 1.0)[:, None, None, None]
    np.testing.assert_allclose(D.threshold_x0(jnp.asarray(x, jnp.float32), "dynamic"), np.clip(x, -q, q) / q,
                               rtol=1e-5, atol=1e-6)
    # 'none' leaves x0 as it is, to the bit; 'clip' clips.
    np.testing.assert_array_equal(D.threshold_x0(x0, "none"), x0)
    np.testing.assert_array_equal(D.threshold_x0(x0, "clip"), np.clip(np.asarray(x0), -1, 1))
    assert D.x0_method(True, "auto") == "clip" and D.x0_method(False, "auto") == "none"
    assert D.x0_method(True, "dynamic") == "dynamic"
    with pytest.raises(ValueError, match=r"sampling.threshold='soft': must be one of \('none', 'clip', 'dynamic'\)"):
        D.threshold_x0(x0, "soft")


def test_learned_variance_optimum_is_the_exact_reverse_variance():
    """For x_0 ~ N(mu, v) per pixel, q(x_{t-1} | x_t) is Gaussian with variance
        Var(x_{t-1} | x_t) = beta_tilde_t + c1_t^2 Var(x_0 | x_t),  Var(x_0 | x_t) = v s^2 / (a^2 v + s^2),
    (x_{t-1} = c1 x_0 + c2 x_t + sqrt(beta_tilde) z given x_t and x_0; a^2 = abar_t, s^2 = 1 - abar_t,
    c1 the posterior mean's x_0 coefficient), which lies in [beta_tilde_t, beta_t] for v <= 1 (= beta_t
    at v = 1). With the exact eps the model's mean is E[x_{t-1} | x_t], so the expected L_{t-1} is
    0.5 (log sigma^2 - log beta_tilde - 1 + (beta_tilde + c1^2 Var(x_0 | x_t)) / sigma^2), least at
    sigma^2 = that variance. Minimising the code's L_{t-1} over the raw variance output finds it.
    """
    T = 1000
    betas = D.linear_betas(T)
    s = D.make_schedule(betas)
    mu, v = np.array([0.1, -0.2]), np.array([0.04, 0.5])
    model = gaussian_eps_model(s, mu, np.diag(v))
    # Four points whose empirical moments are exact: (x_0 - mu)/sqrt(v), eps in {(+-sqrt 2, 0), (0, +-sqrt 2)},
    # so the batch mean of a quantity quadratic in (x_0, eps) is its expectation.
    pattern = np.sqrt(2.0) * np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float64)
    x0 = jnp.asarray(mu + pattern[:, :1] * np.sqrt(v), jnp.float32)  # [4, 2]
    eps = jnp.asarray(np.repeat(pattern[:, 1:], 2, axis=1), jnp.float32)

    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    for i in (30, 100, 300):
        t = jnp.full((4,), i, jnp.int32)
        x_t = D.q_sample(s, x0, t, eps)
        mean_out = model(x_t, t)
        loss = lambda r: D.vb_terms(s, "eps", jnp.concatenate([mean_out, jnp.broadcast_to(r, x0.shape)], -1),
                                    x0, x_t, t, variance="learned_range", clip_x0=False).mean()
        grad = jax.jit(jax.grad(loss))
        lo, hi = -np.ones(2), np.ones(2)  # bisection on the gradient (pixels are separate: a mean of each)
        for _ in range(40):
            mid = (lo + hi) / 2
            g = np.asarray(grad(jnp.asarray(mid, jnp.float32)))
            lo, hi = np.where(g < 0, mid, lo), np.where(g < 0, hi, mid)
        r = jnp.asarray((lo + hi) / 2, jnp.float32)
        _, log_var, _ = D.p_mean_variance(s, "eps", jnp.concatenate([mean_out, jnp.broadcast_to(r, x0.shape)], -1),
                                          x_t, t, variance="learned_range", clip_x0=False)
        exact = beta_tilde[i] + c1[i] ** 2 * v * (1 - abar[i]) / (abar[i] * v + 1 - abar[i])
        assert np.all((beta_tilde[i] < exact) & (exact < betas[i]))
        assert np.all(np.abs(np.asarray(r)) < 0.99), r  # an interior optimum, not a bound of the range
        np.testing.assert_allclose(np.exp(np.asarray(log_var[0], np.float64)), exact, rtol=1e-4)
        # Eq. 15 directly: the optimum's v = (r + 1)/2 interpolates the logs of beta and beta_tilde.
        frac = (np.log(exact) - np.log(beta_tilde[i])) / (np.log(betas[i]) - np.log(beta_tilde[i]))
        np.testing.assert_allclose((np.asarray(r) + 1) / 2, frac, atol=2e-3)


@pytest.mark.parametrize("kind", D.MODEL_OUTPUTS)
def test_min_snr_weights_the_x0_error_by_min_snr_gamma_in_every_parameterisation(kind):
    """Hang et al. 2023: the loss is min(SNR_t, gamma) |x_0 - x0_hat|^2 whatever the network predicts."""
    T, gamma = 1000, 5.0
    betas = D.linear_betas(T)
    s = D.make_schedule(betas)
    rng = np.random.default_rng(0)
    t = jnp.array([0, 5, 60, 300, 999])  # SNR_t from about 1e4 down to 4e-5, both sides of gamma
    x0 = jnp.asarray(rng.uniform(-1, 1, (5, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    x_t = D.q_sample(s, x0, t, noise)
    x0_hat = x0 + jnp.asarray(rng.normal(0, 0.1, x0.shape), jnp.float32)
    # The output of this parameterisation that implies x0_hat at x_t.
    out = D.model_target(s, kind, x0_hat, D.predict_eps(s, "x0", x0_hat, x_t, t), t)
    abar = _abar64(betas)[np.asarray(t)]
    mse_x0 = np.mean((np.asarray(x0, np.float64) - np.asarray(x0_hat, np.float64)) ** 2, axis=(1, 2, 3))
    expected = np.minimum(abar / (1 - abar), gamma) * mse_x0
    got = D.training_loss(s, kind, out, x0, x_t, noise, t, weighting="min_snr", gamma=gamma)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4)
    # 'none' is L_simple, to the bit.
    np.testing.assert_array_equal(D.training_loss(s, kind, out, x0, x_t, noise, t),
                                  D.l_simple(s, kind, out, x0, noise, t))


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_hybrid_loss_gradients_stop_at_the_mean():
    T = 100
    s = D.make_schedule(D.linear_betas(T, 1e-3, 0.1))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(np.round(rng.uniform(0, 255, (4, 8, 8, 1))) / 127.5 - 1, jnp.float32)  # on the 8-bit grid
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([0, 3, 50, 99])
    x_t = D.q_sample(s, x0, t, noise)
    out = jnp.asarray(rng.normal(0, 0.5, (4, 8, 8, 2)), jnp.float32)  # [eps output, raw variance output]
    hybrid = lambda o: D.training_loss(s, "eps", o, x0, x_t, noise, t, variance="learned_range",
                                       vlb_weight=0.001).sum()
    vlb = lambda o: 0.001 * T * D.vb_terms(s, "eps", o, x0, x_t, t, variance="learned_range",
                                           clip_x0=False).sum() / np.log(2.0)
    simple = lambda o: D.l_simple(s, "eps", o[..., :1], x0, noise, t).sum()
    np.testing.assert_allclose(hybrid(out), simple(out) + vlb(out), rtol=1e-6)
    g, g_simple, g_vlb = jax.grad(hybrid)(out), jax.grad(simple)(out), jax.grad(vlb)(out)
    # The mean half learns from L_simple alone; the variance half from lambda L_vlb alone.
    np.testing.assert_allclose(g[..., :1], g_simple[..., :1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g[..., 1:], g_vlb[..., 1:], rtol=1e-5, atol=1e-9)
    assert np.abs(g[..., 1:]).max() > 1e-4
    # Without the stop-gradient L_vlb would pull on the mean too: it has a gradient there.
    assert np.abs(g_vlb[..., :1]).max() > 0.01 * np.abs(g_simple[..., :1]).max()
    # Fixed variances: the loss is L_simple, to the bit.
    np.testing.assert_array_equal(D.training_loss(s, "eps", out[..., :1], x0, x_t, noise, t),
                                  D.l_simple(s, "eps", out[..., :1], x0, noise, t))
    with pytest.raises(ValueError, match="learned_range' needs a network with twice the image channels"):
        D.training_loss(s, "eps", out[..., :1] * jnp.ones((1, 1, 1, 3)), x0, x_t, noise, t, variance="learned_range")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_is_an_affine_map_of_sqrt_alphas_cumprod_to_zero(name):
    """Lin et al. 2024, Sec. 3.1: sqrt(abar') = (sqrt(abar) - sqrt(abar_T)) sqrt(abar_0) / (sqrt(abar_0) -
    sqrt(abar_T)): the first level kept, the last pure noise (beta_T = 1), the betas still in (0, 1]."""
    betas = D.get_betas(name, 1000)
    r = np.sqrt(_abar64(betas))
    new = D.zero_terminal_snr(betas)
    r_new = np.sqrt(_abar64(new))
    np.testing.assert_allclose(r_new, (r - r[-1]) * r[0] / (r[0] - r[-1]), rtol=1e-12, atol=1e-15)
    assert r_new[-1] == 0 and new[-1] == 1 and np.all((new > 0) & (new <= 1))
    assert r_new[0] == pytest.approx(r[0], rel=1e-15)
    s = D.make_schedule(new)
    assert float(s.alphas_cumprod[-1]) == 0 and float(s.sqrt_one_minus_alphas_cumprod[-1]) == 1
    for field in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped", "betas"):
        assert np.isfinite(np.asarray(getattr(s, field))).all(), field
    from ddpm_jax import defaults

    c = defaults.get_config().diffusion
    c.update(beta_schedule=name, zero_terminal_snr=True)
    np.testing.assert_allclose(D.schedule_from_config(c).betas, new, rtol=1e-6)


@pytest.mark.parametrize("sampler,steps,bias", [("ancestral", 1000, 2e-4), ("ddim", 50, 1.5e-2)])
def test_samplers_from_pure_noise_on_a_zero_terminal_snr_schedule_are_exact_for_gaussian_data(sampler, steps, bias):
    """With zero terminal SNR x_T ~ N(0, I) is exactly q(x_T), and the exact v denoiser is finite there:
    ancestral (T = 1000) and DDIM (50 respaced steps) draw N(mu, Sigma) within their discretisation."""
    betas = D.zero_terminal_snr(D.linear_betas(1000))
    full = D.make_schedule(betas)
    s = full if steps == 1000 else D.make_schedule(*D.respace_betas(betas, D.even_timesteps(1000, steps)),
                                                   model_betas=betas)
    model_fn = gaussian_v_model(full, GAUSS_MU, GAUSS_SIGMA)
    opts = S.StepOptions(clip_x0=False)
    x = jax.jit(lambda key: S.generate(s, "v", model_fn, key, (20_000, 4), sampler=sampler, opts=opts))(
        jax.random.key(2))
    assert np.isfinite(np.asarray(x)).all()
    check_gaussian_samples(x, bias=bias)


@pytest.mark.parametrize("fields,message", [
    ({}, r"^diffusion.zero_terminal_snr=True with diffusion.model_output='eps': at the last step x_t is pure noise"),
    ({"diffusion.model_output": "v", "sampling.sampler": "heun"},
     r"^sampling.sampler='heun' steps in log sigma, infinite at the last step"),
    ({"diffusion.model_output": "v", "eval.bpd_method": "ode"}, r"^eval.bpd_method='ode' solves the probability-flow"),
])
def test_zero_terminal_snr_refuses_what_needs_a_finite_last_level(fields, message):
    from ddpm_jax import defaults, validation

    config = defaults.get_config()
    config.diffusion.zero_terminal_snr = True
    for path, value in fields.items():
        section, name = path.split(".")
        config[section][name] = value
    with pytest.raises(validation.UserError, match=message):
        validation.validate_diffusion(config)
        validation.validate_sampling(config)
        validation.validate_eval(config)
    config = defaults.get_config()
    config.diffusion.update(zero_terminal_snr=True, model_output="v")
    validation.validate_diffusion(config)  # v with the ancestral sampler and the bound: fine
    validation.validate_sampling(config)
    validation.validate_eval(config)
