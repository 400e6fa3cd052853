"""bfloat16 compute with float32 params, loss, EMA and Adam state follows the float32 loss curve."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import digits
from ddpm_jax import parallel, training


def _loss_curve(dtype: str, num_steps: int = 150):
    c = digits.get_config()
    c.model.dtype = dtype
    c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2), 1
    c.model.dropout = 0.0
    c.training.batch_size = 64
    c.optim.warmup_steps = 10
    images = (load_digits().images / 16.0 * 2.0 - 1.0).astype(np.float32)[..., None]
    rng = np.random.default_rng(0)  # the same batches for both dtypes
    n_dev = jax.local_device_count()
    p_step = jax.pmap(functools.partial(training.train_step, config=c), axis_name=parallel.AXIS_NAME)
    state = parallel.replicate(training.create_train_state(c, 0))
    losses = []
    for _ in range(num_steps):
        batch = images[rng.choice(len(images), c.training.batch_size)]
        state, m = p_step(state, {"image": batch.reshape((n_dev, -1) + batch.shape[1:]),
                                  "label": np.zeros((n_dev, c.training.batch_size // n_dev), np.int32)})
        losses.append(m["loss"])
    host = parallel.to_host(state)
    return np.array([float(parallel.to_host(loss)) for loss in losses]), host


@pytest.mark.slow  # ~2 CPU-minutes: bf16 convolutions are slow on CPU
def test_bfloat16_loss_curve_matches_float32():
    f32, s32 = _loss_curve("float32")
    bf16, s16 = _loss_curve("bfloat16")
    for tree in (s16.params, s16.ema_params, s16.opt_state):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))
    # Both learn: the loss over the last 50 steps is well under the first 10 steps'.
    for curve in (f32, bf16):
        assert curve[-50:].mean() < 0.5 * curve[:10].mean()
    # The same data, timesteps and noise: per-step losses are noisy (each batch draws its own t), so
    # compare 50-step means; bf16's ~3 significant digits move them by a few percent at most.
    np.testing.assert_allclose(bf16[-50:].mean(), f32[-50:].mean(), rtol=0.1)
    np.testing.assert_allclose(bf16[:50].mean(), f32[:50].mean(), rtol=0.1)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_the_ode_sampler_runs_a_bfloat16_model_in_float32():
    """An adaptive solver's error estimate would measure bfloat16's rounding, so the ode sampler builds
    the network in float32: a bfloat16 config samples exactly what its float32 twin samples."""
    from configs import tiny
    from ddpm_jax import generation
    from ddpm_jax.train_state import init_params

    images = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny.get_config()
        c.data.image_size, c.data.channels, c.model.dtype = 8, 1, dtype
        c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 16, (1,), ()
        c.diffusion.num_timesteps = c.sampling.steps = 20
        c.sampling.update(sampler="ode", ode_tolerance=1e-3, num_samples=8, batch_size=8)
        params = init_params(c, jax.random.key(0))
        # The output layer starts at zero (eps = 0 in any dtype): give it weights, the same for both.
        kernel = params["conv_out"]["kernel"]
        params["conv_out"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(1), kernel.shape, kernel.dtype)
        images[dtype] = generation.run(c, params, generation.make_request(c))["images"]
    assert np.isfinite(images["float32"]).all()
    np.testing.assert_array_equal(images["bfloat16"], images["float32"])
