"""Progressive distillation: trailing timesteps, the student's target against a float64 reference on
the analytic Gaussian denoiser, the train step's wiring, and the checks of a distilled run's config."""
import functools
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

from ddpm_jax import (
    checkpoints,
    defaults,
    distillation,
    evaluate,
    generation,
    main,
    parallel,
    sample,
    train_state,
    training,
)
from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax.evaluation import tasks
from ddpm_jax.models import unet_from_config
from ddpm_jax.validation import UserError, validate_distill, validate_sampling

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

    guidance_embedding = False

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
    with pytest.raises(UserError, match=r"distill.teacher=.*round1 learnt its own teacher's guidance already; "
                                        r"distil it with distill.mode='progressive' and distill.guidance=0"):
        validate_distill(second)


# Guided distillation (Meng et al. 2023): a student that takes w as an input.


def _cond_config(**changes):
    """The small digits config, class-conditional, without dropout (training and inference agree), its
    timestep embedding scaling and shifting the norms: in Ho et al.'s blocks a per-channel shift is undone
    by a GroupNorm of one channel a group, as at ch = 16."""
    config = small_digits_config("unused")
    config.model.update(num_classes=10, dropout=0.0, scale_shift_norm=True)
    config.diffusion.clip_x0 = False
    config.update_from_flattened_dict(changes)
    return config


def _cond(n, rng, w=None):
    cond = {"label": jnp.asarray(rng.integers(0, 10, n), jnp.int32), "drop": jnp.asarray(np.arange(n) % 4 == 0)}
    return cond if w is None else {**cond, "guidance": jnp.asarray(w, jnp.float32)}


def _student_config(**changes):
    config = _cond_config(**changes)
    config.model.guidance_embedding = True
    return config


@functools.cache
def _teacher_and_student():
    """(teacher UNet, its params, student UNet with model.guidance_embedding, its params made from the
    teacher's by `create_train_state`), the teacher's params perturbed so its outputs are not all zero.
    Jitted as the train loop does: op by op it takes seconds more."""
    leaves, tree = jax.tree.flatten(train_state.init_params(_cond_config(), jax.random.key(0)))
    perturb = jax.jit(lambda leaves, keys: [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    params = tree.unflatten(perturb(leaves, list(jax.random.split(jax.random.key(1), len(leaves)))))
    student_params = jax.jit(functools.partial(train_state.create_train_state, _student_config()))(
        jax.random.key(0), params).params
    return unet_from_config(_cond_config()), params, unet_from_config(_student_config()), student_params


def test_a_student_that_takes_w_starts_as_its_teachers_conditional_model():
    """The teacher's params are kept, the embedding of w is added and its last layer starts at zero:
    whatever w, the student's output is the teacher's conditional one until it learns otherwise."""
    teacher, params, student, student_params = _teacher_and_student()
    assert set(student_params) - set(params) == {"guidance_dense0", "guidance_dense1"}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves({k: student_params[k] for k in params}),
                                                    jax.tree.leaves(params)))
    rng = np.random.default_rng(0)
    x, t, cond = jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32), jnp.arange(8) * 12, _cond(8, rng)
    apply = jax.jit(student.apply)
    np.testing.assert_allclose(apply({"params": student_params}, x, t, {**cond, "guidance": jnp.full(8, 3.0)}),
                               jax.jit(teacher.apply)({"params": params}, x, t, cond), atol=1e-6)
    # once the embedding is trained, w is an input: the samplers pass it, one pass a step
    dense1 = student_params["guidance_dense1"]
    trained = {**student_params, "guidance_dense1": {**dense1, "kernel": dense1["kernel"] + 0.1}}
    at = lambda w: apply({"params": trained}, x, t, {**cond, "guidance": jnp.full(8, w)})
    assert float(jnp.abs(at(3.0) - at(0.0)).max()) > 1e-3
    sampled = lambda **kw: jax.jit(S.unet_model_fn(student, trained, cond, **kw))(x, t)
    np.testing.assert_allclose(sampled(guidance=3.0), at(3.0), atol=1e-6)
    np.testing.assert_allclose(sampled(), at(0.0), atol=1e-6)
    inside = sampled(guidance=3.0, interval=(0.0, 40.0))
    np.testing.assert_allclose(inside[t <= 40], at(3.0)[t <= 40], atol=1e-6)
    np.testing.assert_allclose(inside[t > 40], at(0.0)[t > 40], atol=1e-6)
    with pytest.raises(ValueError, match="no autoguidance, negative prompt or guidance rescale"):
        S.unet_model_fn(student, trained, cond, guidance=3.0, rescale=0.7)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_first_stage_targets_are_the_guided_teachers_output(kind):
    """distill.mode='guidance': at every example's own w and timestep, the targets are the x_0 and eps of
    (1 + w) out(cond) - w out(null) of the teacher (the U-Net without the w input), and for a dropped
    row its unconditional output, whatever w."""
    teacher, params, student, _ = _teacher_and_student()
    config = _student_config(**{"diffusion.model_output": kind})
    config.distill.update(teacher="teacher", mode="guidance")
    rng = np.random.default_rng(3)
    n = 16
    w = rng.uniform(0, 4, n)
    z, t = jnp.asarray(rng.standard_normal((n, 8, 8, 1)), jnp.float32), jnp.asarray(rng.integers(0, 100, n))
    cond = _cond(n, rng, w)
    x0, eps = jax.jit(functools.partial(distillation.training_targets, config, student))(params, z, t, cond)
    plain = {k: v for k, v in cond.items() if k != "guidance"}
    apply = jax.jit(teacher.apply)
    out_c = np.asarray(apply({"params": params}, z, t, plain), np.float64)
    out_u = np.asarray(apply({"params": params}, z, t, S.null_condition(plain)), np.float64)
    w4 = w.reshape(-1, 1, 1, 1)
    guided = np.where(np.asarray(cond["drop"]).reshape(-1, 1, 1, 1), out_u, (1 + w4) * out_c - w4 * out_u)
    d = config.diffusion
    abar = np.cumprod(1 - D.linear_betas(100, d.beta_start, d.beta_end))[np.asarray(t)].reshape(-1, 1, 1, 1)
    z64 = np.asarray(z, np.float64)
    want_eps = guided if kind == "eps" else np.sqrt(1 - abar) * z64 + np.sqrt(abar) * guided
    want_x0 = (z64 - np.sqrt(1 - abar) * want_eps) / np.sqrt(abar)
    np.testing.assert_allclose(eps, want_eps, atol=2e-4)
    np.testing.assert_allclose(x0, want_x0, atol=2e-4 / np.sqrt(abar).min())


def test_first_stage_train_step_draws_w_and_trains_on_the_teachers_output():
    """Each example draws its own w in [distill.guidance_min, distill.guidance_max]; a student fresh from
    its teacher is the teacher's conditional model, so at w = 0 its first loss is 0: every row's target
    is its own output (the targets at w > 0: the test above)."""
    params = _teacher_and_student()[1]
    config = _student_config()
    config.distill.update(teacher="teacher", mode="guidance", guidance_min=1.0, guidance_max=3.0)
    keys = jax.random.split(jax.random.key(0), 4096)
    w = training.conditioning(config, {"label": jnp.zeros(4096, jnp.int32)}, keys)["guidance"]
    assert 1.0 <= float(w.min()) < 1.01 and 2.99 < float(w.max()) <= 3.0 and abs(float(w.mean()) - 2.0) < 0.03
    config.distill.update(guidance_min=0.0, guidance_max=0.0)
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 2, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(np.random.default_rng(1).integers(0, 10, (8, 2)), jnp.int32)}
    state = parallel.replicate(jax.jit(functools.partial(train_state.create_train_state, config))(
        jax.random.key(0), params))
    _, metrics = training.pmap_train_step(config)(state, batch, parallel.replicate(params))
    assert float(parallel.to_host(metrics)["loss"]) < 1e-10


def test_validate_guided_distillation(tmp_path):
    """The first stage's student takes w; its teacher does not, and has not learnt guidance; later rounds
    keep w as an input on both sides; each mistake is one line naming the field."""
    first = _student(tmp_path, **{"model.num_classes": 10})
    first.model.update(num_classes=10, guidance_embedding=True)
    first.distill.mode = "guidance"
    first.sampling.update(sampler="ancestral", timestep_spacing="even", steps=20)  # any sampler
    validate_distill(first)
    for changes, message in [
        ({"model.guidance_embedding": False}, "distill.mode='guidance': the student learns its teacher's guided "
                                              "output; set distill.guidance=w, or model.guidance_embedding=True"),
        ({"distill.guidance": 2.0}, "distill.guidance=2.0: a student with model.guidance_embedding learns every w "
                                    r"in \[distill.guidance_min, distill.guidance_max\] instead"),
        ({"distill.guidance_min": 3.0, "distill.guidance_max": 1.0}, "need 0 <= guidance_min <= guidance_max"),
        ({"distill.mode": "halving"}, r"distill.mode='halving': must be one of \('progressive', 'guidance'\)"),
    ]:
        config = first.copy_and_resolve_references()
        config.update_from_flattened_dict(changes)
        with pytest.raises(UserError, match=message):
            validate_distill(config)
    fixed = first.copy_and_resolve_references()
    fixed.model.guidance_embedding, fixed.distill.guidance = False, 2.0
    validate_distill(fixed)  # one w, learnt at every timestep: any sampler, one evaluation a step
    again = _next_round(tmp_path, first, 2)  # the first stage's student as a teacher
    again.distill.mode = "guidance"
    again.sampling.update(sampler="ancestral", timestep_spacing="even")
    with pytest.raises(UserError, match=r"round1 learnt its own teacher's guidance already"):
        validate_distill(again)
    second = _next_round(tmp_path, first, 8)  # progressive, w an input; a first stage is no step count to halve
    second.sampling.update(sampler="ddim", timestep_spacing="trailing")
    second.distill.mode = "progressive"
    validate_distill(second)
    second.model.guidance_embedding = False
    with pytest.raises(UserError, match=r"its model.guidance_embedding=True differs from this run's False"):
        validate_distill(second)
    alone = small_cifar10_config()
    alone.model.update(num_classes=10, guidance_embedding=True)
    with pytest.raises(UserError, match="model.guidance_embedding=True: the student learns w from a guided teacher"):
        validate_distill(alone)


def test_a_student_that_takes_w_refuses_what_needs_a_conditional_output(tmp_path):
    config = _cond_config(**{"model.guidance_embedding": True, "sampling.guidance": 2.0})
    config.sampling.guidance_rescale = 0.7
    with pytest.raises(UserError, match=r"sampling.guidance_rescale=0.7: this model learnt guidance "
                                        r"\(model.guidance_embedding\) and takes w as an input"):
        validate_sampling(config)
    text = small_cifar10_config()
    text.model.update(text_encoder="trained", guidance_embedding=True)
    text.sampling.guidance = 2.0
    with pytest.raises(UserError, match="--negative_prompt: this model learnt guidance against the null text"):
        generation.conditioning(text, prompts=["a red circle"], negative_prompt="a blue square")


def test_the_guidance_config_and_the_next_round(tmp_path):
    """configs/distill_guidance.py makes the first stage of a conditional run; configs/distill.py on that
    student starts the rounds at 8 steps, w still an input."""
    teacher = small_cifar10_config()
    teacher.model.num_classes = 10
    path = _run_config(tmp_path / "teacher", teacher)
    first = defaults.load_config_file(f"{ROOT}/configs/distill_guidance.py:{path}")
    assert first.model.guidance_embedding and first.distill.mode == "guidance" and first.distill.teacher == path
    assert (first.distill.guidance_min, first.distill.guidance_max) == (0.0, 4.0)
    assert first.sampling.sampler == teacher.sampling.sampler
    stage = _run_config(tmp_path / "stage1", first)
    second = defaults.load_config_file(f"{ROOT}/configs/distill.py:{stage}")
    assert second.model.guidance_embedding and second.distill.mode == "progressive"
    assert second.sampling.steps == 8 and second.distill.guidance_max == 4.0


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
    runs = ("runs/digits_v", "runs/digits_d", "runs/digits_cond_v", "runs/digits_cond_d", "runs/digits_cond_w")
    return [line for line in bash_lines([os.path.join(ROOT, "docs", "samplers.md")])
            if line.startswith("python -m ddpm_jax.") and any(run in line for run in runs)]


@pytest.mark.slow  # thirteen small runs trained, five evaluations: about eight minutes on a busy 2-core CPU
def test_the_documented_distillation_commands_run_as_written(tmp_path, monkeypatch):
    """docs/samplers.md's teachers, rounds (guided, and with w an input), samples and evaluations as
    written, with a small model and 2 steps a run appended (sample and evaluate: fewer samples). The
    first student starts from its teacher's EMA params (2 Adam steps of at most ~2e-4 from them), its
    config.json records the teacher's step, and its command run again with more steps resumes from the
    same teacher."""
    monkeypatch.chdir(tmp_path)
    commands = documented_commands()
    assert len(commands) == 20, commands
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
    assert config["distill"] == {"teacher": "runs/digits_v", "teacher_checkpoint_step": 2, "mode": "progressive",
                                 "guidance": 0.0, "guidance_min": 0.0, "guidance_max": 4.0}
    assert config["sampling"]["steps"] == 8 and os.path.exists("runs/digits_d4/samples/samples.npz")
    guided = json.loads((tmp_path / "runs" / "digits_cond_d8" / "config.json").read_text())
    assert guided["distill"]["guidance"] == 1.0 and guided["sampling"]["guidance"] == 0.0
    first, last = (json.loads((tmp_path / "runs" / run / "config.json").read_text())
                   for run in ("digits_cond_w", "digits_cond_w1"))
    assert first["model"]["guidance_embedding"] and first["distill"]["mode"] == "guidance"
    assert last["model"]["guidance_embedding"] and last["distill"]["mode"] == "progressive"
    assert last["sampling"]["steps"] == 1 and os.path.exists("runs/digits_cond_w4/samples/samples.npz")
    resume = [a.replace("configs/", f"{ROOT}/configs/") for a in shlex.split(commands[1])[3:]]
    status, _, err = run_command(main, *resume, *train, "--config.training.num_train_steps=4")
    assert status == 0 and checkpoints.steps("runs/digits_d8") == [2, 4], err[-2000:]
