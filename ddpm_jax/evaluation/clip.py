"""CLIP (Radford et al. 2021) in Flax, read from a local folder, for the CLIP score of text-to-image
samples: 100 max(cos(image, caption), 0) (Hessel et al. 2021's CLIP-S is 2.5 times the cosine, so
this is 40 times CLIP-S; torchmetrics' CLIPScore is this one).

The folder is a checkpoint in the Hugging Face layout that the user downloaded (nothing is downloaded
here; e.g. openai/clip-vit-large-patch14): `config.json`, `model.safetensors`, and the byte-level BPE
vocabulary `vocab.json` and `merges.txt`.

- Text: CLIP's tokenizer (NFC, whitespace collapsed, lower case, pre-tokenized by `PATTERN`, each piece's
  UTF-8 bytes merged by the BPE ranks, `</w>` ending a word), `<|startoftext|>` ... `<|endoftext|>`,
  cut to the position table's length with the end token kept; a causal Transformer; the pooled
  token is the end token's; a projection.
- Images: the shortest side resized to the vision tower's size by PIL's bicubic filter, centre-cropped,
  scaled to [0, 1] and normalised by CLIP's mean and std; patches, a class token and positions, a layer
  norm, a Transformer; the class token's output, normed and projected.
Both Transformers are pre-norm with quick_gelu MLPs (x sigmoid(1.702 x), OpenAI's; or the exact gelu,
`hidden_act` "gelu", LAION's) and attention scaled by 1/sqrt(head_dim). Weights keep their stored
dtype; every product is computed in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import unicodedata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from ddpm_jax import files
from ddpm_jax.validation import UserError

FIELD = "eval.clip_model"
ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI's CLIP; LAION's (exact gelu)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer (openai/CLIP's simple_tokenizer.py), by the `regex` module for \p{L} and \p{N}
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's image normalisation (OpenAI's)
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@functools.cache
def _byte_chars() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE: printable Latin-1 bytes are themselves,
    the other 68 bytes are 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """CLIP's byte-level BPE from `vocab.json` ({token: id}) and `merges.txt` (one 'a b' pair per line,
    by rank, after a '#version' line)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab, self.ranks = vocab, {pair: i for i, pair in enumerate(merges)}
        self.bos, self.eos = vocab[BOS], vocab[EOS]

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one tokenizer per process; words repeat)
    def bpe(self, word: str) -> tuple[str, ...]:
        """The BPE pieces of one pre-tokenized word (already in byte characters)."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """The ids of `text` between the start and end tokens (uncut)."""
        import regex  # imported here: only the CLIP score needs it

        chars = _byte_chars()
        ids = [self.bos]
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()  # as transformers' normalizer
        for word in regex.findall(PATTERN, text, regex.IGNORECASE):
            if word in (BOS, EOS):  # written out in the text: the special token itself
                ids.append(self.vocab[word])
            else:
                ids += [self.vocab[p] for p in self.bpe("".join(chars[b] for b in word.encode("utf-8")))]
        return ids + [self.eos]

    def __call__(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 `[B, length]`, each cut to `length` with its end token kept and padded with the end
        token, as CLIP pads; mask bool `[B, length]`, True on the real tokens)."""
        ids = np.full((len(texts), length), self.eos, np.int32)
        mask = np.zeros((len(texts), length), bool)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            tokens = tokens[:length - 1] + [self.eos] if len(tokens) > length else tokens
            ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, True
        return ids, mask


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # or "gelu" (exact)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    text: TowerConfig
    vision: TowerConfig
    vocab_size: int
    max_positions: int  # text tokens
    image_size: int
    patch_size: int
    projection_dim: int


class EncoderLayer(nn.Module):
    config: TowerConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """x `[B, L, W]`; bias `[B, 1, L, L]` added to the attention logits (None: none)."""
        c = self.config
        B, L, W = x.shape
        heads, dense = c.num_attention_heads, lambda n, name: nn.Dense(n, dtype=jnp.float32, name=name)
        h = nn.LayerNorm(c.layer_norm_eps, dtype=jnp.float32, name="layer_norm1")(x)
        q, k, v = (dense(W, f"{n}_proj")(h).reshape(B, L, heads, -1) for n in "qkv")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (W // heads) ** -0.5, k)
        if bias is not None:
            logits = logits + bias
        h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(B, L, W)
        x = x + dense(W, "out_proj")(h)
        h = dense(c.intermediate_size, "fc1")(nn.LayerNorm(c.layer_norm_eps, dtype=jnp.float32, name="layer_norm2")(x))
        h = h * jax.nn.sigmoid(1.702 * h) if c.hidden_act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return x + dense(W, "fc2")(h)


class Clip(nn.Module):
    """`text(ids, mask)` -> `[B, projection_dim]`, `image(pixels [B, S, S, 3] normalised)` -> `[B, projection_dim]`."""

    config: ClipConfig

    def setup(self):
        c, t, v = self.config, self.config.text, self.config.vision
        self.token_embedding = nn.Embed(c.vocab_size, t.hidden_size, dtype=jnp.float32)
        self.text_positions = self.param("text_positions", nn.initializers.normal(0.01), (c.max_positions,
                                                                                          t.hidden_size))
        self.text_layers = [EncoderLayer(t) for _ in range(t.num_hidden_layers)]
        self.final_layer_norm = nn.LayerNorm(t.layer_norm_eps, dtype=jnp.float32)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=jnp.float32)
        self.patch_embedding = nn.Conv(v.hidden_size, (c.patch_size,) * 2, (c.patch_size,) * 2, padding="VALID",
                                       use_bias=False, dtype=jnp.float32)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(0.01), (v.hidden_size,))
        self.image_positions = self.param("image_positions", nn.initializers.normal(0.01),
                                          ((c.image_size // c.patch_size) ** 2 + 1, v.hidden_size))
        self.pre_layrnorm = nn.LayerNorm(v.layer_norm_eps, dtype=jnp.float32)
        self.vision_layers = [EncoderLayer(v) for _ in range(v.num_hidden_layers)]
        self.post_layernorm = nn.LayerNorm(v.layer_norm_eps, dtype=jnp.float32)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=jnp.float32)

    def text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.text_positions[:L].astype(jnp.float32)
        causal = jnp.tril(jnp.ones((L, L), bool))[None, None] & mask[:, None, None, :]
        bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.text_layers:
            x = layer(x, bias)
        x = self.final_layer_norm(x)
        last = jnp.sum(mask, -1) - 1  # the end token: the last real one
        return self.text_projection(x[jnp.arange(len(x)), last])

    def image(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixels.astype(jnp.float32))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding.astype(jnp.float32), (x.shape[0], 1, x.shape[-1]))
        x = self.pre_layrnorm(jnp.concatenate([cls, x], 1) + self.image_positions.astype(jnp.float32))
        for layer in self.vision_layers:
            x = layer(x, None)
        return self.visual_projection(self.post_layernorm(x[:, 0]))

    def __call__(self, ids, mask, pixels):  # for init
        return self.text(ids, mask), self.image(pixels)


def read_config(path: str) -> ClipConfig:
    """The `ClipConfig` of the folder `path`'s config.json; a UserError naming eval.clip_model if it is not a CLIP's."""
    where = f"{FIELD}={path!r}"
    config_file = epath.Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{where}: no config.json there; give the folder of a CLIP checkpoint in the Hugging Face "
                        "layout (config.json, model.safetensors, vocab.json, merges.txt).")
    try:
        raw = json.loads(config_file.read_text())
        text, vision = raw["text_config"], raw["vision_config"]
        tower = lambda c: TowerConfig(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                                      c["num_attention_heads"], c.get("layer_norm_eps", 1e-5),
                                      c.get("hidden_act", "quick_gelu"))
        acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
        config = ClipConfig(tower(text), tower(vision), text["vocab_size"], text["max_position_embeddings"],
                            vision["image_size"], vision["patch_size"], raw["projection_dim"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: config.json is not a CLIP model's (CLIPModel: text_config, vision_config, "
                        f"projection_dim; {type(e).__name__}: {e}).") from None
    if not acts <= set(ACTIVATIONS):
        raise UserError(f"{where}: hidden_act {sorted(acts)} in config.json; this CLIP reads "
                        f"{' or '.join(ACTIVATIONS)}.")
    return config


def checkpoint_names(config: ClipConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Hugging Face tensor name -> (path in `Clip`'s params, how to convert: '' as is, 'T' transposed
    (torch's Linear is [out, in]), 'conv' a torch conv kernel [out, in, h, w] to Flax's [h, w, in, out])."""
    names = {"text_model.embeddings.token_embedding.weight": (("token_embedding", "embedding"), ""),
             "text_model.embeddings.position_embedding.weight": (("text_positions",), ""),
             "text_model.final_layer_norm.weight": (("final_layer_norm", "scale"), ""),
             "text_model.final_layer_norm.bias": (("final_layer_norm", "bias"), ""),
             "text_projection.weight": (("text_projection", "kernel"), "T"),
             "vision_model.embeddings.patch_embedding.weight": (("patch_embedding", "kernel"), "conv"),
             "vision_model.embeddings.class_embedding": (("class_embedding",), ""),
             "vision_model.embeddings.position_embedding.weight": (("image_positions",), ""),
             "visual_projection.weight": (("visual_projection", "kernel"), "T")}
    for norm in ("pre_layrnorm", "post_layernorm"):
        names[f"vision_model.{norm}.weight"] = ((norm, "scale"), "")
        names[f"vision_model.{norm}.bias"] = ((norm, "bias"), "")
    for tower, ours, count in (("text_model", "text_layers", config.text.num_hidden_layers),
                               ("vision_model", "vision_layers", config.vision.num_hidden_layers)):
        for i in range(count):
            prefix = f"{tower}.encoder.layers.{i}"
            for dense in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{prefix}.self_attn.{dense}.weight"] = ((f"{ours}_{i}", dense, "kernel"), "T")
                names[f"{prefix}.self_attn.{dense}.bias"] = ((f"{ours}_{i}", dense, "bias"), "")
            for dense in ("fc1", "fc2"):
                names[f"{prefix}.mlp.{dense}.weight"] = ((f"{ours}_{i}", dense, "kernel"), "T")
                names[f"{prefix}.mlp.{dense}.bias"] = ((f"{ours}_{i}", dense, "bias"), "")
            for norm in ("layer_norm1", "layer_norm2"):
                names[f"{prefix}.{norm}.weight"] = ((f"{ours}_{i}", norm, "scale"), "")
                names[f"{prefix}.{norm}.bias"] = ((f"{ours}_{i}", norm, "bias"), "")
    return names


def load_params(path: str, config: ClipConfig) -> dict:
    """`Clip`'s params from the folder's model.safetensors, checked against its shapes."""
    weights = str(epath.Path(path) / "model.safetensors")
    if not files.is_file(weights):
        raise UserError(f"{FIELD}={path!r}: no model.safetensors there (PyTorch pickles are not read: save the model "
                        "with safe_serialization=True).")
    names = checkpoint_names(config)
    stored = set(files.safetensors_names(weights))
    missing = [n for n in names if n not in stored]
    if missing:
        raise UserError(f"{FIELD}={path!r}: model.safetensors lacks {len(missing)} tensors of its config.json, the "
                        f"first {missing[0]!r}.")
    size = config.image_size
    shapes = jax.eval_shape(Clip(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                            jnp.ones((1, 2), bool), jnp.zeros((1, size, size, 3)))["params"]
    convert = {"": lambda a: a, "T": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
    params: dict = {}
    for name, value in files.load_safetensors(weights, list(names)).items():
        keys, how = names[name]
        expected = files.place_tensor(params, shapes, keys, convert[how](value))
        if expected is not None:
            raise UserError(f"{FIELD}={path!r}: tensor {name!r} has shape {convert[how](value).shape} (converted), "
                            f"but config.json implies {expected}.")
    return params


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[N, H, W, C]` (C = 1 or 3) -> float32 `[N, size, size, 3]` as CLIP's image processor makes
    them: RGB, the shortest side resized to `size` (bicubic, PIL), the centre `size` x `size`, in
    [0, 1], normalised by `MEAN` and `STD`."""
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        w, h = pil.size
        long = int(size * max(w, h) / min(w, h))  # as transformers' get_resize_output_image_size
        pil = pil.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return ((out - MEAN) / STD).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ClipModel:
    """A loaded CLIP: `score(images, texts)` is each image's CLIP score against its text."""

    path: str
    config: ClipConfig
    params: dict
    tokenizer: Tokenizer
    text_fn: object  # jitted `Clip.text`
    image_fn: object  # jitted `Clip.image`

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """float32 `[B, projection_dim]`, unnormalised."""
        ids, mask = self.tokenizer(texts, self.config.max_positions)
        return np.concatenate([np.asarray(self.text_fn(self.params, ids[i:i + batch_size], mask[i:i + batch_size]))
                               for i in range(0, len(texts), batch_size)])

    def embed_images(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 `[N, H, W, C]` -> float32 `[N, projection_dim]`, unnormalised."""
        return np.concatenate([np.asarray(self.image_fn(self.params, preprocess(images[i:i + batch_size],
                                                                                 self.config.image_size)))
                               for i in range(0, len(images), batch_size)])

    def cosines(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """float64 `[N]`: cos(image_i, text_i) of uint8 images `[N, H, W, C]` and N texts."""
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        return np.sum(unit(self.embed_images(images).astype(np.float64)) * unit(self.embed_texts(texts)), -1)

    def score(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """float64 `[N]`: each image's CLIP score against its text, `clip_score(cosines)`."""
        return clip_score(self.cosines(images, texts))


def clip_score(cos: np.ndarray) -> np.ndarray:
    """100 max(cos, 0): the CLIP score of image-text cosines (torchmetrics' CLIPScore; Hessel et al.
    2021's CLIP-S, 2.5 max(cos, 0), is this over 40)."""
    return 100.0 * np.maximum(cos, 0.0)


@functools.lru_cache(maxsize=1)
def load(path: str) -> ClipModel:
    """The CLIP in the folder `path` (see the module doc), loaded once per process."""
    config = read_config(path)
    folder = epath.Path(path)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise UserError(f"{FIELD}={path!r}: no {name} (CLIP's BPE vocabulary) there.")
    try:
        vocab = json.loads((folder / "vocab.json").read_text())
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tokenizer = Tokenizer(vocab, merges)
    except (ValueError, KeyError, UnicodeDecodeError):
        raise UserError(f"{FIELD}={path!r}: vocab.json and merges.txt are not a CLIP vocabulary (with {BOS} and "
                        f"{EOS}).") from None
    params = jax.device_put({"params": load_params(path, config)})
    model = Clip(config)
    return ClipModel(path, config, params, tokenizer, jax.jit(functools.partial(model.apply, method=Clip.text)),
                     jax.jit(functools.partial(model.apply, method=Clip.image)))
