"""Bad config values and flags fail at once, naming the field and what would be valid."""
import os
import subprocess
import sys

import pytest

from configs import cifar10, cifar10_improved, digits, tiny
from ddpm_jax import training
from ddpm_jax.validation import UserError, validate_config, validate_sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_configs_are_valid():
    for module in (cifar10, cifar10_improved, digits, tiny):
        validate_config(module.get_config(), num_devices=8)


@pytest.mark.parametrize("field, value, message", [
    ("training.batch_size", 100, r"training\.batch_size=100 is not divisible by 8 devices: use a multiple of 8"),
    ("model.attn_resolutions", (16, 64), r"model\.attn_resolutions=\(16, 64\) contains 64, .* valid resolutions "
                                         r"are \(32, 16\)"),
    ("data.image_size", 31, r"data\.image_size=31 is not divisible by .*=2"),
    ("model.ch", 48, r"model\.ch=48, model\.ch_mult=\(1, 2\): the U-Net cannot be built"),
    ("model.dtype", "float64", r"model\.dtype='float64': must be one of \('float32', 'bfloat16', 'float16'\)"),
    ("diffusion.beta_schedule", "quadratic", r"diffusion\.beta_schedule='quadratic': must be one of \('linear', "
                                             r"'cosine'\)"),
    ("diffusion.model_output", "score", r"diffusion\.model_output='score': must be one of \('eps', 'x0', 'v'\)"),
    ("sampling.timestep_spacing", "leading", r"sampling\.timestep_spacing='leading': must be one of \('even', "
                                              r"'trailing'\)"),
    ("diffusion.variance", "learned", r"diffusion\.variance='learned': must be one of"),
    ("training.grad_accum_steps", 3, r"training\.grad_accum_steps=3 does not divide the 2 examples per device "
                                     r"\(training\.batch_size=16 over 8 devices\): use one of \[1, 2\]"),
    ("training.grad_accum_steps", 0, r"training\.grad_accum_steps=0: must be a positive integer"),
    ("training.steps_per_call", 3, r"training\.num_train_steps=20 is not a multiple of training\.steps_per_call=3"),
    ("training.sample_every", -1, r"training\.sample_every=-1: must be 0 \(no samples\) or a multiple of "
                                 r"training\.steps_per_call=1"),
    ("data.channels", 2, r"data\.channels=2: must be one of \(1, 3\)"),
    ("model.attn_head_dim", 24, r"model\.attn_head_dim=24: must divide the channels of every attention layer "
                                r"\[64\]"),
    ("model.time_embedding", "edm", r"model\.time_embedding='edm': must be one of \('ddpm', 'adm'\)"),
    ("model.downsample_padding", "valid", r"model\.downsample_padding='valid': must be one of \('same', "
                                          r"'symmetric'\)"),
    ("model.norm_eps", 0.0, r"model\.norm_eps=0\.0: must be a positive number"),
    ("data.random_crop", 16, r"data\.random_crop=16: .* must be 0 \(no crop\) or at least 32"),
    ("data.random_crop", -1, r"data\.random_crop=-1: must be a non-negative integer"),
    ("optim.ema_decay", 1.0, r"optim\.ema_decay=1\.0: must be in \[0, 1\)"),
    ("optim.decay_steps", 5, r"optim\.decay_steps=5: must be 0 \(constant after warmup\) or a step after "
                             r"optim\.warmup_steps=10"),
    ("optim.decay_steps", 15, r"optim\.decay_steps=15: the learning rate would be 0 for the last steps of "
                              r"training\.num_train_steps=20"),
    ("model.attention", "flash", r"model\.attention='flash': must be one of \('xla', 'cudnn'\)"),
    ("model.attention", "cudnn", r"model\.attention='cudnn' needs model\.dtype bfloat16 or float16"),
])
def test_bad_values_name_the_field(field, value, message):
    config = tiny.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=message):
        validate_config(config, num_devices=8)


@pytest.mark.parametrize("field, value, message", [
    ("sampling.sampler", "plms", r"sampling\.sampler='plms': must be one of \('ancestral', 'ddim', 'dpm_solver\+\+', "
                                 r"'heun', 'ode'\)"),
    ("sampling.steps", 101, r"sampling\.steps=101: must be an integer from 1 to diffusion\.num_timesteps=100"),
    ("sampling.steps", 0, r"sampling\.steps=0: must be an integer from 1"),
    ("sampling.eta", 1.5, r"sampling\.eta=1\.5: must be in \[0, 1\]"),
    ("sampling.threshold", "soft", r"sampling\.threshold='soft': must be one of \('auto', 'none', 'clip', "
                                   r"'dynamic'\) \('auto': as diffusion\.clip_x0 says"),
    ("sampling.threshold_percentile", 0.0, r"sampling\.threshold_percentile=0\.0: must be in \(0, 1\]"),
    ("sampling.threshold_percentile", 99.5, r"sampling\.threshold_percentile=99\.5: must be in \(0, 1\]"),
    ("sampling.s_churn", -1.0, r"sampling\.s_churn=-1\.0: must be a number >= 0"),
    ("sampling.s_noise", -0.5, r"sampling\.s_noise=-0\.5: must be a number >= 0"),
    ("sampling.s_tmax", 0.01, r"sampling\.s_tmax=0\.01: must be a number >= sampling\.s_tmin=0\.05 \(inf: no "
                              r"upper bound\)"),
])
def test_bad_sampling_values_name_the_field(field, value, message):
    config = tiny.get_config()
    for module in (cifar10, cifar10_improved, digits, tiny):
        validate_sampling(module.get_config())
    config.sampling.s_tmin = 0.05
    validate_sampling(config)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=message):
        validate_sampling(config)


def test_learned_range_and_vlb_weight():
    config = tiny.get_config()
    config.diffusion.variance = "learned_range"
    config.sampling.threshold, config.sampling.sampler = "dynamic", "dpm_solver++"
    validate_config(config, num_devices=8)
    validate_sampling(config)
    config.diffusion.vlb_weight = -0.1
    with pytest.raises(UserError, match=r"diffusion\.vlb_weight=-0\.1: must be a number >= 0"):
        validate_config(config, num_devices=8)


def test_loss_weighting():
    config = tiny.get_config()
    config.diffusion.loss_weighting, config.diffusion.min_snr_gamma = "min_snr", 1
    validate_config(config, num_devices=8)
    config.diffusion.min_snr_gamma = 0.0
    with pytest.raises(UserError, match=r"diffusion\.min_snr_gamma=0\.0: must be a number > 0"):
        validate_config(config, num_devices=8)
    config.diffusion.loss_weighting = "snr"
    with pytest.raises(UserError, match=r"diffusion\.loss_weighting='snr': must be one of"):
        validate_config(config, num_devices=8)


def test_cudnn_attention_needs_a_gpu():
    config = tiny.get_config()
    config.model.dtype, config.model.attention = "bfloat16", "cudnn"
    with pytest.raises(UserError, match=r"model\.attention='cudnn' needs an NVIDIA GPU; this process runs on 'cpu'"):
        validate_config(config, num_devices=8)


def test_train_and_evaluate_rejects_bad_config_before_writing(tmp_path):
    config = tiny.get_config()
    config.training.batch_size = 12
    with pytest.raises(ValueError, match="training.batch_size=12"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    config = tiny.get_config()
    config.data.dataset = "cifar100x"
    with pytest.raises(ValueError, match="data.dataset='cifar100x'"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _main(*flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "ddpm_jax.main", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line_rejects_bad_flags_and_values(tmp_path):
    workdir = str(tmp_path / "run")
    r = _main("--config=configs/tiny.py", f"--workdir={workdir}", "--config.training.batch_size=100")
    assert r.returncode != 0
    assert "training.batch_size=100 is not divisible by 8 devices" in r.stderr
    assert "Traceback" not in r.stderr
    r = _main("--config=configs/tiny.py", f"--workdir={workdir}", "--config.training.batch_sise=64")
    assert r.returncode != 0 and "batch_sise" in r.stderr
    r = _main("--config=configs/tiny.py")
    assert r.returncode != 0 and "workdir" in r.stderr
    assert not os.path.exists(workdir)
