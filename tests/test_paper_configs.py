"""The paper's 256x256 configs: the official code's settings, and its parameter counts.

The expected counts come from the official U-Net (hojonathanho/diffusion, diffusion_tf/models/unet.py)
written out below layer by layer, independently of ddpm_jax.models.
"""
import jax
import pytest

from ddpm_jax import defaults, validation
from ddpm_jax.train_state import init_params


def official_unet_params(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_ch=3, out_ch=3):
    """Parameter count of the official `unet.model`: every conv2d, dense/nin and group_norm (gamma, beta)."""
    conv3 = lambda cin, cout: 9 * cin * cout + cout
    dense = lambda cin, cout: cin * cout + cout
    norm = lambda c: 2 * c
    temb_ch = 4 * ch

    def resnet_block(cin, cout):  # norm1, conv1, temb_proj, norm2, conv2, nin_shortcut if C changes
        n = norm(cin) + conv3(cin, cout) + dense(temb_ch, cout) + norm(cout) + conv3(cout, cout)
        return n + (dense(cin, cout) if cin != cout else 0)

    attn_block = lambda c: norm(c) + 4 * dense(c, c)  # norm, q, k, v, proj_out

    total = dense(ch, temb_ch) + dense(temb_ch, temb_ch) + conv3(in_ch, ch)  # temb dense0/1, conv_in
    skips, c, res = [ch], ch, resolution
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += resnet_block(c, ch * mult)
            c = ch * mult
            total += attn_block(c) if res in attn_resolutions else 0
            skips.append(c)
        if level != len(ch_mult) - 1:
            total += conv3(c, c)  # downsample with conv
            skips.append(c)
            res //= 2
    total += 2 * resnet_block(c, c) + attn_block(c)  # mid
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += resnet_block(c + skips.pop(), ch * mult)
            c = ch * mult
            total += attn_block(c) if res in attn_resolutions else 0
        if level != 0:
            total += conv3(c, c)  # upsample with conv
            res *= 2
    return total + norm(c) + conv3(c, out_ch)  # norm_out, conv_out


def test_the_counter_gives_the_known_cifar10_count():
    assert official_unet_params(128, (1, 2, 2, 2), 2, (16,), 32) == 35_746_307


OFFICIAL = {  # config: (dataset, random flips, steps, ch)
    "celebahq256": ("folder", True, 500_000, 128),  # run_celebahq.py, randflip=1
    "lsun_church256": ("lsun/church_outdoor", True, 1_200_000, 128),  # run_lsun.py church command
    "lsun_bedroom256": ("lsun/bedroom", True, 2_400_000, 128),  # run_lsun.py bedroom command
    "lsun_cat256": ("lsun/cat", False, 1_800_000, 128),  # run_lsun.py cat command: --randflip 0
    "lsun_bedroom256_large": ("lsun/bedroom", True, 1_150_000, 192),  # the paper's ~256M model
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_256_configs_have_the_official_settings_and_parameter_count(name):
    c = defaults.load_config_file(f"configs/{name}.py")
    dataset, flips, steps, ch = OFFICIAL[name]
    assert (c.data.dataset, c.data.random_flip, c.training.num_train_steps) == (dataset, flips, steps)
    assert (c.data.image_size, c.data.channels) == (256, 3)
    assert (tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions)) == (
        (1, 1, 2, 2, 4, 4), 2, (16,))
    assert (c.model.dropout, c.model.num_classes, c.model.remat) == (0.0, 0, False)
    o = c.optim
    assert (o.learning_rate, o.warmup_steps, o.grad_clip, o.ema_decay) == (2e-5, 5000, 1.0, 0.9999)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)  # Adam's standard values
    assert c.training.batch_size == 64
    d = c.diffusion
    assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert (d.model_output, d.variance, d.clip_x0) == ("eps", "fixedsmall", True)  # diffusion_utils.py

    if dataset == "folder":
        c.data.data_dir = "/data/celebahq"
    validation.validate_config(c, num_devices=16)  # a v4-32 slice: 16 chips, 4 images each
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))  # nothing allocated
    count = sum(p.size for p in jax.tree.leaves(shapes))
    assert count == official_unet_params(ch, (1, 1, 2, 2, 4, 4), 2, (16,), 256)
    assert round(count / 1e6) == {128: 114, 192: 256}[ch]  # the paper: 114M, and ~256M for the larger bedroom


def test_sr_64_256_has_the_upsampler_sizes_and_validates():
    c = defaults.load_config_file("configs/sr_64_256.py")
    m = c.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (192, (1, 1, 2, 2, 4, 4), 2,
                                                                                     (32, 16, 8))
    assert (m.low_res_size, c.data.image_size, m.text_encoder, c.diffusion.variance, c.diffusion.model_output) == (
        64, 256, "precomputed", "learned_range", "v")
    c.data.data_dir = "/data/captioned"
    validation.validate_config(c, num_devices=16)
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    assert shapes["conv_in"]["kernel"].shape == (3, 3, 6, 192)  # x_t and the upsampled input, on channels
    assert shapes["conv_out"]["kernel"].shape[-1] == 6  # v and the variance interpolation


def test_t2i_64_is_the_base_of_sr_64_256_and_validates_with_a_frozen_t5(tmp_path):
    """The Imagen-like base stage: guided-diffusion's 64x64 sizes, T5-XXL-wide precomputed text, and the
    same folder embeddings as its second stage; with a frozen T5's folder it validates before training."""
    c = defaults.load_config_file("configs/t2i_64.py")
    sr = defaults.load_config_file("configs/sr_64_256.py")
    m = c.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (192, (1, 2, 3, 4), 3,
                                                                                     (32, 16, 8))
    assert (c.data.image_size, sr.model.low_res_size) == (64, 64)
    assert (m.text_encoder, m.text_emb_dim, c.data.max_text_len) == (sr.model.text_encoder, sr.model.text_emb_dim,
                                                                     sr.data.max_text_len) == ("precomputed", 4096, 128)
    c.data.data_dir = "/data/captioned"
    validation.validate_config(c, num_devices=16)
    count = sum(p.size for p in jax.tree.leaves(jax.eval_shape(lambda: init_params(c, jax.random.key(0)))))
    assert round(count / 1e6) == 281  # the docstring's
    (tmp_path / "config.json").write_text('{"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "num_heads": 64, '
                                          '"d_ff": 10240, "num_layers": 24, "feed_forward_proj": "gated-gelu"}')
    c.model.text_encoder_path = str(tmp_path)  # T5-XXL's config.json (google/t5-v1_1-xxl)
    validation.validate_config(c, num_devices=16)
    c.model.text_emb_dim = 2048
    with pytest.raises(validation.UserError, match="makes 4096-wide embeddings; set model.text_emb_dim=4096"):
        validation.validate_config(c, num_devices=16)
