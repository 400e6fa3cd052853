"""Running a command module in-process, as `python -m ddpm_jax.X ARGS` would, for fast tests; the
command lines the docs show."""
import contextlib
import io
import re

from ddpm_jax import cli

# Appended to a documented train command: its model made small and 2 steps, one checkpoint, no extras.
SMALL_MODEL = ["--config.model.ch=16", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
               "--config.training.num_train_steps=2", "--config.training.checkpoint_every=2",
               "--config.training.log_every=1", "--config.training.sample_every=0",
               "--config.training.profile_steps=0", "--compilation_cache="]


def run_command(module, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `module` (e.g. `ddpm_jax.sample`) run with `args`."""
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(module.define_flags, module.main, [module.__name__, *args])
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def bash_lines(paths: list[str]) -> list[str]:
    """The lines of the ```bash blocks of the files `paths`, continuations joined, comments cut."""
    lines = []
    for path in paths:
        with open(path) as f:
            text = re.sub(r"\\\n\s*", " ", f.read())
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            lines += [line.split("  #")[0].strip() for line in block.splitlines()]
    return lines
