"""launch/*.sh --dry-run print the gcloud commands they would run (no gcloud needed)."""
import os
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


def _dry_run(script, *flags):
    r = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", "--name=vm1", "--zone=z1", *flags],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("script, flags, expected", [
    ("create_vm.sh", ["--spot", "--accelerator=v5litepod-8"],
     ["gcloud compute tpus tpu-vm create vm1 --zone=z1 --accelerator-type=v5litepod-8", "--spot"]),
    ("setup_vm.sh", ["--worker=all"],
     ["archive", "tpu-vm scp", "tpu-vm ssh vm1 --zone=z1 --worker=all", "jax\\[tpu\\]", "requirements.txt"]),
    ("train.sh", ["--workdir=gs://b/r", "--", "--config.training.batch_size=64"],
     ["tpu-vm ssh vm1", "tmux\\ new-session", "ddpm_jax.main\\ --config=configs/cifar10.py\\ --workdir=gs://b/r\\ "
                                              "--config.training.batch_size=64"]),
    ("train.sh", ["--workdir=runs/x", "--nohup", "--config=configs/digits.py"], ["nohup", "configs/digits.py"]),
    ("tail_log.sh", [], ["tpu-vm ssh vm1 --zone=z1 --worker=0", "tail\\ -n\\ 100\\ -F"]),
    ("delete_vm.sh", [], ["gcloud compute tpus tpu-vm delete vm1 --zone=z1 --quiet"]),
])
def test_dry_run_prints_the_gcloud_commands(script, flags, expected):
    rc, out, err = _dry_run(script, *flags)
    assert rc == 0, err
    for text in expected:
        assert text in out, out


def test_every_script_says_what_it_needs_and_rejects_unknown_flags():
    for script in ("create_vm.sh", "setup_vm.sh", "train.sh", "tail_log.sh", "delete_vm.sh"):
        with open(os.path.join(LAUNCH, script)) as f:
            assert "# Needs:" in f.read()
        rc, _, err = _dry_run(script, "--bogus")
        assert rc == 2 and "--bogus" in err
    rc, _, err = _dry_run("train.sh")
    assert rc == 2 and "--workdir" in err
