"""diffusers UNet2DModel checkpoints in and out, against diffusers itself: tests/data/ddpm_tiny is a
UNet2DModel in the layout of Ho et al.'s released DDPMs saved by diffusers, and diffusers_reference.npz
its output computed by diffusers (tests/data/make_diffusers_fixture.py)."""
import json
import os
import shlex
import shutil

import jax
import numpy as np
import pytest
from cli_helpers import bash_lines, run_command

from ddpm_jax import checkpoints, convert, defaults, diffusers_weights, files, sample
from ddpm_jax.models import unet_from_config
from ddpm_jax.validation import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "ddpm_tiny")
# the fixture's U-Net as config overrides of configs/cifar10.py (whose schedule it has)
TINY = ["--config.model.ch=32", "--config.model.ch_mult=(1,1)", "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=(8,)", "--config.data.image_size=8", "--config.model.dropout=0.0",
        "--config.model.dtype=float32"]
# google/ddpm-cifar10-32's config.json as the hub has it (diffusers 0.0.4): keys added since are missing
RELEASED_KEYS = ("_class_name", "act_fn", "attention_head_dim", "block_out_channels", "center_input_sample",
                 "down_block_types", "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels",
                 "layers_per_block", "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels",
                 "sample_size", "time_embedding_type", "up_block_types")


# the config.json of google/ddpm-cifar10-32 and google/ddpm-cat-256 on the hub: keys of RELEASED_KEYS only
HO_CIFAR10 = {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
              "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
              "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
HO_CAT256 = {**HO_CIFAR10, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
             "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}


def tiny_config():
    c = defaults.get_config()
    c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions = 32, (1, 1), 1, (8,)
    c.data.image_size, c.model.dropout = 8, 0.0
    return c


def adm_config():
    """tests/data/ddpm_tiny_adm's U-Net: Nichol & Dhariwal's options, 4 classes and the null one."""
    c = tiny_config()
    c.model.attn_resolutions, c.model.num_classes = (4,), 4
    c.model.time_embedding, c.model.norm_eps, c.model.attn_head_dim = "adm", 1e-5, 16
    c.model.scale_shift_norm = c.model.resblock_updown = True
    return c


def copy_fixture(dest, rename=None, config=None):
    """The fixture at `dest`, its tensors renamed by `rename` (name -> (new name, new value)) and its
    config.json replaced by `config`."""
    shutil.copytree(FIXTURE, dest)
    if rename:
        weights = os.path.join(dest, diffusers_weights.WEIGHTS)
        tensors = dict(rename(n, v) for n, v in files.load_safetensors(weights).items())
        files.save_safetensors(weights, tensors)
    if config is not None:
        with open(os.path.join(dest, "config.json"), "w") as f:
            json.dump(config, f)
    return str(dest)


def fixture_config(suffix=""):
    with open(os.path.join(FIXTURE + suffix, "config.json")) as f:
        return json.load(f)


def test_the_released_layout_gives_diffusers_own_output():
    ref = np.load(os.path.join(ROOT, "tests", "data", "diffusers_reference.npz"))
    config = tiny_config()
    params = diffusers_weights.load_params(FIXTURE, config)
    eps = unet_from_config(config).apply({"params": params}, ref["x"], ref["t"])
    np.testing.assert_allclose(eps, ref["eps"], atol=2e-5)  # outputs ~0.3, float32 on both sides
    assert not np.allclose(ref["eps"][0], ref["eps"][1], atol=1e-2)  # the timestep matters


def test_nichol_and_dhariwal_options_and_class_labels_give_diffusers_own_output():
    """diffusers' default timestep embedding and GroupNorm epsilon, 2 heads of 16 channels, scale-shift
    norm and residual up/downsampling; 5 class embeddings are 4 classes and the null one, last."""
    ref = np.load(os.path.join(ROOT, "tests", "data", "diffusers_reference.npz"))
    config = adm_config()
    params = diffusers_weights.load_params(FIXTURE + "_adm", config)
    eps = unet_from_config(config).apply({"params": params}, ref["x"], ref["t"], {"label": ref["labels"]})
    np.testing.assert_allclose(eps, ref["eps_cond"], atol=2e-5)
    assert params["label_emb"]["embedding"].shape == (5, 128)
    assert not np.allclose(eps, unet_from_config(config).apply({"params": params}, ref["x"], ref["t"],
                                                               {"label": ref["labels"] * 0}), atol=1e-2)
    for field, value, key in [("num_classes", 5, r"num_class_embeds=5, but model.num_classes \+ 1 \(the null class"),
                              ("attn_head_dim", 0, "attention_head_dim=16, but model.attn_head_dim of the config"),
                              ("scale_shift_norm", False, "time_scale_shift='scale_shift', but model.scale_shift"),
                              ("norm_eps", 1e-6, "norm_eps=1e-05, but model.norm_eps of the config makes 1e-06")]:
        wrong = adm_config()
        setattr(wrong.model, field, value)
        with pytest.raises(UserError, match=key):
            diffusers_weights.load_params(FIXTURE + "_adm", wrong)


def test_older_files_load_the_same_params(tmp_path):
    """The hub's DDPM files: attention projections named query/key/value/proj_attn (older diffusers),
    some as [O, I, 1, 1], and a config.json without the keys added since (read with diffusers' defaults)."""
    config = tiny_config()
    new = diffusers_weights.load_params(FIXTURE, config)
    legacy = dict(zip(diffusers_weights.LEGACY_NAMES.values(), diffusers_weights.LEGACY_NAMES))

    def rename(name, value):
        for old, current in legacy.items():
            if f".{current}." in name:
                name = name.replace(current, old)
                value = value[:, :, None, None] if old == "query" and value.ndim == 2 else value
        return name, value

    old_config = {k: v for k, v in fixture_config().items() if k in RELEASED_KEYS}
    old = diffusers_weights.load_params(copy_fixture(tmp_path / "old", rename, old_config), config)
    assert any(".query." in n for n in files.safetensors_names(str(tmp_path / "old" / diffusers_weights.WEIGHTS)))
    jax.tree.map(np.testing.assert_array_equal, old, new)


@pytest.mark.parametrize("suffix", ["", "_adm"])
def test_exported_tensors_and_config_are_diffusers_own(suffix):
    """Export is the exact inverse: the loaded params written back are the fixture's tensors (names,
    layouts, values) and its config.json's values, as diffusers saved them."""
    config = adm_config() if suffix else tiny_config()
    tensors = diffusers_weights.to_tensors(diffusers_weights.load_params(FIXTURE + suffix, config), config)
    stored = files.load_safetensors(os.path.join(FIXTURE + suffix, diffusers_weights.WEIGHTS))
    assert tensors.keys() == stored.keys()
    for name, value in stored.items():
        np.testing.assert_array_equal(tensors[name], value.astype(np.float32), err_msg=name)
    released = fixture_config(suffix)
    assert {k: v for k, v in diffusers_weights.unet_config(config).items() if k != "_class_name"} == \
        {k: released[k] for k in diffusers_weights.unet_config(config) if k != "_class_name"}


@pytest.mark.parametrize("name, released", [("cifar10", HO_CIFAR10), ("lsun_cat256", HO_CAT256)])
def test_the_paper_configs_are_the_released_networks(name, released):
    config = defaults.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    diffusers_weights.check_unet_config(released, config, "--diffusers")
    config.model.attn_resolutions = (8,)
    with pytest.raises(UserError, match="down_block_types"):
        diffusers_weights.check_unet_config(released, config, "--diffusers")


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model, "ch_mult", (1, 2)), r"block_out_channels=\[32, 32\].*model.ch \* model.ch_mult"),
    (lambda c: setattr(c.model, "attn_resolutions", (4,)), r"down_block_types=.*model.attn_resolutions"),
    (lambda c: setattr(c.model, "num_res_blocks", 2), r"layers_per_block=1.*model.num_res_blocks"),
    (lambda c: c.update({"data": {"image_size": 16}, "model": {"attn_resolutions": (16,)}}),
     r"sample_size=8.*data.image_size"),
    (lambda c: setattr(c.diffusion, "model_output", "v"), r"'epsilon' where the config has diffusion.model_output='v'"),
    (lambda c: setattr(c.diffusion, "num_timesteps", 100), r"1000 where the config has diffusion.num_timesteps=100"),
    (lambda c: setattr(c.model, "num_classes", 10), r"num_class_embeds=None, but model.num_classes \+ 1"),
    (lambda c: setattr(c.model, "low_res_size", 4), r"--config: model.low_res_size=4"),
    (lambda c: setattr(c.diffusion, "variance", "learned_range"), r"--config: diffusion.variance='learned_range'"),
])
def test_a_folder_of_another_network_or_schedule_is_one_line_naming_the_field(change, message):
    config = tiny_config()
    change(config)
    with pytest.raises(UserError, match=message):
        diffusers_weights.load_params(FIXTURE, config)


@pytest.mark.parametrize("edit, message", [
    ("bin", r"no diffusion_pytorch_model.safetensors .*PyTorch pickles are not read"),
    ("extra", r"1 tensors this U-Net has no place for, e.g. 'class_embedding.weight'"),
    ("missing", r"has no tensor 'conv_out.bias'"),
    ("flip", r"config.json has flip_sin_to_cos=True, but model.time_embedding of the config makes False"),
    ("heads", r"config.json has attention_head_dim=8"),
    ("vae", r"config.json is a AutoencoderKL's"),
    ("empty", r"no config.json \(nor unet/config.json\) there"),
    ("betas", r"scheduler_config.json lists its own betas \(trained_betas\)"),
])
def test_a_folder_that_is_not_such_a_unet_is_one_line(tmp_path, edit, message):
    folder = copy_fixture(tmp_path / "f")
    weights = os.path.join(folder, diffusers_weights.WEIGHTS)
    tensors = files.load_safetensors(weights)
    if edit == "bin":
        os.rename(weights, os.path.join(folder, "diffusion_pytorch_model.bin"))
    elif edit in ("extra", "missing"):
        tensors["class_embedding.weight"] = np.zeros((3, 128), np.float16)
        files.save_safetensors(weights, {k: v for k, v in tensors.items()
                                         if edit == "extra" or k != "conv_out.bias"})
    elif edit == "empty":
        os.remove(os.path.join(folder, "config.json"))
    elif edit == "betas":
        with open(os.path.join(folder, "scheduler_config.json")) as f:
            scheduler = json.load(f)
        with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
            json.dump({**scheduler, "trained_betas": [0.01] * 1000}, f)
    else:
        key, value = {"flip": ("flip_sin_to_cos", True), "heads": ("attention_head_dim", 8),
                      "vae": ("_class_name", "AutoencoderKL")}[edit]
        copy = {**fixture_config(), key: value}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(copy, f)
    with pytest.raises(UserError, match=message):
        diffusers_weights.load_params(folder, tiny_config())


def test_commands_import_sample_export_and_refuse_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = f"--config={ROOT}/configs/cifar10.py"
    status, _, err = run_command(convert, "from_diffusers", f"--diffusers={FIXTURE}", config, "--workdir=runs/released",
                                 *TINY)
    assert status == 0, err[-2000:]
    params, step = checkpoints.load_params("runs/released")
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, params, diffusers_weights.load_params(FIXTURE, tiny_config()))
    raw, _ = checkpoints.load_params("runs/released", use_ema=False)
    jax.tree.map(np.testing.assert_array_equal, raw, params)

    status, _, err = run_command(sample, "--workdir=runs/released", "--num_samples=4", "--sampler=ddim", "--steps=3",
                                 "--out=samples")
    assert status == 0, err[-2000:]
    assert os.path.exists("samples/samples.npz")

    status, _, err = run_command(convert, "to_diffusers", "--workdir=runs/released", "--out=exported")
    assert status == 0, err[-2000:]
    assert sorted(os.listdir("exported")) == ["model_index.json", "scheduler", "unet"]
    status, _, err = run_command(convert, "from_diffusers", "--diffusers=exported", config, "--workdir=runs/again",
                                 *TINY)
    assert status == 0, err[-2000:]
    jax.tree.map(np.testing.assert_array_equal, checkpoints.load_params("runs/again")[0], params)

    # Nothing is overwritten, and a mistake is one line.
    before = sorted(os.listdir("runs/released/checkpoints"))
    conditional = tiny_config()
    conditional.model.text_encoder = "trained"
    checkpoints.write_config("runs/cond", conditional)
    for args, message in [
            (("from_diffusers", f"--diffusers={FIXTURE}", config, "--workdir=runs/released", *TINY),
             "--workdir=runs/released: already holds a run"),
            (("to_diffusers", "--workdir=runs/released", "--out=exported"), "--out=exported: already holds a "
                                                                             "diffusers model"),
            (("from_diffusers", f"--diffusers={FIXTURE}", config, "--workdir=runs/other"),
             "block_out_channels=[32, 32], but model.ch * model.ch_mult of the config makes [128, 256, 256, 256]"),
            (("to_diffusers", "--workdir=runs/released"), "--out is required for to_diffusers"),
            (("to_diffusers", "--workdir=runs/cond", "--out=cond"),
             "--workdir=runs/cond: model.text_encoder='trained'"),
            (("export",), "COMMAND is one of ('from_diffusers', 'to_diffusers')")]:
        status, _, err = run_command(convert, *args)
        assert status == 2 and err.strip().splitlines() == [f"error: {err.strip().split('error: ')[-1]}"], err
        assert message in err, err
    assert sorted(os.listdir("runs/released/checkpoints")) == before and not os.path.exists("runs/other/config.json")
    assert not os.path.exists("cond")
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # one of several processes: refused before any work
    status, _, err = run_command(convert, "to_diffusers", "--workdir=runs/released", "--out=multi")
    assert status == 2 and "convert runs as one process" in err and not os.path.exists("multi")


def documented_commands() -> list[str]:
    """The `python -m ddpm_jax.*` lines of docs/diffusers.md, continuations joined."""
    return [line for line in bash_lines([os.path.join(ROOT, "docs", "diffusers.md")])
            if line.startswith("python -m ddpm_jax.")]


@pytest.mark.slow  # a CIFAR-10-size U-Net written, converted and sampled on the CPU: about a minute
def test_the_documented_commands_run_as_written(tmp_path, monkeypatch):
    """docs/diffusers.md's commands as written, on ddpm-cifar10-32 made as the hub has it (its config.json
    and scheduler, random weights in its layout) and runs/digits trained by the quickstart's command
    (2 steps); `sample` gets fewer samples and steps appended, `evaluate fid` (Inception weights) is
    left out. Then `main` fine-tunes the run brought back from diffusers."""
    monkeypatch.chdir(tmp_path)
    from ddpm_jax import main
    from ddpm_jax.train_state import init_params

    cifar10 = defaults.load_config_file(os.path.join(ROOT, "configs", "cifar10.py"))
    os.makedirs("ddpm-cifar10-32")
    files.save_safetensors(f"ddpm-cifar10-32/{diffusers_weights.WEIGHTS}",
                           diffusers_weights.to_tensors(init_params(cifar10, jax.random.key(1)), cifar10))
    with open("ddpm-cifar10-32/config.json", "w") as f:
        json.dump(HO_CIFAR10, f)
    with open("ddpm-cifar10-32/scheduler_config.json", "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                   "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                   "variance_type": "fixed_small"}, f)
    train = ["--config.training.num_train_steps=2", "--config.training.checkpoint_every=2",
             "--config.training.sample_every=0", "--config.training.profile_steps=0", "--compilation_cache="]
    status, _, err = run_command(main, f"--config={ROOT}/configs/digits.py", "--workdir=runs/digits", *train)
    assert status == 0, err[-2000:]

    commands = documented_commands()
    assert len(commands) == 5, commands
    modules = {"convert": convert, "sample": sample}
    for command in commands:
        name, *args = shlex.split(command)[2:]
        name = name.removeprefix("ddpm_jax.")
        if name == "evaluate":
            assert "--inception_weights=" in command  # pytorch-fid's weights: test_evaluate runs fid
            continue
        args = [a.replace("configs/", f"{ROOT}/configs/") for a in args]
        if name == "sample":
            args += ["--num_samples=2", "--steps=2", "--batch_size=8"]
        status, _, err = run_command(modules[name], *args)
        assert status == 0, f"{command}: {err[-2000:]}"
    assert os.path.exists("runs/ddpm_cifar10_released/samples/samples.npz")
    jax.tree.map(np.testing.assert_array_equal, checkpoints.load_params("runs/digits_back")[0],
                 checkpoints.load_params("runs/digits")[0])
    status, _, err = run_command(main, f"--config={ROOT}/configs/digits.py", "--workdir=runs/digits_back", *train)
    assert status == 0, err[-2000:]
    assert checkpoints.steps("runs/digits_back") == [0, 2]
