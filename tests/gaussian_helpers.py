"""Gaussian data N(mu, Sigma): sample checks and the exact float64 law of a sampler chain on it.

With the exact denoiser (`ddpm_jax.analytic.gaussian_eps_model`) every ancestral or DDIM step is
affine in x plus Gaussian noise, so the law of the chain's output is Gaussian with a mean and
covariance computed here in float64 by composing the steps, independently of the JAX code.
"""
import numpy as np

GAUSS_MU = np.array([0.3, -0.2, 0.1, 0.0])
_L = np.array([[0.20, 0, 0, 0], [0.10, 0.15, 0, 0], [-0.05, 0.05, 0.10, 0], [0.02, -0.03, 0.04, 0.12]])
GAUSS_SIGMA = _L @ _L.T  # non-diagonal, std 0.12..0.2


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
