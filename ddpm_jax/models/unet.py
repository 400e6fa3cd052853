"""The DDPM U-Net of Ho et al. 2020 (their `diffusion_tf/models/unet.py`), in Flax linen.

Images are NHWC. Params are float32 (`param_dtype`); activations use `dtype` (bfloat16 on
accelerators). With the CIFAR-10 settings (ch=128, ch_mult=(1, 2, 2, 2), 2 blocks, attention at
16x16) it has 35,746,307 parameters.

Conditioning is one pytree `cond` (see `UNet`); each kind has one method: `label_embedding` (class
labels, added to the timestep embedding), `text_context` (text, Imagen-style (Saharia et al.
2022): pooled into the timestep embedding and attended to by every attention block, its keys and
values appended to the image's own) and `low_res_input` (super-resolution, SR3: the low-resolution
image resized and concatenated to x_t, its augmentation level embedded like the timestep) and
`guidance_input` (the guidance weight of a student that learnt classifier-free guidance, embedded like
the timestep).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from ddpm_jax import superres, text

Dtype = Any
TEXT_ENCODERS = ("none", "trained", "precomputed")
TEXT_ATTENTION = ("fused", "cross")
TIME_EMBEDDINGS = ("ddpm", "adm")
DOWNSAMPLE_PADDING = {"same": "SAME", "symmetric": ((1, 1), (1, 1))}
# Scale of the guidance weight passed to the sinusoidal embedding: w in [0, 4] spreads as timesteps do.
GUIDANCE_EMBEDDING_SCALE = 250.0

# The official code's default_init: variance scaling, fan_avg, uniform (biases zero).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, kind: str = "ddpm") -> jax.Array:
    """Sinusoidal embedding of timesteps `[B]` -> `[B, dim]` float32. 'ddpm' (Ho et al.): the sin half,
    then the cos half, frequencies 10000^(-i / (dim/2 - 1)); 'adm' (Nichol & Dhariwal's code, diffusers'
    default): cos, then sin, frequencies 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - (kind == "ddpm"))))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    halves = [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(halves if kind == "ddpm" else halves[::-1], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def position_embedding(height: int, width: int, dim: int) -> jax.Array:
    """Fixed 2D sinusoidal embedding of the pixel positions -> `[H * W, dim]` float32: the
    `timestep_embedding` of the row in the first dim // 2 channels, of the column in the rest."""
    rows = timestep_embedding(jnp.arange(height), dim // 2)
    cols = timestep_embedding(jnp.arange(width), dim - dim // 2)
    return jnp.concatenate([jnp.repeat(rows, width, axis=0), jnp.tile(cols, (height, 1))], axis=1)


def coordinate_channels(x: jax.Array) -> jax.Array:
    """`[B, H, W, 2]`: each pixel's row and column, spaced evenly from -1 to 1, in x's dtype."""
    B, H, W, _ = x.shape
    rows, cols = jnp.meshgrid(jnp.linspace(-1.0, 1.0, H), jnp.linspace(-1.0, 1.0, W), indexing="ij")
    return jnp.broadcast_to(jnp.stack([rows, cols], -1), (B, H, W, 2)).astype(x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm of 32 groups (one per channel below 32) and `epsilon` (tf.contrib's group_norm: 1e-6, PyTorch's:
    1e-5); statistics in float32."""

    dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        return nn.GroupNorm(num_groups=min(32, x.shape[-1]), epsilon=self.epsilon, dtype=self.dtype)(x)


def _conv(features, dtype, kernel=3, stride=1, zero=False, name=None, padding="SAME"):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   kernel_init=zeros_init if zero else default_init, dtype=dtype, name=name)


def resample(x: jax.Array, how: str) -> jax.Array:
    """x `[B, H, W, C]` at twice ('up': nearest) or half ('down': 2x2 average) the size; 'none': x."""
    B, H, W, C = x.shape
    if how == "up":
        return jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
    if how == "down":
        return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    return x


def _dense(features, dtype, zero=False, name=None):
    return nn.Dense(features, kernel_init=zeros_init if zero else default_init, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GN-swish-conv, + Dense(temb), GN-swish-dropout-conv(zero init), 1x1 shortcut if C changes.

    `scale_shift` (Nichol & Dhariwal 2021's AdaGN): temb gives a scale and a shift of the second norm's
    output, GN(h) * (1 + scale) + shift, instead of being added before it. `resample` 'up' or 'down'
    (BigGAN's residual up/downsampling, as ADM): both paths resized after the first GN-swish.
    """

    out_ch: int
    dropout: float
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    scale_shift: bool = False
    resample: str = "none"

    @nn.compact
    def __call__(self, x, temb, train: bool):
        norm = functools.partial(GroupNorm, self.dtype, self.norm_eps)
        h = nn.swish(norm(name="norm1")(x))
        h, x = resample(h, self.resample), resample(x, self.resample)
        h = _conv(self.out_ch, self.dtype, name="conv1")(h)
        emb = _dense(self.out_ch * (2 if self.scale_shift else 1), self.dtype, name="temb_proj")(nn.swish(temb))
        if self.scale_shift:
            scale, shift = jnp.split(emb[:, None, None, :], 2, axis=-1)
            h = nn.swish(norm(name="norm2")(h) * (1 + scale) + shift)
        else:
            h = nn.swish(norm(name="norm2")(h + emb[:, None, None, :]))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, self.dtype, zero=True, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = _dense(self.out_ch, self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions with 1x1 q/k/v and a zero-init output: one head of all C
    channels (Ho et al.), or C / `head_dim` heads of `head_dim` channels each (ADM's 64).

    `attention` picks `jax.nn.dot_product_attention`'s kernel: 'xla' anywhere, 'cudnn' (fused flash
    attention) on NVIDIA GPUs with bf16/fp16 compute and head dim C <= 256 on Hopper (<= 128 before).

    With a `context` (text tokens float `[B, L, D]`, mask bool `[B, L]`), `text_attention` 'fused':
    their keys and values (own projections `k_text`, `v_text`) are appended to the image's, one
    softmax over the pixels and the real tokens, padding masked out (Imagen's base model); 'cross':
    self-attention as without text, then a separate cross-attention of the pixels to the tokens
    (`norm_cross`, `q_cross`, `k_text`, `v_text`, zero-init `proj_cross`; Stable Diffusion's
    layout). Without a context, the block and its params are as before.

    `position`: the pixels' `position_embedding` is added to the input of their queries and keys
    (not values), so where a pixel attends, e.g. which of two named objects it draws, can depend on
    where it is; attention alone is blind to it (the convolutions see it only near the borders).
    """

    dtype: Dtype = jnp.float32
    attention: str = "xla"
    position: bool = False
    text_attention: str = "fused"
    head_dim: int = 0  # 0: one head
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, context=None):
        B, H, W, C = x.shape
        dt = self.dtype
        heads = C // self.head_dim if self.head_dim else 1
        split = lambda a: a.reshape(*a.shape[:2], heads, C // heads)  # [B, L, C] -> [B, L, heads, C / heads]
        pos = position_embedding(H, W, C).reshape(H, W, C).astype(dt) if self.position else 0.0
        h = GroupNorm(dt, self.norm_eps, name="norm")(x)
        q, k, v = (split(_dense(C, dt, name=n)(h + pos if n != "v" else h).reshape(B, H * W, C)) for n in "qkv")
        mask = None
        if context is not None:
            ctx, ctx_mask = context
            kt, vt = (split(_dense(C, dt, name=f"{n}_text")(ctx.astype(dt))) for n in "kv")
            if self.text_attention == "fused":
                k, v = jnp.concatenate([k, kt], axis=1), jnp.concatenate([v, vt], axis=1)
                mask = jnp.concatenate([jnp.ones((B, H * W), bool), ctx_mask], axis=1)[:, None, None, :]
        h = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention).reshape(B, H, W, C)
        x = x + _dense(C, dt, zero=True, name="proj_out")(h)
        if context is None or self.text_attention == "fused":
            return x
        h = GroupNorm(dt, self.norm_eps, name="norm_cross")(x)
        qc = split(_dense(C, dt, name="q_cross")(h + pos).reshape(B, H * W, C))
        h = jax.nn.dot_product_attention(qc, kt, vt, mask=ctx_mask[:, None, None, :], implementation=self.attention)
        return x + _dense(C, dt, zero=True, name="proj_cross")(h.reshape(B, H, W, C))


class UNet(nn.Module):
    """eps_theta(x_t, t[, cond]). `x`: `[B, H, W, C]`, `t`: int `[B]`, `cond`: a dict or None.

    cond: 'label' int `[B]` (`num_classes > 0`; index `num_classes` is the null class); 'tokens'
    int32 `[B, L]` + 'mask' bool `[B, L]` (`text_encoder='trained'`: byte tokens of `ddpm_jax.text`);
    'text_emb' float `[B, L, D]` + 'mask' (`text_encoder='precomputed'`); 'low_res' float
    `[B, h, h, C]` in [-1, 1], h = low_res_size at the trained size (already noise-augmented,
    `superres.augment`; resized to x's size) +
    'aug_level' float `[B]` (`low_res_size > 0`); 'guidance' float `[B]` (`guidance_embedding`: the
    weight w the output is guided with; 0 where absent); 'drop' bool `[B]`: use the
    null condition (the null class, or the learned null text token) instead, as in training's
    condition dropout and the unconditional half of classifier-free guidance. Unconditional models
    ignore `cond`.
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    resolution: int = 0  # the image side attn_resolutions refer to (the trained size; 0: the input's)
    dropout: float = 0.1
    num_classes: int = 0
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # AttnBlock's kernel: xla | cudnn
    remat: bool = False  # recompute blocks in the backward pass instead of keeping their activations
    attn_position: bool = False  # AttnBlock.position: 2D position embedding on queries and keys
    coord_channels: bool = False  # the pixel's row and column in [-1, 1] as two more input channels
    text_attention: str = "fused"  # AttnBlock.text_attention: fused | cross
    text_encoder: str = "none"  # none | trained (text.TextEncoder, trained jointly) | precomputed
    text_width: int = 256  # width of the text tokens the image attends to
    text_depth: int = 4  # trained encoder: Transformer blocks
    text_heads: int = 4  # trained encoder: attention heads
    max_text_len: int = 64  # trained encoder: most tokens per text (BOS included)
    low_res_size: int = 0  # > 0: a super-resolution model conditioned on cond['low_res'] of this size
    low_res_resize: str = "bicubic"  # how the low-res image is resized to x's size: superres.RESIZE_METHODS
    guidance_embedding: bool = False  # the guidance weight cond['guidance'] as an input (a distilled student)
    # Ho et al.'s choices by default; the alternatives are Nichol & Dhariwal's (Improved DDPM, ADM):
    attn_head_dim: int = 0  # AttnBlock.head_dim: 0 one head; > 0 heads of this many channels
    scale_shift_norm: bool = False  # ResnetBlock.scale_shift: the timestep scales and shifts the norm
    resblock_updown: bool = False  # resample in residual blocks (avg-pool / nearest) instead of by conv
    time_embedding: str = "ddpm"  # timestep_embedding's kind: ddpm | adm
    norm_eps: float = 1e-6  # GroupNorm's epsilon (PyTorch code: 1e-5)
    downsample_padding: str = "same"  # stride-2 conv: same (TF: 0 before, 1 after) | symmetric (1 each side)

    def label_embedding(self, cond) -> jax.Array:
        """`[B, 4 ch]`: the embedding of cond['label'], the null class where cond['drop']."""
        y = jnp.where(cond["drop"], self.num_classes, cond["label"]) if "drop" in cond else cond["label"]
        return nn.Embed(self.num_classes + 1, self.ch * 4, dtype=self.dtype, name="label_emb")(y)

    def text_context(self, cond) -> tuple[jax.Array, jax.Array]:
        """(tokens float32 `[B, L, text_width]`, mask bool `[B, L]`) of the text in `cond`; rows with
        cond['drop'] are one learned null token (`null_text`) followed by masked positions."""
        if self.text_encoder == "trained":
            ctx, mask = text.TextEncoder(width=self.text_width, depth=self.text_depth, heads=self.text_heads,
                                         max_len=self.max_text_len, dtype=self.dtype, name="text_encoder")(
                cond["tokens"], cond["mask"])
        else:  # precomputed embeddings of any width, projected to text_width
            ctx = _dense(self.text_width, self.dtype, name="text_proj")(cond["text_emb"]).astype(jnp.float32)
            mask = cond["mask"].astype(bool)
        null = self.param("null_text", nn.initializers.normal(0.02), (self.text_width,), jnp.float32)
        first = jnp.arange(ctx.shape[1]) == 0  # the null token sits at position 0, the rest is masked
        drop = cond["drop"][:, None]
        ctx = jnp.where((drop & first)[..., None], null, jnp.where(drop[..., None], 0.0, ctx))
        return ctx, jnp.where(drop, first, mask)

    def low_res_input(self, x, cond) -> tuple[jax.Array, jax.Array]:
        """(x `[B, H, W, 2C]`: x_t and cond['low_res'] resized to H x W, on channels; the embedding
        `[B, 4 ch]` of cond['aug_level'], added to the timestep embedding). Guidance's null
        condition keeps the image (only text or labels are dropped)."""
        up = superres.upsample(cond["low_res"].astype(jnp.float32), x.shape[1], self.low_res_resize)
        level = timestep_embedding(cond["aug_level"] * superres.LEVEL_EMBEDDING_SCALE, self.ch)
        return jnp.concatenate([x, up.astype(x.dtype)], axis=-1), _dense(self.ch * 4, self.dtype, name="aug_emb")(level)

    def guidance_input(self, cond, batch: int) -> jax.Array:
        """`[B, 4 ch]`: the embedding of the guidance weight w = cond['guidance'] float `[B]` (0, the
        conditional model, where absent), added to the timestep embedding: sinusoidal as t's (as Meng
        et al. 2023 embed w), then two dense layers, the last zero-initialised so that a student made
        from its teacher's params starts as the teacher's conditional model."""
        w = cond["guidance"] if cond is not None and "guidance" in cond else jnp.zeros((batch,), jnp.float32)
        emb = timestep_embedding(w * GUIDANCE_EMBEDDING_SCALE, self.ch)
        emb = _dense(self.ch * 4, self.dtype, name="guidance_dense0")(emb)
        return _dense(self.ch * 4, self.dtype, zero=True, name="guidance_dense1")(nn.swish(emb))

    @nn.compact
    def __call__(self, x, t, cond=None, *, train: bool = False):
        dt = self.dtype
        # nn.remat keeps only each block's inputs for the backward pass; params and outputs are the
        # same. static_argnums counts self: 3 is ResnetBlock's `train`, a Python bool.
        resnet_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
        attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
        context = None
        if self.text_encoder != "none":
            if cond is None:
                raise ValueError(f"text_encoder={self.text_encoder!r}: the model needs cond (text and 'drop').")
            context = self.text_context(cond)
        block = lambda out_ch, name, how="none": resnet_cls(out_ch, self.dropout, dt, self.norm_eps,
                                                            self.scale_shift_norm, how, name=name)
        attn = lambda name: functools.partial(
            attn_cls(dt, self.attention, self.attn_position, self.text_attention, self.attn_head_dim, self.norm_eps,
                     name=name), context=context)
        temb = timestep_embedding(t, self.ch, self.time_embedding)
        temb = _dense(self.ch * 4, dt, name="temb_dense0")(temb)
        temb = _dense(self.ch * 4, dt, name="temb_dense1")(nn.swish(temb))
        if self.num_classes:
            if cond is None or "label" not in cond:
                raise ValueError("model.num_classes > 0: the model needs cond['label'].")
            temb = temb + self.label_embedding(cond)
        if self.low_res_size:
            if cond is None or "low_res" not in cond:
                raise ValueError("model.low_res_size > 0: the model needs cond['low_res'] and cond['aug_level'].")
            x, aug_emb = self.low_res_input(x, cond)
            temb = temb + aug_emb
        if context is not None:
            temb = temb + _dense(self.ch * 4, dt, name="text_pool")(text.pooled(*context))
        if self.guidance_embedding:
            temb = temb + self.guidance_input(cond, x.shape[0])

        # Attention by level, not by the size met: a model applied to larger images than it was
        # trained on (super-resolution of whole images after training on crops) keeps its layers.
        side = self.resolution or x.shape[1]
        attends = lambda level: side // 2 ** level in self.attn_resolutions
        if self.coord_channels:  # CoordConv (Liu et al. 2018): every layer can place things by position
            x = jnp.concatenate([x, coordinate_channels(x)], axis=-1)
        hs = [_conv(self.ch, dt, name="conv_in")(x.astype(dt))]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = block(self.ch * mult, f"down_{level}_block_{i}")(hs[-1], temb, train)
                if attends(level):
                    h = attn(f"down_{level}_attn_{i}")(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                name, padding = f"down_{level}_downsample", DOWNSAMPLE_PADDING[self.downsample_padding]
                hs.append(block(h.shape[-1], name, "down")(hs[-1], temb, train) if self.resblock_updown else
                          _conv(h.shape[-1], dt, stride=2, name=name, padding=padding)(hs[-1]))

        h = hs[-1]
        h = block(h.shape[-1], "mid_block_1")(h, temb, train)
        h = attn("mid_attn_1")(h)
        h = block(h.shape[-1], "mid_block_2")(h, temb, train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = block(self.ch * mult, f"up_{level}_block_{i}")(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
                if attends(level):
                    h = attn(f"up_{level}_attn_{i}")(h)
            if level != 0:
                name = f"up_{level}_upsample"
                h = block(h.shape[-1], name, "up")(h, temb, train) if self.resblock_updown else \
                    _conv(h.shape[-1], dt, name=name)(resample(h, "up"))
        assert not hs

        h = nn.swish(GroupNorm(dt, self.norm_eps, name="norm_out")(h))
        return _conv(self.out_ch, dt, zero=True, name="conv_out")(h).astype(jnp.float32)


def unet_from_config(config: ConfigDict) -> UNet:
    """The U-Net described by `config.model` and `config.data` (channels)."""
    m = config.model
    return UNet(ch=m.ch, out_ch=config.data.channels * (2 if config.diffusion.variance == "learned_range" else 1),
                ch_mult=tuple(m.ch_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
                resolution=config.data.image_size,
                dropout=m.dropout, num_classes=m.num_classes, dtype=jnp.dtype(m.dtype),
                attention=m.attention, remat=m.remat, attn_position=m.attn_position,
                coord_channels=m.coord_channels,
                text_attention=m.text_attention,
                text_encoder=m.text_encoder, text_width=m.text_width,
                text_depth=m.text_depth, text_heads=m.text_heads, max_text_len=config.data.max_text_len,
                low_res_size=m.low_res_size, low_res_resize=m.low_res_resize,
                guidance_embedding=m.guidance_embedding, attn_head_dim=m.attn_head_dim,
                scale_shift_norm=m.scale_shift_norm, resblock_updown=m.resblock_updown,
                time_embedding=m.time_embedding, norm_eps=m.norm_eps, downsample_padding=m.downsample_padding)
