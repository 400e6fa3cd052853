"""A frozen T5 encoder (Raffel et al. 2020) read from a local folder, for Imagen-style text conditioning
(Saharia et al. 2022 condition on the token embeddings of a frozen T5-XXL encoder).

The folder is a checkpoint in the Hugging Face layout that the user downloaded (nothing is downloaded
here): `config.json`, the weights as `model.safetensors` or as the shards listed in
`model.safetensors.index.json`, and the SentencePiece vocabulary `spiece.model`. Only the encoder's
tensors are read, so a whole encoder-decoder checkpoint (google/t5-v1_1-xxl, google/flan-t5-xl) works.
Feed-forward layers of both kinds: 'relu' (T5 1.0) and 'gated-gelu' (T5 1.1, Flan-T5).

The architecture: token embeddings, no position embeddings; pre-norm blocks of self-attention and a
feed-forward layer, each added to its input; RMS layer norms (no mean, no bias) in float32; attention
logits unscaled (T5 folds 1/sqrt(d_kv) into its initialisation) plus a learned bias per head of the
bucketed relative position (`relative_position_bucket`), computed in the first block and used by all.
Weights keep their stored dtype (bfloat16 halves T5-XXL's 4.8B encoder parameters to 9.5 GB); every
product is computed in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_jax import files
from ddpm_jax.validation import UserError

FIELD = "model.text_encoder_path"
FEED_FORWARD = ("relu", "gated-gelu")
WEIGHTS, INDEX, VOCABULARY = "model.safetensors", "model.safetensors.index.json", "spiece.model"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a Hugging Face T5 `config.json` that the encoder needs."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    feed_forward_proj: str = "relu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


def read_config(path: str, field: str = FIELD) -> T5Config:
    """The `T5Config` of the encoder folder `path`; a UserError naming `field` if it is not one."""
    where = f"{field}={path!r}"
    config_file = epath.Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{where}: no config.json there; give the folder of a T5 checkpoint in the Hugging Face "
                        f"layout (config.json, {WEIGHTS} or {INDEX} with its shards, {VOCABULARY}).")
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{where}: config.json is not JSON.") from None
    names = [f.name for f in dataclasses.fields(T5Config)]
    required = [n for n in names[:6] if not isinstance(raw.get(n), int) or raw[n] <= 0]
    if required:
        raise UserError(f"{where}: config.json needs positive integers {required} (is it a T5 config?).")
    config = T5Config(**{n: raw[n] for n in names if n in raw})
    if config.feed_forward_proj not in FEED_FORWARD:
        raise UserError(f"{where}: feed_forward_proj={config.feed_forward_proj!r} in config.json; this encoder "
                        f"reads {' or '.join(FEED_FORWARD)}.")
    return config


def relative_position_bucket(relative_position: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bidirectional buckets of `key position - query position`: half the buckets for each sign;
    in each half, distances below a quarter of the buckets get one bucket each and the rest share
    buckets spaced logarithmically up to `max_distance` (beyond it, the last bucket)."""
    half = num_buckets // 2
    bucket = jnp.where(relative_position > 0, half, 0)
    n = jnp.abs(relative_position)
    exact = half // 2
    log_ratio = jnp.log(jnp.maximum(n, 1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).astype(jnp.int32)  # truncation, as T5
    return bucket + jnp.where(n < exact, n, jnp.minimum(large, half - 1))


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=jnp.float32, name=name)


class RMSNorm(nn.Module):
    """T5's layer norm: x / rms(x) times a learned scale, in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x = x.astype(jnp.float32)
        return weight.astype(jnp.float32) * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)


class SelfAttention(nn.Module):
    config: T5Config
    has_relative_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """x `[B, L, d_model]`, mask bool `[B, L]`, bias `[H, L, L]` (None in the first block, which makes it)."""
        c = self.config
        B, L, _ = x.shape
        q, k, v = (_dense(c.num_heads * c.d_kv, n)(x).reshape(B, L, c.num_heads, c.d_kv) for n in "qkv")
        if self.has_relative_bias:
            positions = jnp.arange(L)
            buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                               c.relative_attention_num_buckets, c.relative_attention_max_distance)
            table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, dtype=jnp.float32,
                             name="relative_attention_bias")
            bias = table(buckets).transpose(2, 0, 1)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)  # padded keys
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(B, L, -1)
        return _dense(c.d_model, "o")(out), bias


class FeedForward(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if c.feed_forward_proj == "gated-gelu":  # T5 1.1: gelu (tanh approximation) gating a linear layer
            h = jax.nn.gelu(_dense(c.d_ff, "wi_0")(x), approximate=True) * _dense(c.d_ff, "wi_1")(x)
        else:
            h = jax.nn.relu(_dense(c.d_ff, "wi")(x))
        return _dense(c.d_model, "wo")(h)


class T5Encoder(nn.Module):
    """Token ids int `[B, L]` and mask bool `[B, L]` -> the final hidden states float32 `[B, L, d_model]`."""

    config: T5Config

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32, name="shared")(ids)
        bias = None
        for i in range(c.num_layers):
            norm = RMSNorm(c.layer_norm_epsilon, name=f"block_{i}_attention_norm")
            h, bias = SelfAttention(c, has_relative_bias=i == 0, name=f"block_{i}_attention")(norm(x), mask, bias)
            x = x + h
            x = x + FeedForward(c, name=f"block_{i}_mlp")(RMSNorm(c.layer_norm_epsilon, name=f"block_{i}_mlp_norm")(x))
        return RMSNorm(c.layer_norm_epsilon, name="final_layer_norm")(x)


def checkpoint_names(config: T5Config) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Hugging Face tensor name -> (path in `T5Encoder`'s params, whether to transpose: torch's
    Linear stores [out, in], Flax's Dense [in, out])."""
    names = {"shared.weight": (("shared", "embedding"), False),
             "encoder.final_layer_norm.weight": (("final_layer_norm", "weight"), False),
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                 (("block_0_attention", "relative_attention_bias", "embedding"), False)}
    mlp = ("wi_0", "wi_1", "wo") if config.feed_forward_proj == "gated-gelu" else ("wi", "wo")
    for i in range(config.num_layers):
        prefix = f"encoder.block.{i}.layer"
        for n in "qkvo":
            names[f"{prefix}.0.SelfAttention.{n}.weight"] = ((f"block_{i}_attention", n, "kernel"), True)
        for n in mlp:
            names[f"{prefix}.1.DenseReluDense.{n}.weight"] = ((f"block_{i}_mlp", n, "kernel"), True)
        names[f"{prefix}.0.layer_norm.weight"] = ((f"block_{i}_attention_norm", "weight"), False)
        names[f"{prefix}.1.layer_norm.weight"] = ((f"block_{i}_mlp_norm", "weight"), False)
    return names


def weight_files(path: str) -> dict[str, str]:
    """Tensor name -> the file holding it, from the index of a sharded checkpoint or the one file."""
    folder = epath.Path(path)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{FIELD}={path!r}: {INDEX} is not a safetensors index (JSON with a 'weight_map').") \
                from None
        return {name: str(folder / file) for name, file in weight_map.items()}
    if not (folder / WEIGHTS).is_file():
        found = sorted(p.name for p in folder.iterdir())
        hint = " (PyTorch pickles are not read: save the model with safe_serialization=True)" if any(
            n.endswith(".bin") for n in found) else ""
        raise UserError(f"{FIELD}={path!r}: no {WEIGHTS} or {INDEX} there{hint}; found {found}.")
    return dict.fromkeys(files.safetensors_names(str(folder / WEIGHTS)), str(folder / WEIGHTS))


def load_params(path: str, config: T5Config) -> dict:
    """The encoder's params from the folder `path`, in their stored dtype, checked against `T5Encoder`'s
    shapes; a UserError naming the missing or misshapen tensor."""
    located = weight_files(path)
    names = checkpoint_names(config)
    if "shared.weight" not in located:  # some checkpoints hold only the encoder's tied copy
        names["encoder.embed_tokens.weight"] = names.pop("shared.weight")
    missing = [n for n in names if n not in located]
    if missing:
        raise UserError(f"{FIELD}={path!r}: the checkpoint lacks {len(missing)} encoder tensors of its config.json, "
                        f"the first {missing[0]!r}.")
    shapes = jax.eval_shape(T5Encoder(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                            jnp.ones((1, 2), bool))["params"]
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(located[name], []).append(name)
    params: dict = {}
    for file, wanted in by_file.items():
        tensors = files.load_safetensors(file, wanted)
        for name in wanted:
            keys, transpose = names[name]
            expected = files.place_tensor(params, shapes, keys, tensors[name].T if transpose else tensors[name])
            if expected is not None:
                raise UserError(f"{FIELD}={path!r}: tensor {name!r} has shape {tensors[name].shape}, but config.json "
                                f"implies {expected[::-1] if transpose else expected}.")
    return params


def embed_tokens(config: T5Config, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The token embeddings float32 `[..., L, d_model]` of ids int `[..., L]` under mask bool `[..., L]`,
    zero where padded: what a 'precomputed' text model reads (any leading dims, one encoder call)."""
    L = ids.shape[-1]
    emb = T5Encoder(config).apply({"params": params}, ids.reshape(-1, L), mask.reshape(-1, L))
    return jnp.where(mask[..., None], emb.reshape(ids.shape + emb.shape[-1:]), 0.0)


@dataclasses.dataclass(frozen=True)
class FrozenT5:
    """A loaded encoder: `embed(texts, max_len)` gives the token embeddings a 'precomputed' text model reads."""

    path: str
    config: T5Config
    params: dict  # a copy on every group of local devices (`load`)
    processor: object  # sentencepiece.SentencePieceProcessor
    apply: object  # jax.jit(embed_tokens) of this config, built once per encoder: apply(params, ids, mask)
    rows: jax.sharding.NamedSharding  # leading axis split over the groups of local devices
    dtype: str = ""  # what the weights were cast to as loaded ('': as stored)

    @property
    def fingerprint(self) -> str:
        """Names the encoder: a hash of its config.json, its weight files' names and sizes, and the
        dtype they were cast to (if they were)."""
        folder = epath.Path(self.path)
        h = hashlib.sha256((folder / "config.json").read_bytes())
        for file in sorted(set(weight_files(self.path).values())):
            h.update(f"{epath.Path(file).name}:{epath.Path(file).stat().length}".encode())
        if self.dtype:
            h.update(f"dtype:{self.dtype}".encode())
        return h.hexdigest()[:16]

    def tokenize(self, texts: list[str], max_len: int, flag: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SentencePiece ids + EOS, zero-padded: (ids int32 `[B, max_len]`, mask bool `[B, max_len]`). A text
        of more than `max_len` tokens is a UserError naming `flag`, or, with `flag=None`, cut to its first
        `max_len - 1` tokens and EOS (as T5 tokenizers truncate)."""
        eos = self.processor.eos_id()
        ids, lengths = np.zeros((len(texts), max_len), np.int32), []
        for row, pieces in enumerate(self.processor.encode(list(texts))):
            if len(pieces) + 1 > max_len:
                if flag is not None:
                    raise UserError(f"{flag}={texts[row]!r}: {len(pieces) + 1} T5 tokens (EOS included); this model "
                                    f"reads at most data.max_text_len={max_len}.")
                pieces = pieces[:max_len - 1]
            ids[row, :len(pieces) + 1] = pieces + [eos]
            lengths.append(len(pieces) + 1)
        return ids, np.arange(max_len) < np.array(lengths, int).reshape(-1, 1)

    def embed(self, texts: list[str], max_len: int, flag: str | None = None,
              batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(text_emb float32 `[B, max_len, d_model]`, zero where padded; mask bool `[B, max_len]`), in
        calls of `batch_size` texts (rounded up to a multiple of the groups of local devices, `load`)
        split over this process's devices. `flag`: as `tokenize`."""
        ids, mask = self.tokenize(texts, max_len, flag)
        n_dev = self.rows.mesh.shape["rows"]  # groups of devices, each with one copy
        per_call = -(-batch_size // n_dev) * n_dev
        out = []
        for i in range(0, len(texts), per_call):
            rows = [x[i:i + per_call] for x in (ids, mask)]
            pad = -len(rows[0]) % n_dev  # the last row again, so each device gets as many
            rows = [jax.device_put(np.concatenate([x, np.repeat(x[-1:], pad, 0)]), self.rows) for x in rows]
            out.append(np.asarray(self.apply(self.params, *rows))[:len(rows[0]) - pad])
        return np.concatenate(out), mask


def from_config(model_config) -> FrozenT5:
    """`load` of a model's `text_encoder_path`, `text_encoder_dtype` and `text_encoder_shards`."""
    return load(model_config.text_encoder_path, model_config.text_encoder_dtype, model_config.text_encoder_shards)


def param_spec(path: tuple[str, ...]) -> jax.sharding.PartitionSpec:
    """How a `T5Encoder` param is split over the mesh axis 'model' (Megatron-style tensor parallelism):
    the query, key, value and first feed-forward kernels by their output units (heads, d_ff), the
    attention output and last feed-forward kernels by their input units, so each layer needs one sum
    over 'model'; embeddings and norms whole on every device."""
    P = jax.sharding.PartitionSpec
    if path[-1] != "kernel":
        return P()
    return P("model", None) if path[-2] in ("o", "wo") else P(None, "model")


def check_shards(config: T5Config, shards: int) -> None:
    """UserError unless `shards` divides the local devices and the units `param_spec` splits."""
    split = {"attention (num_heads * d_kv)": config.num_heads * config.d_kv, "feed-forward (d_ff)": config.d_ff}
    if jax.local_device_count() % shards or any(n % shards for n in split.values()):
        raise UserError(f"model.text_encoder_shards={shards}: must divide this process's {jax.local_device_count()} "
                        f"devices and the encoder's {' and '.join(f'{k}={v}' for k, v in split.items())}.")


@functools.lru_cache(maxsize=2)
def load(path: str, dtype: str = "", shards: int = 1) -> FrozenT5:
    """The encoder in the folder `path` (see the module doc), loaded once per process, its weights cast
    to `dtype` ('': as stored). The local devices form groups of `shards`: each group holds one copy,
    split over its devices (`param_spec`), and embeds its share of each call's texts."""
    config = read_config(path)
    vocabulary = epath.Path(path) / VOCABULARY
    if not vocabulary.is_file():
        raise UserError(f"{FIELD}={path!r}: no {VOCABULARY} (the SentencePiece vocabulary) there.")
    import sentencepiece  # imported here: only frozen-encoder models need it

    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=vocabulary.read_bytes())
    except (RuntimeError, OSError):
        raise UserError(f"{FIELD}={path!r}: {VOCABULARY} is not a SentencePiece model.") from None
    if processor.eos_id() < 0 or processor.get_piece_size() > config.vocab_size:
        raise UserError(f"{FIELD}={path!r}: {VOCABULARY} ({processor.get_piece_size()} pieces, EOS id "
                        f"{processor.eos_id()}) does not fit config.json's vocab_size={config.vocab_size} with an EOS.")
    check_shards(config, shards)
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()).reshape(-1, shards), ("rows", "model"))
    # Once (not copied at every call), on this process's devices only: no other process takes part in a call.
    params = load_params(path, config)
    if dtype:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, jax.sharding.NamedSharding(mesh, param_spec(tuple(k.key for k in p)))), params)
    return FrozenT5(path, config, params, processor, jax.jit(functools.partial(embed_tokens, config)),
                    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows")), dtype)
