"""An adaptive ODE solver, Dormand-Prince 5(4) (Dormand & Prince 1980; the RK45 of scipy and of
score_sde), as one `lax.while_loop`: for the probability-flow ODE, in likelihood
(`evaluation.likelihood.ode_log_likelihood`) and sampling (`sampling.ode_step`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The tableau: nodes, stages, the 5th-order weights (the 7th stage's row: first same as last) and
# the 5th minus the embedded 4th-order weights (the error estimate).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
      -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)


def _plus(y, h, coefficients, ks):
    """y + h sum_j c_j k_j over pytrees (zero coefficients skipped)."""
    terms = [(c, k) for c, k in zip(coefficients, ks) if c]
    return jax.tree.map(lambda y0, *k: y0 + h * sum(c * kj for (c, _), kj in zip(terms, k)), y,
                        *[k for _, k in terms])


def dormand_prince(f, y0, u0: float, u1: float, *, rtol: float, atol: float, max_steps: int = 2000):
    """Integrates dy/du = f(y, u) (y a pytree of float32 arrays) from u0 to u1 > u0 with adaptive steps.

    A step is accepted when its error estimate, as a root mean square of err / (atol + rtol max(|y|,
    |y_new|)) over each leaf, is at most 1 for every leaf (so a small leaf, as log p is beside an
    image, is held to the tolerance too); the next step is h 0.9 err^(-1/5), within [0.2 h, 10 h]
    (Hairer, Norsett & Wanner, Sec. II.4). One `lax.while_loop` (its trip count is the solver's).
    Returns (y(u1), evaluations of f, whether u1 was reached within `max_steps` tries); a solve whose
    step size shrinks below float32's resolution (f not finite, or stiff beyond it) stops there, failed.
    """
    def step(carry):
        u, h, y, k1, evals, tries, _ = carry
        h = jnp.minimum(h, u1 - u)
        last = h >= u1 - u
        ks = [k1]
        for c, a in zip(_C[1:], _A[1:]):
            ks.append(f(_plus(y, h, a, ks), u + c * h))
        y_new = _plus(y, h, _B, ks)
        k7 = f(y_new, u + h)
        err = _plus(jax.tree.map(jnp.zeros_like, y), h, _E, ks + [k7])
        ratios = jax.tree.map(lambda e, a, b: jnp.sqrt(jnp.mean(
            (e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))) ** 2)), err, y, y_new)
        norm = jnp.max(jnp.stack(jax.tree.leaves(ratios)))
        ok = jnp.isfinite(norm) & (norm <= 1.0)
        factor = jnp.where(jnp.isfinite(norm), jnp.clip(0.9 * norm ** -0.2, 0.2, 10.0), 0.2)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        u = jnp.where(ok, jnp.where(last, u1, u + h), u)
        return u, h * factor, keep(y_new, y), keep(k7, k1), evals + 6, tries + 1, ok & last

    def going(carry):
        u, h, *_, tries, done = carry
        # A step size below float32's resolution at u can never move u: the solve has failed (e.g. f is NaN).
        return ~done & (tries < max_steps) & (u + h > u)

    u0, u1 = jnp.asarray(u0, jnp.float32), jnp.asarray(u1, jnp.float32)
    carry = (u0, (u1 - u0) / 100, y0, f(y0, u0), jnp.int32(1), jnp.int32(0), jnp.bool_(False))
    _, _, y, _, evals, _, done = jax.lax.while_loop(going, step, carry)
    return y, evals, done
