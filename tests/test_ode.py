"""The adaptive ODE solver (`ddpm_jax.ode`) against a closed form."""
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import ode


def test_dormand_prince_on_a_closed_form():
    """dy/du = -2 u y from 0 to 2: y = exp(-u^2), to its tolerance, in few steps (a lower order, or a
    wrong weight, would need many more or miss), through an ODE whose steps shrink and grow."""
    for rtol, steps in ((1e-4, 20), (1e-8, 120)):
        y, evals, done = jax.jit(lambda: ode.dormand_prince(lambda y, u: -2.0 * u * y, jnp.ones(2), 0.0, 2.0,
                                                            rtol=rtol, atol=0.0))()
        assert bool(done) and (evals - 1) % 6 == 0 and (evals - 1) // 6 < steps, (evals, rtol)
        np.testing.assert_allclose(y, np.exp(-4.0), rtol=20 * rtol + 2e-6)  # the global error of local tolerance
    _, _, done = ode.dormand_prince(lambda y, u: -2.0 * u * y, jnp.ones(2), 0.0, 2.0, rtol=1e-8, atol=0.0,
                                    max_steps=5)
    assert not bool(done)


def test_a_solve_that_cannot_advance_stops_early_and_says_so():
    # f is NaN from the start: every step is rejected and h shrinks 5x per try until u + h == u,
    # well before max_steps (which would cost 6 evaluations per try).
    _, evals, done = jax.jit(lambda: ode.dormand_prince(lambda y, u: y * jnp.nan, jnp.ones(2), 1.0, 2.0, rtol=1e-5,
                                                        atol=1e-5))()
    assert not bool(done) and 1 < (evals - 1) // 6 < 30, evals
