"""The Ho et al. U-Net: size, dtypes, dropout, determinism, and that it can fit a batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar10, tiny
from ddpm_jax import diffusion as D
from ddpm_jax.models import UNet, unet_from_config


def _init(model, shape=(2, 32, 32, 3), y=None):
    x, t = jnp.zeros(shape), jnp.zeros((shape[0],), jnp.int32)
    return jax.jit(model.init)({"params": jax.random.key(0)}, x, t, y)["params"]  # eager init is slow


def _perturbed(params, key=1, scale=0.05):
    """Params with noise added, so zero-initialised output layers no longer hide the network."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return tree.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_cifar10_parameter_count_is_the_papers():
    model = unet_from_config(cifar10.get_config())
    shapes = jax.eval_shape(lambda: _init(model))
    assert sum(p.size for p in jax.tree.leaves(shapes)) == 35_746_307
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_shapes_dtypes_and_float32_params_under_bfloat16():
    cfg = tiny.get_config()
    cfg.model.dtype = "bfloat16"
    cfg.model.attn_resolutions = (8,)
    model = unet_from_config(cfg)
    params = _init(model, (2, 16, 16, 3))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = jax.jit(model.apply)({"params": _perturbed(params)}, jnp.ones((2, 16, 16, 3)), jnp.array([3, 7]))
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    # The activations really are bfloat16: the convolutions take bf16 operands.
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, jnp.ones((1, 16, 16, 3)), jnp.array([3])))(params))
    convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
    assert convs and all("bf16" in line for line in convs)


@pytest.mark.slow
def test_zero_init_output_and_attention_at_16():
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)
    params = _init(model)
    out = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)), jnp.array([1, 2]))
    np.testing.assert_array_equal(out, 0.0)  # conv_out is zero-initialised
    assert "down_1_attn_0" in params and "down_0_attn_0" not in params and "mid_attn_1" in params



def test_attention_stays_at_its_levels_on_larger_inputs():
    """Trained at 16 with attention at 16 (level 0), applied at 32: the same layers run (attention
    at level 0, where the 32x32 features are), not attention wherever 16x16 features are met."""
    from ddpm_jax.models.unet import AttnBlock
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, resolution=16)
    params = jax.eval_shape(lambda: _init(model, (1, 16, 16, 3)))  # traced only: shapes, nothing compiled

    def called(size):
        out, state = jax.eval_shape(lambda p: model.apply(
            {"params": p}, jnp.ones((1, size, size, 3)), jnp.array([3]),
            capture_intermediates=lambda mdl, _: isinstance(mdl, AttnBlock), mutable=["intermediates"]), params)
        assert out.shape == (1, size, size, 3)
        return sorted(state["intermediates"])

    assert called(32) == called(16) == ["down_0_attn_0", "mid_attn_1", "up_0_attn_0", "up_0_attn_1"]
    assert unet_from_config(tiny.get_config()).resolution == tiny.get_config().data.image_size


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_coord_channels_are_the_only_difference_they_make():
    """The two channels hold each pixel's row and column; with their conv_in weights zeroed the
    model is the model without them (to float32 rounding: the convolution sums 5 channels, not 3)."""
    from ddpm_jax.models.unet import coordinate_channels
    c = coordinate_channels(jnp.zeros((2, 3, 5, 1)))
    assert c.shape == (2, 3, 5, 2)
    np.testing.assert_array_equal(c[1, :, 4, 0], [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(c[1, 2, :, 1], [-1.0, -0.5, 0.0, 0.5, 1.0])
    kw = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    coord, plain = UNet(coord_channels=True, **kw), UNet(**kw)
    params = _perturbed(_init(coord, (1, 8, 8, 3)))
    assert params["conv_in"]["kernel"].shape == (3, 3, 5, 32)
    x, t = jax.random.normal(jax.random.key(3), (2, 8, 8, 3)), jnp.array([1, 9])
    cut = {**params, "conv_in": {**params["conv_in"], "kernel": params["conv_in"]["kernel"][:, :, :3]}}
    zeroed = {**params, "conv_in": {**params["conv_in"], "kernel": params["conv_in"]["kernel"].at[:, :, 3:].set(0.0)}}
    out = coord.apply({"params": params}, x, t)
    np.testing.assert_allclose(coord.apply({"params": zeroed}, x, t), plain.apply({"params": cut}, x, t), atol=1e-5)
    assert np.abs(out - plain.apply({"params": cut}, x, t)).max() > 1e-3


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_attention_sees_positions_only_with_the_position_embedding():
    from ddpm_jax.models.unet import AttnBlock, position_embedding, timestep_embedding

    pos = np.asarray(position_embedding(3, 4, 10))
    assert pos.shape == (12, 10)
    np.testing.assert_allclose(pos[4 * 2 + 1, :5], timestep_embedding(jnp.array([2]), 5)[0])  # row 2
    np.testing.assert_allclose(pos[4 * 2 + 1, 5:], timestep_embedding(jnp.array([1]), 5)[0])  # column 1
    # Self-attention without positions commutes with any permutation of the pixels; with them, not.
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    perm = np.random.default_rng(0).permutation(16)
    shuffle = lambda a: a.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8)
    for position in (False, True):
        block = AttnBlock(position=position)
        params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape),
                              block.init(jax.random.key(2), x))
        out, out_shuffled = block.apply(params, x), block.apply(params, shuffle(x))
        assert np.allclose(shuffle(out), out_shuffled, atol=1e-5) == (not position)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_dropout_only_in_training_and_determinism():
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.5)
    params = _perturbed(_init(model))
    x, t = jax.random.normal(jax.random.key(2), (2, 32, 32, 3)), jnp.array([5, 50])
    apply = lambda train, key: model.apply({"params": params}, x, t, train=train, rngs={"dropout": jax.random.key(key)})
    np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
    np.testing.assert_array_equal(apply(True, 3), apply(True, 3))
    assert not np.allclose(apply(True, 3), apply(True, 4))
    assert not np.allclose(apply(True, 3), apply(False, 3))


def test_class_conditioning_uses_labels():
    model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=10)
    params = _perturbed(_init(model, (2, 8, 8, 3), {"label": jnp.zeros((2,), jnp.int32)}))
    assert params["label_emb"]["embedding"].shape == (11, 128)  # 10 classes + the null class
    x, t = jnp.ones((2, 8, 8, 3)), jnp.array([5, 5])
    apply = lambda y, drop=(False, False): model.apply({"params": params}, x, t,
                                                       {"label": jnp.array(y), "drop": jnp.array(drop)})
    a, b = apply([1, 1]), apply([1, 2])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[1], b[1])
    np.testing.assert_array_equal(apply([1, 2], (True, False)), apply([10, 2]))  # drop = the null class


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_tiny_unet_overfits_one_batch():
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    s = D.make_schedule(D.linear_betas(100, 1e-3, 0.2))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.uniform(k1, (8, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jax.random.randint(k3, (8,), 0, 100)
    x_t = D.q_sample(s, x0, t, noise)
    params = _init(model, x0.shape)
    opt = optax.adam(3e-3)

    def loss_fn(p):
        return D.l_simple(s, "eps", model.apply({"params": p}, x_t, t), x0, noise, t).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    o = opt.init(params)
    first = float(loss_fn(params))
    for _ in range(60):
        params, o, loss = step(params, o)
    # At init the output is 0, so the loss is E[eps^2] ~ 1; fitting one fixed batch drives it down 10x.
    assert 0.7 < first < 1.3
    assert float(loss_fn(params)) < first / 10


@pytest.mark.slow
def test_remat_keeps_params_outputs_and_gradients_and_recomputes_in_the_backward_pass():
    kwargs = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.3)
    plain, remat = UNet(**kwargs), UNet(**kwargs, remat=True)
    x, t = jax.random.normal(jax.random.key(2), (2, 8, 8, 3)), jnp.array([5, 50])
    shapes = [jax.eval_shape(lambda: m.init({"params": jax.random.key(0)}, x, t))["params"]
              for m in (plain, remat)]
    assert shapes[0] == shapes[1]  # same names and shapes: a checkpoint loads either way
    leaves, tree = jax.tree.flatten(shapes[0])  # random params (no init to compile), none of them zero
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    def loss(model, p):  # train=True: dropout must draw the same masks when a block is recomputed
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(out ** 2), out

    traced = [jax.jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True)).trace(params)
              for m in (plain, remat)]
    (l1, out1), g1 = traced[0].lower().compile()(params)
    (l2, out2), g2 = traced[1].lower().compile()(params)
    # Bitwise equal at JAX 0.10; JAX 0.5's XLA fuses the rematerialised graph differently (2e-7 apart).
    # Another dropout mask would move the outputs by ~0.1.
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
    assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 0
    # Each block is one rematerialised call: 1 + 2 + 2 res blocks (down, middle, up) and 1 + 1 + 2
    # attention blocks at 8x8.
    count = [str(tr.jaxpr).count(" remat2[") for tr in traced]
    assert count == [0, 5 + 4]
def test_float_timesteps():
    # Heun evaluates the network between its timesteps: the sinusoidal embedding takes float t, equal to
    # the integer embedding at whole values and continuous in between.
    from ddpm_jax.models.unet import timestep_embedding
    t = jnp.array([0, 1, 17, 999])
    np.testing.assert_array_equal(timestep_embedding(t.astype(jnp.float32), 64), timestep_embedding(t, 64))
    mid = timestep_embedding(jnp.array([17.5]), 64)[0]
    lo, hi = timestep_embedding(jnp.array([17, 18]), 64)
    assert 0 < np.abs(mid - lo).max() < np.abs(hi - lo).max()


def test_learned_range_doubles_the_output_channels():
    # diffusion.variance='learned_range': the model output and the variance output, C channels each.
    cfg = tiny.get_config()
    assert unet_from_config(cfg).out_ch == 3
    cfg.diffusion.variance = "learned_range"
    assert unet_from_config(cfg).out_ch == 6


@pytest.mark.parametrize("padding, pads", [("same", ((0, 1), (0, 1))), ("symmetric", ((1, 1), (1, 1)))])
def test_the_strided_conv_pads_as_its_field_says(padding, pads):
    """'same' as TensorFlow (Ho et al.): 0 before, 1 after; 'symmetric' as PyTorch's padding=1 (ADM)."""
    model = UNet(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 downsample_padding=padding)
    x, t = jax.random.normal(jax.random.key(2), (1, 8, 8, 3)), jnp.array([5])
    params = _perturbed(_init(model, (1, 8, 8, 3)))
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))({"params": params}, x, t)
    seen = state["intermediates"]
    conv = params["down_0_downsample"]
    expected = jax.lax.conv_general_dilated(seen["down_0_block_0"]["__call__"][0], conv["kernel"], (2, 2), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
    np.testing.assert_allclose(seen["down_0_downsample"]["__call__"][0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_nichol_and_dhariwal_options_keep_remat_equal_and_change_the_network():
    """Scale-shift norm, residual resampling and 2 heads (tests/test_diffusers_weights.py checks them
    against diffusers): remat changes nothing, and each option changes the network."""
    options = dict(scale_shift_norm=True, resblock_updown=True, attn_head_dim=16, time_embedding="adm")
    kwargs = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    x, t = jax.random.normal(jax.random.key(2), (2, 8, 8, 3)), jnp.array([5, 50])
    params = _perturbed(_init(UNet(**kwargs, **options), (2, 8, 8, 3)), scale=0.2)
    assert params["down_0_block_0"]["temb_proj"]["kernel"].shape == (128, 64)  # a scale and a shift
    assert "norm1" in params["down_0_downsample"] and "norm1" in params["up_1_upsample"]
    out = UNet(**kwargs, **options).apply({"params": params}, x, t)
    np.testing.assert_allclose(UNet(**kwargs, **options, remat=True).apply({"params": params}, x, t), out,
                               rtol=1e-5, atol=1e-6)
    for name, plain in [("attn_head_dim", 0), ("time_embedding", "ddpm")]:
        other = UNet(**kwargs, **{**options, name: plain}).apply({"params": params}, x, t)
        assert np.abs(other - out).max() > 1e-3, name
