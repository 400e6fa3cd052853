"""The byte-level tokenizer and the Transformer text encoder: exact round trips, masking that holds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import text as T

TEXTS = ["a red circle left of a blue square", "", "naïve café", "日本語のテキスト",
         "🙂 emoji 🎉", "tab\tand\nnewline"]


def test_tokenize_layout():
    tokens, mask = T.tokenize(["ab", ""], max_len=5)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (2, 5)
    np.testing.assert_array_equal(tokens, [[T.BOS, ord("a") + 1, ord("b") + 1, 0, 0], [T.BOS, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, tokens != 0)
    tokens, _ = T.tokenize(["é"], max_len=4)  # two UTF-8 bytes, 0xC3 0xA9
    np.testing.assert_array_equal(tokens[0], [T.BOS, 0xC3 + 1, 0xA9 + 1, 0])
    assert T.tokenize(["\xff" * 100], max_len=300)[0].max() < T.VOCAB_SIZE


def test_round_trip_is_exact_for_texts_that_fit():
    tokens, mask = T.tokenize(TEXTS, max_len=40)
    assert T.detokenize(tokens, mask) == TEXTS
    assert T.detokenize(jnp.asarray(tokens), jnp.asarray(mask)) == TEXTS  # device arrays too


@pytest.mark.parametrize("text, max_len, kept", [
    ("abcdef", 4, "abc"),         # BOS + 3 bytes
    ("héllo", 3, "h"),            # é (2 bytes) does not fit after h: cut before it, not inside it
    ("héllo", 4, "hé"),
    ("日本語", 7, "日本"),           # 3 bytes per character
    ("日本語", 9, "日本"),
    ("日本語", 10, "日本語"),
    ("🙂", 4, ""),                # 4 bytes
    ("abc", 1, ""),               # BOS only
])
def test_truncation_keeps_whole_characters(text, max_len, kept):
    tokens, mask = T.tokenize([text], max_len)
    assert tokens.shape == (1, max_len)
    assert T.detokenize(tokens, mask) == [kept]
    assert mask.sum() == 1 + len(kept.encode())


def test_tokenize_and_detokenize_reject_what_they_cannot_do():
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        T.tokenize(["a"], 0)
    tokens, mask = T.tokenize(["abc"], 6)
    tokens[0, 2] = T.BOS  # BOS only at the start
    with pytest.raises(ValueError, match=r"token ids \[257\] are not bytes"):
        T.detokenize(tokens, mask)
    assert T.detokenize(np.array([[T.BOS, 0xFF + 1]]), np.array([[True, True]])) == ["\ufffd"]


ENCODER = dict(width=32, depth=2, heads=4, max_len=48)


@pytest.fixture(scope="module")
def encoder():
    tokens, mask = T.tokenize(TEXTS, ENCODER["max_len"])
    model = T.TextEncoder(**ENCODER)
    params = jax.jit(model.init)(jax.random.key(0), tokens, mask)  # jitted: eager is slower here
    return jax.jit(model.apply), params, tokens, mask


def test_encoder_shapes_and_dtypes(encoder):
    apply, params, tokens, mask = encoder
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert params["params"]["pos_emb"].shape == (48, 32)
    assert params["params"]["token_emb"]["embedding"].shape == (T.VOCAB_SIZE, 32)
    emb, out_mask = apply(params, tokens, mask)
    assert emb.shape == (len(TEXTS), 48, 32) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(out_mask, mask)
    assert T.pooled(emb, mask).shape == (len(TEXTS), 32)
    # The texts are told apart: every pair of pooled vectors differs.
    p = np.asarray(T.pooled(emb, mask))
    assert min(np.abs(p[i] - p[j]).max() for i in range(len(p)) for j in range(i)) > 1e-3


def test_encoder_computes_in_bfloat16_with_float32_params(encoder):
    apply, params, tokens, mask = encoder
    model = T.TextEncoder(**ENCODER, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(model.apply)(params, tokens, mask)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    emb, _ = jax.jit(model.apply)(params, tokens, mask)
    assert emb.dtype == jnp.float32
    reference, _ = apply(params, tokens, mask)
    assert np.abs(np.asarray(emb) - np.asarray(reference)).max() < 0.1  # layer-normed, O(1) values


def test_padding_changes_nothing(encoder):
    """Other tokens at padded positions: identical embeddings (padded ones zero) and pooled vectors."""
    apply, params, tokens, mask = encoder
    emb, _ = apply(params, tokens, mask)
    junk = np.random.default_rng(0).integers(0, T.VOCAB_SIZE, tokens.shape, dtype=np.int32)
    emb_junk, _ = apply(params, np.where(mask, tokens, junk), mask)
    np.testing.assert_array_equal(emb_junk, emb)
    assert not np.asarray(emb)[~mask].any()
    np.testing.assert_array_equal(T.pooled(emb_junk, mask), T.pooled(emb, mask))
    # Sanity: a changed real token does change the outputs of the other real tokens.
    changed = tokens.copy()
    changed[0, 3] += 1
    emb_changed, _ = apply(params, changed, mask)
    assert np.abs(np.asarray(emb_changed)[0, 1] - np.asarray(emb)[0, 1]).max() > 1e-4


def test_padding_length_does_not_matter(encoder):
    """The same texts padded to 48 or to their longest length give the same embeddings."""
    apply, params, tokens, mask = encoder
    longest = int(mask.sum(1).max())
    emb, _ = apply(params, tokens, mask)
    short, _ = apply(params, tokens[:, :longest], mask[:, :longest])
    np.testing.assert_allclose(short, np.asarray(emb)[:, :longest], atol=1e-5)


def test_attention_gives_masked_keys_no_weight():
    """Whatever sits at a masked position, the other outputs are those of the sequence without it."""
    attn = T.SelfAttention(heads=2)
    x = jax.random.normal(jax.random.key(1), (2, 6, 8))
    mask = np.array([[True, True, False, True, False, True], [True] * 6])
    params = jax.jit(attn.init)(jax.random.key(2), x, mask)
    apply = jax.jit(attn.apply)
    out = np.asarray(apply(params, x, mask))
    huge = x.at[0, 2].set(1e4).at[0, 4].set(-1e4)
    np.testing.assert_array_equal(np.asarray(apply(params, huge, mask))[0, mask[0]], out[0, mask[0]])
    kept = x[:1, mask[0]]
    np.testing.assert_allclose(apply(params, kept, np.ones((1, 4), bool))[0], out[0, mask[0]], atol=1e-6)
    # Unmasked, position 2 does matter.
    assert np.abs(np.asarray(apply(params, huge, np.ones((2, 6), bool)))[0, 0] - out[0, 0]).max() > 1e-3


def test_encoder_rejects_too_long_input(encoder):
    apply, params, _, _ = encoder
    tokens, mask = T.tokenize(["abc"], 49)
    with pytest.raises(ValueError, match="49 tokens per text, more than the encoder's max_len=48"):
        apply(params, tokens, mask)


def test_pooled_is_the_masked_mean():
    emb = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[True, False, True], [False, False, False]])
    np.testing.assert_allclose(T.pooled(emb, mask), [[2.0, 3.0], [0.0, 0.0]])
