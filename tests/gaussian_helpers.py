"""Gaussian data N(mu, Sigma): sample checks and the exact float64 law of a sampler chain on it.

With the exact denoiser (`gaussian_eps_model`) every ancestral or DDIM step is affine in x plus
Gaussian noise, so the law of the chain's output is Gaussian with a mean and covariance computed
here in float64 by composing the steps, independently of the JAX code.

The exact denoiser: for x_0 ~ N(mu, Sigma) (vectors of d pixels), x_t = a_t x_0 + s_t eps with
a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t) is Gaussian with covariance C_t = a_t^2 Sigma + s_t^2 I,
and eps, x_t are jointly Gaussian with Cov(eps, x_t) = s_t I, so E[eps | x_t] = s_t C_t^{-1} (x_t - a_t mu).
"""
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import Schedule

GAUSS_MU = np.array([0.3, -0.2, 0.1, 0.0])
_L = np.array([[0.20, 0, 0, 0], [0.10, 0.15, 0, 0], [-0.05, 0.05, 0.10, 0], [0.02, -0.03, 0.04, 0.12]])
GAUSS_SIGMA = _L @ _L.T  # non-diagonal, std 0.12..0.2


def gaussian_eps_model(s: Schedule, mu: np.ndarray, Sigma: np.ndarray):
    """model_fn(x_t `[B, d]`, t `[B]`) -> E[eps | x_t], built in float64, evaluated in float32.

    `t` indexes `s.alphas_cumprod` of the full schedule whose model timesteps are `s.timesteps`;
    for a respaced schedule pass the original full schedule here.
    """
    abar = np.asarray(s.alphas_cumprod, np.float64)
    a, sd = np.sqrt(abar), np.sqrt(1 - abar)
    mu, Sigma = np.asarray(mu, np.float64), np.asarray(Sigma, np.float64)
    C_inv = np.linalg.inv(a[:, None, None] ** 2 * Sigma + sd[:, None, None] ** 2 * np.eye(len(mu)))
    W = jnp.asarray(sd[:, None, None] * C_inv, jnp.float32)
    a32, mu32 = jnp.asarray(a, jnp.float32), jnp.asarray(mu, jnp.float32)

    def model_fn(x_t, t):
        return jnp.einsum("bij,bj->bi", W[t], x_t - a32[t][:, None] * mu32)

    return model_fn


def check_gaussian_samples(x, mu=GAUSS_MU, Sigma=GAUSS_SIGMA, bias=0.0):
    """Sample mean and covariance of `x` [N, d] against N(mu, Sigma).

    Tolerance = 5 standard errors (mean: sqrt(Sigma_ii/N); covariance: sqrt((S_ii S_jj + S_ij^2)/N))
    plus `bias`, the discretisation error allowed for the sampler (absolute, on each entry).
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    se_mean = np.sqrt(np.diag(Sigma) / n)
    se_cov = np.sqrt((np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma ** 2) / n)
    assert np.all(np.abs(x.mean(0) - mu) < 5 * se_mean + bias), (x.mean(0), mu)
    assert np.all(np.abs(np.cov(x.T) - Sigma) < 5 * se_cov + bias), (np.cov(x.T), Sigma)


def eps_model64(abar_full, mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """E[eps | x_t] = W_t (x_t - a_t mu) for original timestep t: returns t -> (W_t, a_t)."""
    def at(t):
        a, sd = np.sqrt(abar_full[t]), np.sqrt(1 - abar_full[t])
        return sd * np.linalg.inv(a ** 2 * Sigma + sd ** 2 * np.eye(len(mu))), a
    return at


def step64(abar, abar_prev, W, a_model, mu, sampler, eta=0.0, variance="fixedlarge"):
    """One reverse step (no clipping) as x_prev = M x + c + N(0, var I): returns (M, c, var).

    abar, abar_prev: the chain's noise levels at this step and the next (1 at the last step);
    W, a_model: the denoiser at this step's model timestep.
    """
    d = len(mu)
    E, e = W, -a_model * W @ mu  # eps = E x + e
    X, xc = (np.eye(d) - np.sqrt(1 - abar) * E) / np.sqrt(abar), -np.sqrt(1 - abar) * e / np.sqrt(abar)
    beta = 1 - abar / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    last = abar_prev == 1.0
    if sampler == "ancestral":
        c1, c2 = beta * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
        var = 0.0 if last else (beta if variance == "fixedlarge" else beta_tilde)
        return c1 * X + c2 * np.eye(d), c1 * xc, var
    var = eta ** 2 * beta_tilde
    k = np.sqrt(max(1 - abar_prev - var, 0.0))
    return np.sqrt(abar_prev) * X + k * E, np.sqrt(abar_prev) * xc + k * e, var


def chain_law(abar_full, timesteps, levels, m, P, sampler, eta=0.0, variance="fixedlarge",
              mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """Mean and covariance after the reverse steps from level `levels` down to 0, starting from
    N(m, P). The chain visits original timesteps `timesteps` (its noise levels abar_full[timesteps]).
    m may be `[N, d]` (N starting points; P ignored, pass None): then only the means are returned."""
    model = eps_model64(abar_full, mu, Sigma)
    abar = abar_full[timesteps]
    for i in range(levels - 1, -1, -1):
        W, a = model(timesteps[i])
        M, c, var = step64(abar[i], abar[i - 1] if i else 1.0, W, a, mu, sampler, eta, variance)
        m = m @ M.T + c
        if P is not None:
            P = M @ P @ M.T + var * np.eye(len(mu))
    return m, P


def ddim_invert64(abar_full, timesteps, x0, mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """DDIM inversion of points x0 `[N, d]` from level 0 to the top: eps from the denoiser at x (level i)
    and timestep t_i, x <- sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps, x0_hat at x's own level."""
    model = eps_model64(abar_full, mu, Sigma)
    abar = abar_full[timesteps]
    x = np.asarray(x0, np.float64)
    for i in range(len(timesteps)):
        W, a = model(timesteps[i])
        eps = (x - a * mu) @ W.T
        here = abar[i - 1] if i else 1.0
        x = np.sqrt(abar[i]) * (x - np.sqrt(1 - here) * eps) / np.sqrt(here) + np.sqrt(1 - abar[i]) * eps
    return x


def continuous_eps_model(s, mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """model_fn(x_t `[B, d]`, t `[B]`) -> E[eps | x_t] for float timesteps too (JAX, float32).

    t is mapped to a noise level by the inverse of the samplers' interpolation: log sigma is
    piecewise linear in t on `s.model_t`, `s.model_log_sigma`, abar = 1/(1 + sigma^2). In the
    eigenbasis Sigma = U diag(lam) U^T, E[eps | x_t] = U diag(sd / (a^2 lam + sd^2)) U^T (x_t - a mu).
    """
    import jax.numpy as jnp
    lam, U = np.linalg.eigh(np.asarray(Sigma, np.float64))
    lam, U, mu32 = jnp.asarray(lam, jnp.float32), jnp.asarray(U, jnp.float32), jnp.asarray(mu, jnp.float32)

    def model_fn(x_t, t):
        sigma = jnp.exp(jnp.interp(t.astype(jnp.float32), s.model_t, s.model_log_sigma))[:, None]
        a = 1.0 / jnp.sqrt(1.0 + sigma ** 2)
        sd = sigma * a
        y = (x_t - a * mu32) @ U
        return (y * sd / (a ** 2 * lam + sd ** 2)) @ U.T

    return model_fn


def denoiser64(abar, mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """E[x_0 | x_t] = K x_t + b at noise level abar (float64): returns (K, b)."""
    a, sd = np.sqrt(abar), np.sqrt(1 - abar)
    K = a * Sigma @ np.linalg.inv(a * a * Sigma + sd * sd * np.eye(len(mu)))
    return K, mu - a * K @ mu


def dpm_solver_pp64(abar_levels, mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in float64 as the affine map x_T -> x_0 = M x_T + c,
    on levels with noise `abar_levels` (`[S]`, level L at index L - 1; level 0 is data), first order
    for the first step and the steps into level 1 and to data."""
    a = np.concatenate([[1.0], np.sqrt(abar_levels)])
    sd = np.concatenate([[0.0], np.sqrt(1 - abar_levels)])
    lam = lambda L: np.log(a[L] / sd[L])
    d = len(mu)
    M, c, prev = np.eye(d), np.zeros(d), None
    for i in range(len(abar_levels) - 1, -1, -1):  # level i + 1 -> i
        K, b = denoiser64(abar_levels[i], mu, Sigma)
        DM, Dc = K @ M, K @ c + b  # x0_hat = DM x_T + Dc
        EM, Ec = DM, Dc
        if prev is not None and i >= 2:
            r = (lam(i + 1) - lam(i + 2)) / (lam(i) - lam(i + 1))
            EM, Ec = (1 + 1 / (2 * r)) * DM - prev[0] / (2 * r), (1 + 1 / (2 * r)) * Dc - prev[1] / (2 * r)
        coef = a[i] - sd[i] * a[i + 1] / sd[i + 1]
        M, c = sd[i] / sd[i + 1] * M + coef * EM, sd[i] / sd[i + 1] * c + coef * Ec
        prev = (DM, Dc)
    return M, c


def heun64(sigma_max, sigma_min, n, rho=7.0, mu=GAUSS_MU, Sigma=GAUSS_SIGMA):
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1) in float64 as the affine map
    x_T -> x_0 = M x_T + c, for x_T the variance-preserving x at sigma_max (x_ve = x_T sqrt(1 + sigma_max^2)),
    on n Karras noise levels (rho = 7) from sigma_max to sigma_min, then 0."""
    k = np.arange(n) / max(n - 1, 1)
    sig = np.append((sigma_max ** (1 / rho) + k * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho, 0.0)

    def denoise(sg):  # x0_hat = K x_ve + b
        K, b = denoiser64(1 / (1 + sg * sg), mu, Sigma)
        return K / np.sqrt(1 + sg * sg), b

    d = len(mu)
    M, c = np.eye(d) * np.sqrt(1 + sigma_max ** 2), np.zeros(d)
    for s0, s1 in zip(sig[:-1], sig[1:]):
        K, b = denoise(s0)
        dM, dc = (M - K @ M) / s0, (c - K @ c - b) / s0
        Me, ce = M + (s1 - s0) * dM, c + (s1 - s0) * dc
        if s1 > 0:
            K, b = denoise(s1)
            Me, ce = M + (s1 - s0) * (dM + (Me - K @ Me) / s1) / 2, c + (s1 - s0) * (dc + (ce - K @ ce - b) / s1) / 2
        M, c = Me, ce
    return M, c



def gaussian_v_model(s: Schedule, mu: np.ndarray, Sigma: np.ndarray):
    """model_fn(x_t `[B, d]`, t `[B]`) -> E[v | x_t] = a_t E[eps | x_t] - s_t E[x_0 | x_t], finite at every
    level, pure noise (a_t = 0) included, where it is -mu. E[x_0 | x_t] = mu + a_t Sigma C_t^{-1} (x_t - a_t mu)."""
    abar = np.asarray(s.alphas_cumprod, np.float64)
    a, sd = np.sqrt(abar)[:, None, None], np.sqrt(1 - abar)[:, None, None]
    mu, Sigma = np.asarray(mu, np.float64), np.asarray(Sigma, np.float64)
    C_inv = np.linalg.inv(a ** 2 * Sigma + sd ** 2 * np.eye(len(mu)))
    W = jnp.asarray(a * sd * (np.eye(len(mu)) - Sigma) @ C_inv, jnp.float32)
    a32, sd32, mu32 = (jnp.asarray(v, jnp.float32) for v in (a[:, 0, 0], sd[:, 0, 0], mu))

    def model_fn(x_t, t):
        return jnp.einsum("bij,bj->bi", W[t], x_t - a32[t][:, None] * mu32) - sd32[t][:, None] * mu32

    return model_fn
