"""The training state and optimizer: what a checkpoint holds, built from the config alone."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from ddpm_jax.models import unet_from_config


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. Leaves gain a leading device axis when replicated for pmap.

    step: int32 `[]`, steps taken. key: uint32 raw key data of the base training key (every step's
    keys are `fold_in`s of it), stored raw so a checkpoint holds a plain array.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array


def learning_rate_schedule(optim_config) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then constant (Ho et al.) or, with
    `decay_steps` > 0, a cosine from `learning_rate` down to 0 at step `decay_steps` (and 0 after)."""
    o = optim_config
    if o.decay_steps and o.warmup_steps == 0:  # the same values; optax warns of a warmup of 0 steps
        return optax.cosine_decay_schedule(o.learning_rate, o.decay_steps)
    if o.decay_steps:
        return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, o.decay_steps, 0.0)
    if o.warmup_steps == 0:
        return optax.constant_schedule(o.learning_rate)
    return optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)


def make_optimizer(optim_config) -> optax.GradientTransformation:
    """Adam with the warmup schedule, after clipping the gradient's global norm (0: no clipping)."""
    o = optim_config
    adam = optax.adam(learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam) if o.grad_clip else adam


def example_cond(config: ConfigDict, n: int) -> dict:
    """A conditioning pytree of `n` rows of the kind `config.model` takes (zeros, one real token,
    nothing dropped): what the U-Net is traced with."""
    m, length = config.model, config.data.max_text_len
    cond = {"drop": jnp.zeros((n,), bool)}
    if m.num_classes:
        cond["label"] = jnp.zeros((n,), jnp.int32)
    if m.text_encoder != "none":
        cond["mask"] = jnp.zeros((n, length), bool).at[:, 0].set(True)
    if m.text_encoder == "trained":
        cond["tokens"] = jnp.zeros((n, length), jnp.int32)
    elif m.text_encoder == "precomputed":
        cond["text_emb"] = jnp.zeros((n, length, m.text_emb_dim), jnp.float32)
    if m.low_res_size:
        cond["low_res"] = jnp.zeros((n, m.low_res_size, m.low_res_size, config.data.channels), jnp.float32)
        cond["aug_level"] = jnp.zeros((n,), jnp.float32)
    if m.guidance_embedding:
        cond["guidance"] = jnp.zeros((n,), jnp.float32)
    return cond


def init_params(config: ConfigDict, key: jax.Array):
    """Float32 U-Net params for `config` (traced with a batch of one image)."""
    d = config.data
    x = jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    # Jitted: op-by-op initialisation of a U-Net is many times slower, bfloat16 on CPU above all.
    return jax.jit(unet_from_config(config).init)({"params": key}, x, t, example_cond(config, 1))["params"]


def create_train_state(config: ConfigDict, key_or_seed: int | jax.Array, params=None) -> TrainState:
    """Fresh state: initial params (or `params`, e.g. released weights or a teacher's, whose missing
    layers, a student's `guidance_input`, are initialised), also the EMA, Adam state, step 0 and the
    base training key."""
    key = jax.random.key(key_or_seed) if isinstance(key_or_seed, int) else key_or_seed
    init_key, train_key = jax.random.split(key)
    if params is None or config.model.guidance_embedding:
        params = {**init_params(config, init_key), **(params or {})}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=make_optimizer(config.optim).init(params),
        key=jax.random.key_data(train_key),
    )
