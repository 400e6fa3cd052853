"""Samplers, guidance and editing against exact answers: the analytic Gaussian denoiser, whose
sampler chains have a closed-form law (tests/gaussian_helpers.py), and identities between samplers."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_helpers import (
    GAUSS_MU,
    GAUSS_SIGMA,
    chain_law,
    check_gaussian_samples,
    continuous_eps_model,
    ddim_invert64,
    dpm_solver_pp64,
    gaussian_eps_model,
    heun64,
)

from ddpm_jax import diffusion as D
from ddpm_jax import parallel, train_state
from ddpm_jax import sampling as S
from ddpm_jax.models import UNet

T = 1000
BETAS = D.linear_betas(T)
ABAR = np.cumprod(1 - BETAS)  # float64
FULL = D.make_schedule(BETAS)
GAUSS = gaussian_eps_model(FULL, GAUSS_MU, GAUSS_SIGMA)  # called with original timesteps
EXACT = S.StepOptions(clip_x0=False)  # clipping is an image heuristic, not part of the exact chain
N = 20_000


def _respaced(steps):
    return D.make_schedule(*D.respace_betas(BETAS, D.even_timesteps(T, steps)), model_betas=BETAS)


def _gen(s, sampler, opts, key=0, x_T=None, model_fn=GAUSS):
    """N samples of the 4-d Gaussian (from x_T when given), float64 numpy."""
    run = jax.jit(lambda k, x: S.generate(s, "eps", model_fn, k, (N, 4), sampler=sampler, opts=opts, x_T=x))
    return np.asarray(run(jax.random.key(key), x_T), np.float64)


def test_registry_and_unknown_name():
    assert {k: v.step for k, v in S.SAMPLERS.items()} == {
        "ancestral": S.ancestral_step, "ddim": S.ddim_step, "dpm_solver++": S.dpm_solver_pp_step,
        "heun": S.heun_step, "ode": S.ode_step}
    with pytest.raises(ValueError, match=r"sampler='plms': must be one of \['ancestral', 'ddim', 'dpm_solver\+\+', "
                                         r"'heun', 'ode'\]"):
        S.get_step("plms")
    assert [S.network_evaluations("heun", n) for n in (1, 2, 9, 10)] == [1, 1, 9, 9]
    assert S.network_evaluations("dpm_solver++", 10) == 10
    assert S.network_evaluations("ode", 10) is None  # adaptive


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_respaced_ancestral_50_steps_exact_law(variance):
    s = _respaced(50)
    x = _gen(s, "ancestral", EXACT._replace(variance=variance))
    # The exact law of this 50-step chain (float64, composed affine steps from N(0, I)): the samples
    # must match it to 5 standard errors; 1e-5 covers float32 rounding through 50 steps.
    m, P = chain_law(ABAR, np.asarray(s.timesteps), 50, np.zeros(4), np.eye(4), "ancestral", variance=variance)
    check_gaussian_samples(x, m, P, bias=1e-5)
    # That law is N(mu, Sigma) up to the discretisation error of 50 steps: 1.0e-2 (fixedlarge) and
    # 1.4e-2 (fixedsmall) on the largest covariance entry in float64; allowed 1.5e-2.
    check_gaussian_samples(x, bias=1.5e-2)
    # A sampler that told the model the respaced index i instead of the timestep s.timesteps[i] fails.
    wrong = lambda x_t, t: GAUSS(x_t, jnp.searchsorted(s.timesteps, t))
    with pytest.raises(AssertionError):
        check_gaussian_samples(_gen(s, "ancestral", EXACT._replace(variance=variance), model_fn=wrong), m, P,
                               bias=1e-5)


def test_ddim_eta0_deterministic_and_exact():
    s = _respaced(50)
    x_T = jax.random.normal(jax.random.key(7), (N, 4))
    x = _gen(s, "ddim", EXACT, key=0, x_T=x_T)
    # Deterministic: the key (the only randomness besides x_T) does not matter, to the bit.
    np.testing.assert_array_equal(x, _gen(s, "ddim", EXACT, key=1, x_T=x_T))
    # Each output equals the float64 composition of the 50 affine DDIM steps applied to its x_T;
    # 2e-5 allows float32 rounding (outputs are ~0.3, eps 1.2e-7, 50 steps of a few ops each).
    ref, _ = chain_law(ABAR, np.asarray(s.timesteps), 50, np.asarray(x_T, np.float64), None, "ddim")
    np.testing.assert_allclose(x, ref, atol=2e-5)
    # In distribution: N(mu, Sigma) up to 50-step discretisation, 8.5e-3 in float64; allowed 1e-2.
    check_gaussian_samples(x, bias=1e-2)


def test_ddim_eta1_is_ancestral_with_posterior_variance():
    # Song et al.: eta = 1 gives sigma^2 = beta_tilde, and then DDIM is DDPM's posterior step, so the
    # two samplers map the same x_T and noise to the same output.
    s = _respaced(30)
    a = _gen(s, "ddim", EXACT._replace(eta=1.0), key=5)
    b = _gen(s, "ancestral", EXACT._replace(variance="fixedsmall"), key=5)
    # 1e-4: the two forms differ in float32 rounding, largest in 1 - abar' - beta_tilde near the end,
    # where abar' ~ 1 (measured 2.7e-5).
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.allclose(a, _gen(s, "ddim", EXACT._replace(eta=0.5), key=5), atol=1e-2)


def test_ddim_inversion_round_trip():
    x0 = np.random.default_rng(0).multivariate_normal(GAUSS_MU, GAUSS_SIGMA, 2000)
    errors = {}
    for steps in (100, 1000):
        s = FULL if steps == T else _respaced(steps)
        x_T = jax.jit(lambda x: S.ddim_invert(s, "eps", GAUSS, x))(jnp.asarray(x0, jnp.float32))
        # The encoding is the float64 inversion, to float32 rounding over `steps` steps.
        np.testing.assert_allclose(x_T, ddim_invert64(ABAR, np.asarray(s.timesteps), x0), atol=5e-4)
        back = _gen(s, "ddim", EXACT, x_T=x_T)
        errors[steps] = np.abs(back - x0).max()
        if steps == T:
            # Data ~ N(mu, Sigma) encodes to ~ N(0, I): 5 standard errors of 2000 samples.
            check_gaussian_samples(x_T, np.zeros(4), np.eye(4))
    # The round trip is first order in the step: 1000 steps come back within 0.01 (measured 0.0078;
    # the data have std 0.12..0.2), and 10x the steps give ~10x less error.
    assert errors[T] < 0.01, errors
    assert 5 < errors[100] / errors[T] < 20, errors


# An image-like Gaussian: pixel std 0.24..0.40 (eigenvalues 0.02..0.23), as images in [-1, 1].
WIDE = 4 * GAUSS_SIGMA
BASIS = jnp.asarray(np.vstack([np.zeros(4), np.eye(4)]), jnp.float32)  # x_T = 0, then e_1..e_4


def _affine_map(sampler, steps, Sigma=WIDE, opts=EXACT):
    """A deterministic sampler's map x_T -> x_0 = M x_T + c on S = `steps` levels, measured exactly by
    pushing 0 and the basis through it: returns (M, c) in float64."""
    s = _respaced(steps)
    model = continuous_eps_model(s, GAUSS_MU, Sigma)  # exact at every noise level, float t included
    run = jax.jit(lambda: S.generate(s, "eps", model, jax.random.key(0), None, sampler=sampler, opts=opts,
                                     x_T=BASIS))
    y = np.asarray(run(), np.float64)
    return (y[1:] - y[0]).T, y[0]


def test_deterministic_samplers_are_the_papers_algorithms():
    # On Gaussian data each deterministic sampler is an affine map of x_T; the JAX samplers (float32)
    # equal float64 reimplementations of DDIM (eta = 0), DPM-Solver++(2M) (Lu et al. Alg. 2) and EDM's
    # Heun (Karras et al. Alg. 1, rho = 7) to float32 rounding (measured <= 1.1e-6 on entries ~0.5).
    steps = 15
    s = _respaced(steps)
    abar = ABAR[np.asarray(s.timesteps)]
    sigma = np.sqrt((1 - ABAR) / ABAR)
    x = np.asarray(BASIS, np.float64)
    ddim = chain_law(ABAR, np.asarray(s.timesteps), steps, x, None, "ddim", mu=GAUSS_MU, Sigma=WIDE)[0]
    refs = {"ddim": ((ddim[1:] - ddim[0]).T, ddim[0]),
            "dpm_solver++": dpm_solver_pp64(abar, GAUSS_MU, WIDE),
            # 15 levels -> 8 Karras noise levels, 15 evaluations; sigma_max, sigma_min: t = 999, 0.
            "heun": heun64(sigma[-1], sigma[0], (steps + 1) // 2, mu=GAUSS_MU, Sigma=WIDE)}
    for name, (M64, c64) in refs.items():
        M, c = _affine_map(name, steps)
        np.testing.assert_allclose(M, M64, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(c, c64, atol=1e-5, err_msg=name)
    # The references tell the methods apart (so would catch one sampler standing in for another).
    assert np.abs(refs["dpm_solver++"][0] - refs["ddim"][0]).max() > 1e-2
    assert np.abs(refs["heun"][0] - refs["ddim"][0]).max() > 1e-2


def _sqrtm(A):
    """The symmetric square root of a covariance, float64."""
    lam, U = np.linalg.eigh(A)
    return U @ np.diag(np.sqrt(lam)) @ U.T


def test_ode_sampler_is_the_probability_flow_to_its_tolerance():
    """On Gaussian data the exact probability-flow ODE is affine in closed form: in x_ve = x / sqrt(abar),
    x_ve(sigma) - mu = (Sigma + sigma^2 I)^(1/2) (Sigma + sigma_hi^2 I)^(-1/2) (x_ve(sigma_hi) - mu), then
    the final x_0 = mu + Sigma (Sigma + sigma_lo^2 I)^(-1) (x_ve - mu). The adaptive solver lands on it to
    its tolerance, whatever --steps (only the table the model is told timesteps on), and a coarser
    tolerance lands farther off."""
    sigma = np.sqrt((1 - ABAR) / ABAR)
    hi, lo, eye = sigma[-1], sigma[0], np.eye(4)
    A = _sqrtm(WIDE + lo ** 2 * eye) @ np.linalg.inv(_sqrtm(WIDE + hi ** 2 * eye))
    B = WIDE @ np.linalg.inv(WIDE + lo ** 2 * eye)
    M64, c64 = np.sqrt(1 + hi ** 2) * B @ A, GAUSS_MU - B @ A @ GAUSS_MU
    errors = {}
    for tol, steps in ((1e-5, 1000), (1e-5, 20), (1e-2, 1000)):
        M, c = _affine_map("ode", steps, opts=EXACT._replace(ode_tolerance=tol))
        errors[tol, steps] = max(np.abs(M - M64).max(), np.abs(c - c64).max())
    # Measured: 1.24e-5 at tolerance 1e-5 (the same for either table), 2.7e-2 at 1e-2.
    assert errors[1e-5, 1000] < 5e-5 and errors[1e-5, 20] < 5e-5, errors
    assert errors[1e-2, 1000] > 100 * errors[1e-5, 1000], errors
    M_ddim, _ = _affine_map("ddim", 20)
    assert np.abs(M_ddim - M64).max() > 1e-2  # the reference tells it from a 20-step sampler


def test_ode_frames_are_points_of_the_flow():
    """With frames asked for (`--figures`) the ode path is solved in pieces, evenly spaced in log sigma:
    each frame is x at its piece's end, on the closed-form flow to the tolerance, the last x_0."""
    s, F = _respaced(1000), 4
    hi, lo = float(s.sqrt_recipm1_alphas_cumprod[-1]), float(np.exp(s.model_log_sigma[0]))
    model = continuous_eps_model(s, GAUSS_MU, WIDE)
    run = jax.jit(lambda: S.generate(s, "eps", model, jax.random.key(0), None, sampler="ode",
                                     opts=EXACT._replace(ode_tolerance=1e-5), x_T=BASIS, num_frames=F,
                                     return_state=True))
    (x0, frames), evals = run()
    frames = np.asarray(frames, np.float64)
    assert frames.shape == (F, 5, 4)
    np.testing.assert_array_equal(frames[-1], x0)
    for k, sig in enumerate(np.exp(np.linspace(np.log(hi), np.log(lo), F + 1))[1:-1]):
        R = _sqrtm(WIDE + sig ** 2 * np.eye(4)) @ np.linalg.inv(_sqrtm(WIDE + hi ** 2 * np.eye(4)))
        M = np.sqrt(1 + hi ** 2) / np.sqrt(1 + sig ** 2) * R
        c = (GAUSS_MU - R @ GAUSS_MU) / np.sqrt(1 + sig ** 2)
        np.testing.assert_allclose((frames[k, 1:] - frames[k, 0]).T, M, atol=5e-5)
        np.testing.assert_allclose(frames[k, 0], c, atol=5e-5)
    M1, c1 = _affine_map("ode", 1000, opts=EXACT._replace(ode_tolerance=1e-5))  # in one piece
    np.testing.assert_allclose((x0[1:] - x0[0]).T, M1, atol=5e-5)
    np.testing.assert_allclose(x0[0], c1, atol=5e-5)
    assert int(evals) > 4 * 6  # every piece took solver steps, and the last its D


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_second_order_samplers_converge_faster():
    """The law of x_0 from x_T ~ N(0, I) is N(c, M M^T); its covariance error ||M M^T - Sigma||_F
    against the data's, per step count (exact: no Monte Carlo). Printed with -s (docs/samplers.md)."""
    err = {}
    for sampler, counts in [("ddim", (10, 15, 20, 30, 60)), ("dpm_solver++", (10, 15, 20, 30, 60)),
                            ("heun", (19, 39, 79))]:
        for n in counts:
            M, _ = _affine_map(sampler, n)
            err[sampler, n] = np.linalg.norm(M @ M.T - WIDE)
            print(f"{sampler:>13} {n:3d} levels, {S.network_evaluations(sampler, n):3d} evaluations: "
                  f"||Cov - Sigma||_F = {err[sampler, n]:.3e}")
    # Second order: doubling the steps cuts the error >= 3x (measured: DPM-Solver++ 15 -> 30 -> 60
    # 4.0x, 4.8x; Heun 19 -> 39 -> 79 evaluations 5.7x, 4.7x); DDIM is first order (1.8x, 1.9x).
    for sampler, (a, b, c) in [("dpm_solver++", (15, 30, 60)), ("heun", (19, 39, 79))]:
        assert err[sampler, a] / err[sampler, b] > 3 and err[sampler, b] / err[sampler, c] > 3, sampler
    assert 1.5 < err["ddim", 15] / err["ddim", 30] < 2.5 and 1.5 < err["ddim", 30] / err["ddim", 60] < 2.5
    # DPM-Solver++ beats DDIM at the same number of evaluations: measured 1.15x, 1.5x, 1.9x at 10, 15, 20.
    for n in (10, 15, 20):
        assert err["dpm_solver++", n] < err["ddim", n], n
    assert err["dpm_solver++", 20] < 0.6 * err["ddim", 20]


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_network_evaluations_are_counted():
    # Each model call on the host during the run: heun makes 2n - 1 of them for n = (S + 1) // 2 levels
    # (no second evaluation at the last step, to sigma = 0); DPM-Solver++ one per level.
    for sampler, steps in [("heun", 9), ("heun", 10), ("dpm_solver++", 7)]:
        s = _respaced(steps)
        model, calls = continuous_eps_model(s, GAUSS_MU, WIDE), []

        def counted(x, t):
            jax.debug.callback(lambda: calls.append(1))
            return model(x, t)

        jax.block_until_ready(S.generate(s, "eps", counted, jax.random.key(0), (2, 4), sampler=sampler, opts=EXACT))
        jax.effects_barrier()
        assert len(calls) == S.network_evaluations(sampler, steps) == {9: 9, 10: 9, 7: 7}[steps], (sampler, steps)
    # The ode sampler chooses its own: its state counts them, the solver's and the final D's.
    calls.clear()
    opts = EXACT._replace(ode_tolerance=1e-3)
    x, evals = S.generate(s, "eps", counted, jax.random.key(0), (2, 4), sampler="ode", opts=opts, return_state=True)
    jax.effects_barrier()
    assert x.shape == (2, 4) and 20 < int(evals) == len(calls)
    # With --invert, the encoding by the same ODE upwards is counted too.
    calls.clear()
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4)), jnp.float32)
    x, evals = S.img2img(s, "eps", counted, jax.random.key(0), x0, steps, sampler="ode", opts=opts, invert=True,
                         return_state=True)
    jax.effects_barrier()
    assert 40 < int(evals) == len(calls)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_heun_churn_is_off_by_default_and_calibrated_when_on():
    s = _respaced(79)
    model = continuous_eps_model(s, GAUSS_MU, WIDE)
    x_T = jax.random.normal(jax.random.key(9), (N, 4))

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def run(key, churn, s_noise=1.0):
        opts = EXACT._replace(s_churn=churn, s_noise=s_noise)
        return S.generate(s, "eps", model, jax.random.key(key), None, sampler="heun", opts=opts, x_T=x_T)

    # Off (s_churn = 0, the default): deterministic given x_T, whatever the key.
    np.testing.assert_array_equal(run(0, 0.0), run(1, 0.0))
    # On (EDM Alg. 2): fresh noise at each step, a function of the key, ...
    a = np.asarray(run(0, 40.0), np.float64)
    np.testing.assert_array_equal(a, run(0, 40.0))
    assert np.isfinite(a).all() and np.abs(a - np.asarray(run(1, 40.0))).max() > 1e-2
    # ... of the right size: the samples still follow N(mu, Sigma) (||Cov - Sigma||_F 0.024 measured with
    # 50,000 samples; 0.009 without churn), while a churn noise 0.5 or 1.5 times too large does not (0.18, 0.38).
    err = lambda x: np.linalg.norm(np.cov(np.asarray(x, np.float64).T) - WIDE)
    assert err(a) < 0.05
    assert err(run(0, 40.0, 0.5)) > 0.1 and err(run(0, 40.0, 1.5)) > 0.1
    check_gaussian_samples(a, GAUSS_MU, WIDE, bias=0.03)


def test_every_sampler_thresholds_its_x0():
    # A model of kind 'x0' that overshoots: x0_hat = 3 x_t + 0.5. Every sampler's last step returns its
    # last x0 prediction, so the output shows the treatment: 'none' leaves values far beyond 1, 'clip'
    # and 'dynamic' keep every value in [-1, 1], and 'dynamic' scales rather than clips (few values at
    # +-1 exactly; with 4 pixels the 0.995 quantile is near the largest |x0|).
    s = _respaced(6)
    model = lambda x, t: 3.0 * x + 0.5
    x_T = jax.random.normal(jax.random.key(0), (256, 4))
    for sampler in S.SAMPLERS:
        out = {m: np.asarray(jax.jit(lambda m=m: S.generate(
            s, "x0", model, jax.random.key(1), None, sampler=sampler, x_T=x_T,
            opts=S.StepOptions(threshold=m, percentile=0.995)))()) for m in D.THRESHOLDS}
        assert np.abs(out["none"]).max() > 2, sampler
        for m in ("clip", "dynamic"):
            assert np.abs(out[m]).max() <= 1 + 1e-5, (sampler, m)
        assert (np.abs(out["clip"]) > 1 - 1e-6).mean() > 0.3, sampler
        assert (np.abs(out["dynamic"]) > 1 - 1e-6).mean() < 0.3, sampler
    # threshold 'auto' (the default): diffusion.clip_x0 decides, as before ('clip' when True, 'none' when False).
    run = lambda opts: np.asarray(S.generate(s, "x0", model, jax.random.key(1), None, sampler="ddim", x_T=x_T,
                                             opts=opts))
    np.testing.assert_array_equal(run(S.StepOptions(clip_x0=True)), run(S.StepOptions(threshold="clip")))
    np.testing.assert_array_equal(run(S.StepOptions(clip_x0=False)), run(S.StepOptions(threshold="none")))


def test_step_options_from_config():
    from configs import tiny
    c = tiny.get_config()
    assert S.step_options(c) == S.StepOptions()  # the defaults: eta 0, fixedlarge, clip_x0, no churn
    # Plain values, no FieldReference: a run's section can be laid over the defaults' (as the sampling
    # command does for runs saved before a field existed) and every field set from the command line.
    c.sampling.update(tiny.get_config().sampling)
    c.diffusion.variance, c.diffusion.clip_x0 = "learned_range", False
    c.sampling.threshold, c.sampling.threshold_percentile, c.sampling.eta = "dynamic", 0.9, 0.5
    c.sampling.s_churn, c.sampling.s_tmin, c.sampling.s_tmax, c.sampling.s_noise = 10.0, 0.05, 50.0, 1.003
    assert S.step_options(c, eta=1.0) == S.StepOptions(
        eta=1.0, variance="learned_range", clip_x0=False, threshold="dynamic", percentile=0.9, s_churn=10.0,
        s_tmin=0.05, s_tmax=50.0, s_noise=1.003)


def test_guidance_with_a_learned_variance_guides_the_mean_half_only():
    # A stand-in network with 2C = 4 output channels for C = 2: [mean half, variance half], each
    # depending on the label (5 when dropped), so conditional and unconditional halves differ.
    label = lambda c: jnp.where(c["drop"], 5, c["label"])[:, None]
    apply_fn = lambda x, t, c: jnp.concatenate([x * label(c) + t[:, None], jnp.tanh(x - label(c))], -1)
    x, t = jnp.ones((3, 2)) * 0.3, jnp.array([1.0, 2.0, 3.0])
    cond = {"label": jnp.array([0, 1, 2]), "drop": jnp.zeros(3, bool)}
    null = S.null_condition(cond)
    out = S.guided_model_fn(apply_fn, cond, null, 2.0)(x, t)
    c_out, u_out = apply_fn(x, t, cond), apply_fn(x, t, null)
    np.testing.assert_allclose(out[:, :2], 3 * c_out[:, :2] - 2 * u_out[:, :2], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 2:], c_out[:, 2:])
    # With C output channels (fixed variance) everything is guided, as before.
    plain = lambda x, t, c: x * label(c) + t[:, None]
    np.testing.assert_allclose(S.guided_model_fn(plain, cond, null, 2.0)(x, t),
                               3 * plain(x, t, cond) - 2 * plain(x, t, null), rtol=1e-6)


def test_guidance_interval_guides_inside_and_is_the_conditional_model_outside():
    label = lambda c: jnp.where(c["drop"], 5, c["label"])[:, None]
    apply_fn = lambda x, t, c: jnp.concatenate([x * label(c) + t[:, None], jnp.tanh(x - label(c))], -1)
    x, t = jnp.ones((4, 2)) * 0.3, jnp.array([99.0, 100.0, 700.0, 700.5])
    cond = {"label": jnp.array([0, 1, 2, 3]), "drop": jnp.zeros(4, bool)}
    null = S.null_condition(cond)
    out = S.guided_model_fn(apply_fn, cond, null, 2.0, interval=(100.0, 700.0))(x, t)
    c_out, u_out = apply_fn(x, t, cond), apply_fn(x, t, null)
    inside = np.array([False, True, True, False])  # the bounds belong to the interval
    np.testing.assert_allclose(out[inside, :2], 3 * c_out[inside, :2] - 2 * u_out[inside, :2], rtol=1e-6)
    np.testing.assert_array_equal(out[~inside], c_out[~inside])
    np.testing.assert_array_equal(out[:, 2:], c_out[:, 2:])
    # The default interval is every timestep.
    np.testing.assert_array_equal(S.guided_model_fn(apply_fn, cond, null, 2.0)(x, t),
                                  S.guided_model_fn(apply_fn, cond, null, 2.0, interval=(0.0, 1e9))(x, t))


def test_guidance_rescale_is_lin_et_al_eq_15_16_per_sample_on_the_mean_half():
    """phi = 1: the guided output's std per sample is the conditional output's; phi in between mixes
    linearly in phi (Eq. 16); 0 is plain guidance; the variance half is the conditional one's."""
    rng = np.random.default_rng(0)
    scale = lambda c: 0.6 * (c["label"] + 1.0)[:, None, None, None]  # a spread of its own per sample
    apply_fn = lambda x, t, c: jnp.concatenate(
        [jnp.where(c["drop"][:, None, None, None], 0.2 * x, scale(c) * x + 0.1), jnp.tanh(x)], -1)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    t = jnp.array([1.0, 2.0, 3.0])
    cond = {"label": jnp.array([0, 1, 2]), "drop": jnp.zeros(3, bool)}
    null = S.null_condition(cond)
    c_out, u_out = apply_fn(x, t, cond)[..., :2], apply_fn(x, t, null)[..., :2]
    plain = np.asarray(4 * c_out - 3 * u_out, np.float64)
    full = plain * (np.std(np.asarray(c_out, np.float64), axis=(1, 2, 3), keepdims=True)
                    / np.std(plain, axis=(1, 2, 3), keepdims=True))
    for phi in (0.0, 0.7, 1.0):
        out = S.guided_model_fn(apply_fn, cond, null, 3.0, rescale=phi)(x, t)
        np.testing.assert_allclose(out[..., :2], phi * full + (1 - phi) * plain, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[..., 2:], jnp.tanh(x))
    assert not np.allclose(full, plain, rtol=0.05)  # the rescale does something here
    np.testing.assert_allclose(np.std(full, axis=(1, 2, 3)), np.std(c_out, axis=(1, 2, 3)), rtol=1e-6)


def test_autoguidance_guides_by_another_network_also_without_a_condition():
    good = lambda x, t, c: x * 3.0 + t[:, None]
    bad = lambda x, t, c: jnp.tanh(x) - t[:, None]
    x, t = jnp.ones((4, 2)) * 0.3, jnp.array([99.0, 100.0, 700.0, 700.5])
    out = S.guided_model_fn(good, None, None, 2.0, interval=(100.0, 700.0), guide_apply=bad)(x, t)
    inside = np.array([False, True, True, False])
    np.testing.assert_allclose(out[inside], 3 * good(x, t, None)[inside] - 2 * bad(x, t, None)[inside], rtol=1e-6)
    np.testing.assert_array_equal(out[~inside], good(x, t, None)[~inside])


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_learned_range_ancestral_interpolates_the_respaced_variances():
    # A model whose variance half is constant r: r = -1 gives beta_tilde and r = +1 beta of the respaced
    # chain, so the learned-range sampler is then the fixedsmall / fixedlarge one (same noise; the last
    # step adds none). r = 0 is in between: the output's spread lies strictly between the two.
    s = _respaced(20)
    with_v = lambda r: lambda x, t: jnp.concatenate([GAUSS(x, t), jnp.full_like(x, r)], -1)
    run = lambda model, variance: _gen(s, "ancestral", EXACT._replace(variance=variance), key=3, model_fn=model)
    small, large = run(GAUSS, "fixedsmall"), run(GAUSS, "fixedlarge")
    np.testing.assert_allclose(run(with_v(-1.0), "learned_range"), small, atol=2e-5)
    np.testing.assert_allclose(run(with_v(1.0), "learned_range"), large, atol=2e-5)
    mid = run(with_v(0.0), "learned_range")
    assert np.abs(mid - small).max() > 1e-3 and np.abs(mid - large).max() > 1e-3
    # DDIM and DPM-Solver++ read only the mean half: the variance half changes nothing.
    for sampler in ("ddim", "dpm_solver++"):
        a = _gen(s, sampler, EXACT._replace(variance="learned_range"), model_fn=with_v(0.7), x_T=BASIS)
        np.testing.assert_array_equal(a, _gen(s, sampler, EXACT, x_T=BASIS))


def test_img2img_exact_law_and_strength_zero():
    s = _respaced(50)
    x_in = jnp.tile(jnp.asarray([[0.6, -0.5, 0.4, 0.2]]), (N, 1))
    assert S.strength_to_level(0.0, 50) == 0 and S.strength_to_level(0.08, 50) == 4
    np.testing.assert_array_equal(S.img2img(s, "eps", GAUSS, jax.random.key(0), x_in, 0), x_in)
    x = jax.jit(lambda k: S.img2img(s, "eps", GAUSS, k, x_in, 4, opts=EXACT))(jax.random.key(1))
    # Exact law: x_4 ~ q(x_4 | x_in) = N(sqrt(abar) x_in, (1 - abar) I) at t = 61, then 4 ancestral
    # steps. (A low strength, so the output still depends on x_in: its mean is 0.36, not mu_0 = 0.3.)
    abar = ABAR[int(s.timesteps[3])]
    start = (np.sqrt(abar) * np.asarray(x_in[0], np.float64), (1 - abar) * np.eye(4))
    law = lambda levels: chain_law(ABAR, np.asarray(s.timesteps), levels, *start, "ancestral")
    check_gaussian_samples(x, *law(4), bias=1e-5)
    # Denoising from one level too low is a different law, and the check resolves it (means differ by 0.04).
    with pytest.raises(AssertionError):
        check_gaussian_samples(x, *law(3), bias=1e-5)
    with pytest.raises(ValueError, match="strength=1.5"):
        S.strength_to_level(1.5, 50)


def test_img2img_with_inversion_reconstructs():
    # Strength 1 with DDIM inversion and DDIM decoding is the round trip above: an edit that keeps x_in.
    # The other deterministic samplers solve the same ODE back (heun in 999 evaluations on its own
    # noise levels, from the inverted x_T's): they reconstruct too. Measured max errors 0.0060 (ddim),
    # 0.0028 (dpm_solver++), 0.0027 (heun).
    x_in = jnp.asarray(np.random.default_rng(1).multivariate_normal(GAUSS_MU, GAUSS_SIGMA, 64), jnp.float32)
    model = continuous_eps_model(FULL)
    for sampler in ("ddim", "dpm_solver++", "heun"):
        x = jax.jit(lambda: S.img2img(FULL, "eps", model, jax.random.key(0), x_in, T, sampler=sampler, opts=EXACT,
                                      invert=True))()
        assert np.abs(np.asarray(x) - np.asarray(x_in)).max() < 0.01, sampler
    # From part way (level 300 of 1000: heun from that level's sigma, 299 evaluations), DDIM and heun
    # agree to the discretisation error of the shorter path (measured 0.0034).
    run = lambda sampler: np.asarray(jax.jit(lambda: S.img2img(FULL, "eps", model, jax.random.key(0), x_in, 300,
                                                               sampler=sampler, opts=EXACT, invert=True))())
    assert np.abs(run("heun") - run("ddim")).max() < 0.01


def test_ode_inversion_round_trip_is_exact_to_the_tolerance():
    """--invert with the ode sampler encodes by the same ODE upwards (`ode_invert`): decoding returns
    D(x_in; sigma_min) = mu + Sigma (Sigma + sigma_min^2 I)^(-1) (x_in - mu) (the final step, in closed
    form) to the solver's tolerance, from the top level and from part way."""
    x_in = jnp.asarray(np.random.default_rng(1).multivariate_normal(GAUSS_MU, GAUSS_SIGMA, 64), jnp.float32)
    model = continuous_eps_model(FULL)
    lo = np.sqrt(BETAS[0] / (1 - BETAS[0]))
    want = GAUSS_MU + (np.asarray(x_in, np.float64) - GAUSS_MU) @ np.linalg.inv(
        GAUSS_SIGMA + lo ** 2 * np.eye(4)).T @ GAUSS_SIGMA.T
    errors = {}
    for level in (T, 300):
        x = jax.jit(lambda: S.img2img(FULL, "eps", model, jax.random.key(0), x_in, level, sampler="ode",
                                      opts=EXACT, invert=True))()
        errors[level] = np.abs(np.asarray(x, np.float64) - want).max()
    assert max(errors.values()) < 1e-4, errors  # measured 5.0e-5 and 3.6e-5 (DDIM's round trip: 6e-3)
    assert np.abs(want - np.asarray(x_in)).max() > 1e-3  # the final step is seen: x_in itself would fail


def test_repaint_schedule():
    np.testing.assert_array_equal(S.repaint_schedule(4), [[3, 0], [2, 0], [1, 0], [0, 0]])
    S_, j, r = 20, 5, 3
    ops = S.repaint_schedule(S_, j, r)
    # Jump points at levels 0, 5, 10, 15, each r - 1 times: S reverse steps plus j more per jump.
    assert len(ops) == S_ + 4 * (r - 1) * (j + 1)
    level = S_
    for i, up in ops:
        if up:
            assert level == i and i % j == 0 and i + up <= S_
            level += up
        else:
            assert i == level - 1
            level -= 1
    assert level == 0
    with pytest.raises(ValueError, match="jump_length=30"):
        S.repaint_schedule(20, 30, 2)


def test_inpainting_gaussian_conditional():
    # 2-d Gaussian, correlation 0.9: given x_0[0] = 0.5, x_0[1] ~ N(0.45, 0.0076) exactly.
    mu, Sigma = np.zeros(2), np.array([[0.04, 0.036], [0.036, 0.04]])
    model_fn = gaussian_eps_model(FULL, mu, Sigma)
    s = _respaced(100)
    x0 = jnp.zeros((N, 2)).at[:, 0].set(0.5)
    mask = jnp.asarray([False, True])
    run = jax.jit(lambda k, j, r: S.inpaint(s, "eps", model_fn, k, x0, mask, opts=EXACT, jump_length=j,
                                            jump_n_sample=r), static_argnums=(1, 2))
    plain, resampled = np.asarray(run(jax.random.key(0), 0, 1)), np.asarray(run(jax.random.key(0), 1, 20))
    # Known pixels come back exactly as given.
    np.testing.assert_array_equal(plain[:, 0], 0.5)
    np.testing.assert_array_equal(resampled[:, 0], 0.5)
    # Replacement alone is biased (mean 0.29, the known failure RePaint addresses); resampling with
    # jumps of 1 level, 20 times, harmonises: mean 0.431, variance 0.0079 measured (SE 6e-4, 8e-5).
    assert abs(plain[:, 1].mean() - 0.45) > 0.1
    assert abs(resampled[:, 1].mean() - 0.45) < 0.03
    assert abs(resampled[:, 1].var() - 0.0076) < 0.001 < abs(plain[:, 1].var() - 0.0076)


@functools.cache
def _cond_unet():
    """A small class-conditional U-Net (3 classes, null class 3) with perturbed, non-zero output layers."""
    # ch=64: with one channel per GroupNorm group (ch=32) the norm would erase the time and label embedding.
    model = UNet(ch=64, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 num_classes=3)
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, {"label": t, "drop": t > 0})["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return model, tree.unflatten([0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.slow  # the guidance arithmetic stays in the default suite (stand-in networks, test_text_to_image)
def test_classifier_free_guidance():
    model, params = _cond_unet()
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, y = jnp.array([3, 50, 200, 900]), jnp.array([0, 1, 2, 1])
    cond = {"label": y, "drop": jnp.zeros(4, bool)}
    calls = []
    apply_fn = lambda *a: calls.append(a[0].shape) or model.apply({"params": params}, *a)

    @jax.jit
    def outputs(w):
        # The null class as a label and as 'drop' are the same condition.
        return dict(cond=apply_fn(x, t, cond), uncond=apply_fn(x, t, {"label": jnp.full_like(y, 3)}),
                    guided=S.guided_model_fn(apply_fn, cond, S.null_condition(cond), w)(x, t),
                    unet=S.unet_model_fn(model, params, cond, 2.0)(x, t),
                    unet_cond=S.unet_model_fn(model, params, cond)(x, t))

    o, o2 = outputs(0.0), outputs(2.0)
    assert calls == [(4, 8, 8, 1), (4, 8, 8, 1), (8, 8, 8, 1)]  # guidance: one pass on the 2B stacked batch
    assert not np.allclose(o["cond"], o["uncond"], atol=1e-2)  # the labels matter to this network
    # w = 0 through the guided (batched) path is the conditional model (1e-5: batch-size rounding).
    np.testing.assert_allclose(o["guided"], o["cond"], atol=1e-5)
    np.testing.assert_allclose(o2["guided"], 3 * o["cond"] - 2 * o["uncond"], atol=1e-4)
    np.testing.assert_allclose(o["unet"], o2["guided"], atol=1e-5)
    np.testing.assert_allclose(o["unet_cond"], o["cond"], atol=1e-5)


@pytest.mark.slow  # the same exactness through the command: test_sample_cli.test_editing_keeps_what_it_must
def test_inpainting_unet_keeps_known_pixels_and_img2img_strength0():
    model, params = _cond_unet()
    s = _respaced(8)
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    mask = jnp.zeros((4, 8, 8, 1), bool).at[:, 2:6, 2:6].set(True)
    model_fn = S.unet_model_fn(model, params, {"label": jnp.array([0, 1, 2, 0]), "drop": jnp.zeros(4, bool)}, 1.5)
    for sampler in ("ancestral", "ddim", "dpm_solver++"):
        x = jax.jit(lambda k: S.inpaint(s, "eps", model_fn, k, x0, mask, sampler=sampler, jump_length=2,
                                        jump_n_sample=2))(jax.random.key(0))
        np.testing.assert_array_equal(np.where(mask, 0, x), np.where(mask, 0, x0))
        assert np.abs(np.asarray(x - x0)[np.asarray(mask)]).max() > 0.1  # the hole was generated
    with pytest.raises(ValueError, match=r"sampler='heun' cannot inpaint: .* use one of \['ancestral', 'ddim', "
                                         r"'dpm_solver\+\+'\]"):
        S.inpaint(s, "eps", model_fn, jax.random.key(0), x0, mask, sampler="heun")
    np.testing.assert_array_equal(S.img2img(s, "eps", model_fn, jax.random.key(0), x0, 0), x0)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_masked_img2img_keeps_known_pixels_and_is_img2img_under_a_full_mask():
    model, params = _cond_unet()
    s = _respaced(8)
    x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    model_fn = S.unet_model_fn(model, params, {"label": jnp.array([0, 1, 2, 0]), "drop": jnp.zeros(4, bool)}, 1.5)
    source_fn = S.unet_model_fn(model, params, {"label": jnp.array([2, 0, 1, 1]), "drop": jnp.zeros(4, bool)})
    edit = lambda mask, **kw: np.asarray(jax.jit(lambda k: S.inpaint(
        s, "eps", model_fn, k, x0, mask, sampler="ddim", level=4, **kw))(jax.random.key(0)))
    # Under a mask of everything, DiffEdit's decoding from an inverted start is DDIM image-to-image.
    full = jnp.ones((4, 8, 8, 1), bool)
    want = jax.jit(lambda k: S.img2img(s, "eps", model_fn, k, x0, 4, sampler="ddim", invert=True,
                                       invert_model_fn=source_fn))(jax.random.key(0))
    np.testing.assert_allclose(edit(full, invert=True, invert_model_fn=source_fn), want, atol=3e-4)  # XLA round-off
    mask = jnp.zeros((4, 8, 8, 1), bool).at[:, 1:5, 3:7].set(True)
    for kw in ({}, {"invert": True}):
        x = edit(mask, **kw)
        np.testing.assert_array_equal(np.where(mask, 0, x), np.where(mask, 0, x0))
        assert np.abs(x - np.asarray(x0))[np.asarray(mask)[..., 0]].max() > 0.05  # the masked part was edited
    np.testing.assert_array_equal(S.inpaint(s, "eps", model_fn, jax.random.key(0), x0, mask, level=0), x0)


def test_diffedit_mask_thresholds_the_eps_difference():
    # eps_ref = eps_target + 0.8 on `strong` (two of three channels: mean 0.533) and + 0.3 on `weak`
    # (all channels), for every x_t: the mask is where that mean difference >= threshold * its max.
    s = _respaced(10)
    strong = jnp.zeros((2, 6, 6, 1), bool).at[0, 1:3, 1:4].set(True).at[1, 4:, :2].set(True)
    weak = jnp.zeros((2, 6, 6, 1), bool).at[:, 5, 4:].set(True)
    offset = jnp.where(strong, jnp.array([0.8, 0.8, 0.0]), 0.0) + jnp.where(weak, 0.3, 0.0)
    target = lambda x, t: jnp.sin(3 * x) + t[:, None, None, None] / 1000
    ref = lambda x, t: target(x, t) + offset
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 6, 6, 3)), jnp.float32)
    masks = jax.jit(lambda th, d: S.diffedit_mask(s, "eps", target, ref, jax.random.key(0), x0, 5, num_draws=3,
                                                  threshold=th, dilation=d), static_argnums=1)
    mask = lambda th, d=0: np.asarray(masks(th, d))
    assert mask(0.5).shape == (2, 6, 6, 1)
    np.testing.assert_array_equal(mask(0.5), strong | weak)  # weak: 0.3 / 0.5333 = 0.5625 of the max
    np.testing.assert_array_equal(mask(0.55), strong | weak)
    np.testing.assert_array_equal(mask(0.6), strong)
    np.testing.assert_array_equal(mask(0.9), strong)
    grown = np.zeros((2, 6, 6, 1), bool)
    grown[0, 0:4, 0:5] = grown[1, 3:, :3] = True  # the strong boxes, one pixel wider on every side
    np.testing.assert_array_equal(mask(0.9, 1), grown)


def test_pad_shard_unpad_pads_orders_and_chunks():
    n_dev = jax.local_device_count()
    assert n_dev == 8  # tests/conftest.py
    calls = []

    def fn(c, shard):
        calls.append((c, shard["labels"].shape))
        return {"y": 10 * shard["labels"]}

    labels = np.arange(13)
    seen = []
    out = parallel.pad_shard_unpad(fn, {"labels": labels}, batch_size=5, progress=lambda *a: seen.append(a))
    # batch 5 over 8 devices -> chunks of 8 (1 per device): 13 = 8 + 5 (padded to 8, padding dropped).
    np.testing.assert_array_equal(out["y"], 10 * labels)
    assert calls == [(0, (8, 1)), (1, (8, 1))] and seen == [(8, 13), (13, 13)]


def test_generation_run_keys_frames_and_one_compiled_sampler():
    """Every device and batch has its own noise, the same seed gives the same images, frames end at
    the images, and repeated runs reuse one pmapped sampler."""
    from configs import tiny
    from ddpm_jax import generation
    config = tiny.get_config()
    config.data.image_size, config.data.channels = 8, 1
    config.model.ch, config.model.ch_mult, config.model.attn_resolutions, config.model.num_classes = 16, (1,), (), 3
    config.diffusion.num_timesteps = 6
    config.sampling.update(sampler="ddim", steps=6, guidance=1.0, num_samples=10, batch_size=16)
    params = jax.jit(functools.partial(train_state.init_params, config))(jax.random.key(0))
    req = generation.make_request(config, label="all")
    out = generation.run(config, params, req)
    assert out["images"].shape == (10, 8, 8, 1)
    assert len({img.tobytes() for img in out["images"]}) == 10  # no two rows share noise
    np.testing.assert_array_equal(generation.run(config, params, req)["images"], out["images"])
    req = generation.make_request(config, label="all")
    framed = generation.run(config, params, dataclasses.replace(req, spec=req.spec._replace(num_frames=3)))
    assert framed["frames"].shape == (10, 3, 8, 8, 1)
    np.testing.assert_array_equal(framed["frames"][:, -1], framed["images"])
    assert generation.pmapped_sampler(config, req.spec) is generation.pmapped_sampler(config, req.spec)


def test_forward_trajectory_marginals():
    s = _respaced(50)
    x0 = jnp.full((N, 1), 0.7)
    frames = np.asarray(S.forward_trajectory(s, jax.random.key(0), x0, 5), np.float64)
    for f, pos in zip(frames, D.frame_indices(50, 5)):
        # After step pos the chain is at noise level abar of index pos: N(sqrt(abar) x0, 1 - abar).
        abar = float(s.alphas_cumprod[pos])
        assert abs(f.mean() - 0.7 * np.sqrt(abar)) < 5 * np.sqrt((1 - abar) / N) + 1e-6
        assert abs(f.var() - (1 - abar)) < 5 * (1 - abar) * np.sqrt(2 / N) + 1e-6


LABELS_A, LABELS_B = (0, 1, 2, 0) * 4, (2, 2, 1, 0) * 4


def _train_three_steps(label_dropout: float):
    """Params after 3 train steps on fixed images with labels A and with labels B (8 devices x 2
    examples, same keys), and the initial params."""
    from configs import tiny
    from ddpm_jax import training

    c = tiny.get_config()
    c.data.image_size, c.data.channels = 8, 1
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions, c.model.num_classes = 64, (1,), (), 3
    c.optim.warmup_steps = 0  # (with warmup the first step is lr = 0 and the zero-init output hides all)
    c.training.label_dropout = label_dropout
    state = training.create_train_state(c, 0)
    step = jax.pmap(functools.partial(training.train_step, config=c), axis_name=parallel.AXIS_NAME)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 2, 8, 8, 1)), jnp.float32)
    out = []
    for labels in (LABELS_A, LABELS_B):
        replicated = parallel.replicate(state)
        for _ in range(3):
            replicated, _ = step(replicated, {"image": images, "label": jnp.asarray(labels).reshape(8, 2)})
        out.append(jax.tree.map(lambda a: np.asarray(a)[0], replicated.params))
    return out[0], out[1], jax.device_get(state.params)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_label_dropout_one_makes_training_ignore_labels():
    # label_dropout = 1: every label becomes the null class, so the update is the same for any labels,
    # to the bit, and the real classes' embeddings never move from their initial values.
    p_a, p_b, init = _train_three_steps(1.0)
    jax.tree.map(np.testing.assert_array_equal, p_a, p_b)
    emb, emb0 = p_a["label_emb"]["embedding"], init["label_emb"]["embedding"]
    np.testing.assert_array_equal(emb[:3], emb0[:3])
    assert np.abs(emb[3] - emb0[3]).max() > 1e-4  # the null class (index 3) is what it learns
    # Control: without dropout the labels change the update.
    q_a, q_b, _ = _train_three_steps(0.0)
    assert np.abs(q_a["conv_out"]["kernel"] - q_b["conv_out"]["kernel"]).max() > 1e-6
