"""Text for text-to-image models: a byte-level tokenizer and a small Transformer text encoder.

Tokens are a text's UTF-8 bytes + 1 (1..256) after BOS (257), padded with 0: no vocabulary file,
nothing is out of vocabulary, and the empty text (the null condition of classifier-free guidance)
still has one token to attend to and pool.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

PAD = 0
BOS = 257
VOCAB_SIZE = 258  # padding, 256 bytes, BOS


def tokenize(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """N texts -> (tokens int32 `[N, max_len]`, mask bool `[N, max_len]`, True on real tokens).

    Each row is BOS, the UTF-8 bytes + 1, then padding. A text of more than max_len - 1 bytes is
    cut after its last whole character that fits, so the cut still decodes.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1 (room for BOS), got {max_len}.")
    tokens = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        cut = min(len(data), max_len - 1)
        while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1  # data[cut] continues a character: keeping data[:cut] would split it
        tokens[i, 0] = BOS
        tokens[i, 1:1 + cut] = np.frombuffer(data[:cut], np.uint8).astype(np.int32) + 1
    return tokens, tokens != PAD


def detokenize(tokens, mask) -> list[str]:
    """Inverse of `tokenize`: int `[N, L]` and bool `[N, L]` -> N texts. Byte sequences that are not
    UTF-8 decode with U+FFFD; ids other than a leading BOS and bytes are a ValueError."""
    out = []
    for row, m in zip(np.asarray(tokens), np.asarray(mask, bool)):
        ids = row[m]
        if ids.size and ids[0] == BOS:
            ids = ids[1:]
        if ((ids < 1) | (ids > 256)).any():
            raise ValueError(f"token ids {sorted(set(ids[(ids < 1) | (ids > 256)].tolist()))} are "
                             f"not bytes (1..256); only a leading BOS ({BOS}) may be.")
        out.append(bytes((ids - 1).astype(np.uint8)).decode("utf-8", errors="replace"))
    return out


class SelfAttention(nn.Module):
    """Multi-head self-attention: x `[N, L, width]`, mask bool `[N, L]` -> `[N, L, width]`.
    Keys where mask is False get zero weight: no output depends on the padded positions."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} does not split into {self.heads} heads.")
        qkv = nn.DenseGeneral((3, self.heads, width // self.heads), dtype=self.dtype, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, L, heads, head_dim]
        h = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(h)


class Block(nn.Module):
    """Pre-LN Transformer block: x + attention(LN(x)), then x + MLP(LN(x)) (GELU, `mlp_ratio` wide)."""

    heads: int
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        width, dt = x.shape[-1], self.dtype
        x = x + SelfAttention(self.heads, dt, name="attn")(nn.LayerNorm(dtype=dt, name="ln1")(x), mask)
        h = nn.Dense(self.mlp_ratio * width, dtype=dt, name="mlp_in")(nn.LayerNorm(dtype=dt, name="ln2")(x))
        return x + nn.Dense(width, dtype=dt, name="mlp_out")(nn.gelu(h))


class TextEncoder(nn.Module):
    """tokens int `[N, L]`, mask bool `[N, L]` (L <= max_len) -> (embeddings float32 `[N, L, width]`,
    mask).

    Token + learned position embeddings, `depth` pre-LN blocks with masked self-attention, a final
    LayerNorm. Params are float32, compute is in `dtype`. Padded positions neither influence the
    others nor carry anything (their embeddings are zero), so the output depends only on the texts.
    """

    vocab_size: int = VOCAB_SIZE
    width: int = 256
    depth: int = 4
    heads: int = 4
    max_len: int = 64
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, mask):
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"{length} tokens per text, more than the encoder's max_len={self.max_len}.")
        init = nn.initializers.normal(0.02)
        embed = nn.Embed(self.vocab_size, self.width, embedding_init=init, dtype=self.dtype, name="token_emb")
        x = embed(tokens)
        pos = self.param("pos_emb", init, (self.max_len, self.width), jnp.float32)
        x = x + pos[:length].astype(self.dtype)
        for i in range(self.depth):
            x = Block(self.heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)
        return jnp.where(mask[..., None], x, 0.0), mask


def pooled(emb: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `emb` `[N, L, width]` over the positions where `mask` `[N, L]` is True -> `[N, width]`
    (zero for a row with none)."""
    m = mask[..., None].astype(emb.dtype)
    return (emb * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
