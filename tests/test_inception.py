"""The FID Inception-v3: forward shapes, input preprocessing, and conversion of pytorch-fid's weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax.evaluation import inception as I
from ddpm_jax.validation import UserError


def _pytorch_fid_state_dict_shapes():
    """pytorch-fid's FID Inception state dict, names and torch shapes, written from torchvision's
    Inception3 (conv [out, in, kh, kw] without bias, BatchNorm per conv) with 1008 classes and no
    auxiliary head; every BatchNorm also has a scalar `num_batches_tracked`."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{name}.branch1x1", cin, 64, 1, 1), (f"{name}.branch5x5_1", cin, 48, 1, 1),
                  (f"{name}.branch5x5_2", 48, 64, 5, 5), (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
                  (f"{name}.branch3x3dbl_2", 64, 96, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{name}.branch_pool", cin, pool, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{name}.branch1x1", 768, 192, 1, 1), (f"{name}.branch7x7_1", 768, c, 1, 1),
                  (f"{name}.branch7x7_2", c, c, 1, 7), (f"{name}.branch7x7_3", c, 192, 7, 1),
                  (f"{name}.branch7x7dbl_1", 768, c, 1, 1), (f"{name}.branch7x7dbl_2", c, c, 7, 1),
                  (f"{name}.branch7x7dbl_3", c, c, 1, 7), (f"{name}.branch7x7dbl_4", c, c, 7, 1),
                  (f"{name}.branch7x7dbl_5", c, 192, 1, 7), (f"{name}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{name}.branch1x1", cin, 320, 1, 1), (f"{name}.branch3x3_1", cin, 384, 1, 1),
                  (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{name}.branch3x3dbl_1", cin, 448, 1, 1), (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{name}.branch_pool", cin, 192, 1, 1)]
    shapes = {}
    for name, cin, cout, kh, kw in convs:
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{leaf}"] = (cout,)
        shapes[f"{name}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def _synthetic_state_dict(seed=0):
    rng = np.random.default_rng(seed)
    return {k: (np.array(7, np.int64) if k.endswith("num_batches_tracked")
                else rng.normal(size=s).astype(np.float32)) for k, s in _pytorch_fid_state_dict_shapes().items()}


def _assert_mapping_exact(variables, state_dict):
    """Every torch tensor lands at its Flax name, transposed to Flax's layout, bit for bit."""
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        node = lambda coll: variables[coll] if not path else _get(variables[coll], path)
        if leaf == "num_batches_tracked":
            continue
        if key == "fc.weight":
            np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], value.T)
        elif key == "fc.bias":
            np.testing.assert_array_equal(variables["params"]["fc"]["bias"], value)
        elif path[-1] == "conv":
            np.testing.assert_array_equal(node("params")["kernel"], np.transpose(value, (2, 3, 1, 0)))
        else:
            coll, name = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                          "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}[leaf]
            np.testing.assert_array_equal(node(coll)[name], value)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_forward_shapes_and_dtypes():
    variables = I.random_variables()
    variables["params"]["fc"]["bias"] = jnp.linspace(-1.0, 1.0, 1008)
    n_conv = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
                 if p[-1].key == "kernel" and p[-2].key == "conv")
    assert n_conv == 94  # as torchvision's Inception3
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # CIFAR-sized
    out = jax.jit(I.inception_apply)(variables, jnp.asarray(images))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert all(v.dtype == jnp.float32 and np.isfinite(v).all() for v in out.values())
    np.testing.assert_allclose(out["logits"] - out["logits_unbiased"],
                               np.broadcast_to(variables["params"]["fc"]["bias"], (2, 1008)), atol=1e-5)
    assert (out["pool"] >= 0).all()  # the mean of ReLU outputs
    with pytest.raises(ValueError, match="uint8"):
        I.preprocess(jnp.zeros((1, 32, 32, 3), jnp.float32))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` float64 weights of torch's `interpolate(mode='bilinear', align_corners=False)`, which
    pytorch-fid uses, also when shrinking: output pixel o reads source (o + 0.5) in/out - 0.5, clamped
    below at 0, mixing its two neighbours (the upper one clamped to the last)."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def test_preprocess_matches_torch_bilinear_resize_without_antialiasing():
    """[0, 255] -> [-1, 1] at 299x299, resized like torch's bilinear (align_corners=False), checked
    against that rule written out in float64, for up- and down-sampling."""
    rng = np.random.default_rng(0)
    for hw in [(32, 32), (8, 8), (400, 350)]:
        images = rng.integers(0, 256, (1,) + hw + (3,), dtype=np.uint8)
        want = np.einsum("oh,bhwc,pw->bopc", bilinear_matrix(hw[0], 299), images / 255.0,
                         bilinear_matrix(hw[1], 299), optimize=True)  # two matmuls, not one 4-d loop
        # atol: JAX computes the source coordinates in float32 (they round to ~1e-5).
        np.testing.assert_allclose(I.preprocess(jnp.asarray(images)), 2 * want - 1, atol=1e-4)
    grey = rng.integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)  # greyscale is tiled to RGB
    np.testing.assert_array_equal(I.preprocess(jnp.asarray(grey)),
                                  I.preprocess(jnp.asarray(np.repeat(grey, 3, axis=-1))))
    # A constant image stays constant; 0 and 255 map to -1 and 1.
    for v, want in [(0, -1.0), (255, 1.0)]:
        np.testing.assert_allclose(I.preprocess(jnp.full((1, 5, 7, 3), v, jnp.uint8)), want, atol=1e-6)
    m = bilinear_matrix(5, 10)
    np.testing.assert_allclose(m.sum(1), 1.0)
    # Upsampling 2x: output pixel 1 sits at source 0.25 -> 0.75 x0 + 0.25 x1; pixel 0 clamps to x0.
    np.testing.assert_allclose(m[0], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(m[1], [0.75, 0.25, 0, 0, 0])
    np.testing.assert_allclose(bilinear_matrix(6, 6), np.eye(6))


def test_convert_state_dict_maps_pytorch_fid_names_exactly(tmp_path):
    state_dict = _synthetic_state_dict()
    arrays = I.convert_state_dict(state_dict)
    assert len(arrays) == 94 * 5 + 2  # num_batches_tracked dropped
    I._check_against_model(arrays, "synthetic")  # exactly the model's variables and shapes
    np.savez(tmp_path / "w.npz", **arrays)
    _assert_mapping_exact(I.load_variables(str(tmp_path / "w.npz")), state_dict)


def test_weight_errors_name_the_field_and_the_source(tmp_path):
    with pytest.raises(UserError, match="eval.inception_weights.*pt_inception-2015-12-05"):
        I.load_variables(str(tmp_path / "nope.npz"))
    state_dict = _synthetic_state_dict()
    state_dict["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # torchvision's ImageNet model
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        I.convert_state_dict(state_dict)
    arrays = I.convert_state_dict(_synthetic_state_dict())
    arrays["params/fc/kernel"] = arrays["params/fc/kernel"][:, :1000]  # a 1000-class classifier
    del arrays["params/Mixed_7c/branch_pool/conv/kernel"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"bad.npz: not the FID Inception-v3.*Mixed_7c/branch_pool.*fc/kernel"):
        I.load_variables(str(tmp_path / "bad.npz"))


def test_torch_file_round_trip(tmp_path):
    """A synthetic `.pth` with pytorch-fid's names and shapes, read with weights_only=True."""
    torch = pytest.importorskip("torch")
    state_dict = _synthetic_state_dict(seed=1)
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "fid.pth")
    I.convert_pytorch_fid_weights(str(tmp_path / "fid.pth"), str(tmp_path / "fid.npz"))
    _assert_mapping_exact(I.load_variables(str(tmp_path / "fid.npz")), state_dict)


def _pytorch_fid_inception():
    """pytorch-fid's own model, where it can be imported (it needs torchvision)."""
    try:
        import torch
        from pytorch_fid import inception as pfi
    except Exception as e:  # noqa: BLE001 (a broken torchvision raises RuntimeError, not ImportError)
        pytest.skip(f"pytorch-fid is not importable: {e}")
    return torch, pfi


@pytest.mark.slow
def test_matches_pytorch_fid_forward(monkeypatch):
    """With the same random weights our network gives pytorch-fid's pool features and logits (rtol
    1e-4: float32 round-off over 94 layers), for an up- and a down-sampled input."""
    torch, pfi = _pytorch_fid_inception()
    rng = np.random.default_rng(0)
    state_dict = {}
    for k, v in _synthetic_state_dict().items():
        if k.endswith(("running_var", "bn.weight")):
            v = 0.5 + rng.uniform(size=v.shape).astype(np.float32)
        elif k.endswith("conv.weight") or k == "fc.weight":
            v = v * np.float32(np.sqrt(2.0 / np.prod(v.shape[1:])))
        elif v.ndim:
            v = 0.1 * v
        state_dict[k] = torch.from_numpy(np.asarray(v))
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict)
    net = pfi.InceptionV3([3]).eval()
    fc = pfi.fid_inception_v3().fc
    arrays = I.convert_state_dict({k: v.numpy() for k, v in state_dict.items()})
    variables = jax.tree.map(jnp.asarray, _unflatten(arrays))
    for shape in [(2, 32, 32, 3), (1, 400, 350, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        with torch.no_grad():
            pool = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0]
            logits = fc(pool).numpy()
        out = jax.jit(I.inception_apply)(variables, jnp.asarray(images))
        np.testing.assert_allclose(out["pool"], pool.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)


def _unflatten(arrays):
    return traverse_util.unflatten_dict(arrays, sep="/")
