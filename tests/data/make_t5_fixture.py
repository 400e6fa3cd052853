"""Regenerate the tiny T5 golden fixture in this folder (tests/data/).

Run with a separate virtualenv that has the reference implementation (Hugging Face
transformers + PyTorch), never from the test suite:

    python3 -m venv /tmp/t5ref
    /tmp/t5ref/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu   # or any CPU-only torch wheel
    /tmp/t5ref/bin/pip install transformers sentencepiece protobuf safetensors numpy
    /tmp/t5ref/bin/python tests/data/make_t5_fixture.py

Everything is made locally (nothing is downloaded from a model hub): a SentencePiece
unigram model trained on t5_corpus.txt, three randomly initialised T5 encoders and the
reference outputs in t5_reference.npz. See README.md.
"""

import io
import json
import math
import os
import random
import shutil
import sys

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors import safe_open
from transformers import T5Config, T5EncoderModel, T5Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else HERE
CORPUS = os.path.join(OUT, "t5_corpus.txt")
SPM_FILE = os.path.join(OUT, "t5_tiny", "spiece.model")
MAX_LEN = 16
FULL_LEN = 48  # width of the untruncated id arrays
SPM_VOCAB = 200

PROMPTS = [
    "a red circle left of a blue square",
    "a photo of a cat",
    "a Zebra eating quinoa",  # not in the corpus: rare pieces, and 'Z' is <unk>
    "  A  Big   RED dog ",  # extra spaces and capitals
    "café ünïcode ½",  # NFKC: '½' -> '1⁄2'; 'ü', 'ï' are <unk>
    "",
    "東京 tower",  # two adjacent unknown characters (one fused <unk> piece?)
    "a small green triangle above a large yellow circle next to a purple square in a sunny garden at sunset",
]
LONG_PROMPT_INDEX = len(PROMPTS) - 1


def make_corpus(seed=0, n_lines=400):
    rng = random.Random(seed)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey",
               "golden"]
    shapes = ["circle", "square", "triangle", "star", "cube", "sphere", "rectangle", "hexagon", "cone", "heart"]
    animals = ["cat", "dog", "bird", "horse", "cow", "sheep", "rabbit", "fox", "bear", "lion", "tiger", "elephant",
               "mouse", "duck", "fish", "owl"]
    places = ["the beach", "a forest", "the city", "a garden", "the mountains", "a kitchen", "the desert", "a park",
              "the river", "a small village", "the snow", "a busy street", "the ocean", "a library", "the moon"]
    relations = ["left of", "right of", "above", "below", "next to", "behind", "in front of", "on top of", "under",
                 "near"]
    sizes = ["big", "small", "large", "tiny", "huge", "little"]
    styles = ["a photo of", "a painting of", "a drawing of", "a sketch of", "a picture of", "an image of",
              "a close up of", "a watercolor of"]
    verbs = ["sitting in", "running through", "sleeping in", "playing in", "walking in", "standing in", "looking at",
             "jumping over"]
    adjs = ["happy", "sleepy", "fluffy", "old", "young", "cute", "wild", "quiet", "shiny", "bright", "dark",
            "colorful"]
    times = ["at night", "at sunset", "in the morning", "in winter", "in summer", "on a rainy day",
             "under a blue sky"]
    fixed = [
        "a photo of a cat", "a photo of a dog", "a red circle left of a blue square",
        "two cats and one dog", "three red apples on a table", "a cup of coffee in a cafe",
        "a café with green chairs", "the sun is bright and the sky is blue",
        "colours like red, green and blue are primary colours.", "shapes: circle, square, triangle!",
        "numbers 1 2 3 4 5 6 7 8 9 10", "the year 2024 was warm", "a cat? a dog? both!",
        "An Orange Fox In The Snow", "A BIG BLUE HOUSE", "it's a small world",
        "the quick brown fox jumps over the lazy dog",
    ]

    def a(word):
        return ("an " if word[0] in "aeiou" else "a ") + word

    templates = [
        lambda: f"{a(rng.choice(colours))} {rng.choice(shapes)} {rng.choice(relations)} {a(rng.choice(colours))} "
                f"{rng.choice(shapes)}",
        lambda: f"{rng.choice(styles)} {a(rng.choice(adjs))} {rng.choice(animals)}",
        lambda: f"{a(rng.choice(sizes))} {rng.choice(colours)} {rng.choice(animals)} {rng.choice(verbs)} "
                f"{rng.choice(places)}",
        lambda: f"{rng.choice(styles)} {rng.choice(places)} {rng.choice(times)}",
        lambda: f"the {rng.choice(animals)} is {rng.choice(relations)} the {rng.choice(colours)} {rng.choice(shapes)}",
        lambda: f"{rng.choice(['two', 'three', 'four', 'many', 'some'])} {rng.choice(colours)} {rng.choice(shapes)}s "
                f"in {rng.choice(places)}",
        lambda: f"{a(rng.choice(adjs))} {rng.choice(animals)} and {a(rng.choice(adjs))} {rng.choice(animals)} "
                f"{rng.choice(times)}",
        lambda: f"{rng.choice(styles)} {a(rng.choice(colours))} {rng.choice(shapes)}",
        lambda: f"The {rng.choice(colours).capitalize()} {rng.choice(animals).capitalize()} lives in "
                f"{rng.choice(places)}.",
    ]
    lines = list(fixed)
    while len(lines) < n_lines:
        lines.append(rng.choice(templates)())
    return lines


def train_spm():
    lines = make_corpus()
    with open(CORPUS, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    # Single thread, no sampling/shuffling of the input, sentences fed from memory (so no file
    # path is recorded in the model's trainer_spec): the file is byte-for-byte reproducible.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=SPM_VOCAB,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2,
    )
    return buf.getvalue()


def make_config(ffn):
    return T5Config(
        vocab_size=SPM_VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, dropout_rate=0.0, feed_forward_proj=ffn,
    )


@torch.no_grad()
def make_model(ffn):
    torch.manual_seed(0)
    model = T5EncoderModel(make_config(ffn)).float().eval()
    gen = torch.Generator().manual_seed(1234)
    d_model = model.config.d_model
    for name, p in sorted(model.named_parameters()):
        if "layer_norm" in name:
            # Norm weights are 1 after init: perturb so a loader that ignores them fails.
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("relative_attention_bias.weight"):
            # Larger than the init (std d_model**-0.5) so the bias visibly shapes attention.
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith("SelfAttention.q.weight"):
            # Init std is (d_model*d_kv)**-0.5, which makes the logits tiny; use d_model**-0.5 so the
            # logits are O(sqrt(d_kv)) and a wrong 1/sqrt(d_kv) scaling is visible.
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(d_model))
    return model


def save_tokenizer(dst, spm_bytes):
    with open(os.path.join(dst, "spiece.model"), "wb") as f:  # a copy per folder: git stores it once
        f.write(spm_bytes)
    tok = T5Tokenizer.from_pretrained(dst)  # converts spiece.model
    tok.save_pretrained(dst)
    # tokenizer.json carries the nmt_nfkc charsmap again (~350 KB): leave it out;
    # T5Tokenizer/AutoTokenizer.from_pretrained rebuild it from spiece.model.
    os.remove(os.path.join(dst, "tokenizer.json"))


def tensor_table(folder):
    rows = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                for k in sorted(f.keys()):
                    t = f.get_tensor(k)
                    rows[k] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), fn)
    return rows


def pad_to(ids, n):
    return ids + [0] * (n - len(ids))


@torch.no_grad()
def hidden(model, input_ids, attention_mask):
    out = model(input_ids=torch.tensor(input_ids, dtype=torch.long),
                attention_mask=torch.tensor(attention_mask, dtype=torch.long))
    return out.last_hidden_state.double().numpy()


def main():
    os.makedirs(OUT, exist_ok=True)
    spm_bytes = train_spm()

    dirs = {k: os.path.join(OUT, k) for k in ("t5_tiny", "t5_tiny_relu", "t5_tiny_sharded_bf16")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    tiny = make_model("gated-gelu")
    relu = make_model("relu")
    tiny.save_pretrained(dirs["t5_tiny"], safe_serialization=True)
    relu.save_pretrained(dirs["t5_tiny_relu"], safe_serialization=True)
    make_model("gated-gelu").to(torch.bfloat16).save_pretrained(
        dirs["t5_tiny_sharded_bf16"], safe_serialization=True, max_shard_size=25_000)
    for d in dirs.values():
        save_tokenizer(d, spm_bytes)

    # Tokenisation: HF tokenizer vs plain sentencepiece (+ EOS).
    tok = T5Tokenizer.from_pretrained(dirs["t5_tiny"])
    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int32)
    attention_mask = np.asarray(enc["attention_mask"], dtype=np.int32)
    hf_full = tok(PROMPTS)["input_ids"]

    sp = spm.SentencePieceProcessor(model_file=SPM_FILE)
    sp_full = [sp.encode(p) + [1] for p in PROMPTS]
    sp_ids = np.asarray([pad_to(ids if len(ids) <= MAX_LEN else ids[:MAX_LEN - 1] + [1], MAX_LEN)
                         for ids in sp_full], dtype=np.int32)
    full_ids = np.asarray([pad_to(ids, FULL_LEN) for ids in sp_full], dtype=np.int32)
    full_lengths = np.asarray([len(ids) for ids in sp_full], dtype=np.int32)

    # Reference hidden states, float64 (eager attention; sdpa is checked against it).
    models = {
        "hidden_tiny": T5EncoderModel.from_pretrained(dirs["t5_tiny"], attn_implementation="eager"),
        "hidden_relu": T5EncoderModel.from_pretrained(dirs["t5_tiny_relu"], attn_implementation="eager"),
        "hidden_sharded_bf16": T5EncoderModel.from_pretrained(
            dirs["t5_tiny_sharded_bf16"], dtype=torch.float32, attn_implementation="eager"),
    }
    out = {}
    for key, m in models.items():
        out[key] = hidden(m.double().eval(), input_ids, attention_mask)

    np.savez(
        os.path.join(OUT, "t5_reference.npz"),
        prompts=np.asarray(PROMPTS, dtype=f"<U{max(len(p) for p in PROMPTS)}"),
        max_length=np.int32(MAX_LEN),
        long_prompt_index=np.int32(LONG_PROMPT_INDEX),
        input_ids=input_ids,
        attention_mask=attention_mask,
        sp_ids=sp_ids,
        full_ids=full_ids,
        full_lengths=full_lengths,
        **out,
    )

    # ---------------- report ----------------
    print("versions: transformers", transformers.__version__, "torch", torch.__version__,
          "sentencepiece", spm.__version__, "numpy", np.__version__)
    print("spm vocab", sp.get_piece_size(), "HF tokenizer len", len(tok))
    for name, d in dirs.items():
        print(f"\n== {name}: files", sorted(os.listdir(d)))
        for k, (shape, dt, fn) in tensor_table(d).items():
            print(f"  {k:60s} {str(shape):12s} {dt:9s} {fn}")
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        print("  config:", {k: cfg.get(k) for k in (
            "architectures", "model_type", "vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
            "feed_forward_proj", "dense_act_fn", "is_gated_act", "relative_attention_num_buckets",
            "relative_attention_max_distance", "layer_norm_epsilon", "tie_word_embeddings", "dtype",
            "torch_dtype", "transformers_version")})
    print("\n== tokenisation")
    for i, p in enumerate(PROMPTS):
        same = hf_full[i] == sp_full[i]
        print(f"  [{i}] {p!r}: hf==sp+eos {same}; pieces {sp.encode(p, out_type=str)}")
        if not same:
            print("     hf", hf_full[i], "\n     sp", sp_full[i])
    print("  truncated HF == sp_ids:", bool((input_ids == sp_ids).all()))
    print("  long prompt: untruncated len", len(hf_full[LONG_PROMPT_INDEX]),
          "truncated", input_ids[LONG_PROMPT_INDEX].tolist())
    print("  input_ids\n", input_ids, "\n  attention_mask\n", attention_mask)

    # ---------------- sanity checks of the reference itself ----------------
    m = models["hidden_tiny"]
    print("\n== checks")
    print("  dense_act_fn", m.config.dense_act_fn, "is_gated_act", m.config.is_gated_act,
          "| relu:", models["hidden_relu"].config.dense_act_fn, models["hidden_relu"].config.is_gated_act)
    print("  attention scaling", m.encoder.block[0].layer[0].SelfAttention.scaling)
    print("  has_relative_attention_bias per block",
          [b.layer[0].SelfAttention.has_relative_attention_bias for b in m.encoder.block])
    print("  shared is embed_tokens:", m.shared.weight.data_ptr() == m.encoder.embed_tokens.weight.data_ptr())
    sd = T5EncoderModel.from_pretrained(dirs["t5_tiny"], attn_implementation="sdpa").double().eval()
    print("  sdpa vs eager max|diff|", np.abs(hidden(sd, input_ids, attention_mask) - out["hidden_tiny"]).max())
    f32 = T5EncoderModel.from_pretrained(dirs["t5_tiny"]).eval()
    print("  float32 vs float64 max|diff|", np.abs(hidden(f32, input_ids, attention_mask) - out["hidden_tiny"]).max())
    bfm = T5EncoderModel.from_pretrained(dirs["t5_tiny_sharded_bf16"], dtype=torch.bfloat16).eval()
    print("  native bf16 run vs hidden_sharded_bf16 max|diff|",
          np.abs(hidden(bfm, input_ids, attention_mask).astype(np.float64) - out["hidden_sharded_bf16"]).max())
    print("  hidden_tiny vs hidden_sharded_bf16 max|diff|",
          np.abs(out["hidden_tiny"] - out["hidden_sharded_bf16"]).max())
    print("  |hidden_tiny| mean", np.abs(out["hidden_tiny"]).mean())

    # How much common mistakes change the output (so the fixture can detect them).
    def variant(fn):
        mm = T5EncoderModel.from_pretrained(dirs["t5_tiny"], attn_implementation="eager").double().eval()
        fn(mm)
        return np.abs(hidden(mm, input_ids, attention_mask) - out["hidden_tiny"]).max()

    def scale(mm):
        for b in mm.encoder.block:
            b.layer[0].SelfAttention.scaling = 8 ** -0.5

    def ones_norm(mm):
        with torch.no_grad():
            for n, p in mm.named_parameters():
                if "layer_norm" in n:
                    p.fill_(1.0)

    def exact_gelu(mm):
        for b in mm.encoder.block:
            b.layer[1].DenseReluDense.act = torch.nn.GELU()

    def no_mask_out():
        return np.abs(hidden(models["hidden_tiny"], input_ids, np.ones_like(attention_mask))
                      - out["hidden_tiny"]).max()

    print("  wrong 1/sqrt(d_kv) scaling: max|diff|", variant(scale))
    print("  norm weights ignored: max|diff|", variant(ones_norm))
    print("  exact erf gelu instead of tanh gelu_new: max|diff|", variant(exact_gelu))
    print("  attention_mask ignored: max|diff|", no_mask_out())


if __name__ == "__main__":
    main()
