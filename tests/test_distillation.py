"""Progressive distillation: trailing timesteps, the student's target against a float64 reference on
the analytic Gaussian denoiser, the train step's wiring, and the checks of a distilled run's config."""
import json
import os
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import SMALL_MODEL, bash_lines, run_command
from gaussian_helpers import GAUSS_MU, GAUSS_SIGMA, eps_model64, gaussian_eps_model, step64
from train_helpers import small_cifar10_config, small_digits_config

from ddpm_jax import checkpoints, defaults, distillation, evaluate, main, parallel, sample, train_state, training
from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax.evaluation import tasks
from ddpm_jax.validation import UserError, validate_distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 1000
ABAR = np.cumprod(1 - D.linear_betas(T))  # float64
EXACT = S.StepOptions(clip_x0=False)  # clipping is an image heuristic, not part of the exact chain


def test_trailing_timesteps():
    np.testing.assert_array_equal(D.trailing_timesteps(1000, 10), np.arange(99, 1000, 100))
    # round(j T / N) - 1 with halves rounded up: 12.5 -> 13, 37.5 -> 38
    np.testing.assert_array_equal(D.trailing_timesteps(200, 16)[:3], [12, 24, 37])
    np.testing.assert_array_equal(D.trailing_timesteps(50, 50), np.arange(50))
    for t, n in [(1000, 1), (1000, 3), (1000, 125), (1000, 500), (200, 7), (200, 100), (37, 9)]:
        student, teacher = D.trailing_timesteps(t, n), D.trailing_timesteps(t, 2 * n)
        np.testing.assert_array_equal(student, teacher[1::2])  # the nested grids of distillation
        assert student[-1] == t - 1 and len(np.unique(student)) == n
    with pytest.raises(ValueError, match="steps=11: must be between 1 and num_timesteps=10"):
        D.trailing_timesteps(10, 11)
    with pytest.raises(ValueError, match=r"timestep spacing 'leading': must be one of \('even', 'trailing'\)"):
        D.respaced_timesteps(10, 5, "leading")


def test_trailing_schedule_keeps_alpha_bar():
    config = defaults.get_config()
    s = D.schedule_from_config(config.diffusion, 8, "trailing")
    use = D.trailing_timesteps(T, 8)
    np.testing.assert_array_equal(s.timesteps, use)
    np.testing.assert_allclose(s.alphas_cumprod, ABAR[use], rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod_prev, np.append(1.0, ABAR[use[:-1]]), rtol=1e-6)
    np.testing.assert_array_equal(D.schedule_from_config(config.diffusion, 8).timesteps, D.even_timesteps(T, 8))
    # results and messages name the spacing, so results of the two spacings never share a file
    config.sampling.update(sampler="ddim", steps=8, timestep_spacing="trailing")
    assert tasks.sampling_name(config).startswith("ddim8_trailing_w0")
    assert S.sampler_text("ddim", 8, 1e-5, "trailing") == "ddim, 8 trailing steps"
    config.sampling.timestep_spacing = "even"
    assert tasks.sampling_name(config).startswith("ddim8_w0")


def _target64(z, i, n):
    """Two DDIM steps of the exact Gaussian denoiser on the 2n trailing timesteps from student index i,
    then the x_0 of one step that lands there, in float64; also where the two steps land."""
    teacher, student = D.trailing_timesteps(T, 2 * n), D.trailing_timesteps(T, n)
    model = eps_model64(ABAR)
    x = np.asarray(z, np.float64)
    for j in (2 * i + 1, 2 * i):
        W, a = model(teacher[j])
        M, c, _ = step64(ABAR[teacher[j]], ABAR[teacher[j - 1]] if j else 1.0, W, a, GAUSS_MU, "ddim", 0.0,
                         "fixedlarge")
        x = x @ M.T + c
    abar, abar_end = ABAR[student[i]], ABAR[student[i - 1]] if i else 1.0
    r = np.sqrt((1 - abar_end) / (1 - abar))
    return (x - r * z) / (np.sqrt(abar_end) - r * np.sqrt(abar)), x


@pytest.mark.parametrize("n", [1, 4])
def test_target_matches_float64_two_teacher_steps(n):
    """At every student step: the target equals the float64 reference, and one student DDIM step with it
    (the sampler's own step) lands where the teacher's two steps did."""
    student, teacher = distillation.schedules(defaults.get_config().diffusion, n)
    model = gaussian_eps_model(D.make_schedule(D.linear_betas(T)), GAUSS_MU, GAUSS_SIGMA)
    rng = np.random.default_rng(0)
    for i in range(n):
        # z_t drawn from the marginal at the student's timestep: the region the student is trained on
        x0 = rng.multivariate_normal(GAUSS_MU, GAUSS_SIGMA, 256)
        abar = ABAR[D.trailing_timesteps(T, n)[i]]
        z = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * rng.standard_normal(x0.shape)
        idx = jnp.full((len(z),), i, jnp.int32)
        got = distillation.target(student, teacher, "eps", model, jnp.asarray(z, jnp.float32), idx, EXACT)
        want, landing = _target64(z, i, n)
        np.testing.assert_allclose(got, want, atol=2e-4 / np.sqrt(abar) if i == n - 1 else 2e-4)
        step, _, _ = S.ddim_step(student, "x0", lambda x, t: got, jnp.asarray(z, jnp.float32), idx,
                                 jnp.zeros(z.shape), EXACT)
        np.testing.assert_allclose(step, landing, atol=1e-4)


class _GaussianUNet:
    """Stands in for a U-Net in `training_targets`: the exact denoiser, whatever the params."""

    def __init__(self):
        self.fn = gaussian_eps_model(D.make_schedule(D.linear_betas(T)), GAUSS_MU, GAUSS_SIGMA)

    def apply(self, variables, x, t, cond=None):
        return self.fn(x, t)


def test_training_targets_noise_is_the_one_of_z_t():
    """eps = (z_t - alpha x_0) / sigma: q_sample of the target and its noise gives z_t back, so the run's
    loss sees a consistent (x_0, eps) pair at the student's timestep."""
    config = defaults.get_config()
    config.sampling.steps = 4
    config.diffusion.clip_x0 = False
    student, teacher = distillation.schedules(config.diffusion, 4)
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    i = jnp.asarray(rng.integers(0, 4, 64), jnp.int32)
    x0, eps = distillation.training_targets(config, _GaussianUNet(), None, z, i, {"drop": jnp.zeros(64, bool)})
    np.testing.assert_allclose(x0, distillation.target(student, teacher, "eps", _GaussianUNet().fn, z, i, EXACT),
                               rtol=1e-6)
    t = student.timesteps[i]
    np.testing.assert_allclose(D.q_sample(D.make_schedule(D.linear_betas(T)), x0, t, eps), z, atol=2e-5)


class _ClassGaussianUNet(_GaussianUNet):
    """The exact denoiser of a Gaussian whose mean moves with the label (the null class: not at all)."""

    def apply(self, variables, x, t, cond=None):
        shift = jnp.where(cond["drop"], 0.0, 0.05 * cond["label"].astype(jnp.float32))[:, None]
        return self.fn(x - shift, t)


def test_a_guided_teacher_takes_the_guided_steps():
    """With distill.guidance w the target is that of (1 + w) eps(cond) - w eps(null), each row under its
    own condition: a dropped row's is the unconditional teacher's."""
    config = defaults.get_config()
    config.model.num_classes = 10
    config.sampling.steps = 4
    config.distill.guidance = 2.0
    student, teacher = distillation.schedules(config.diffusion, 4)
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    i = jnp.asarray(rng.integers(0, 4, 64), jnp.int32)
    cond = {"label": jnp.asarray(rng.integers(0, 10, 64), jnp.int32), "drop": jnp.asarray(np.arange(64) % 4 == 0)}
    model = _ClassGaussianUNet()
    x0, _ = distillation.training_targets(config, model, None, z, i, cond)
    null = {**cond, "drop": jnp.ones(64, bool)}
    guided = lambda x, t: 3.0 * model.apply(None, x, t, cond) - 2.0 * model.apply(None, x, t, null)
    opts = S.step_options(config)
    np.testing.assert_allclose(x0, distillation.target(student, teacher, "eps", guided, z, i, opts), atol=1e-5)
    unguided = distillation.target(student, teacher, "eps", lambda x, t: model.apply(None, x, t, cond), z, i, opts)
    assert float(jnp.abs(x0 - unguided)[~cond["drop"]].max()) > 1e-2
    np.testing.assert_allclose(x0[cond["drop"]], unguided[cond["drop"]], atol=1e-5)


def _constant(params, bias):
    """The U-Net's params changed so that it outputs `bias` (per channel) whatever its input: conv_out's
    kernel zeroed (as initialised: Ho et al.'s zero init) and its bias set."""
    out = {**params["conv_out"], "kernel": jnp.zeros_like(params["conv_out"]["kernel"]), "bias": jnp.asarray(bias)}
    return {**params, "conv_out": out}


def test_train_step_learns_the_teachers_steps_at_the_students_timesteps():
    """A teacher whose eps is a constant b: DDIM with a constant eps lands at the same point in one step
    as in two, so the student's eps target is b exactly, and a student that outputs c has loss
    (c - b)^2, at the student's timesteps only (T = 100, 2 steps: timesteps 49 and 99, quarters 1 and 3
    of the loss)."""
    config = small_digits_config("unused")
    config.distill.teacher = "teacher"  # only the train loop reads it; the step gets the params
    config.sampling.update(sampler="ddim", timestep_spacing="trailing", steps=2)
    config.diffusion.clip_x0 = False
    state = train_state.create_train_state(config, 0)
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 2, 8, 8, 1)), jnp.float32)}
    p_step = training.pmap_train_step(config)

    def first_step(student_bias, teacher_bias):
        student = parallel.replicate(state.replace(params=_constant(state.params, student_bias)))
        _, metrics = p_step(student, batch, parallel.replicate(_constant(state.ema_params, teacher_bias)))
        return {k: float(v) for k, v in parallel.to_host(metrics).items()}

    c, b = np.array([0.3], np.float32), np.array([-0.2], np.float32)
    m = first_step(c, b)
    np.testing.assert_allclose(m["loss"], np.mean((c - b) ** 2), rtol=1e-4)
    assert m["loss_q0"] == m["loss_q2"] == 0.0 and m["loss_q1"] > 0 and m["loss_q3"] > 0
    assert first_step(c, c)["loss"] < 1e-9  # the student already is its teacher


def _run_config(path, config):
    checkpoints.write_config(str(path), config)
    return str(path)


def _student(tmp_path, **teacher_changes):
    teacher = small_cifar10_config()
    for field, value in teacher_changes.items():
        section, name = field.split(".")
        teacher[section][name] = value
    config = small_cifar10_config()
    config.distill.teacher = _run_config(tmp_path / "teacher", teacher)
    config.sampling.update(sampler="ddim", timestep_spacing="trailing", steps=4)
    return config


def test_validate_distill(tmp_path):
    validate_distill(_student(tmp_path))
    validate_distill(_student(tmp_path, **{"model.dtype": "bfloat16", "model.dropout": 0.3}))  # compute only
    config = small_cifar10_config()
    config.distill.teacher_checkpoint_step = 5
    with pytest.raises(UserError, match="distill.teacher_checkpoint_step=5: applies to distill.teacher, which is "
                                        "not set"):
        validate_distill(config)
    with pytest.raises(UserError, match=r"distill.teacher=.*teacher: its model.ch=32 differs from this run's 16"):
        validate_distill(_student(tmp_path, **{"model.ch": 32}))
    with pytest.raises(UserError, match=r"its diffusion.model_output='v' differs from this run's 'eps'"):
        validate_distill(_student(tmp_path, **{"diffusion.model_output": "v"}))


@pytest.mark.parametrize("field, value, message", [
    ("distill.guidance", 2.0, "distill.guidance=2.0: classifier-free guidance of the teacher needs a class- or "
                              "text-conditional model"),
    ("sampling.timestep_spacing", "even", "set 'ddim', 0 and 'trailing'"),
    ("sampling.steps", 11, "sampling.steps=11: the student's steps; its teacher takes twice as many, at most "
                           "diffusion.num_timesteps=20"),
    ("distill.teacher", "nothing", "distill.teacher='nothing': no config.json there"),
    ("distill.teacher_checkpoint_step", 3, "distill.teacher_checkpoint_step=3: distill.teacher=.* has no checkpoint"),
    ("diffusion.variance", "learned_range", "diffusion.variance='learned_range': distillation trains"),
])
def test_a_students_bad_field_is_one_line(tmp_path, monkeypatch, field, value, message):
    config = _student(tmp_path)
    monkeypatch.chdir(tmp_path)  # 'nothing' is a folder that is not there
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=message):
        validate_distill(config)


def _next_round(tmp_path, first, steps):
    """A student of the run `first` (written to tmp_path/round1) in `steps` steps."""
    second = first.copy_and_resolve_references()
    second.distill.update(teacher=_run_config(tmp_path / "round1", first), guidance=0.0)
    second.sampling.steps = steps
    return second


def test_a_round_halves_its_teachers_steps(tmp_path):
    with pytest.raises(UserError, match="sampling.steps=4: distill.teacher=.*round1 is a student of 4 steps, so this "
                                        r"round's student takes 2 \(half as many\)"):
        validate_distill(_next_round(tmp_path, _student(tmp_path), 4))
    validate_distill(_next_round(tmp_path, _student(tmp_path), 2))


def test_guidance_is_distilled_once(tmp_path):
    first = _student(tmp_path, **{"model.num_classes": 10})
    first.model.num_classes = 10
    first.distill.guidance = 2.0
    validate_distill(first)
    first.sampling.guidance = 1.0
    with pytest.raises(UserError, match="sampling.guidance=1.0: the student learns its teacher guided with "
                                        "distill.guidance=2.0, so it samples guided with sampling.guidance=0"):
        validate_distill(first)
    first.sampling.guidance = 0.0
    second = _next_round(tmp_path, first, 2)
    validate_distill(second)
    second.distill.guidance = 2.0
    with pytest.raises(UserError, match=r"distill.guidance=2.0: distill.teacher=.*round1 learnt its own teacher "
                                        r"guided with w=2.0 already; set distill.guidance=0"):
        validate_distill(second)


def test_resume_refuses_another_teacher_or_step_count(tmp_path):
    config = _student(tmp_path)
    config.distill.teacher_checkpoint_step = 8
    workdir = _run_config(tmp_path / "student", config)
    for field, value in [("sampling.steps", 2), ("distill.teacher_checkpoint_step", 12)]:
        changed = config.copy_and_resolve_references()
        section, name = field.split(".")
        changed[section][name] = value
        with pytest.raises(UserError, match=f"{field}"):
            checkpoints.check_resume_config(workdir, changed, 4)
    changed = config.copy_and_resolve_references()
    changed.training.num_train_steps = 100
    checkpoints.check_resume_config(workdir, changed, 4)
    assert json.loads((tmp_path / "student" / "config.json").read_text())["distill"]["teacher_checkpoint_step"] == 8


def test_main_refuses_a_missing_teacher_in_one_line(tmp_path):
    workdir = tmp_path / "student"
    for config, message in [("distill.py", "name the run to distill after a colon"),
                            (f"distill.py:{tmp_path / 'nothing'}", "no config.json there")]:
        status, _, err = run_command(main, f"--config={ROOT}/configs/{config}", f"--workdir={workdir}")
        assert status == 2 and err.strip().count("\n") == 0 and message in err, err
        assert err.startswith(f"error: --config={ROOT}/configs/{config}: ")
    assert not workdir.exists()


def documented_commands() -> list[str]:
    """The command lines of docs/samplers.md's distillation examples, continuations joined."""
    runs = ("runs/digits_v", "runs/digits_d", "runs/digits_cond_v", "runs/digits_cond_d")
    return [line for line in bash_lines([os.path.join(ROOT, "docs", "samplers.md")])
            if line.startswith("python -m ddpm_jax.") and any(run in line for run in runs)]


@pytest.mark.slow  # eight small runs trained, three evaluations: about five minutes on a busy 2-core CPU
def test_the_documented_distillation_commands_run_as_written(tmp_path, monkeypatch):
    """docs/samplers.md's teachers, rounds (guided too), sample and evaluations as written, with a small
    model and 2 steps a run appended (sample and evaluate: fewer samples). The first student starts
    from its teacher's EMA params (2 Adam steps of at most ~2e-4 from them), its config.json records the
    teacher's step, and its command run again with more steps resumes from the same teacher."""
    monkeypatch.chdir(tmp_path)
    commands = documented_commands()
    assert len(commands) == 12, commands
    train = [f"--config.data.data_dir={tmp_path / 'tfds'}", *SMALL_MODEL]
    modules = {"main": (main, train), "sample": (sample, ["--num_samples=4", "--batch_size=8"]),
               "evaluate": (evaluate, ["--num_samples=10", "--num_per_class=1"])}
    for command in commands:
        name, *args = shlex.split(command)[2:]
        module, extra = modules[name.removeprefix("ddpm_jax.")]
        status, _, err = run_command(module, *[a.replace("configs/", f"{ROOT}/configs/") for a in args], *extra)
        assert status == 0, f"{command}: {err[-2000:]}"
    teacher, _ = checkpoints.load_params("runs/digits_v")
    student, _ = checkpoints.load_params("runs/digits_d8", use_ema=False)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(student)))
    assert 0 < moved < 1e-3, moved
    config = json.loads((tmp_path / "runs" / "digits_d8" / "config.json").read_text())
    assert config["distill"] == {"teacher": "runs/digits_v", "teacher_checkpoint_step": 2, "guidance": 0.0}
    assert config["sampling"]["steps"] == 8 and os.path.exists("runs/digits_d4/samples/samples.npz")
    guided = json.loads((tmp_path / "runs" / "digits_cond_d8" / "config.json").read_text())
    assert guided["distill"]["guidance"] == 1.0 and guided["sampling"]["guidance"] == 0.0
    resume = [a.replace("configs/", f"{ROOT}/configs/") for a in shlex.split(commands[1])[3:]]
    status, _, err = run_command(main, *resume, *train, "--config.training.num_train_steps=4")
    assert status == 0 and checkpoints.steps("runs/digits_d8") == [2, 4], err[-2000:]
