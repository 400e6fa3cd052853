"""Every `sample` and `evaluate` command line in the README and docs/ runs as written on small saved
runs named as the docs name them (runs/digits, runs/digits_cond), trained by the documented train
command with a smaller model. Only sample counts are made smaller, by flags appended at the end
(the last value of a flag wins). Commands on data or weights that cannot exist offline (CIFAR-10,
pytorch-fid's weights) are listed and left out."""
import glob
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
from cli_helpers import SMALL_MODEL, bash_lines, run_command

from ddpm_jax import cascade, evaluate, main, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALLER = {sample: ["--num_samples=4", "--batch_size=8"],
           evaluate: ["--num_samples=10", "--num_per_class=1", "--num_examples=8"],
           cascade: ["--num_samples=2"]}
# the docs' snippets that write the images the editing commands read (inputs/, shapes_inputs/, ...)
INPUTS = "# the inputs of the lines above\n"
# the "In Python" snippets, on the runs the tests make
API = ("from ddpm_jax import checkpoints, generation\n", "from ddpm_jax import cascading\n")
# the runs the tests make; runs/shapes_t2i_2k (the docs' autoguidance guide) is a copy of runs/shapes_t2i
OFFLINE = ("runs/digits", "runs/digits_cond", "runs/shapes_t2i", "runs/shapes_sr", "runs/shapes_t2i_2k")


def documented_commands() -> list[str]:
    """`python -m ddpm_jax.sample/evaluate/cascade ...` lines of the README and docs/, continuations joined."""
    paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    ours = r"python -m ddpm_jax\.(sample|evaluate|cascade)\b"
    commands = [line for line in bash_lines(paths) if re.match(ours, line)]
    return list(dict.fromkeys(commands))  # README and docs repeat some


def documented_python(start: str) -> list[str]:
    """The ```python blocks of the README and docs/ that start with `start`."""
    blocks = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as f:
            blocks += [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if b.startswith(start)]
    return blocks


def runnable(command: str) -> bool:
    """The command reads only the runs the tests make (--workdir, or every run of --stages), and no
    Inception weights (made from pytorch-fid's: `test_evaluate` and `test_text_to_image` run fid)."""
    if "--inception_weights=" in command:
        return False
    stages = re.search(r"--stages=(\S+)", command)
    if stages:
        return all(run in OFFLINE for run in stages.group(1).split(","))
    return any(run in command + " " for run in (f"--workdir={r} " for r in OFFLINE))


def test_docs_have_commands_and_most_run_offline():
    commands = documented_commands()
    offline = [c for c in commands if runnable(c)]
    assert len(commands) >= 15 and len(offline) >= 10, offline


@pytest.fixture(scope="module")
def cwd_with_runs(tmp_path_factory):
    """runs/digits, runs/digits_cond, runs/shapes_t2i and runs/shapes_sr trained by the documented
    command (a smaller model, 2 steps; shapes with 40 train / 20 test scenes), runs/shapes_t2i_2k (a
    copy of runs/shapes_t2i: the same model, as a guide run must be), clip-vit-base-patch32 (the tiny
    random CLIP of tests/data), docs/shapes_prompts.txt, and
    the images the commands read (inputs/, mask.png, shapes_inputs/, shapes_mask.png,
    shapes_low_res/), written by the docs' own snippets, as the docs' commands expect them."""
    from ddpm_jax.datasets import shapes as shapes_ds

    d = tmp_path_factory.mktemp("docs")
    old = os.getcwd()
    os.chdir(d)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(shapes_ds, "SPLITS", {"train": (40, 0), "test": (20, 1)})
            for name in ("digits", "digits_cond", "shapes_t2i", "shapes_sr"):
                status, _, err = run_command(main, f"--config={ROOT}/configs/{name}.py", f"--workdir=runs/{name}",
                                             f"--config.data.data_dir={d / 'tfds'}", *SMALL_MODEL)
                assert status == 0, err[-2000:]
        shutil.copytree("runs/shapes_t2i", "runs/shapes_t2i_2k")
        shutil.copytree(os.path.join(ROOT, "tests", "data", "clip_tiny"), "clip-vit-base-patch32")  # the docs' CLIP
        os.makedirs("docs")
        shutil.copy(os.path.join(ROOT, "docs", "shapes_prompts.txt"), "docs/")
        snippets = documented_python(INPUTS)
        assert len(snippets) == 3, snippets  # sampling, text_to_image, super_resolution
        for snippet in snippets:
            exec(snippet, {})
    finally:
        os.chdir(old)
    return d


@pytest.mark.parametrize("command", [c for c in documented_commands() if runnable(c)])
def test_documented_command_runs(cwd_with_runs, monkeypatch, command):
    monkeypatch.chdir(cwd_with_runs)
    words = shlex.split(command)
    module = {"ddpm_jax.sample": sample, "ddpm_jax.evaluate": evaluate, "ddpm_jax.cascade": cascade}[words[2]]
    status, out, err = run_command(module, *words[3:], *SMALLER[module])
    assert status == 0, (command, err[-3000:])
    if module is sample:
        assert "samples.png" in out and "samples.npz" in out
        # the ode sampler chooses its network evaluations, and says how many
        assert ("network evaluations per image" in err) == ("--sampler=ode" in command), err[-2000:]
    elif module is cascade:
        assert "cascade.png" in out
    else:
        assert "{" in out or "| setting |" in out  # the metrics as JSON, or the accuracy table


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_evaluations_of_other_settings_write_other_files(cwd_with_runs, monkeypatch):
    """A result is named by what changes its numbers, so evaluating again with another setting keeps
    the first result: digits by the sampling settings, bpd by split, examples, seed and method, --samples by file,
    shapes also by a split given."""
    monkeypatch.chdir(cwd_with_runs)
    runs = [("digits", "--num_samples=10"), ("digits", "--num_samples=10", "--steps=5"),
            ("digits", "--num_samples=10", "--seed=1"), ("bpd", "--num_examples=8"), ("bpd", "--num_examples=4"),
            ("bpd", "--num_examples=4", "--seed=1"), ("bpd", "--num_examples=4", "--bpd_method=ode"),
            ("digits", "--num_samples=10", "--sampler=ode", "--ode_tolerance=1e-2")]
    for args in runs:
        status, _, err = run_command(evaluate, args[0], "--workdir=runs/digits", *args[1:])
        assert status == 0, (args, err[-2000:])
        # a progress bar of the sampling or the bits/dim batches
        assert re.search(r"\] (10/10|[48]/[48]) images, ", err), (args, err[-2000:])
    with open("runs/digits/eval/bpd_step_2_ode_tol1e-05_train_n4.json") as f:
        ode = json.load(f)
    assert ode["bpd_method"] == "ode" and ode["ode_unfinished"] == 0 and 0 < ode["bpd"] < 20 and ode["ode_evals"] > 7
    with open("runs/digits/eval/digits_step_2_ode_tol0.01_w0_n10.json") as f:
        assert json.load(f)["ode_sampling_evals"] > 7  # the ode sampler's network evaluations per image
    np.savez("mine.npz", arr_0=np.zeros((10, 8, 8, 1), np.uint8))
    status, _, err = run_command(evaluate, "digits", "--workdir=runs/digits", "--samples=mine.npz")
    assert status == 0, err[-2000:]
    status, _, err = run_command(sample, "--workdir=runs/digits", "--num_samples=10", "--individual",
                                 "--out=mine_images")
    assert status == 0, err[-2000:]
    status, out, err = run_command(evaluate, "digits", "--workdir=runs/digits", "--samples=mine_images/images/")
    assert status == 0 and '"num_samples": 10' in out, err[-2000:]
    for args in [(), ("--split=train",)]:
        status, _, err = run_command(evaluate, "shapes", "--workdir=runs/shapes_t2i", "--num_samples=4", *args)
        assert status == 0, (args, err[-2000:])
    assert {"shapes_step_2_ddim50_eta1_w3_t150-inf_n4.json",
            "shapes_step_2_train_ddim50_eta1_w3_t150-inf_n4.json"} <= set(os.listdir("runs/shapes_t2i/eval"))
    written = set(os.listdir("runs/digits/eval"))  # with those of the documented commands
    assert written >= {"digits_step_2_ancestral200_w0_n10.json", "digits_step_2_ancestral5_w0_n10.json",
                       "digits_step_2_ancestral200_w0_seed1_n10.json", "bpd_step_2_train_n8.json",
                       "bpd_step_2_train_n4.json", "bpd_step_2_train_n4_seed1.json", "digits_mine.json",
                       "digits_images.json"}, written


class _Preempted(Exception):
    pass


def _evaluate_stopped_and_resumed(monkeypatch, args, result, stopper):
    """`evaluate ARGS` whole, then stopped by `stopper` (a ProgressBar that raises _Preempted), then
    again: (the whole run's JSON, the resumed run's, the rerun's stderr); each JSON file is removed
    once read, and none is written by the stopped run."""
    from ddpm_jax import generation

    def pop():
        with open(result) as f:
            out = json.load(f)
        os.remove(result)
        return out

    status, _, err = run_command(evaluate, *args)
    assert status == 0, err[-2000:]
    whole = pop()
    with monkeypatch.context() as m:
        m.setattr(generation, "ProgressBar", stopper)
        with pytest.raises(_Preempted):
            run_command(evaluate, *args)
    assert not os.path.exists(result)
    status, _, err = run_command(evaluate, *args)
    assert status == 0, err[-2000:]
    return whole, pop(), err


def test_a_stopped_evaluation_resumes_and_writes_the_result_of_an_uninterrupted_one(cwd_with_runs, monkeypatch):
    """evaluate digits (sampling) and bpd stopped after 2 of 3 batches: eval/NAME.partial holds them,
    the same command again computes only the last, writes the uninterrupted result and removes it."""
    from ddpm_jax import generation

    monkeypatch.chdir(cwd_with_runs)
    for args, name in ((("digits", "--num_samples=24"), "digits_step_2_ancestral200_w0_seed3_n24"),
                       (("bpd", "--num_examples=24"), "bpd_step_2_train_n24_seed3")):
        args = (args[0], "--workdir=runs/digits", *args[1:], "--batch_size=8", "--seed=3")

        class StopAt24(generation.ProgressBar):
            def __call__(self, done, total, resumed=False):
                if done == 24:  # the third batch is saved: remove it, as if stopped while drawing it
                    os.remove(f"runs/digits/eval/{name}.partial/process_0/chunk_000002.npz")
                    raise _Preempted
                super().__call__(done, total, resumed)

        whole, resumed, err = _evaluate_stopped_and_resumed(monkeypatch, args, f"runs/digits/eval/{name}.json",
                                                            StopAt24)
        assert "resuming: 16/24 images read from the last run" in err, err[-2000:]
        assert resumed == whole
        assert not os.path.exists(f"runs/digits/eval/{name}.partial")


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_a_cascade_stopped_in_its_last_stage_resumes_from_the_stages_before(cwd_with_runs, monkeypatch):
    """The cascade command, and `evaluate cascade`, stopped while the SR stage samples: the base
    stage's batches are read again, the SR stage is sampled, and the files (the result) equal an
    uninterrupted cascade's."""
    from ddpm_jax import generation

    monkeypatch.chdir(cwd_with_runs)
    args = ("--stages=runs/shapes_t2i,runs/shapes_sr", "--prompt=a red circle", "--num_samples=2")
    status, _, err = run_command(cascade, *args, "--out=cascade_whole")
    assert status == 0, err[-2000:]

    class StopInStage1(generation.ProgressBar):
        partial = "cascade_stop/partial"

        def __call__(self, done, total, resumed=False):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:  # stage 1's batch is saved: remove it, as if stopped while drawing it
                shutil.rmtree(f"{self.partial}/stage_1")
                raise _Preempted
            super().__call__(done, total, resumed)

    with monkeypatch.context() as m:
        m.setattr(generation, "ProgressBar", StopInStage1)
        with pytest.raises(_Preempted):
            run_command(cascade, *args, "--out=cascade_stop")
    status, _, err = run_command(cascade, *args, "--out=cascade_stop")
    assert status == 0 and err.count("resuming: 2/2 images read from the last run") == 1, err[-2000:]
    assert sorted(os.listdir("cascade_stop")) == ["cascade.png", "stage_0", "stage_1"]
    for k in (0, 1):
        with np.load(f"cascade_whole/stage_{k}/samples.npz") as a, np.load(f"cascade_stop/stage_{k}/samples.npz") as b:
            np.testing.assert_array_equal(a["arr_0"], b["arr_0"])

    # `evaluate cascade` the same way: its stages' batches are kept in the base run's eval/.
    args = ("cascade", "--stages=runs/shapes_t2i,runs/shapes_sr", "--num_samples=2", "--seed=5")
    StopInStage1.partial = "runs/shapes_t2i/eval/cascade_shapes_sr_num_samples2_seed5.partial"
    whole, resumed, err = _evaluate_stopped_and_resumed(
        monkeypatch, args, "runs/shapes_t2i/eval/cascade_step_2_shapes_sr-2_num_samples2_seed5.json", StopInStage1)
    assert err.count("resuming: 2/2 images read from the last run") == 1, err[-2000:]
    assert resumed == whole and not os.path.exists(StopInStage1.partial)


@pytest.mark.parametrize("start, shapes", [(API[0], [(100, 8, 8, 1)]), (API[1], [(4, 16, 16, 3), (4, 32, 32, 3)])])
def test_documented_python_runs(cwd_with_runs, monkeypatch, start, shapes):
    monkeypatch.chdir(cwd_with_runs)
    (snippet,) = documented_python(start)
    namespace = {}
    exec(snippet, namespace)
    images = namespace["images"]  # sampling.md: one array; super_resolution.md: one per stage
    assert [np.shape(x) for x in (images if isinstance(images, list) else [images])] == shapes


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_checkpoint_step_chooses_the_checkpoint_of_a_workdir_command(cwd_with_runs, monkeypatch):
    """evaluate --checkpoint_step: the run's checkpoint of that step (cascade: of each stage), named in the
    result; a step the run lacks, --checkpoint_step with --samples, or with a command that has no run, is one
    line before any work."""
    monkeypatch.chdir(cwd_with_runs)
    status, out, err = run_command(evaluate, "bpd", "--workdir=runs/digits", "--num_examples=4", "--seed=2",
                                   "--checkpoint_step=2")
    assert status == 0 and os.path.isfile("runs/digits/eval/bpd_step_2_train_n4_seed2.json"), err[-2000:]
    os.remove("runs/digits/eval/bpd_step_2_train_n4_seed2.json")
    status, out, err = run_command(evaluate, "bpd", "--workdir=runs/digits", "--num_examples=4", "--seed=2",
                                   "--checkpoint_step=0")  # the newest
    assert status == 0 and os.path.isfile("runs/digits/eval/bpd_step_2_train_n4_seed2.json"), err[-2000:]
    status, _, err = run_command(evaluate, "shapes", "--workdir=runs/shapes_t2i", "--guide_workdir=runs/shapes_t2i_2k",
                                 "--guide_checkpoint_step=2", "--guidance=2", "--num_samples=4")
    assert status == 0, err[-2000:]
    with open("runs/shapes_t2i/eval/shapes_step_2_ddim50_eta1_w2_t150-inf_guide-shapes_t2i_2k_step2_n4.json") as f:
        result = json.load(f)
    assert (result["guide_workdir"], result["guide_step"]) == ("runs/shapes_t2i_2k", 2)
    status, _, err = run_command(evaluate, "cascade", "--stages=runs/shapes_t2i,runs/shapes_sr", "--num_samples=2",
                                 "--checkpoint_step=2,0")
    assert status == 0 and os.path.isfile("runs/shapes_t2i/eval/cascade_step_2_shapes_sr-2_num_samples2.json"), err
    np.savez("mine.npz", arr_0=np.zeros((10, 8, 8, 1), np.uint8))
    for args, says in ((("bpd", "--workdir=runs/digits", "--checkpoint_step=1"),
                        "error: --checkpoint_step=1: --workdir=runs/digits has no checkpoint of that step; it has "
                        "steps [2]."),
                       (("digits", "--workdir=runs/digits", "--samples=mine.npz", "--checkpoint_step=2"),
                        "error: --checkpoint_step=2 chooses the checkpoint to sample; --samples=mine.npz scores"),
                       (("bpd", "--workdir=runs/digits", "--checkpoint_step=2,2"),
                        "error: --checkpoint_step=2,2: give one step (a whole number) of the --workdir run; one per "
                        "stage is for cascade."),
                       (("convert_inception", "--checkpoint_step=2"),
                        "error: --checkpoint_step=2: chooses the checkpoint of a run; convert_inception has none."),
                       (("cascade", "--stages=runs/shapes_t2i,runs/shapes_sr", "--checkpoint_step=0,1"),
                        "error: --checkpoint_step=0,1: stage 1 (runs/shapes_sr) has no checkpoint of step 1; it has "
                        "steps [2] (0: the newest).")):
        status, _, err = run_command(evaluate, *args)
        assert status == 2 and says in err and "Traceback" not in err, (args, err[-2000:])
