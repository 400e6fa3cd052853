"""The FID Inception-v3 in Flax, and conversion of pytorch-fid's weights file to `.npz`.

The network is the 2015-12-05 TensorFlow Inception-v3 that TF-GAN's FID and pytorch-fid use, which
differs from the ImageNet Inception-v3 of torchvision in (pytorch-fid, `src/pytorch_fid/inception.py`):
  - the average pools inside the A, C and first E blocks ignore padded zeros (TF's avg_pool);
  - the last E block (Mixed_7c) pools its branch with max instead of average;
  - the classifier has 1008 outputs; every conv is bias-free and followed by BatchNorm, eps 1e-3.
Inputs: uint8 images, scaled to [0, 1], resized to 299x299 bilinearly (half-pixel centres, no
antialiasing: torch's `interpolate(mode="bilinear", align_corners=False)`), then mapped to [-1, 1].

Module and parameter names follow torch's (`Mixed_5b/branch1x1/conv/kernel`), so conversion is a
rename plus layout change: conv OIHW -> HWIO, linear [out, in] -> [in, out].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from ddpm_jax.files import is_file, load_npz, save_npz
from ddpm_jax.validation import UserError

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
# pytorch-fid's release of the TF Inception weights; sha256 prefix 6726825d in its name.
PYTORCH_FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                           "pt_inception-2015-12-05-6726825d.pth")
_HIGHEST = jax.lax.Precision.HIGHEST  # FID must not depend on the accelerator's default matmul precision


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3/1 average pool, 'SAME' size, averaging only over the pixels inside the image."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), padding=pad)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool`: the FID network's last block pools its pool branch with max, not average."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """x `[B, 299, 299, 3]` float in [-1, 1] -> dict of
    'pool' `[B, 2048]` (FID/KID features), 'logits' `[B, 1008]` and 'logits_unbiased' `[B, 1008]`
    (pool @ fc kernel without the bias: what the original Inception Score code feeds to softmax)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name="fc")
        logits = fc(pool)
        return {"pool": pool, "logits": logits,
                "logits_unbiased": logits - self.variables["params"]["fc"]["bias"]}


# ----------------------------------------------------------------------------------------------
# Input preprocessing.


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 `[B, H, W, C]` (C = 1 or 3) -> float32 `[B, 299, 299, 3]` in [-1, 1].

    Greyscale is repeated to three channels. Scale to [0, 1], resize, then 2x - 1, as pytorch-fid.
    """
    if images.dtype != jnp.uint8:
        raise ValueError(f"Inception input must be uint8 images in [0, 255], got {images.dtype}.")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception input must be [B, H, W, 1 or 3], got shape {images.shape}.")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        # Half-pixel centres, no antialiasing: torch's bilinear with align_corners=False, as pytorch-fid.
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=False,
                             precision=_HIGHEST)
    return 2.0 * x - 1.0


def inception_apply(variables, images: jax.Array) -> dict:
    """uint8 images `[B, H, W, C]` -> the network's outputs (see `FIDInceptionV3`)."""
    return FIDInceptionV3().apply(variables, preprocess(images))


def abstract_variables() -> dict:
    """Shapes and dtypes of the variables {'params', 'batch_stats'}, without computing them."""
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def random_variables(seed: int = 0) -> dict:
    """Random variables (for tests): He-scaled normal kernels, unit BatchNorm. Drawn with numpy,
    since Flax's init of 24M truncated normals takes ~30 s on a CPU."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(size=x.shape) * np.sqrt(2.0 / np.prod(x.shape[:-1])), jnp.float32)
        return jnp.full(x.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables())


# ----------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict -> flat `.npz` -> Flax variables.

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid's parameter names and layouts -> flat '{collection}/{module path}/{name}' arrays.

    `Mixed_5b.branch1x1.conv.weight` [O, I, kh, kw] -> `params/Mixed_5b/branch1x1/conv/kernel`
    [kh, kw, I, O]; `*.bn.{weight, bias, running_mean, running_var}` -> params scale/bias and
    batch_stats mean/var; `fc.weight` [1008, 2048] -> `params/fc/kernel` [2048, 1008]. BatchNorm's
    `num_batches_tracked` counters are dropped; any other name is an error.
    """
    out = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        *path, leaf = key.split(".")
        if leaf == "num_batches_tracked":
            continue
        if path and path[-1] == "conv" and leaf == "weight" and value.ndim == 4:
            out["/".join(["params", *path, "kernel"])] = value.transpose(2, 3, 1, 0)
        elif path and path[-1] == "bn" and leaf in _BN:
            collection, name = _BN[leaf]
            out["/".join([collection, *path, name])] = value
        elif path == ["fc"] and leaf == "weight" and value.ndim == 2:
            out["params/fc/kernel"] = value.T
        elif path == ["fc"] and leaf == "bias":
            out["params/fc/bias"] = value
        else:
            raise UserError(f"Inception weights: unexpected parameter {key!r} {value.shape}; expected "
                             "pytorch-fid's FID Inception state dict (conv/bn/fc parameters).")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def convert_pytorch_fid_weights(pth_path: str, out_path: str) -> None:
    """pytorch-fid's `.pth` -> `.npz` for `load_variables`. Needs torch (only here)."""
    if not is_file(pth_path):
        raise UserError(f"--pth={pth_path}: no such file; download pytorch-fid's weights from "
                        f"{PYTORCH_FID_WEIGHTS_URL}")
    try:
        import torch
    except ImportError:
        raise UserError("Converting the .pth needs torch: pip install torch (CPU build is enough).") from None
    try:
        with epath.Path(pth_path).open("rb") as f:
            state_dict = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a user's file: torch raises many kinds for a bad one
        raise UserError(f"--pth={pth_path}: not a PyTorch weights file torch can read safely ({e}).") from None
    arrays = convert_state_dict({k: v.numpy() for k, v in state_dict.items()})
    _check_against_model(arrays, pth_path)  # fail here, not at evaluation time
    save_npz(out_path, **arrays)


def _check_against_model(arrays: dict[str, np.ndarray], source: str) -> None:
    """Raises unless `arrays` holds exactly the model's variables with the model's shapes."""
    expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_variables(), sep="/").items()}
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or extra or wrong:
        raise UserError(
            f"{source}: not the FID Inception-v3 weights. Missing {missing[:5]} ({len(missing)}), "
            f"unexpected {extra[:5]} ({len(extra)}), wrong shape "
            f"{[(k, got[k], expected[k]) for k in wrong[:5]]} ({len(wrong)}).")


def load_variables(npz_path: str | None, field: str = "eval.inception_weights") -> dict:
    """The `.npz` written by `convert_pytorch_fid_weights` -> {'params', 'batch_stats'} as jnp arrays.
    `field`: the config field or flag that named the file, for the error message."""
    if not is_file(npz_path):
        raise UserError(
            f"{field}={npz_path!r}: no such file. Download pytorch-fid's weights "
            f"({PYTORCH_FID_WEIGHTS_URL}) and convert them once with `python -m ddpm_jax.evaluate "
            "convert_inception --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz`, "
            f"then set {field} to the .npz.")
    arrays = load_npz(npz_path, field)
    _check_against_model(arrays, f"{field}={npz_path}")
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in arrays.items()}, sep="/")
