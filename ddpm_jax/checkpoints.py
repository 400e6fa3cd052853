"""Orbax checkpoints of the train state; a run's resolved config; params for inference.

A run's workdir holds `config.json` (the resolved config) and `checkpoints/<step>/` with the items
'params', 'ema_params', 'opt_state', 'progress' ({'step', 'key'}) and 'data' (JSON: how far into its
stream the input pipeline is, so the data order resumes exactly). Restores go through abstract
target trees built from the config, so a checkpoint that does not fit the config is an error, and
inference reads only the params it needs.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import defaults
from ddpm_jax.train_state import create_train_state, init_params
from ddpm_jax.validation import UserError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
ITEMS = ("params", "ema_params", "opt_state", "progress", "data")  # "data" is JSON, the rest arrays


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


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _restore(manager, step: int, **items):
    """Restores the named items of checkpoint `step`; a checkpoint that does not fit is a UserError."""
    where = manager.directory / str(step)
    advice = "Resume with the config the run was started with (its config.json) or use another --workdir."
    # The params tell a model that differs from the config's before any array is read.
    for name in {"params", "ema_params"} & set(items):
        saved, wanted = _shapes(manager.item_metadata(step)[name]), _shapes(items[name].item)
        for path in sorted(saved.keys() | wanted.keys()):
            if saved.get(path) != wanted.get(path):
                raise UserError(f"{where}: the checkpoint does not fit this config: {name}{path} is "
                                 f"{saved.get(path, 'missing')} in the checkpoint and "
                                 f"{wanted.get(path, 'missing')} for the config. {advice}")
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: the checkpoint does not fit this config ({e}). {advice}") from e


def restore_train_state(manager: ocp.CheckpointManager, config, device=None):
    """(state, data_state) from the latest checkpoint, on `device` (default: the first local one), or None."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = _placed(jax.eval_shape(lambda: create_train_state(config, 0)), device or jax.local_devices()[0])
    r = _restore(manager, step,
                 params=ocp.args.StandardRestore(abstract.params),
                 ema_params=ocp.args.StandardRestore(abstract.ema_params),
                 opt_state=ocp.args.StandardRestore(abstract.opt_state),
                 progress=ocp.args.StandardRestore({"step": abstract.step, "key": abstract.key}),
                 data=ocp.args.JsonRestore())
    state = abstract.replace(params=r.params, ema_params=r.ema_params, opt_state=r.opt_state,
                             step=r.progress["step"], key=r.progress["key"])
    return state, r.data


def write_config(workdir, config) -> None:
    """Writes the resolved config as `workdir/config.json`."""
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


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


def load_params(workdir, config=None, use_ema: bool = True):
    """(params, step) of the latest checkpoint in `workdir`, on the host CPU. EMA params by default.

    `config` defaults to the run's `config.json`. Reads only the one params item, not the optimizer.
    """
    config = config or load_config(workdir)
    if not (epath.Path(workdir) / CHECKPOINT_DIR).exists():
        raise UserError(f"--workdir={workdir}: no checkpoint (no {CHECKPOINT_DIR}/ folder); train with "
                        f"`python -m ddpm_jax.main --workdir={workdir}` first.")
    manager = checkpoint_manager(workdir, read_only=True)
    step = manager.latest_step()
    if step is None:
        raise UserError(f"--workdir={workdir}: {CHECKPOINT_DIR}/ holds no finished checkpoint.")
    cpu = jax.local_devices(backend="cpu")[0]
    abstract = _placed(jax.eval_shape(lambda: init_params(config, jax.random.key(0))), cpu)
    item = "ema_params" if use_ema else "params"
    params = _restore(manager, step, **{item: ocp.args.StandardRestore(abstract)})[item]
    manager.close()
    return params, step
