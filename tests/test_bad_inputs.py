"""Every user mistake is one line: exit status 2, `error: ...` naming the flag, field or file, no
traceback, and the workdir's files byte-identical. Table-driven over the four commands, in-process."""
import hashlib
import os
import shutil
import stat

import jax
import numpy as np
import pytest
from cli_helpers import run_command
from PIL import Image

from configs import tiny
from ddpm_jax import benchmark, cascade, checkpoints, evaluate, image_utils, main, sample
from ddpm_jax.train_state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
SHAPES_T2I = os.path.join(ROOT, "configs", "shapes_t2i.py")


def _config(num_classes, text_encoder="none"):
    c = tiny.get_config()
    c.data.dataset, c.data.image_size, c.data.channels = "digits", 8, 1
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 32, (1,), ()
    c.model.num_classes = num_classes
    c.model.text_encoder, c.model.text_width, c.model.text_depth, c.model.text_heads = text_encoder, 32, 1, 2
    c.model.text_emb_dim = 8 if text_encoder == "precomputed" else 0
    c.data.max_text_len = 16
    c.diffusion.num_timesteps = 20
    c.sampling.steps = 5
    return c


def _run(path, config):
    checkpoints.write_config(str(path), config)
    manager = checkpoints.checkpoint_manager(str(path))
    checkpoints.save_train_state(manager, jax.device_get(create_train_state(config, 0)), {"position": 0})
    manager.wait_until_finished()
    manager.close()
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved runs (conditional, unconditional, corrupt config.json) and input files of every kind."""
    d = tmp_path_factory.mktemp("bad_inputs")
    f = {"cond": _run(d / "cond", _config(3)), "uncond": _run(d / "uncond", _config(0)),
         "text": _run(d / "text", _config(0, "trained")), "emb": _run(d / "emb", _config(0, "precomputed"))}
    (d / "empty.txt").write_text("\n  \n")
    np.savez(d / "emb4.npz", text_emb=np.zeros((3, 4), np.float32))
    f.update(empty_txt=str(d / "empty.txt"), emb4_npz=str(d / "emb4.npz"))
    os.makedirs(d / "corrupt")
    (d / "corrupt" / "config.json").write_text("{not json")
    f["corrupt"] = str(d / "corrupt")
    os.makedirs(d / "empty")
    f["empty"] = str(d / "empty")
    os.makedirs(d / "inputs")
    rng = np.random.default_rng(0)
    for i in range(2):
        image_utils.save_png(str(d / "inputs" / f"in{i}.png"), rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
    f["inputs"] = str(d / "inputs")
    os.makedirs(d / "noimages")
    (d / "noimages" / "readme.txt").write_text("x")
    f["noimages"] = str(d / "noimages")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    f["broken_png"] = str(d / "broken.png")
    # 20000 x 20000 pixels in a few kB: PIL refuses to decode it (a decompression bomb).
    Image.new("1", (20000, 20000)).save(d / "huge.png")
    f["huge_png"] = str(d / "huge.png")
    mask = np.zeros((8, 8, 1), np.uint8)
    mask[2:6, 2:6] = 255
    image_utils.save_png(str(d / "mask.png"), mask)
    image_utils.save_png(str(d / "mask16.png"), np.zeros((16, 16, 1), np.uint8))
    os.makedirs(d / "masks3")
    for i in range(3):
        image_utils.save_png(str(d / "masks3" / f"m{i}.png"), mask)
    f.update(mask=str(d / "mask.png"), mask16=str(d / "mask16.png"), masks3=str(d / "masks3"))
    (d / "random.npz").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (d / "empty.npz").write_bytes(b"")
    np.savez(d / "good.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8))
    (d / "truncated.npz").write_bytes((d / "good.npz").read_bytes()[:100])
    np.savez(d / "pickled.npz", arr_0=np.array([{"a": 1}], dtype=object))
    np.savez(d / "flat.npz", arr_0=np.zeros((4, 8), np.uint8))
    np.savez(d / "rgb32.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(d / "nostats.npz", mu=np.zeros(3))
    for name in ("random", "empty", "good", "truncated", "pickled", "flat", "rgb32", "nostats"):
        f[f"{name}_npz"] = str(d / f"{name}.npz")
    (d / "syntax.py").write_text("def get_config(:\n")
    (d / "notdict.py").write_text("def get_config():\n    return 3\n")
    f.update(syntax=str(d / "syntax.py"), notdict=str(d / "notdict.py"), file=str(d / "good.npz"))
    f["tfds"] = str(d / "tfds")
    os.makedirs(d / "blocked")
    (d / "blocked" / "partial").write_text("a file where the sample command keeps its finished batches")
    f["blocked"] = str(d / "blocked")
    return f


# (command module, args with {placeholders}, text the one-line message must contain)
CASES = [
    # --- train: python -m ddpm_jax.main
    (main, [], "--config"),
    (main, ["--config=nowhere.py", "--workdir={empty}"], "--config=nowhere.py: no such file"),
    (main, ["--config={syntax}", "--workdir={empty}"], "--config="),
    (main, ["--config={notdict}", "--workdir={empty}"], "ml_collections.ConfigDict"),
    (main, [f"--config={DIGITS}"], "--workdir"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.model.nonsense=1"], "config.model.nonsense"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.model.ch=abc"], "config.model.ch"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "extra"], "unexpected arguments"),
    (main, [f"--config={DIGITS}", "--workdir={file}"], "--workdir="),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.training.batch_size=12"], "training.batch_size=12"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.model.attn_resolutions=(3,)"],
     "model.attn_resolutions"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.model.dtype=float8"], "model.dtype"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.diffusion.beta_schedule=quad"],
     "diffusion.beta_schedule"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.diffusion.model_output=score"],
     "diffusion.model_output"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.optim.b1=1.5"], "optim.b1=1.5"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.optim.b2=-0.1"], "optim.b2"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.optim.eps=0"], "optim.eps=0"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.optim.learning_rate=-1"], "optim.learning_rate"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.training.nonfinite=ignore"], "training.nonfinite"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.sampling.steps=500"], "sampling.steps=500"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.sampling.sampler=plms"], "sampling.sampler"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.eval.eval_every=-1"], "eval.eval_every"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.eval.num_samples=1"], "eval.num_samples=1"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.eval.inception_weights=w.npz"],
     "eval.inception_weights and eval.reference_stats"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.data.dataset=cifar100000"], "data.dataset"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.data.data_dir={tfds}",
            "--config.data.split=test"], "data.split='test'"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.data.data_dir={tfds}",
            "--config.data.channels=3"], "data.channels=3"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.model.text_encoder=clip"], "model.text_encoder"),
    (main, [f"--config={DIGITS}", "--workdir={empty}", "--config.training.text_dropout=2"], "training.text_dropout"),
    (main, [f"--config={SHAPES_T2I}", "--workdir={empty}", "--config.data.random_flip=True"],
     "data.random_flip=True with a text model"),
    (main, [f"--config={SHAPES_T2I}", "--workdir={empty}", "--config.model.num_classes=3"],
     "labels or on text, not both"),
    (main, [f"--config={SHAPES_T2I}", "--workdir={empty}", "--config.model.text_heads=3"], "model.text_heads=3"),
    (main, [f"--config={SHAPES_T2I}", "--workdir={empty}", "--config.data.max_text_len=1"], "data.max_text_len=1"),
    (main, [f"--config={SHAPES_T2I}", "--workdir={empty}", "--config.model.text_encoder=precomputed"],
     "model.text_emb_dim=0"),
    # --- python -m ddpm_jax.sample
    (sample, [], "--workdir"),
    (sample, ["--workdir={uncond}", "--prompt=a red circle"], "--prompt: this run's model takes no text"),
    (sample, ["--workdir={cond}", "--prompts={empty_txt}"], "--prompts: this run's model takes no text"),
    (sample, ["--workdir={text}", "--prompts=nowhere.txt"], "--prompts=nowhere.txt: no such file"),
    (sample, ["--workdir={text}", "--prompts={empty_txt}"], "the file has no prompts"),
    (sample, ["--workdir={text}", "--prompt=a", "--prompts={empty_txt}"], "not both"),
    (sample, ["--workdir={text}", "--prompt=a", "--negative_prompt=b"], "set --guidance > 0"),
    (sample, ["--workdir={text}", "--prompt=" + "x" * 16], "16 bytes; this model reads at most 15"),
    (sample, ["--workdir={text}", "--prompt=a", "--guidance=1", "--negative_prompt=" + "y" * 20],
     "--negative_prompt='yyyy"),
    (sample, ["--workdir={text}", "--label=1"], "--label=1: this run's model is conditioned on text"),
    (sample, ["--workdir={text}", "--prompt=a", "--source_prompt=b"], "give --invert"),
    (sample, ["--workdir={text}", "--prompt_embedding={emb4_npz}"], "encodes text itself"),
    (sample, ["--workdir={emb}", "--prompt=a"], "give --prompt_embedding"),
    (sample, ["--workdir={emb}", "--prompt_embedding=nowhere.npz"], "--prompt_embedding='nowhere.npz': no such file"),
    (sample, ["--workdir={emb}", "--prompt_embedding={emb4_npz}"], "model.text_emb_dim=8"),
    (sample, ["--workdir={emb}", "--prompt_embedding={good_npz}"], "expected arrays named 'text_emb'"),
    (sample, ["--workdir={empty}"], "config.json"),
    (sample, ["--workdir={corrupt}"], "config.json"),
    (sample, ["--workdir={cond}", "--sampler=plms"], "sampling.sampler='plms'"),
    (sample, ["--workdir={cond}", "--steps=0"], "sampling.steps=0"),
    (sample, ["--workdir={cond}", "--steps=21"], "diffusion.num_timesteps=20"),
    (sample, ["--workdir={cond}", "--steps=abc"], "--steps"),
    (sample, ["--workdir={cond}", "--eta=0.5"], "sampling.eta=0.5 applies to sampling.sampler='ddim'"),
    (sample, ["--workdir={cond}", "--sampler=ddim", "--eta=2"], "sampling.eta=2.0"),
    (sample, ["--workdir={cond}", "--sampler=ode", "--ode_tolerance=0"], "sampling.ode_tolerance=0.0: the ode"),
    (sample, ["--workdir={cond}", "--ode_tolerance=1e-3"], "--ode_tolerance applies to --sampler=ode (this is "),
    (sample, ["--workdir={cond}", "--sampler=heun", "--init_images={inputs}", "--mask={mask}"],
     "--mask with --sampler=heun: inpainting (RePaint)"),
    (sample, ["--workdir={cond}", "--guidance=-1"], "sampling.guidance=-1.0"),
    (sample, ["--workdir={cond}", "--guidance=2", "--guidance_t_min=500", "--guidance_t_max=100"],
     "need 0 <= guidance_t_min <= guidance_t_max"),
    (sample, ["--workdir={cond}", "--guidance=2", "--guidance_rescale=1.5"],
     "sampling.guidance_rescale=1.5: phi of guidance rescale, in [0, 1] (0: off)."),
    (sample, ["--workdir={uncond}", "--guidance=2"], "needs a class- or text-conditional model"),
    (sample, ["--workdir={cond}", "--label=3"], "--label=3"),
    (sample, ["--workdir={cond}", "--label=dog"], "--label=dog"),
    (sample, ["--workdir={uncond}", "--label=1"], "--label=1: this run's model is unconditional"),
    (sample, ["--workdir={cond}", "--strength=0.5"], "--strength edits the --init_images"),
    (sample, ["--workdir={cond}", "--init_images={inputs}", "--strength=1.5"], "sampling.strength=1.5"),
    (sample, ["--workdir={cond}", "--mask={mask}"], "--mask edits the --init_images"),
    (sample, ["--workdir={cond}", "--invert"], "--invert"),
    (sample, ["--workdir={cond}", "--init_images={inputs}", "--mask={mask}", "--invert"],
     "--invert with --mask needs --strength"),
    (sample, ["--workdir={uncond}", "--init_images={inputs}", "--mask=auto"], "unconditional: give a mask image"),
    (sample, ["--workdir={text}", "--init_images={inputs}", "--mask=auto"], "--mask=auto (DiffEdit)"),
    (sample, ["--workdir={text}", "--init_images={inputs}", "--mask=auto", "--prompt=a", "--mask_strength=0"],
     "sampling.mask_strength=0.0"),
    (sample, ["--workdir={text}", "--init_images={inputs}", "--mask=auto", "--prompt=a", "--mask_draws=0"],
     "sampling.mask_draws=0"),
    (sample, ["--workdir={cond}", "--init_images={inputs}", "--mask={mask16}"], "it must be 8x8"),
    (sample, ["--workdir={cond}", "--init_images={inputs}", "--mask={masks3}"], "3 masks for 2 --init_images"),
    (sample, ["--workdir={cond}", "--init_images=nowhere/"], "--init_images=nowhere/"),
    (sample, ["--workdir={cond}", "--init_images={noimages}"], "--init_images="),
    (sample, ["--workdir={cond}", "--init_images={broken_png}"], "cannot read it as an image"),
    (sample, ["--workdir={cond}", "--init_images={huge_png}"], "cannot read it as an image"),
    (sample, ["--workdir={cond}", "--jump_length=2"], "apply to inpainting"),
    (sample, ["--workdir={cond}", "--init_images={inputs}", "--mask={mask}", "--jump_length=9"],
     "sampling.jump_length=9"),
    (sample, ["--workdir={cond}", "--init_images={inputs}", "--mask={mask}", "--jump_n_sample=0"],
     "sampling.jump_n_sample=0"),
    (sample, ["--workdir={cond}", "--num_samples=0"], "sampling.num_samples=0"),
    (sample, ["--workdir={cond}", "--batch_size=0"], "sampling.batch_size=0"),
    (sample, ["--workdir={cond}", "--seed=-1"], "sampling.seed=-1"),
    (sample, ["--workdir={cond}", "--out={file}"], "--out="),
    (sample, ["--workdir={cond}", "--out={blocked}"], "{blocked}/partial: cannot keep the finished batches there"),
    (sample, ["--workdir={cond}", "--nonsense=1"], "nonsense"),
    (sample, ["--workdir={cond}", "more"], "unexpected arguments"),
    # --- python -m ddpm_jax.evaluate
    (evaluate, [], "COMMAND is one of"),
    (evaluate, ["fidd", "--workdir={cond}"], "COMMAND is one of"),
    (evaluate, ["fid", "--workdir={cond}"], "eval.inception_weights=None"),
    (evaluate, ["fid", "--samples={good_npz}", "--inception_weights={good_npz}"], "not the FID Inception"),
    (evaluate, ["fid", "--workdir={cond}", "--reference_stats=s.npz", "--inception_weights=nowhere.npz"],
     "nowhere.npz"),
    (evaluate, ["fid", "--workdir={cond}", "--reference_stats=s.npz", "--inception_weights={random_npz}"],
     "random.npz: not an .npz"),
    (evaluate, ["fid", "--workdir={cond}", "--reference_stats=s.npz", "--inception_weights={good_npz}"],
     "not the FID Inception-v3 weights"),
    (evaluate, ["fid", "--workdir={cond}", "--reference_stats=s.npz", "--inception_weights=nowhere.pth"],
     "nowhere.pth: no such file"),
    (evaluate, ["digits", "--samples={random_npz}"], "--samples="),
    (evaluate, ["digits", "--samples={empty_npz}"], "empty.npz: not an .npz"),
    (evaluate, ["digits", "--samples={truncated_npz}"], "truncated.npz: not an .npz"),
    (evaluate, ["digits", "--samples={pickled_npz}"], "pickled objects"),
    (evaluate, ["digits", "--samples={flat_npz}"], "images must be [N >= 1, H, W, 1 or 3]"),
    (evaluate, ["digits", "--samples={rgb32_npz}"], "8x8 greyscale"),
    (evaluate, ["digits", "--samples=nowhere.npz"], "--samples='nowhere.npz': no such file"),
    (evaluate, ["digits", "--samples={noimages}"], "noimages: folder has no .png/.jpg images"),
    (evaluate, ["digits"], "--workdir"),
    (evaluate, ["bpd", "--samples={good_npz}", "--workdir={cond}"],
     "--samples applies to fid, digits and clip; bpd needs the model"),
    (evaluate, ["clip", "--workdir={cond}", "--clip_model=x"], "clip scores a text-to-image run's samples"),
    (evaluate, ["clip", "--samples={good_npz}", "--clip_model=x"], "give --prompts=FILE too"),
    (evaluate, ["digits", "--workdir={cond}", "--num_samples=1"], "eval.num_samples=1"),
    (evaluate, ["bpd", "--workdir={cond}", "--out={empty}"], "--out applies to accuracy"),
    (evaluate, ["cascade"], "cascade needs --stages"),
    (evaluate, ["cascade", "--stages={cond}", "--inception_weights=w.npz"], "--inception_weights does not apply"),
    (evaluate, ["digits", "--workdir={cond}", "--steps=99"], "eval.steps=99"),
    (evaluate, ["digits", "--workdir={cond}", "--batch_size=0"], "eval.batch_size=0"),
    (evaluate, ["digits", "--workdir={cond}", "--per_device_batch=0"], "--per_device_batch"),
    (evaluate, ["bpd", "--workdir={cond}", "--num_examples=0"], "--num_examples"),
    (evaluate, ["bpd", "--workdir={cond}", "--bpd_method=exact"], "eval.bpd_method='exact': must be one of ('vlb', "),
    (evaluate, ["bpd", "--workdir={cond}", "--bpd_method=ode", "--ode_tolerance=0"], "eval.ode_tolerance=0.0: the"),
    (evaluate, ["bpd", "--workdir={cond}", "--bpd_method=ode", "--ode_sigma_min=-1"], "eval.ode_sigma_min=-1.0"),
    (evaluate, ["accuracy", "--workdir={uncond}"], "class-conditional digits run"),
    (evaluate, ["accuracy", "--workdir={cond}", "--settings=ddim"], "--settings: 'ddim'"),
    (evaluate, ["accuracy", "--workdir={cond}", "--settings=plms:10"], "sampling.sampler='plms'"),
    (evaluate, ["shapes", "--workdir={cond}"], "shapes evaluates a text-to-image run"),
    (evaluate, ["reference_stats", "--out=x.npz"], "--config is required"),
    (evaluate, ["reference_stats", f"--config={DIGITS}"], "--out is required"),
    (evaluate, ["reference_stats", f"--config={DIGITS}", "--out={empty}"], "is a folder"),
    (evaluate, ["fid", "--workdir={cond}", "--inception_weights={good_npz}", "--reference_stats=s.npz",
                "--samples={good_npz}", "--reference_split=train"], "not the FID Inception-v3 weights"),
    (evaluate, ["convert_inception", "--out=x.npz"], "--pth is required"),
    (evaluate, ["convert_inception", "--pth=nowhere.pth", "--out=x.npz"], "--pth=nowhere.pth"),
    # --- python -m ddpm_jax.cascade
    (cascade, [], "--stages"),
    (cascade, ["--stages=nowhere"], "nowhere is not a training run"),
    (cascade, ["--stages={cond},{cond}"], "each stage must upscale"),
    (cascade, ["--stages={cond}", "--steps=1,2"], "--steps=1,2: give one value, or one per stage (1)"),
    (cascade, ["--stages={cond}", "--guidance=x"], "--guidance=x: each value must be a number"),
    (cascade, ["--stages={cond}", "--sampler=ode", "--ode_tolerance=2"],
     "stage 0 ({cond}): sampling.ode_tolerance=2.0"),
    (cascade, ["--stages={cond}", "--prompt=a red circle"], "no stage of this cascade takes text"),
    (cascade, ["--stages={cond}", "--label=12"], "--label=12"),
    (cascade, ["--stages={cond}", "extra"], "unexpected arguments"),
    # --- python -m ddpm_jax.benchmark
    (benchmark, [], "--config"),
    (benchmark, ["--config=nowhere.py"], "no such file"),
    (benchmark, ["--config={syntax}"], "--config="),
    (benchmark, [f"--config={DIGITS}", "--skip=everything"], "--skip"),
    (benchmark, [f"--config={DIGITS}", "--train_calls=0"], "--train_calls"),
    (benchmark, [f"--config={DIGITS}", "--out={empty}"], "--out="),
    (benchmark, [f"--config={DIGITS}", "extra"], "unexpected arguments"),
]


def _snapshot(paths) -> dict:
    out = {}
    for root in paths:
        for folder, _, names in os.walk(root):
            for name in names:
                p = os.path.join(folder, name)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_table_is_large_enough():
    assert len(CASES) >= 60
    assert {m for m, _, _ in CASES} == {main, sample, evaluate, cascade, benchmark}


@pytest.mark.parametrize("module, args, message", CASES,
                         ids=[f"{m.__name__.split('.')[-1]}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line(files, tmp_path, monkeypatch, module, args, message):
    monkeypatch.chdir(tmp_path)  # relative outputs (x.npz) would land here
    runs = [files["cond"], files["uncond"], files["text"], files["emb"], files["corrupt"], files["empty"]]
    before = _snapshot(runs)
    if module is main:  # keep JAX's compilation cache setting of this test process as it is
        args = [*args, "--compilation_cache="]
    status, out, err = run_command(module, *(a.format(**files) for a in args))
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, err)
    assert "Traceback" not in err + out
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert message.format(**files) in errors[0], errors[0]
    assert _snapshot(runs) == before
    assert os.listdir(files["empty"]) == [] and os.listdir(tmp_path) == []


def test_read_only_workdir_is_refused(files, tmp_path):
    """(As root every folder is writable, so the check is shown with a folder made unwritable for all.)"""
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    os.makedirs(ro)
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    try:
        status, _, err = run_command(main, f"--config={DIGITS}", f"--workdir={ro / 'run'}")
        assert status == 2 and "not writable" in err
    finally:
        shutil.rmtree(ro, ignore_errors=True)
