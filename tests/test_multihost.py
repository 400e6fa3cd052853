"""Multi-process runs on this machine: two processes of 4 CPU devices each run the real commands
(`jax.distributed.initialize` on a localhost coordinator, CPU collectives over gloo) and must do
what one process of 8 devices does: the same training, a stop agreed by both, one set of files.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from ddpm_jax import checkpoints, cli
from ddpm_jax.validation import UserError
from tests.train_helpers import prepare_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_digits(str(tmp_path_factory.mktemp("tfds")))


def _train_flags(data_dir, workdir, sample_every=0):
    """The digits config at its smallest: 12 steps of 16 with checkpoints every 4."""
    return [f"--config={ROOT}/configs/digits.py", f"--workdir={workdir}", "--compilation_cache=",
            f"--config.data.data_dir={data_dir}", "--config.model.ch=16", "--config.model.ch_mult=(1,)",
            "--config.model.attn_resolutions=()", "--config.diffusion.num_timesteps=100",
            "--config.sampling.steps=10", "--config.optim.warmup_steps=2",
            # Gradients that are 0 up to float noise (biases a GroupNorm follows) would take Adam steps
            # of +-lr whose sign is the noise of the reduction order, which 2 x 4 and 1 x 8 devices differ in.
            "--config.optim.eps=1e-5",
            "--config.training.batch_size=16", f"--config.training.num_train_steps={STEPS}",
            "--config.training.log_every=4", "--config.training.checkpoint_every=4",
            "--config.training.stop_check_every=2", f"--config.training.sample_every={sample_every}",
            "--config.training.num_sample_images=16", "--config.training.profile_steps=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(module, args, logs, num_processes=2, cwds=None):
    """`python -m module args` as `num_processes` processes of 8 / num_processes CPU devices, joined by
    the process flags; output in logs.<i>."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // num_processes}"}
    # No persistent compilation cache: process 0 alone reads it, and its head start would make the
    # other time out in gloo's 30 s rendezvous at the first collective (see docs/multihost.md).
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    port = _free_port()
    procs = []
    for i in range(num_processes):
        join = ([f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
                if num_processes > 1 else [])
        with open(f"{logs}.{i}", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args, *join], cwd=(cwds or [ROOT] * 2)[i],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, logs) -> list[tuple[int, str]]:
    """(exit status, output) of each process; kills them all if one takes over 10 minutes."""
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for i, p in enumerate(procs):
        with open(f"{logs}.{i}") as f:
            outputs.append((p.returncode, f.read()))
    return outputs


def _run(module, args, logs, num_processes=2, cwds=None):
    results = _wait(_start(module, args, logs, num_processes, cwds), logs)
    for rc, out in results:
        assert rc == 0, out[-5000:]
    return results


def _params(workdir):
    """(params, EMA params, step) of the newest checkpoint."""
    params, step = checkpoints.load_params(workdir, use_ema=False)
    return params, checkpoints.load_params(workdir)[0], step


@pytest.fixture(scope="module")
def stopped_and_resumed(data_dir, tmp_path_factory):
    """A 12-step run on 2 processes x 4 devices whose process 1 gets SIGTERM after step 4, then the
    same command again: (workdir, [(status, output)] of the stopped processes, of the resumed ones)."""
    tmp = tmp_path_factory.mktemp("two")
    workdir, flags = tmp / "run", _train_flags(data_dir, tmp / "run", sample_every=STEPS)
    procs = _start("ddpm_jax.main", flags, tmp / "log")
    try:
        while not any(path.name.startswith("4") for path in (workdir / "checkpoints").glob("*")):  # a save began
            assert all(p.poll() is None for p in procs), "a process ended before step 4"
            time.sleep(0.02)
        # Process 0 holds still, so process 1 cannot be far past step 4 when it gets SIGTERM.
        os.kill(procs[0].pid, signal.SIGSTOP)
        os.kill(procs[1].pid, signal.SIGTERM)
        time.sleep(0.5)
    finally:
        os.kill(procs[0].pid, signal.SIGCONT)
    stopped = _wait(procs, tmp / "log")
    saved = sorted(int(step) for step in os.listdir(workdir / "checkpoints"))
    return str(workdir), stopped, saved, _run("ddpm_jax.main", flags, tmp / "rerun")


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_sigterm_to_one_process_stops_both_after_the_same_step(stopped_and_resumed):
    _, ((rc0, log0), (rc1, log1)), saved, _ = stopped_and_resumed
    assert (rc0, rc1) == (0, 0), log0[-3000:] + log1[-3000:]
    assert "Received SIGTERM" in log1 and "Received SIGTERM" not in log0
    stopped = int(log0.split("Stopped at step ")[1].split(";")[0])
    assert 4 < stopped < STEPS and stopped % 2 == 0  # at a stop check (every 2 steps), before the end
    assert f"Stopped at step {stopped};" in log1  # (process 1 logs warnings only)
    assert saved == [4, stopped]  # a save is collective: it completes only if both save that step


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_two_processes_of_4_devices_stopped_and_resumed_train_as_one_of_8_in_one_go(stopped_and_resumed, data_dir,
                                                                                  tmp_path):
    workdir, _, _, ((_, log0), (_, log1)) = stopped_and_resumed
    _run("ddpm_jax.main", _train_flags(data_dir, tmp_path / "run"), tmp_path / "log", num_processes=1)
    two, one = _params(workdir), _params(str(tmp_path / "run"))
    assert two[2] == one[2] == STEPS
    apart = jax.tree.map(lambda x, y: np.abs(x - y).max(), one[0], one[1])
    assert max(jax.tree.leaves(apart)) > 1e-3  # params and EMA: the steps moved them apart by far more
    for a, b in zip(two[:2], one[:2]):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    # Process 0 alone logs progress and writes the grid; the other says who it is.
    assert "Process 0 of 2 (flags): 4 local devices, 8 in all." in log0
    assert "Process 1 of 2 (flags): 4 local devices, 8 in all." in log1
    assert "Resuming from" in log0 and "loss=" in log0 and "loss=" not in log1
    assert "step_00000012.png" in log0 and "step_00000012.png" not in log1
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_00000012.png"]


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_sample_command_on_two_processes_writes_one_grid_of_the_same_images(stopped_and_resumed, tmp_path):
    workdir = stopped_and_resumed[0]
    flags = [f"--workdir={workdir}", "--num_samples=20"]  # 20: padded to 24 over 8 devices
    (_, out0), (_, out1) = _run("ddpm_jax.sample", [*flags, f"--out={tmp_path / 'two'}"], tmp_path / "log")
    _run("ddpm_jax.sample", [*flags, f"--out={tmp_path / 'one'}"], tmp_path / "log1", num_processes=1)
    assert sorted(os.listdir(tmp_path / "two")) == ["samples.npz", "samples.png"]
    assert "samples.npz" in out0 and "samples.npz" not in out1
    two, one = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("two", "one"))
    assert two.shape == (20, 8, 8, 1)
    np.testing.assert_array_equal(two, one)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_sample_command_killed_on_two_processes_resumes_and_draws_the_same_images(stopped_and_resumed, tmp_path):
    """Both processes killed part way: each kept its finished batches in OUT/partial/process_P; the
    same command resumes from the first batch one of them lacks and writes the images of a run that
    was never stopped."""
    workdir = stopped_and_resumed[0]
    flags = [f"--workdir={workdir}", "--num_samples=800", "--batch_size=8", "--steps=100"]  # 100 batches
    _run("ddpm_jax.sample", [*flags, f"--out={tmp_path / 'whole'}"], tmp_path / "log")
    partial = tmp_path / "out" / "partial"
    procs = _start("ddpm_jax.sample", [*flags, f"--out={tmp_path / 'out'}"], tmp_path / "log1")
    try:
        while not all((partial / f"process_{i}" / "chunk_000002.npz").exists() for i in (0, 1)):
            assert all(p.poll() is None for p in procs), "a process ended before its third batch"
            time.sleep(0.01)
    finally:
        for p in procs:
            p.kill()
    _wait(procs, tmp_path / "log1")
    kept = [sum(name.endswith(".npz") for name in os.listdir(partial / f"process_{i}")) for i in (0, 1)]
    assert min(kept) >= 3 and max(kept) < 100, kept
    (_, out0), _ = _run("ddpm_jax.sample", [*flags, f"--out={tmp_path / 'out'}"], tmp_path / "log2")
    assert f"resuming: {8 * min(kept)}/800 images read from the last run" in out0, out0[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["samples.npz", "samples.png"]
    whole, resumed = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("whole", "out"))
    np.testing.assert_array_equal(resumed, whole)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_a_workdir_the_processes_do_not_share_is_refused(data_dir, tmp_path):
    # A relative workdir from two folders: two local disks, as for processes on two hosts.
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for cwd in cwds:
        cwd.mkdir()
    results = _wait(_start("ddpm_jax.main", _train_flags(data_dir, "run"), tmp_path / "log", cwds=cwds),
                    tmp_path / "log")
    for rc, out in results:
        assert rc == 2, out[-3000:]
        [line] = [line for line in out.splitlines() if line.startswith("error: ")]
        assert "--workdir=run: process(es) 1 do not see the lock that process 0 wrote" in line
        assert "gs:// bucket or a shared filesystem" in line
    assert not (cwds[0] / "run" / ".lock").exists()  # released
    assert not (cwds[0] / "run" / "checkpoints").exists() and not (cwds[1] / "run").exists()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
      "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, None),  # one task
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}, None),  # no srun step
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "2"}, "Cloud TPU"),
    ({"TPU_WORKER_HOSTNAMES": "w0", "TPU_WORKER_ID": "0"}, None),
    ({"MEGASCALE_NUM_SLICES": "2"}, "Cloud TPU"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_several_processes_are_detected_only_where_the_cluster_says_so(monkeypatch, env, expected):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "_tpu_vm_hosts", lambda: 0)
    assert cli.detected_cluster() == expected


def test_a_tpu_vm_of_a_pod_slice_is_detected_by_its_metadata(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "_tpu_vm_hosts", lambda: 4)
    assert cli.detected_cluster() == "Cloud TPU pod slice"
    monkeypatch.setattr(cli, "_tpu_vm_hosts", lambda: 1)  # a single-host TPU VM
    assert cli.detected_cluster() is None


def _start_processes(*args):
    from absl import flags

    fv = flags.FlagValues()
    cli.define_process_flags(fv)
    fv(["command", *args])
    cli.start_processes(fv)


def test_process_flags_reach_jax_and_one_process_starts_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cli, "detected_cluster", lambda: None)
    _start_processes()
    _start_processes("--num_processes=1")
    assert calls == []
    with pytest.raises(UserError, match=r"--process_id=2: must be below --num_processes=2"):
        _start_processes("--num_processes=2", "--process_id=2")
    _start_processes("--coordinator_address=h:1", "--num_processes=2", "--process_id=1")
    _start_processes("--process_id=1")  # the rest from the cluster (JAX fills it in)
    monkeypatch.setattr(cli, "detected_cluster", lambda: "SLURM")
    _start_processes()
    _start_processes("--num_processes=1")  # one process wins over the cluster
    assert calls == [{"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, {"process_id": 1}, {}]


def test_a_cluster_jax_cannot_complete_is_a_user_error(monkeypatch):
    def initialize(**kw):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    with pytest.raises(UserError, match=r"cannot start a multi-process run \(Number of processes must be "
                                        r"defined\.\): give --coordinator_address"):
        _start_processes("--coordinator_address=h:1")


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
@pytest.mark.parametrize("shared", [True, False])
def test_embed_on_two_processes_splits_a_shared_folder_and_fills_folders_of_their_own(tmp_path, shared):
    """Each process embeds every other caption; where the hosts' folders are their own, each then
    writes the other half too. Every file is the one a single process writes."""
    from PIL import Image

    from ddpm_jax import t5

    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]
    cwds = [str(tmp_path / "host0"), str(tmp_path / ("host0" if shared else "host1"))]
    for cwd in set(cwds):
        os.makedirs(os.path.join(cwd, "mine"))
        for i, caption in enumerate(captions):
            Image.new("RGB", (16, 16)).save(os.path.join(cwd, "mine", f"{i}.png"))
            with open(os.path.join(cwd, "mine", f"{i}.txt"), "w") as f:
                f.write(caption)
    tiny = os.path.join(ROOT, "tests", "data", "t5_tiny")
    args = [f"--config={ROOT}/configs/shapes_t2i.py", "--config.data.dataset=folder", "--config.data.data_dir=mine",
            "--config.model.text_encoder=precomputed", f"--config.model.text_encoder_path={tiny}",
            "--config.model.text_emb_dim=32", "--batch_size=2"]
    results = _run("ddpm_jax.embed", args, str(tmp_path / "log"), cwds=cwds)
    out = results[0][1]  # (the other processes log warnings only)
    assert f"process 0 wrote {3 if shared else 6} embeddings, kept 0 up to date (6 captions)" in out, out[-3000:]
    want, mask = t5.load(tiny).embed(captions, 48)
    for cwd in set(cwds):
        for i in range(len(captions)):
            with np.load(os.path.join(cwd, "mine", f"{i}.npz")) as f:
                np.testing.assert_allclose(f["text_emb"], want[i][mask[i]], rtol=0, atol=1e-5)


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_captions_embedded_as_it_trains_on_two_processes_train_as_one_process(tmp_path):
    """data.embed_captions with the frozen T5 split over pairs of devices, 2 steps per call: each
    process embeds its own rows on its own devices, and the params are those of one process of 8."""
    tiny = os.path.join(ROOT, "tests", "data", "t5_tiny")
    args = [f"--config={ROOT}/configs/shapes_t2i.py", "--compilation_cache=", f"--config.data.data_dir={tmp_path}",
            "--config.data.embed_captions=True", "--config.model.text_encoder=precomputed",
            f"--config.model.text_encoder_path={tiny}", "--config.model.text_emb_dim=32",
            "--config.model.text_encoder_shards=2", "--config.model.ch=16", "--config.model.ch_mult=(1,)",
            "--config.model.attn_resolutions=(16,)", "--config.training.batch_size=16",
            "--config.training.num_train_steps=4", "--config.training.steps_per_call=2",
            "--config.training.checkpoint_every=4", "--config.training.sample_every=0",
            "--config.training.profile_steps=0"]
    _run("ddpm_jax.main", [*args, f"--workdir={tmp_path / 'two'}"], str(tmp_path / "log2"))
    _run("ddpm_jax.main", [*args, f"--workdir={tmp_path / 'one'}"], str(tmp_path / "log1"), num_processes=1)
    (two, two_ema, step), (one, one_ema, _) = _params(tmp_path / "two"), _params(tmp_path / "one")
    assert step == 4
    chex.assert_trees_all_close(two, one, atol=1e-7)  # 3.8e-11 measured
    chex.assert_trees_all_close(two_ema, one_ema, atol=1e-7)
