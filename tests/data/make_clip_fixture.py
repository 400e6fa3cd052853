"""Regenerate the tiny CLIP golden fixture in this folder (tests/data/).

Run with a separate virtualenv that has the reference implementation (Hugging Face
transformers + PyTorch + Pillow), never from the test suite:

    python3 -m venv /tmp/t5ref
    /tmp/t5ref/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu   # or any CPU-only torch wheel
    /tmp/t5ref/bin/pip install transformers safetensors numpy pillow
    /tmp/t5ref/bin/python tests/data/make_clip_fixture.py

Everything is made locally (nothing is downloaded from a model hub): a byte-level BPE
vocabulary in CLIP's file format learned from a small generated caption corpus, a randomly
initialised tiny CLIPModel, and the reference outputs in clip_reference.npz. See README.md.
"""

import collections
import json
import os
import random
import sys
import unicodedata

import numpy as np
import PIL
import regex
import safetensors
import tokenizers
import torch
import transformers
from safetensors import safe_open
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else HERE
MODEL_DIR = os.path.join(OUT, "clip_tiny")
NPZ = os.path.join(OUT, "clip_reference.npz")
MAX_LEN = 16
NUM_MERGES = 150
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The pre-tokenizer regex of openai/CLIP's simple_tokenizer.py and of HF CLIPTokenizer.
PAT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

PROMPTS = [
    "a photo of a cat",
    "a red circle left of a blue square",
    "  A   Big RED dog ",  # extra spaces and capitals
    "café",  # two-byte UTF-8 character
    "",
    "a small green triangle above a large yellow circle next to a purple square in a sunny garden",  # > 16 tokens
]
LONG_PROMPT_INDEX = len(PROMPTS) - 1


def bytes_to_unicode():
    """openai/CLIP's (and GPT-2's) byte -> printable unicode character table, in its dict order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_corpus(seed=0, n_lines=300):
    rng = random.Random(seed)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "star", "cube", "sphere", "rectangle"]
    animals = ["cat", "dog", "bird", "horse", "cow", "sheep", "rabbit", "fox", "bear", "lion", "mouse", "duck"]
    objects = ["car", "chair", "table", "cup", "book", "lamp", "bicycle", "house", "tree", "boat", "clock"]
    places = ["the beach", "a forest", "the city", "a garden", "the mountains", "a kitchen", "a park", "the snow",
              "a café", "the river"]
    relations = ["left of", "right of", "above", "below", "next to", "behind", "in front of"]
    sizes = ["small", "big", "large", "tiny"]
    lines = ["a photo of a cat", "a photo of a dog", "a red circle left of a blue square", "a café in paris",
             "crème brûlée on a plate", "a naïve painting of a dog", "an old café near the river"]
    while len(lines) < n_lines:
        kind = rng.randrange(4)
        if kind == 0:
            line = f"a photo of a {rng.choice(colours)} {rng.choice(animals)}"
        elif kind == 1:
            line = (f"a {rng.choice(colours)} {rng.choice(shapes)} {rng.choice(relations)} "
                    f"a {rng.choice(colours)} {rng.choice(shapes)}")
        elif kind == 2:
            line = f"a {rng.choice(sizes)} {rng.choice(animals)} in {rng.choice(places)}"
        else:
            line = f"a {rng.choice(colours)} {rng.choice(objects)} {rng.choice(relations)} a {rng.choice(objects)}"
        lines.append(line)
    return lines


def clean(text):
    """What HF's CLIPTokenizer normalizer does: NFC, every whitespace run -> one space, lowercase."""
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def learn_bpe(lines, num_merges):
    """Greedy byte-level BPE: merge the most frequent adjacent pair (ties: smallest pair)."""
    b2u = bytes_to_unicode()
    counts = collections.Counter()
    for line in lines:
        for word in regex.findall(PAT, clean(line)):
            chars = [b2u[b] for b in word.encode("utf-8")]
            chars[-1] += "</w>"
            counts[tuple(chars)] += 1
    words = dict(counts)
    known = set(b2u.values()) | {c + "</w>" for c in b2u.values()}
    merges = []
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for word, freq in words.items():
            for pair in zip(word[:-1], word[1:]):
                pairs[pair] += freq
        candidates = [(-n, p) for p, n in pairs.items() if p[0] + p[1] not in known]
        if not candidates:
            break
        _, best = min(candidates)
        merges.append(best)
        known.add(best[0] + best[1])
        new_words = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + freq
        words = new_words
    return merges


def write_tokenizer_files(directory, merges):
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + [BOS, EOS]
    assert len(set(tokens)) == len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vocab


def perturb(model, seed=1234):
    """Make every parameter matter: random LayerNorm weights/biases and Linear biases, O(1) activations."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.2 * randn(module.weight))
                module.bias.copy_(0.2 * randn(module.bias))
            elif isinstance(module, torch.nn.Linear):
                if module.bias is not None:
                    module.bias.copy_(0.1 * randn(module.bias))
                if name.endswith("q_proj"):
                    # logits = q.k / sqrt(head_dim) become O(1), so a missing or wrong scale shows.
                    module.weight.copy_(3.0 * randn(module.weight) / module.weight.shape[1] ** 0.5)
        patch = model.vision_model.embeddings.patch_embedding.weight
        patch.copy_(randn(patch) / (patch[0].numel() ** 0.5))


def main():
    os.makedirs(MODEL_DIR, exist_ok=True)
    for name in os.listdir(MODEL_DIR):
        os.remove(os.path.join(MODEL_DIR, name))

    # 1. Tokenizer.
    merges = learn_bpe(make_corpus(), NUM_MERGES)
    vocab = write_tokenizer_files(MODEL_DIR, merges)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR)
    assert tokenizer.bos_token_id == vocab[BOS] and tokenizer.eos_token_id == vocab[EOS]
    assert tokenizer.pad_token_id == vocab[EOS]
    enc = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True)
    input_ids = np.array(enc["input_ids"], np.int32)
    attention_mask = np.array(enc["attention_mask"], np.int32)
    full = tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]
    full_ids = np.full((len(PROMPTS), 48), vocab[EOS], np.int32)
    for i, ids in enumerate(full):
        full_ids[i, : len(ids)] = ids
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in full]

    # 2. Model.
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act="quick_gelu",
                         projection_dim=16, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, num_channels=3, hidden_act="quick_gelu", projection_dim=16),
        projection_dim=16,
        logit_scale_init_value=2.6592,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    perturb(model)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    write_tokenizer_files(MODEL_DIR, merges)  # save_pretrained of the model must not have touched them
    tokenizer.save_pretrained(MODEL_DIR)
    tok_json = os.path.join(MODEL_DIR, "tokenizer.json")
    if os.path.exists(tok_json):
        os.remove(tok_json)  # duplicates vocab.json + merges.txt; HF rebuilds the tokenizer from them
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(MODEL_DIR)

    # Reload everything from disk, so the outputs belong to the saved files.
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR)
    enc2 = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True)
    assert np.array_equal(np.array(enc2["input_ids"]), input_ids)
    processor = CLIPImageProcessorPil.from_pretrained(MODEL_DIR)
    # Default attention (sdpa): the eager path computes its softmax in float32 even for a float64 model.
    model = CLIPModel.from_pretrained(MODEL_DIR, attn_implementation="sdpa").eval()
    model64 = CLIPModel.from_pretrained(MODEL_DIR, attn_implementation="sdpa").eval().double()

    # 3. Images.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 48, 40, 3), dtype=np.uint8)
    pixel_values = processor(list(images), return_tensors="np")["pixel_values"].astype(np.float32)
    # The same preprocessing spelled out: PIL bicubic resize of the uint8 image (shortest edge -> 32, the other
    # edge int(32 * 48 / 40) = 38), centre crop, x / 255, (x - mean) / std.
    new_h = int(32 * images.shape[1] / images.shape[2])
    resized = np.stack([np.asarray(PIL.Image.fromarray(im).resize((32, new_h), PIL.Image.Resampling.BICUBIC))
                        for im in images])
    top = (new_h - 32) // 2
    cropped = resized[:, top: top + 32, :, :].astype(np.float64) * (1 / 255)
    mine = (cropped.astype(np.float32) - np.array(processor.image_mean, np.float32)) / np.array(
        processor.image_std, np.float32)
    mine = mine.transpose(0, 3, 1, 2)
    assert np.abs(mine - pixel_values).max() < 1e-6, np.abs(mine - pixel_values).max()
    given_pixels = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)

    # 4. Reference outputs, float64.
    ids_t = torch.from_numpy(input_ids.astype(np.int64))
    mask_t = torch.from_numpy(attention_mask.astype(np.int64))
    with torch.no_grad():
        text_out = model64.get_text_features(input_ids=ids_t, attention_mask=mask_t)
        text_embeds = text_out.pooler_output.numpy()
        text_last_hidden = text_out.last_hidden_state.numpy()
        text_pooled = model64.text_model(input_ids=ids_t, attention_mask=mask_t).pooler_output.numpy()
        text_last_hidden_nomask = model64.text_model(input_ids=ids_t).last_hidden_state.numpy()
        img_out = model64.get_image_features(pixel_values=torch.from_numpy(pixel_values.astype(np.float64)))
        image_embeds = img_out.pooler_output.numpy()
        image_last_hidden = img_out.last_hidden_state.numpy()
        image_embeds_given = model64.get_image_features(
            pixel_values=torch.from_numpy(given_pixels.astype(np.float64))).pooler_output.numpy()
        out = model64(input_ids=ids_t, attention_mask=mask_t,
                      pixel_values=torch.from_numpy(pixel_values.astype(np.float64)))
        logits_per_image = out.logits_per_image.numpy()
        logit_scale = model64.logit_scale.numpy()
        # float32 run of the same model, for the tolerance a float32 port can expect.
        out32 = model(input_ids=ids_t, attention_mask=mask_t, pixel_values=torch.from_numpy(pixel_values))
        t32 = model.get_text_features(input_ids=ids_t, attention_mask=mask_t).pooler_output.numpy()
        i32 = model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output.numpy()

    # The same weights with exact (erf) gelu in both towers, as LAION's CLIP checkpoints (hidden_act "gelu").
    gelu_config = CLIPConfig.from_pretrained(MODEL_DIR)
    gelu_config.text_config.hidden_act = gelu_config.vision_config.hidden_act = "gelu"
    gelu64 = CLIPModel.from_pretrained(MODEL_DIR, config=gelu_config, attn_implementation="sdpa").eval().double()
    with torch.no_grad():
        text_embeds_gelu = gelu64.get_text_features(input_ids=ids_t, attention_mask=mask_t).pooler_output.numpy()
        image_embeds_gelu = gelu64.get_image_features(
            pixel_values=torch.from_numpy(pixel_values.astype(np.float64))).pooler_output.numpy()
    assert np.abs(text_embeds_gelu - text_embeds).max() > 1e-3  # the activation matters

    pooled_index = (input_ids == vocab[EOS]).argmax(-1)  # first <|endoftext|>
    assert np.array_equal(pooled_index, input_ids.argmax(-1))  # legacy rule agrees: EOS is the largest id
    assert np.allclose(text_pooled, text_last_hidden[np.arange(len(PROMPTS)), pooled_index])
    # Padding (pad == EOS, at the end) cannot change the non-pad positions under a causal mask.
    assert np.allclose(text_last_hidden[attention_mask == 1], text_last_hidden_nomask[attention_mask == 1])
    check = {
        "text_embeds f32 vs f64": np.abs(t32 - text_embeds).max(),
        "image_embeds f32 vs f64": np.abs(i32 - image_embeds).max(),
        "logits_per_image f32 vs f64": np.abs(out32.logits_per_image.numpy() - logits_per_image).max(),
        "text_last_hidden mask vs no mask (pad rows)": np.abs(text_last_hidden - text_last_hidden_nomask).max(),
    }
    for k, v in check.items():
        print(f"max|diff| {k}: {v:.3g}")

    width = max(len(p) for p in PROMPTS)
    np.savez(
        NPZ,
        prompts=np.array(PROMPTS, dtype=f"<U{width}"),
        long_prompt_index=np.int32(LONG_PROMPT_INDEX),
        max_length=np.int32(MAX_LEN),
        input_ids=input_ids,
        attention_mask=attention_mask,
        full_ids=full_ids,
        full_lengths=np.array([len(ids) for ids in full], np.int32),
        pooled_index=pooled_index.astype(np.int32),
        text_embeds=text_embeds,
        text_pooled=text_pooled,
        text_last_hidden=text_last_hidden,
        images=images,
        images_resized=resized,
        pixel_values=pixel_values,
        image_embeds=image_embeds,
        image_last_hidden=image_last_hidden,
        given_pixel_values=given_pixels,
        image_embeds_from_given_pixels=image_embeds_given,
        text_embeds_gelu=text_embeds_gelu,
        image_embeds_gelu=image_embeds_gelu,
        logit_scale=logit_scale,
        logits_per_image=logits_per_image,
    )

    # Report.
    for p, toks in zip(PROMPTS, tokens):
        print(repr(p), toks)
    print("input_ids:\n", input_ids)
    with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), "np") as f:
        names = f.keys()
        for k in names:
            print(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())
    print("versions:", transformers.__version__, torch.__version__, tokenizers.__version__,
          safetensors.__version__, np.__version__, PIL.__version__)
    print("done")


if __name__ == "__main__":
    main()
