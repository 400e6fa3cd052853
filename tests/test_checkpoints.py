"""Checkpoint reliability: unreadable checkpoints, one trainer per workdir, config changes on resume."""
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import types

import jax
import numpy as np
import pytest
from etils import epath

from configs import tiny
from ddpm_jax import checkpoints, locking, parallel
from ddpm_jax.train_state import create_train_state
from ddpm_jax.validation import UserError


def _config():
    c = tiny.get_config()
    c.data.image_size, c.data.channels = 8, 1
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 16, (1,), ()
    c.diffusion.num_timesteps = 20
    return c


def test_the_saved_state_has_arrays_for_leaves_never_numpy_scalars_nor_views_of_device_buffers():
    """Orbax 0.11 (the oldest supported) refuses numpy scalars such as Adam's step count. The state is
    saved in the background while the next train step runs on (and donates) the device state, so
    the host copy must not be a view of it (on CPU `np.asarray` of a device array is one)."""
    state = parallel.replicate(create_train_state(_config(), 0))
    leaves = jax.tree.leaves(parallel.to_host(state))
    assert leaves and all(type(leaf) is np.ndarray and leaf.flags.owndata for leaf in leaves)
    assert any(leaf.ndim == 0 for leaf in leaves)
    buffers = {shard.data.unsafe_buffer_pointer() for x in jax.tree.leaves(state) for shard in x.addressable_shards}
    assert not {leaf.__array_interface__["data"][0] for leaf in leaves if leaf.size} & buffers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with checkpoints at steps 1, 2 and 3 (data position = step)."""
    path = str(tmp_path_factory.mktemp("run"))
    checkpoints.write_config(path, _config())
    manager = checkpoints.checkpoint_manager(path)
    state = jax.device_get(create_train_state(_config(), 0))
    for step in (1, 2, 3):
        checkpoints.save_train_state(manager, state.replace(step=step), {"position": step})
    manager.wait_until_finished()
    manager.close()
    return path


@pytest.fixture
def workdir(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return str(tmp_path / "run")


def _tree_hash(path) -> str:
    """One hash of every folder and file name and every file's bytes under `path`."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        h.update(os.path.relpath(root, path).encode())
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _largest_file(folder) -> str:
    """The biggest array data file Orbax wrote under `folder` (OCDBT: `ocdbt.process_0/d/<hash>`)."""
    return max((p for p in glob.glob(f"{folder}/**", recursive=True) if os.path.isfile(p)), key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes(size))


CORRUPTIONS = {
    "truncated array file": (lambda step_dir: _truncate(_largest_file(f"{step_dir}/params")), r"[a-z-]+"),
    "zeroed array file": (lambda step_dir: _zero(_largest_file(f"{step_dir}/params")), r"[a-z-]+"),
    "params folder deleted": (lambda step_dir: shutil.rmtree(f"{step_dir}/params"), "missing-params"),
    "data folder deleted": (lambda step_dir: shutil.rmtree(f"{step_dir}/data"), "missing-data"),
    "zeroed data JSON": (lambda step_dir: _zero(f"{step_dir}/data/metadata"), r"[a-z-]+"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_training_restore_moves_an_unreadable_checkpoint_aside_and_uses_the_older_one(workdir, corruption, caplog):
    corrupt, tag = CORRUPTIONS[corruption]
    step_dir = os.path.join(workdir, "checkpoints", "3")
    corrupt(step_dir)
    before = _tree_hash(step_dir)
    manager = checkpoints.checkpoint_manager(workdir, keep=3)
    state, data = checkpoints.restore_train_state(manager, _config())
    assert int(state.step) == 2 and data == {"position": 2}

    bad_dir = os.path.join(workdir, checkpoints.BAD_CHECKPOINT_DIR)
    moved = [n for n in os.listdir(bad_dir) if not n.endswith(".txt")]
    assert len(moved) == 1 and re.fullmatch(rf"3-{tag}-\d{{8}}T\d{{6}}", moved[0]), moved
    assert _tree_hash(os.path.join(bad_dir, moved[0])) == before  # moved as it was, not rewritten
    with open(os.path.join(bad_dir, moved[0] + ".txt")) as f:
        assert f.read().startswith(f"{step_dir}: ")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    assert any(r.levelname == "WARNING" and f"{step_dir} cannot be read" in r.getMessage() for r in caplog.records)
    # The manager forgot step 3: training can save it again.
    checkpoints.save_train_state(manager, jax.device_get(state).replace(step=3), {"position": 3})
    manager.wait_until_finished()
    manager.close()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]


def test_load_params_skips_an_unreadable_checkpoint_and_changes_nothing(workdir, caplog):
    _truncate(_largest_file(os.path.join(workdir, "checkpoints", "3", "ema_params")))
    before = _tree_hash(workdir)
    params, step = checkpoints.load_params(workdir)
    assert step == 2 and jax.tree.leaves(params)
    assert any(r.levelname == "WARNING" and "checkpoints/3 cannot be read" in r.getMessage() for r in caplog.records)
    assert checkpoints.load_params(workdir, use_ema=False)[1] == 3  # it reads only the item it needs
    assert _tree_hash(workdir) == before


def test_load_params_of_a_chosen_step_reads_that_one_or_stops(tmp_path):
    """`step=`: exactly that checkpoint's params; a step the run lacks, or one that cannot be read, is
    an error naming the run's steps (never another checkpoint), and nothing changes."""
    path, config = str(tmp_path), _config()
    checkpoints.write_config(path, config)
    manager = checkpoints.checkpoint_manager(path)
    state = jax.device_get(create_train_state(config, 0))
    shifted = lambda step: jax.tree.map(lambda p: p + step, state.ema_params)
    for step in (2, 4):
        checkpoints.save_train_state(manager, state.replace(step=step, ema_params=shifted(step)), {"position": step})
    manager.wait_until_finished()
    manager.close()
    for step in (2, 4):
        params, got = checkpoints.load_params(path, step=step)
        assert got == step
        jax.tree.map(np.testing.assert_array_equal, params, shifted(step))
    with pytest.raises(UserError, match=rf"^--checkpoint_step=3: --workdir={path} has no checkpoint of that step; it "
                                        r"has steps \[2, 4\]\.$"):
        checkpoints.load_params(path, step=3)
    _truncate(_largest_file(os.path.join(path, "checkpoints", "2", "ema_params")))
    before = _tree_hash(path)
    with pytest.raises(UserError, match=r"the chosen checkpoint cannot be read \(step 2: .*\)\. Nothing was moved or "
                                        r"deleted; the run has checkpoints at steps \[2, 4\]\.$"):
        checkpoints.load_params(path, step=2)
    assert _tree_hash(path) == before


def test_no_readable_checkpoint_is_an_error_and_nothing_moves(workdir):
    for step in (1, 3):
        for item in ("params", "ema_params"):
            _zero(_largest_file(os.path.join(workdir, "checkpoints", str(step), item)))
    for item in ("params", "ema_params"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", "2", item))
    before = _tree_hash(workdir)
    manager = checkpoints.checkpoint_manager(workdir, read_only=True)
    with pytest.raises(UserError, match=rf"{workdir}/checkpoints: none of its checkpoints can be read \(step 3: .*"
                                        r"step 2: the item folder 'params'.*Nothing was moved") as e:
        checkpoints.restore_train_state(manager, _config())
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"none of its checkpoints can be read \(step 3: .*step 2: the item folder "
                                        r"'ema_params' is missing; step 1: "):
        checkpoints.load_params(workdir)
    assert _tree_hash(workdir) == before


def test_a_checkpoint_of_another_config_is_a_user_error_and_nothing_moves(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3", "params"))  # unreadable: 2 is the one tried
    before = _tree_hash(workdir)
    manager = checkpoints.checkpoint_manager(workdir, read_only=True)
    wider = _config()
    wider.model.ch = 32
    with pytest.raises(UserError, match=r"checkpoints/2: the checkpoint does not fit this config: params/conv_in/"
                                        r"bias is \(16,\) in the checkpoint and \(32,\) for the config"):
        checkpoints.restore_train_state(manager, wider)
    unclipped = _config()
    unclipped.optim.grad_clip = 0.0  # another optimizer state tree, same params
    with pytest.raises(UserError, match=r"checkpoints/2: the checkpoint does not fit this config: opt_state/"):
        checkpoints.restore_train_state(manager, unclipped)
    with pytest.raises(UserError, match=r"checkpoints/3: the checkpoint does not fit this config: ema_params/"):
        checkpoints.load_params(workdir, wider)
    assert _tree_hash(workdir) == before


def test_a_storage_error_is_raised_as_it_is_and_nothing_moves(workdir):
    before = _tree_hash(workdir)
    manager = checkpoints.checkpoint_manager(workdir, read_only=True)

    def unavailable(*args, **kwargs):
        raise Exception("Encountered error while reading array index") from ValueError("UNAVAILABLE: try again")

    manager.restore = unavailable
    with pytest.raises(Exception, match="Encountered error while reading array index") as e:
        checkpoints.restore_train_state(manager, _config())
    assert not isinstance(e.value, UserError)
    assert _tree_hash(workdir) == before


def _write_lock(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, locking.LOCK_FILE), "w") as f:
        json.dump({"started": "2024-01-01T00:00:00+00:00", "token": "x", **record}, f)


def _lock(workdir):
    with open(os.path.join(workdir, locking.LOCK_FILE)) as f:
        return json.load(f)


def test_lock_is_held_for_the_body_and_released_also_on_errors(tmp_path):
    workdir = str(tmp_path / "run")
    with locking.workdir_lock(workdir):
        held = _lock(workdir)
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"--workdir={workdir} is in use by another training run "
                                            rf"\(pid {os.getpid()} on host "), locking.workdir_lock(workdir):
            pass
        assert _lock(workdir) == held  # the failed second acquisition left ours alone
    assert not os.path.exists(os.path.join(workdir, locking.LOCK_FILE))
    with pytest.raises(RuntimeError, match="boom"), locking.workdir_lock(workdir):
        raise RuntimeError("boom")
    assert not os.path.exists(os.path.join(workdir, locking.LOCK_FILE))


def test_a_live_trainer_s_lock_stops_another(tmp_path):
    workdir = str(tmp_path / "run")
    _write_lock(workdir, pid=os.getppid(), host=socket.gethostname())  # a live process that is not us
    held = _lock(workdir)
    with (pytest.raises(UserError, match=rf"--workdir={workdir} is in use by another training run \(pid "
                                         rf"{os.getppid()} on host {re.escape(socket.gethostname())}, since "),
          locking.workdir_lock(workdir)):
        pass
    assert _lock(workdir) == held
    _write_lock(workdir, pid=os.getppid(), host="other-host")  # cannot be checked from here: respected
    with pytest.raises(UserError, match=rf"pid {os.getppid()} on host other-host, .*delete {workdir}/.lock and "
                                        r"start again"), locking.workdir_lock(workdir):
        pass
    assert _lock(workdir)["host"] == "other-host"


def test_a_dead_trainer_s_lock_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    # A process that has ended, and one with our pid from before a container restart.
    for pid in (dead.pid, os.getpid()):
        _write_lock(workdir, pid=pid, host=socket.gethostname())
        with locking.workdir_lock(workdir):
            assert _lock(workdir)["pid"] == os.getpid() and _lock(workdir)["token"] != "x"
        assert not os.path.exists(os.path.join(workdir, locking.LOCK_FILE))
        assert any(f"from pid {pid} on" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert os.listdir(workdir) == []  # no renamed leftovers


def test_remote_lock_is_read_back_and_a_later_writer_wins(tmp_path, monkeypatch):
    path = epath.Path(tmp_path) / locking.LOCK_FILE
    ours = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "token": "ours"}
    theirs = {"pid": os.getppid(), "host": "other-host", "started": "now", "token": "theirs"}
    monkeypatch.setattr(locking, "time", types.SimpleNamespace(sleep=lambda s: None))
    locking._acquire_best_effort("gs://b/run", path, theirs)  # no lock yet: written and read back
    assert json.loads(path.read_text()) == theirs
    with pytest.raises(UserError, match=rf"gs://b/run is in use by a training run on another host \(pid "
                                        rf"{os.getppid()} on host other-host"):
        locking._acquire_best_effort("gs://b/run", path, ours)
    assert json.loads(path.read_text()) == theirs
    path.unlink()
    # Another trainer writes its lock while we wait to read ours back: it won.
    monkeypatch.setattr(locking, "time", types.SimpleNamespace(sleep=lambda s: path.write_text(json.dumps(theirs))))
    with pytest.raises(UserError, match=rf"pid {os.getppid()} on host other-host"):
        locking._acquire_best_effort("gs://b/run", path, ours)


def test_resume_config_refuses_changes_to_what_the_checkpoints_are(tmp_path):
    workdir = str(tmp_path)
    checkpoints.write_config(workdir, _config())
    saved = (tmp_path / "config.json").read_text()
    config = _config()
    config.model.ch, config.diffusion.num_timesteps, config.seed = 32, 50, 1
    config.optim.learning_rate = 1e-4
    with pytest.raises(UserError, match=r"differs from the run's config.json in fields that change what its "
                                        r"checkpoints are \(diffusion.num_timesteps: 20 -> 50, model.ch: 16 -> 32, "
                                        r"seed: 0 -> 1\)\. .*training.allow_config_change=True") as e:
        checkpoints.check_resume_config(workdir, config, 2)
    assert "learning_rate" not in str(e.value)
    config.training.allow_config_change = True
    assert ("model.ch", 16, 32) in checkpoints.check_resume_config(workdir, config, 2)
    moved = _config()
    moved.data.data_dir = "/elsewhere"  # where the data is read from does not change what it is
    assert checkpoints.check_resume_config(workdir, moved, 2) == [("data.data_dir", None, "/elsewhere")]
    assert (tmp_path / "config.json").read_text() == saved


def test_resume_config_applies_and_records_other_changes(tmp_path):
    workdir = str(tmp_path)
    checkpoints.write_config(workdir, _config())
    first = (tmp_path / "config.json").read_text()
    config = _config()
    config.optim.learning_rate = 1e-4
    assert checkpoints.check_resume_config(workdir, config, 2) == [("optim.learning_rate", 1e-3, 1e-4)]
    checkpoints.write_config(workdir, config, resumed_from=2)
    assert checkpoints.load_config(workdir).optim.learning_rate == 1e-4
    assert (tmp_path / "config.2.json").read_text() == first
    # Resumed from the same step again with another change: the earlier record is kept.
    second = (tmp_path / "config.json").read_text()
    config.training.sample_every = 10
    checkpoints.write_config(workdir, config, resumed_from=2)
    assert (tmp_path / "config.2.json").read_text() == first and (tmp_path / "config.2.1.json").read_text() == second
    checkpoints.write_config(workdir, config, resumed_from=4)  # unchanged: nothing to record
    assert sorted(os.listdir(tmp_path)) == ["config.2.1.json", "config.2.json", "config.json"]


def test_resume_at_or_past_num_train_steps_is_an_error(tmp_path):
    checkpoints.write_config(str(tmp_path), _config())
    config = _config()
    config.training.num_train_steps = 8
    for saved_step in (8, 9):
        with pytest.raises(UserError, match=rf"training.num_train_steps=8: the run in --workdir={tmp_path} is "
                                            rf"already at step {saved_step}; to train on"):
            checkpoints.check_resume_config(str(tmp_path), config, saved_step)
