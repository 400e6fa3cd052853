"""Data-parallel plumbing: the pmap axis, placement, fetching, and mapping a pmapped function over data.

`jax.pmap` (jit over shard_map since JAX 0.8) takes and returns arrays with a leading axis of one entry
per local device. Its outputs are global arrays, so `x[0]` would gather across devices; `to_host`
reads the first local device's copy instead. With several processes pmap's axis spans every
process's devices (process 0's first), each process passing and getting its own devices' rows.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS_NAME = "batch"  # the pmap axis; collectives (pmean) and axis_index use it
_BUILT: dict = {}


def built_once(key, build: Callable):
    """`build()` the first time `key` is seen, the same object after: a pmapped function kept this way
    compiles once per input shape however often it is asked for (sample grids, evaluations)."""
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def device_sharding(devices=None) -> NamedSharding:
    """The sharding pmap gives its mapped inputs: axis 0 split over the local devices."""
    devices = jax.local_devices() if devices is None else devices
    return NamedSharding(Mesh(np.asarray(devices), (AXIS_NAME,)), PartitionSpec(AXIS_NAME))


def replicate(tree, devices=None):
    """One copy of every leaf on each local device: `[D, ...]` arrays for pmap's state argument."""
    devices = jax.local_devices() if devices is None else devices
    sharding = device_sharding(devices)

    def put(x):
        x = jnp.asarray(x)[None]
        return jax.make_array_from_single_device_arrays(
            (len(devices),) + x.shape[1:], sharding, [jax.device_put(x, d) for d in devices])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Device 0's slice of every `[D, ...]` leaf of a replicated pmap output, as numpy, no gather.

    Leaves are arrays that own their memory, 0-d included, never numpy scalars (which Orbax 0.11
    refuses to save). On CPU `device_get` returns views of the device buffers; a checkpoint written
    in the background from such a view would read the train state that the next step donates."""
    return jax.tree.map(lambda x: np.array(x[0]), jax.device_get(
        jax.tree.map(lambda x: x.addressable_shards[0].data, tree)))


def pad_shard_unpad(fn: Callable[[int, dict], dict], inputs: dict, batch_size: int,
                    progress: Callable[[int, int], None] | None = None, *,
                    post: Callable[[int, dict], dict] | None = None, store=None) -> dict:
    """Runs a pmapped `fn(c, shard)` over `inputs` (a pytree of `[N, ...]` arrays, e.g. {name: array}
    or nested dicts) in chunks c of `batch_size` rows, on the devices of all processes (every process
    calls it with the same inputs).

    `batch_size` is rounded up to a multiple of the device count; every chunk is padded to that size
    (repeating the last row), so it has one shape and compiles once, and each process passes its
    devices' rows of it as `[local devices, rows per device, ...]` (pmap's axis runs over process
    0's devices, then process 1's, ...). Returns {name: numpy `[N, ...]`} of `fn`'s outputs in input
    order, padding dropped, on every process. flax's `jax_utils.pad_shard_unpad` pads one call; this
    also chunks.

    post(c, outputs) -> outputs: applied on the host to each chunk's {name: numpy `[chunk, ...]`}
    (e.g. to check and quantize images). store: a `chunk_store.ChunkStore`; the chunks it holds are
    read instead of computed, and each chunk computed is saved to it after `post`.
    progress(done rows, n): called after each chunk computed; once before them, with resumed=True,
    for the chunks read from `store`.
    """
    n = len(jax.tree.leaves(inputs)[0])
    if not n:
        raise ValueError("pad_shard_unpad: no rows.")
    n_dev, n_local = jax.device_count(), jax.local_device_count()
    per_dev = -(-min(batch_size, n) // n_dev)
    chunk = per_dev * n_dev
    mine = slice(jax.process_index() * n_local * per_dev, (jax.process_index() + 1) * n_local * per_dev)

    def rows(v, start):
        padded = np.concatenate([v[start:start + chunk]] + [v[-1:]] * max(0, start + chunk - n))
        return padded[mine].reshape((n_local, per_dev) + v.shape[1:])

    outs = store.resume(inputs, chunk) if store is not None else []
    if progress and outs:  # the chunks read, reported once and flagged, so that a rate leaves them out
        progress(min(len(outs) * chunk, n), n, resumed=True)
    try:
        for c, start in enumerate(range(0, n, chunk)):
            if c < len(outs):
                continue
            out = fn(c, jax.tree.map(functools.partial(rows, start=start), inputs))
            if jax.process_count() > 1:  # pmap returns this process's rows; every process gets them all
                out = multihost_utils.process_allgather(out, tiled=True)
            out = {k: np.asarray(v).reshape((chunk,) + v.shape[2:]) for k, v in out.items()}
            out = post(c, out) if post else out
            if store is not None:
                store.save(c, out)
            outs.append(out)
            if progress:
                progress(min(start + chunk, n), n)
    except KeyboardInterrupt:
        if store is not None:
            store.log_stop(len(outs), -(-n // chunk))
        raise
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
