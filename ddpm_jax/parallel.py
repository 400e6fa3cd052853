"""Data-parallel plumbing shared by training and its input pipeline: the pmap axis, placement, fetching.

`jax.pmap` (jit over shard_map since JAX 0.8) takes and returns arrays with a leading axis of one entry
per local device. Its outputs are global arrays, so `x[0]` would gather across devices; `to_host`
reads the first local device's copy instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS_NAME = "batch"  # the pmap axis; collectives (pmean) and axis_index use it


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
    """Device 0's slice of every `[D, ...]` leaf of a replicated pmap output, as numpy, no gather."""
    return jax.tree.map(lambda x: x[0], jax.device_get(
        jax.tree.map(lambda x: x.addressable_shards[0].data, tree)))
