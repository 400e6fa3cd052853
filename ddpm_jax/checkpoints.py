"""Orbax checkpoints of the train state; a run's resolved config; params for inference.

A run's workdir holds `config.json` (the resolved config) and `checkpoints/<step>/` with the items
'params', 'ema_params', 'opt_state', 'progress' ({'step', 'key'}) and 'data' (JSON: how far into its
stream the input pipeline is, so the data order resumes exactly). Restores go through abstract
target trees built from the config, so a checkpoint that does not fit the config is an error, and
inference reads only the params it needs.

A checkpoint that cannot be read (a truncated or zeroed file, a missing item) is skipped for the
next older one, with a warning. Training moves it, untouched, to
`checkpoints_bad/<step>-<reason>-<time>/` (with `<that name>.txt` saying why) so that it neither
meets it again nor rotates it away; reads for sampling and evaluation change nothing. Nothing here
deletes a checkpoint. A resume whose config changes fields is recorded: `config.json` is the current
config, and the one it replaced is kept as `config.<step>.json` (the step resumed from).
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from ml_collections import ConfigDict

from ddpm_jax import defaults
from ddpm_jax.train_state import create_train_state, init_params
from ddpm_jax.validation import UserError

CHECKPOINT_DIR = "checkpoints"
BAD_CHECKPOINT_DIR = "checkpoints_bad"
CONFIG_FILE = "config.json"
ITEMS = ("params", "ema_params", "opt_state", "progress", "data")  # "data" is JSON, the rest arrays
# Errors that say the storage could not be reached or the host ran short, not that a checkpoint is
# bad: they are raised as they are, so that a good checkpoint is never set aside for them.
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED",
                    "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")
_TRANSIENT_TYPES = (ConnectionError, TimeoutError, PermissionError, MemoryError)


def checkpoint_manager(workdir, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """Manager of `workdir/checkpoints`: asynchronous saves keeping the last `keep` (None: all).

    `read_only`: for restoring only; it creates, cleans and deletes nothing (Orbax's own read-only
    mode would say so in warnings on every load).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=not read_only,
        # Saves go to a temporary folder that is renamed when complete; a killed save leaves one.
        cleanup_tmp_directories=not read_only)
    handlers = {name: ocp.JsonCheckpointHandler() if name == "data" else ocp.StandardCheckpointHandler()
                for name in ITEMS}
    # Orbax wants absolute paths; a relative local workdir (runs/digits) is taken from the current folder.
    root = epath.Path(workdir) if "://" in str(workdir) else epath.Path(os.path.abspath(workdir))
    return ocp.CheckpointManager(root / CHECKPOINT_DIR, options=options, item_handlers=handlers)


def _placed(abstract_tree, device):
    """`abstract_tree` (ShapeDtypeStructs) with every leaf restored onto `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract_tree)


def save_train_state(manager: ocp.CheckpointManager, state, data_state: dict) -> None:
    """Starts an asynchronous save of `state` (host or single-device arrays) at step `state.step`."""
    manager.save(int(state.step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        ema_params=ocp.args.StandardSave(state.ema_params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        progress=ocp.args.StandardSave({"step": state.step, "key": state.key}),
        data=ocp.args.JsonSave(data_state)))


class _Unreadable(Exception):
    """A checkpoint that cannot be read; `tag` is a short name of the failure, for folder names."""

    def __init__(self, tag: str, reason: str):
        super().__init__(reason)
        self.tag = tag


def _unreadable(error: Exception) -> _Unreadable:
    """What a failed read says about the checkpoint. Re-raises `error` when it is not about the
    checkpoint's bytes (storage out of reach, out of memory, an interrupt Orbax wrapped)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for e in chain:
        if not isinstance(e, Exception) or isinstance(e, _TRANSIENT_TYPES) or str(e).startswith(_TRANSIENT_CODES):
            raise error
    cause = chain[-1]  # Orbax wraps TensorStore's error, which names the file and what is wrong
    message = (str(cause).strip().splitlines() or [""])[0][:300]
    code = re.match(r"([A-Z_]+): ", message)  # TensorStore's status, e.g. DATA_LOSS, OUT_OF_RANGE
    tag = code.group(1).lower().replace("_", "-") if code else type(cause).__name__.lower()
    return _Unreadable(tag, f"{type(cause).__name__}: {message}")


def _shapes(tree) -> dict:
    """{'a/b/0': shape} of the leaves. Keys are plain names: Orbax's metadata has dict keys where
    the train state has named-tuple fields (the optimizer state)."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(manager, step: int, items: dict) -> None:
    """UserError when checkpoint `step` holds other trees or shapes than `items`' targets (another
    model or optimizer, not corruption); _Unreadable when its metadata cannot be read or an item is
    missing. Reads only metadata."""
    where = manager.directory / str(step)
    try:
        metadata = manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001  (sorted by _unreadable)
        raise _unreadable(e) from e
    for name, arg in items.items():
        if name not in metadata.keys():  # noqa: SIM118  (Orbax's Composite metadata has no __contains__)
            raise _Unreadable(f"missing-{name}", f"the item folder '{name}' is missing")
        if not isinstance(arg, ocp.args.StandardRestore):
            continue
        if metadata[name] is None:
            raise _Unreadable(f"no-metadata-{name}", f"'{name}' has no _METADATA file")
        saved, wanted = _shapes(metadata[name]), _shapes(arg.item)
        for path in sorted(saved.keys() | wanted.keys()):
            if saved.get(path) != wanted.get(path):
                raise UserError(f"{where}: the checkpoint does not fit this config: {name}/{path} is "
                                f"{saved.get(path, 'missing')} in the checkpoint and "
                                f"{wanted.get(path, 'missing')} for the config. Resume with the config the "
                                f"run was started with (its config.json) or use another --workdir.")


def _newest_readable(manager, items: dict, steps=None):
    """(step, restored items, [(step, _Unreadable)] of the newer checkpoints that could not be read).

    Tries the checkpoints (`steps`, default all) newest first, logging each one that cannot be read.
    UserError when one does not fit the config or none can be read.
    """
    unreadable = []
    for step in sorted(steps or manager.all_steps(), reverse=True):
        try:
            _check_fits(manager, step, items)
            try:
                return step, manager.restore(step, args=ocp.args.Composite(**items)), unreadable
            except Exception as e:  # noqa: BLE001  (sorted by _unreadable)
                raise _unreadable(e) from e
        except _Unreadable as bad:
            logging.warning("Checkpoint %s cannot be read (%s); trying the next older one.",
                            manager.directory / str(step), bad)
            unreadable.append((step, bad))
    reasons = "; ".join(f"step {step}: {bad}" for step, bad in unreadable)
    if steps:
        raise UserError(f"{manager.directory}: the chosen checkpoint cannot be read ({reasons}). Nothing was moved "
                        f"or deleted; the run has checkpoints at steps {sorted(manager.all_steps())}.")
    raise UserError(f"{manager.directory}: none of its checkpoints can be read ({reasons}). Nothing was moved or "
                    f"deleted. Inspect them; to train this --workdir again from step 0, move that folder away "
                    f"(or use another --workdir).")


def _move_aside(manager, step: int, bad: _Unreadable) -> None:
    """Moves checkpoint `step` to WORKDIR/checkpoints_bad/ as it is, with a note of why beside it."""
    source = manager.directory / str(step)
    bad_dir = manager.directory.parent / BAD_CHECKPOINT_DIR
    bad_dir.mkdir(parents=True, exist_ok=True)
    target = bad_dir / f"{step}-{bad.tag}-{time.strftime('%Y%m%dT%H%M%S')}"
    source.rename(target)  # local: atomic; gs://: object by object, each copied before it is deleted
    (bad_dir / f"{target.name}.txt").write_text(f"{source}: {bad}\n")
    logging.warning("Moved the unreadable checkpoint %s to %s.", source, target)


def restore_train_state(manager: ocp.CheckpointManager, config: ConfigDict, device=None):
    """(state, data_state) from the newest checkpoint that can be read, on `device` (default: the
    first local one), or None when there is no checkpoint.

    Newer ones that cannot be read are moved to WORKDIR/checkpoints_bad/ (by process 0; the manager
    is reloaded), so hold the workdir's lock (`locking.workdir_lock`). A checkpoint that does not
    fit the config, or none that can be read, is a UserError and nothing is moved.
    """
    if not manager.all_steps():
        return None
    abstract = _placed(jax.eval_shape(lambda: create_train_state(config, 0)), device or jax.local_devices()[0])
    _, r, unreadable = _newest_readable(manager, dict(
        params=ocp.args.StandardRestore(abstract.params),
        ema_params=ocp.args.StandardRestore(abstract.ema_params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        progress=ocp.args.StandardRestore({"step": abstract.step, "key": abstract.key}),
        data=ocp.args.JsonRestore()))
    if jax.process_index() == 0:
        for step, bad in unreadable:
            _move_aside(manager, step, bad)
    if jax.process_count() > 1:  # every process sees the moves before it reloads
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("ddpm_jax: unreadable checkpoints moved aside")
    manager.reload()  # else it would count moved ones for rotation and refuse to save their steps again
    state = abstract.replace(params=r.params, ema_params=r.ema_params, opt_state=r.opt_state,
                             step=r.progress["step"], key=r.progress["key"])
    return state, r.data


def write_config(workdir, config: ConfigDict, resumed_from: int | None = None) -> None:
    """Writes the resolved config as `workdir/config.json`.

    `resumed_from`: the step a run resumed from. If its config.json differs, it is kept first as
    `config.<step>.json` (`config.<step>.<n>.json` when that name is taken by an earlier resume
    from the same step): the config the checkpoints up to that step were trained with.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if resumed_from is not None and path.exists() and (old := path.read_text()) != text:
        keep, n = path.parent / f"config.{resumed_from}.json", 0
        while keep.exists():
            n += 1
            keep = path.parent / f"config.{resumed_from}.{n}.json"
        keep.write_text(old)  # before config.json is replaced: a crash in between loses nothing
    path.write_text(text)


def _tuples(x):
    """JSON has no tuples; every sequence in a config is one."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def load_config(workdir) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote to `workdir`, over `defaults.get_config()` so that
    runs saved before a field existed get its default."""
    if not workdir:
        raise UserError("--workdir is required: a training run's folder.")
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"--workdir={workdir}: no {CONFIG_FILE} there; is it the --workdir of a training run?")
    config = defaults.get_config()
    try:
        config.update(_tuples(json.loads(path.read_text())))
    except (ValueError, TypeError, KeyError) as e:  # not JSON, or fields of the wrong type
        raise UserError(f"{path}: not a config this version reads ({type(e).__name__}: {e}).") from None
    return config


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a.b': value} of a nested dict."""
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def _changes_meaning(field: str) -> bool:
    """Whether a change of `field` changes what the checkpoints are: the model, the diffusion
    process, the data (wherever it is read from), the seed (the data order and the RNG) and a
    distilled run's teacher."""
    return field == "seed" or (field.startswith(("model.", "diffusion.", "data.", "distill."))
                               and field != "data.data_dir")


def check_resume_config(workdir, config: ConfigDict, saved_step: int) -> list[tuple[str, object, object]]:
    """The fields in which `config` differs from the run's config.json, as (field, old, new).

    Call it on resuming from checkpoint `saved_step`, before `write_config(workdir, config,
    resumed_from=saved_step)` records them. UserError if a field that changes what the checkpoints
    are differs (`model.*`, `diffusion.*`, `data.*` but `data.data_dir`, `seed`, `distill.*`, and a
    progressive student's `sampling.steps`) and
    `training.allow_config_change` is False, or if `training.num_train_steps` <= `saved_step`.
    Other changes (`optim.*`, `training.*`, `sampling.*`, `eval.*`) are logged and returned.
    """
    changes = []
    if (epath.Path(workdir) / CONFIG_FILE).exists():
        old, new = (_flat(json.loads(c.to_json_best_effort())) for c in (load_config(workdir), config))
        changes = [(f, old.get(f, "missing"), new.get(f, "missing")) for f in sorted(old.keys() | new.keys())
                   if old.get(f, "missing") != new.get(f, "missing")]
    else:  # checkpoints without one (written by hand?): nothing to compare with
        logging.warning("%s has checkpoints but no %s; cannot compare configs.", workdir, CONFIG_FILE)

    def show(chosen):
        return ", ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in chosen)

    # A student's steps are what it learns (the sampler's other fields are fixed: validation.validate_distill).
    learned = ("sampling.steps",) if config.distill.teacher and config.distill.mode == "progressive" else ()
    refused = [c for c in changes if _changes_meaning(c[0]) or c[0] in learned]
    if refused and not config.training.allow_config_change:
        raise UserError(f"--workdir={workdir}: the config differs from the run's {CONFIG_FILE} in fields that "
                        f"change what its checkpoints are ({show(refused)}). Resume with the run's config, "
                        f"train in another --workdir, or set training.allow_config_change=True to resume anyway.")
    steps = config.training.num_train_steps
    if steps <= saved_step:
        raise UserError(f"training.num_train_steps={steps}: the run in --workdir={workdir} is already at step "
                        f"{saved_step}; to train on, set training.num_train_steps above {saved_step}.")
    if changes:
        logging.warning("Resuming from step %d with these config changes: %s.", saved_step, show(changes))
    return changes


def steps(workdir) -> list[int]:
    """The steps of the checkpoints in `workdir` (local or gs://...), oldest first; unfinished ones
    (Orbax's temporary folders) are not counted."""
    folder = epath.Path(workdir) / CHECKPOINT_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def load_params(workdir, config=None, use_ema: bool = True, step: int | None = None, flag: str = "--checkpoint_step"):
    """(params, step) of the newest checkpoint in `workdir` that can be read, or of checkpoint `step`
    (a UserError naming `flag` and the run's steps when there is none), on the host CPU. EMA params
    by default.

    `config` defaults to the run's `config.json`. Reads only the one params item, not the optimizer.
    Newer checkpoints that cannot be read are skipped with a warning and left where they are: this
    changes nothing in the workdir (it takes no lock and may run beside training).
    """
    config = config or load_config(workdir)
    if not (epath.Path(workdir) / CHECKPOINT_DIR).exists():
        raise UserError(f"--workdir={workdir}: no checkpoint (no {CHECKPOINT_DIR}/ folder); train with "
                        f"`python -m ddpm_jax.main --workdir={workdir}` first.")
    manager = checkpoint_manager(workdir, read_only=True)
    if not manager.all_steps():
        raise UserError(f"--workdir={workdir}: {CHECKPOINT_DIR}/ holds no finished checkpoint.")
    if step is not None and step not in manager.all_steps():
        raise UserError(f"{flag}={step}: --workdir={workdir} has no checkpoint of that step; it has steps "
                        f"{sorted(manager.all_steps())}.")
    cpu = jax.local_devices(backend="cpu")[0]
    abstract = _placed(jax.eval_shape(lambda: init_params(config, jax.random.key(0))), cpu)
    item = "ema_params" if use_ema else "params"
    step, restored, _ = _newest_readable(manager, {item: ocp.args.StandardRestore(abstract)},
                                         None if step is None else [step])
    manager.close()
    return restored[item], step
