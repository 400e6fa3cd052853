"""Progressive distillation (Salimans & Ho 2022) of a training run, one halving per run.

The run to distill, the teacher, follows a colon; the student takes its model, data and diffusion from
the teacher's config.json, starts from its EMA params, and learns to sample in `sampling.steps`
deterministic DDIM steps on trailing timesteps, half the teacher's (8, from 16, for a DDPM teacher;
docs/samplers.md has the rounds on the digits and what they measured):
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_v --workdir=runs/digits_d8
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_d8 --workdir=runs/digits_d4
A conditional teacher guided with weight w (the student samples with it learnt, at sampling.guidance 0):
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_cond_v --workdir=runs/digits_cond_d8 \
        --config.distill.guidance=1
A student of configs/distill_guidance.py (Meng et al.'s first stage) keeps w as its input in every round:
    python -m ddpm_jax.main --config=configs/distill.py:runs/digits_cond_w --workdir=runs/digits_cond_w8
The training settings are those measured on the digits (1,000 steps a round); a larger model wants more
steps (training.num_train_steps, which the learning rate's decay follows) and a slower EMA.
"""
from ddpm_jax import checkpoints
from ddpm_jax.validation import UserError


def get_config(teacher: str = ""):
    if not teacher:
        raise UserError("name the run to distill after a colon, e.g. --config=configs/distill.py:runs/digits_v.")
    c = checkpoints.load_config(teacher)
    student_of_a_student = bool(c.distill.teacher) and c.distill.mode == "progressive"
    c.distill.update(teacher=teacher, teacher_checkpoint_step=0, mode="progressive", guidance=0.0)
    c.sampling.update(sampler="ddim", eta=0.0, timestep_spacing="trailing", guidance=0.0,
                      steps=c.sampling.steps // 2 if student_of_a_student else 8)
    c.optim.update(learning_rate=2e-4, warmup_steps=0, ema_decay=0.995)  # 0.999: 37% teacher after 1,000 steps
    c.training.num_train_steps = 1000
    c.training.allow_config_change = False  # a resume must read the same teacher, whatever the teacher's run allowed
    c.optim.decay_steps = c.training.get_ref("num_train_steps")  # each round's learning rate decays to 0
    return c
