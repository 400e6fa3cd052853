"""launch/: --dry-run prints the commands the scripts would run (no gcloud or SLURM needed), and every
user value reaches the VM's shell (or srun) as one literal word.

The VM is faked: PATH shims for gcloud, git, python3, tmux, tar, tail and srun record their argv, and
the remote command (the --command= of `gcloud ... ssh`) runs in a local `bash -c` as sshd would run it.
"""
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SLURM = os.path.join(LAUNCH, "slurm_train.sbatch")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]

# Records its name, working folder and argv (NUL-separated) in $STUB_LOG.
STUB = """#!/usr/bin/env bash
printf '%s\\0' "${0##*/}" "$(pwd -P)" "$#" "$@" >> "$STUB_LOG"
"""
# tmux runs a new session's command line with a shell (sh here: stricter than bash).
TMUX_STUB = STUB + """[[ "$1" != new-session ]] || exec sh -c "${@: -1}"
"""

# Each would touch {m} if a shell ran it as code rather than reading it as one word.
HOSTILE = [
    "gs://b/run; touch {m}",
    "it's'; touch {m}; echo '",
    'a"b"; touch {m}; echo "',
    "$(touch {m})",
    "`touch {m}`",
    "x && touch {m} || touch {m}",
    "two  spaces\tand a tab",
    "line1\ntouch {m}",
    "$HOME ~ * ? [x] \\ | > < & = '\"'\\''",
]


def _env(tmp_path, remote_dir=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "WORKER", "REMOTE_DIR")
           and not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", STUB_LOG=str(tmp_path / "calls"), TMPDIR=str(tmp_path))
    if remote_dir is not None:
        env["REMOTE_DIR"] = remote_dir
    return env


@pytest.fixture
def vm(tmp_path):
    """tmp_path with the PATH shims in bin/ and the ssh user's home in home/."""
    (tmp_path / "bin").mkdir()
    for name in ("gcloud", "git", "python3", "tmux", "tar", "tail", "srun"):
        (tmp_path / "bin" / name).write_text(TMUX_STUB if name == "tmux" else STUB)
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "home").mkdir()
    return tmp_path


def _calls(tmp_path):
    """The shims' calls since the last _calls, as (name, working folder, argv[1:])."""
    log = tmp_path / "calls"
    if not log.exists():
        return []
    fields = log.read_bytes().decode().split("\0")[:-1]
    log.unlink()
    calls = []
    while fields:
        name, cwd, n = fields[0], fields[1], int(fields[2])
        calls.append((name, cwd, fields[3:3 + n]))
        fields = fields[3 + n:]
    return calls


def _dry_run(script, *flags, env=None):
    r = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", "--name=vm1", "--zone=z1", *flags],
                       capture_output=True, text=True, timeout=60, env=env)
    return r.returncode, r.stdout, r.stderr


def _parse(line, cwd):
    """The argv a shell runs for a pasted dry-run line; shlex.split agrees but cannot read $'...'."""
    r = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], capture_output=True, text=True, timeout=60,
                       cwd=cwd, check=True)
    argv = r.stdout.split("\0")[:-1]
    if "$'" not in line:
        assert shlex.split(line) == argv, line
    return argv


def _commands(vm, script, *flags, remote_dir=None):
    """The argvs `script --dry-run` prints, checked to be what the real run executes."""
    env = _env(vm, remote_dir)
    rc, out, err = _dry_run(script, *flags, env=env)
    assert rc == 0, err
    argvs = [_parse(line, vm) for line in out.splitlines()]
    r = subprocess.run(["bash", os.path.join(LAUNCH, script), "--name=vm1", "--zone=z1", *flags],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert [[name, *argv] for name, _, argv in _calls(vm)] == argvs
    return argvs


def _run_on_vm(vm, argvs):
    """Runs the ssh command's --command= in bash in the fake home; returns the shims' calls there."""
    [ssh] = [argv for argv in argvs if argv[:5] == SSH]
    [command] = [arg[len("--command="):] for arg in ssh if arg.startswith("--command=")]
    subprocess.run(["bash", "-n", "-c", command], check=True, timeout=60)
    # The exit trap lets nohup's background job finish before the calls are read.
    r = subprocess.run(["bash", "-c", "trap wait EXIT\n" + command], capture_output=True, text=True, timeout=60,
                       cwd=vm / "home", env=_env(vm))
    assert r.returncode == 0, r.stderr
    return _calls(vm)


@pytest.mark.parametrize("script, flags, expected", [
    ("create_vm.sh", ["--spot", "--accelerator=v5litepod-8"],
     [SSH[:4] + ["create", "vm1", "--zone=z1", "--accelerator-type=v5litepod-8", "--version=tpu-ubuntu2204-base",
                 "--spot"]]),
    ("setup_vm.sh", ["--worker=all"],
     [["git", "-C", os.path.dirname(LAUNCH), "archive", "--format=tar.gz", "-o", "{tmp}/ddpm_jax.tar.gz", "HEAD"],
      SSH[:4] + ["scp", "{tmp}/ddpm_jax.tar.gz", "vm1:ddpm_jax.tar.gz", "--zone=z1", "--worker=all"],
      SSH + ["vm1", "--zone=z1", "--worker=all", "--command=set -e; mkdir -p ddpm_jax && tar -xzf ddpm_jax.tar.gz "
             "-C ddpm_jax && cd ddpm_jax && (command -v tmux >/dev/null || sudo apt-get install -y tmux) && python3 -m "
             "pip install -U pip && python3 -m pip install 'jax[tpu]' && python3 -m pip install -r requirements.txt "
             "-e . && python3 -c 'import jax; print(jax.devices())'"]]),
    ("train.sh", ["--workdir=gs://b/r", "--", "--config.training.batch_size=64"],
     [SSH + ["vm1", "--zone=z1", "--worker=0", "--command=cd ddpm_jax && tmux new-session -d -s ddpm 'python3 -m "
             "ddpm_jax.main --config=configs/cifar10.py --workdir=gs://b/r --config.training.batch_size=64 "
             ">> train.log 2>&1' && echo started in tmux session ddpm"]]),
    ("train.sh", ["--workdir=runs/x", "--nohup", "--config=configs/digits.py"],
     [SSH + ["vm1", "--zone=z1", "--worker=0", "--command=cd ddpm_jax && { nohup python3 -m ddpm_jax.main "
             "--config=configs/digits.py --workdir=runs/x >> train.log 2>&1 < /dev/null & } "
             "&& echo started with nohup"]]),
    ("tail_log.sh", ["--lines=20"],
     [SSH + ["vm1", "--zone=z1", "--worker=0", "--command=tail -n 20 -F ddpm_jax/train.log"]]),
    # A pod slice: every host trains; the log to follow is process 0's, on worker 0.
    ("create_vm.sh", ["--accelerator=v4-32"],
     [SSH[:4] + ["create", "vm1", "--zone=z1", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]),
    ("train.sh", ["--worker=all", "--workdir=gs://b/r"],
     [SSH + ["vm1", "--zone=z1", "--worker=all", "--command=cd ddpm_jax && tmux new-session -d -s ddpm 'python3 -m "
             "ddpm_jax.main --config=configs/cifar10.py --workdir=gs://b/r >> train.log 2>&1' && echo started in "
             "tmux session ddpm"]]),
    ("tail_log.sh", ["--worker=all"],
     [SSH + ["vm1", "--zone=z1", "--worker=0", "--command=tail -n 100 -F ddpm_jax/train.log"]]),
    ("delete_vm.sh", [], [SSH[:4] + ["delete", "vm1", "--zone=z1", "--quiet"]]),
])
def test_dry_run_prints_the_commands_the_real_run_executes(vm, script, flags, expected):
    expected = [[word.replace("{tmp}", str(vm)) for word in argv] for argv in expected]
    assert _commands(vm, script, *flags) == expected


@pytest.mark.parametrize("mode", ["tmux", "nohup"])
@pytest.mark.parametrize("value", HOSTILE)
def test_train_values_reach_python_as_one_literal_word_each(vm, value, mode):
    value = value.format(m=vm / "pwned")
    (vm / "home" / value).mkdir(parents=True)
    argvs = _commands(vm, "train.sh", f"--name={value}", f"--workdir={value}", f"--config={value}",
                      *(["--nohup"] if mode == "nohup" else []), "--", value, "--config.training.batch_size=64",
                      remote_dir=value)
    assert argvs[0][5] == value
    calls = _run_on_vm(vm, argvs)
    folder = os.path.realpath(vm / "home" / value)
    expected_python = ["-m", "ddpm_jax.main", f"--config={value}", f"--workdir={value}", value,
                       "--config.training.batch_size=64"]
    assert calls[-1] == ("python3", folder, expected_python)
    assert (vm / "home" / value / "train.log").exists()
    assert not (vm / "pwned").exists()


@pytest.mark.parametrize("value", HOSTILE)
def test_setup_and_tail_log_use_remote_dir_and_name_as_one_literal_word(vm, value):
    value = value.format(m=vm / "pwned")
    argvs = _commands(vm, "setup_vm.sh", f"--name={value}", remote_dir=value)
    assert argvs[1][6] == f"{value}:ddpm_jax.tar.gz" and argvs[2][5] == value
    calls = _run_on_vm(vm, argvs)
    assert calls[0] == ("tar", os.path.realpath(vm / "home"), ["-xzf", "ddpm_jax.tar.gz", "-C", value])
    assert calls[-1][:2] == ("python3", os.path.realpath(vm / "home" / value))

    argvs = _commands(vm, "tail_log.sh", f"--name={value}", "--lines=5", remote_dir=value)
    assert argvs[0][5] == value
    assert _run_on_vm(vm, argvs) == [("tail", os.path.realpath(vm / "home"), ["-n", "5", "-F", f"{value}/train.log"])]
    assert not (vm / "pwned").exists()


@pytest.mark.parametrize("script", ["create_vm.sh", "delete_vm.sh"])
@pytest.mark.parametrize("value", HOSTILE)
def test_create_and_delete_pass_the_name_as_one_word(vm, value, script):
    value = value.format(m=vm / "pwned")
    [argv] = _commands(vm, script, f"--name={value}")
    assert argv[5] == value
    assert not (vm / "pwned").exists()


@pytest.mark.parametrize("script, flags, env, named", [
    ("tail_log.sh", ["--lines=abc"], {}, "--lines"),
    ("tail_log.sh", ["--lines=0"], {}, "--lines"),
    ("tail_log.sh", ["--lines=5; touch x"], {}, "--lines"),
    ("train.sh", ["--worker=-1", "--workdir=w"], {}, "--worker"),
    ("delete_vm.sh", ["--worker=one"], {}, "--worker"),
    ("train.sh", ["--workdir="], {}, "--workdir"),
    ("train.sh", ["--workdir=w", "--config="], {}, "--config"),
    ("create_vm.sh", ["--name="], {}, "--name"),
    ("tail_log.sh", [], {"REMOTE_DIR": "-x"}, "REMOTE_DIR"),
    ("train.sh", ["--workdir=w", "--bad\nflag"], {}, "--bad"),
])
def test_bad_values_exit_2_with_one_line_naming_the_flag(script, flags, env, named):
    rc, out, err = _dry_run(script, *flags, env={**os.environ, **env})
    assert (rc, out) == (2, "") and err.count("\n") == 1 and named in err, err


def test_every_script_says_what_it_needs_and_rejects_unknown_flags():
    for script in ("create_vm.sh", "setup_vm.sh", "train.sh", "tail_log.sh", "delete_vm.sh"):
        with open(os.path.join(LAUNCH, script)) as f:
            assert "# Needs:" in f.read()
        rc, _, err = _dry_run(script, "--bogus")
        assert rc == 2 and "--bogus" in err
    rc, _, err = _dry_run("train.sh")
    assert rc == 2 and "--workdir" in err


def _slurm(vm, *flags, **env):
    """The argvs `slurm_train.sbatch --dry-run flags` prints, checked to be what it runs (cd is a builtin:
    srun's working folder shows it)."""
    env = {**_env(vm), **env}
    dry = subprocess.run(["bash", SLURM, "--dry-run", *flags], capture_output=True, text=True, timeout=60, env=env)
    assert dry.returncode == 0, dry.stderr
    argvs = [_parse(line, vm) for line in dry.stdout.splitlines()]
    real = subprocess.run(["bash", SLURM, *flags], capture_output=True, text=True, timeout=60, env=env, cwd=vm)
    assert real.returncode == 0, real.stderr
    [(name, cwd, argv)] = _calls(vm)
    assert argvs == [["cd", cwd], [name, *argv]]
    return argvs


def test_slurm_script_runs_one_task_per_node_on_all_its_gpus(vm):
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label", "env"]
    train = ["-m", "ddpm_jax.main", "--config=configs/cifar10.py", "--workdir=/shared/r"]
    # As sbatch runs it: from the spool folder, the repository in SLURM_SUBMIT_DIR, the GPUs counted.
    assert _slurm(vm, "--workdir=/shared/r", "--", "--config.training.batch_size=64", SLURM_SUBMIT_DIR=ROOT,
                  SLURM_GPUS_ON_NODE="4") == [
        ["cd", ROOT], [*srun, "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "python3", *train, "--config.training.batch_size=64"]]
    assert _slurm(vm, "--workdir=/shared/r", "--gpus-per-node=2", SLURM_GPUS_ON_NODE="4", PYTHON="/venv/bin/python")[
        1] == [*srun, "JAX_LOCAL_DEVICE_IDS=0,1", "/venv/bin/python", *train]


@pytest.mark.parametrize("value", HOSTILE)
def test_slurm_script_passes_each_value_to_srun_as_one_word(vm, value):
    value = value.format(m=vm / "pwned")
    [_, srun] = _slurm(vm, f"--workdir={value}", f"--config={value}", "--gpus-per-node=1", "--", value)
    assert srun[-3:] == [f"--config={value}", f"--workdir={value}", value]
    assert not (vm / "pwned").exists()


@pytest.mark.parametrize("flags, env, named", [
    (["--workdir=w"], {}, "--gpus-per-node"),  # outside SLURM nothing says how many
    (["--workdir=w", "--gpus-per-node=0"], {}, "--gpus-per-node"),
    (["--workdir=w"], {"SLURM_GPUS_ON_NODE": "x"}, "--gpus-per-node"),
    (["--workdir=", "--gpus-per-node=1"], {}, "--workdir"),
    (["--workdir=w", "--gpus-per-node=1", "--name=vm1"], {}, "--name"),
    (["--workdir=w", "--gpus-per-node=1"], {"SLURM_SUBMIT_DIR": "/"}, "repository's root"),
])
def test_slurm_script_bad_values_exit_2_with_one_line_naming_the_flag(flags, env, named):
    r = subprocess.run(["bash", SLURM, "--dry-run", *flags], capture_output=True, text=True, timeout=60,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **env})
    assert (r.returncode, r.stdout) == (2, "") and r.stderr.count("\n") == 1 and named in r.stderr, r.stderr
    with open(SLURM) as f:
        assert "# Needs:" in f.read()
