"""Converting model images to uint8, tiling them into grids and writing PNGs."""
from __future__ import annotations

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1] (any float dtype) -> uint8 in [0, 255], rounding to nearest."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1]."""
    return np.asarray(x, np.float32) / 127.5 - 1.0


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles `[N, H, W, C]` images into one `[rows*(H+p)+p, nrow*(W+p)+p, C]` image, row by row."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    """Writes a uint8 `[H, W, C]` image (C = 1 or 3) as PNG, enlarged `scale` times (nearest)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png({path!r}): expected uint8, got {image.dtype}.")
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    path = epath.Path(path)  # a local path or gs://... (a training workdir on a bucket)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")


def load_images(path: str, image_size: int | None = None, channels: int | None = 3) -> np.ndarray:
    """A PNG/JPEG file or a folder of them (local or gs://...) -> uint8 `[N, H, W, channels]`, resized
    when asked; channels None: as stored (1 for grayscale files, else 3), the same for every file."""
    root = epath.Path(path)
    if root.is_dir():
        files = sorted((f for f in root.iterdir() if f.name.lower().endswith((".png", ".jpg", ".jpeg"))),
                       key=lambda f: f.name)
        if not files:
            raise ValueError(f"{path}: folder has no .png/.jpg images.")
    elif root.exists():
        files = [root]
    else:
        raise FileNotFoundError(f"{path}: no such image file or folder.")
    out = []
    for f in files:
        try:
            with f.open("rb") as fh:
                img = Image.open(fh)
                img.load()
            gray = img.mode in ("1", "L", "I", "I;16", "F") if channels is None else channels == 1
            img = img.convert("L" if gray else "RGB")
        except (OSError, Image.DecompressionBombError) as e:  # not an image, truncated, or too large to read
            raise ValueError(f"{f}: cannot read it as an image ({e}).") from None
        if image_size and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(img, np.uint8)
        out.append(a[..., None] if gray else a)
        if out[-1].shape != out[0].shape:
            raise ValueError(f"{f} is {'x'.join(map(str, out[-1].shape))} (height x width x channels), "
                             f"{files[0]} {'x'.join(map(str, out[0].shape))}: the images must all be alike.")
    return np.stack(out)
