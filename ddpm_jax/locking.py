"""One training run per workdir: the lock file `WORKDIR/.lock`.

A trainer holds it from before its checkpoint manager starts (Orbax's start-up deletes the temporary
folders of saves in flight, which may be another trainer's) until it exits; sampling and evaluation
only read and take no lock. The file is JSON {pid, host, started, token}.

Local folders: the file is created atomically (O_CREAT | O_EXCL), so of two trainers starting at once
exactly one gets it. A lock left by a dead process on this host (its pid is not running) is taken
over with a warning; one from another host is respected, since this host cannot see that process,
and the error says how to remove it.

Several processes (a multi-host run): process 0 takes the lock and every process reads it back; a
workdir where some process does not see it (a host's local disk) stops them all with a UserError.

gs:// and other remote folders: epath has no atomic create there, so acquisition is best effort: the
record is written, and read back after `SETTLE_S` seconds; the last writer wins and the other
stops. Two trainers whose writes are more than `SETTLE_S` apart both see the first one's lock; a
start closer than that can still let both run. (An atomic version needs GCS's
`if_generation_match=0` precondition, through google-cloud-storage.)
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax.validation import UserError

LOCK_FILE = ".lock"
SETTLE_S = 2.0  # remote folders: wait this long between writing the lock and reading it back
_held: set[str] = set()  # lock files this process holds; one naming our pid but not in here is stale


@contextlib.contextmanager
def workdir_lock(workdir):
    """Holds `WORKDIR/.lock` for the body; a UserError if another live trainer holds it.

    Released on exit, exceptions included. In a multi-process run process 0 takes it and every
    process reads it back (`_check_shared`): a UserError on all of them unless all see it.
    """
    remote = "://" in str(workdir)
    path = epath.Path(workdir if remote else os.path.abspath(workdir)) / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "token": uuid.uuid4().hex}
    error, acquired = None, False
    if jax.process_index() == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            (_acquire_best_effort if remote else _acquire_local)(workdir, path, record)
            _held.add(str(path))
            acquired = True
        except UserError as e:
            error = e
    try:
        if jax.process_count() > 1:
            _check_shared(workdir, path, None if error else record["token"])
        if error:
            raise error
        yield
    finally:
        if acquired:  # a refused nested attempt must not release the holder's lock
            _held.discard(str(path))
            _release(path, record)


def _check_shared(workdir, path, token: str | None) -> None:
    """Every process reads the lock that process 0 took (`token`: its token there, None if it could
    not take it) and all raise the same UserError unless every one sees it: their checkpoints,
    written by several processes and read by all, must be in one place."""
    from jax.experimental import multihost_utils

    # Process 0's token (16 bytes; zeros: no lock), to every process.
    sent = np.frombuffer(bytes.fromhex(token), np.uint8) if token else np.zeros(16, np.uint8)
    token = np.asarray(multihost_utils.broadcast_one_to_all(sent), np.uint8).tobytes().hex()
    if token == "00" * 16:
        if jax.process_index():
            raise UserError(f"--workdir={workdir}: process 0 could not take {path} (its log says why).")
        return  # process 0 raises its own error
    try:
        sees = (_read(path) or {}).get("token") == token
    except UserError:  # not a lock's JSON: not process 0's lock
        sees = False
    seen = multihost_utils.process_allgather(np.int32(sees))
    if not seen.all():
        blind = ", ".join(str(i) for i in np.flatnonzero(seen == 0))
        raise UserError(f"--workdir={workdir}: process(es) {blind} do not see the lock that process 0 wrote "
                        f"there ({path}): a multi-process run needs a workdir that every process shares, a "
                        f"gs:// bucket or a shared filesystem (NFS, Lustre, ...), not a host's local disk.")


def _read(path) -> dict | None:
    """The lock's record; None if there is no lock. A lock being written is retried for a second."""
    for _ in range(10):
        try:
            record = json.loads(epath.Path(path).read_text())
            if isinstance(record, dict):
                return record
        except FileNotFoundError:
            return None
        except ValueError:  # empty or half written: its creator is writing it now
            pass
        time.sleep(0.1)
    raise UserError(f"{path}: a lock file that is not a lock's JSON record; if no training runs in this "
                    f"workdir, delete it and start again.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(path, holder: dict) -> bool:
    """Whether `holder` is a process of this host that has ended (or, with our pid, an earlier one
    that did: containers restart with the same pid and host name)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if pid == os.getpid():
        return str(path) not in _held
    return not isinstance(pid, int) or not _pid_alive(pid)


def _held_error(workdir, path, holder: dict) -> UserError:
    who = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
    if holder.get("host") == socket.gethostname():
        return UserError(f"--workdir={workdir} is in use by another training run ({who}; lock {path}): stop "
                         f"that run first, or train in another --workdir.")
    return UserError(f"--workdir={workdir} is in use by a training run on another host ({who}; lock {path}); "
                     f"this host cannot tell whether it still runs. If it does not (e.g. its VM was "
                     f"preempted), delete {path} and start again; otherwise train in another --workdir.")


def _acquire_local(workdir, path, record: dict) -> None:
    """Creates the lock with O_CREAT | O_EXCL; takes a stale one over by renaming it away first."""
    for _ in range(3):  # a take-over, then the create again; a third failure is a race with another trainer
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # released meanwhile
                continue
            if not _is_stale(path, holder):
                raise _held_error(workdir, path, holder) from None
            _take_over_local(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return
    raise UserError(f"--workdir={workdir}: could not take {path}; other trainers are starting there at the "
                    f"same time. Start one only.")


def _take_over_local(path, holder: dict) -> None:
    """Removes the stale lock `holder`, unless another trainer replaced it meanwhile (then it is put back)."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)  # atomic: of two trainers taking over, one renames the stale file
    except FileNotFoundError:
        return
    if _read(aside) != holder:  # we moved a lock created since we read it: give it back
        os.rename(aside, path)
        return
    os.remove(aside)
    logging.warning("Took over %s from pid %s on %s, which is no longer running.", path, holder.get("pid"),
                    holder.get("host"))


def _acquire_best_effort(workdir, path, record: dict) -> None:
    """Writes the lock and reads it back after `SETTLE_S`: the last writer wins (no atomic create)."""
    holder = _read(path)
    if holder is not None:
        if not _is_stale(path, holder):
            raise _held_error(workdir, path, holder)
        logging.warning("Taking over %s from pid %s on %s, which is no longer running.", path,
                        holder.get("pid"), holder.get("host"))
    path.write_text(json.dumps(record))
    time.sleep(SETTLE_S)  # a trainer that started at the same time writes within this window
    holder = _read(path)
    if holder != record:
        raise _held_error(workdir, path, holder or {})


def _release(path, record: dict) -> None:
    """Deletes the lock if it is still ours (someone may have deleted it and started another run)."""
    try:
        if _read(path) == record:
            path.unlink()
            return
    except UserError:
        pass
    logging.warning("%s is no longer this run's lock; left as it is.", path)
