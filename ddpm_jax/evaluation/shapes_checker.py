"""Does an image show its caption? A deterministic checker for the `shapes` dataset (no learned model).

Each pixel is black below half brightness, else the nearest in hue of red, green, blue, yellow and
white ("other", which no caption names); per colour, 8-connected components larger than a speck are
the objects. An object's position is its bounding box's centre, as in `ddpm_jax.scenes`. Its shape
comes from its coverage (how much of its colour each pixel holds, so the half-covered edge pixels
of a downsampled image count half): a triangle (apex up) has most of its mass low down (skewed
rows), a square fills the rectangle of its widest row and tallest column (~1.0), a circle ~pi/4.
Works for uint8 RGB images of any size >= 8 (the dataset's 32x32, a 16x16 base model's samples).

Per image it reports: 'colour' (the set of colours seen is the caption's), 'count' (as many objects
as the caption names), 'shape' (the multiset of shapes is the caption's), 'relation' (two-object
captions: the objects that best match the caption's two stand in its relation, judged by the
larger centre offset), 'all' (the right count, each named (colour, shape) seen, and the relation),
and 'reversed' (the same objects stand in the opposite relation: a model that places the two
objects along the right axis but ignores which is which scores about as much here as in 'relation').
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ddpm_jax.scenes import COLOURS, parse_caption

# Bright but unsaturated pixels (grey, white) are "other", a colour no caption names, so a white
# blob is a wrong object rather than a yellow one (yellow is white's nearest caption colour).
_HUES = {**COLOURS, "other": (255, 255, 255)}
_NAMES = ("black",) + tuple(_HUES)
_PALETTE = np.array(list(_HUES.values()), np.float32)  # [5, 3]
# Pixels whose brightest channel is below this are background: an object covers at least half.
BRIGHTNESS = 128
# Components smaller than this fraction of the image are noise. The smallest object, a 10-pixel
# triangle, covers 0.059 of a 32x32 image; this is a quarter of that.
MIN_AREA = 0.015
# Triangle: the skewness of its row masses is below this (an apex-up triangle's is about -0.55,
# symmetric circles and squares about 0; measured within +-0.17 on 16x16 renders with noise).
TRIANGLE_SKEW = -0.25
# Square: fills more than this of its widest row times its tallest column (1.0 rendered, circles
# ~0.79; measured 0.97-1.03 and 0.78-0.87 on 16x16 renders with noise).
SQUARE_FILL = 0.92
_EIGHT_CONNECTED = np.ones((3, 3), bool)
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


class Detection(NamedTuple):
    """An object found in an image: `box` (y0, x0, y1, x1) half-open, in pixels."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.box
        return (y0 + y1) / 2, (x0 + x1) / 2


def colour_map(image: np.ndarray) -> np.ndarray:
    """uint8 `[H, W, 3]` -> int `[H, W]`: 0 black, k for the k-th (1-based) of COLOURS and "other"."""
    pixels = image.astype(np.float32)
    brightness = pixels.max(-1, keepdims=True)
    # Hue from the pixel scaled to full brightness, so a dim yellow (half-covered edge, 128, 128, 0)
    # is still nearest yellow, not equally near red and green.
    hue = pixels / np.maximum(brightness, 1.0)
    nearest = ((hue[:, :, None, :] - _PALETTE / 255) ** 2).sum(-1).argmin(-1) + 1
    return np.where(brightness[..., 0] >= BRIGHTNESS, nearest, 0)


def coverage(pixels: np.ndarray, colour: str) -> np.ndarray:
    """uint8 `[..., 3]` -> float `[...]` in [0, 1]: how much of `colour` each pixel holds."""
    unit = np.asarray(_HUES[colour], np.float32) / 255
    return np.clip(pixels.astype(np.float32) / 255 @ unit / (unit @ unit), 0.0, 1.0)


def classify_shape(cov: np.ndarray) -> str:
    """The shape of one object from its coverage `[h, w]` (its bounding box and a margin, zero on
    other objects)."""
    rows, cols = cov.sum(1), cov.sum(0)
    p = rows / rows.sum()
    y = np.arange(len(rows))
    mean = (p * y).sum()
    var = (p * (y - mean) ** 2).sum()
    if var > 0 and (p * (y - mean) ** 3).sum() / var**1.5 < TRIANGLE_SKEW:
        return "triangle"
    return "square" if cov.sum() / (rows.max() * cols.max()) > SQUARE_FILL else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in one uint8 `[H, W, 3]` image, ordered by colour, then top to bottom."""
    cmap = colour_map(image)
    min_area = MIN_AREA * cmap.size
    found = []
    for k in range(1, len(_NAMES)):
        labels, _ = ndimage.label(cmap == k, structure=_EIGHT_CONNECTED)
        for label, sl in enumerate(ndimage.find_objects(labels), start=1):
            if (labels[sl] == label).sum() < min_area:
                continue
            # A 1-pixel margin takes in the partly covered pixels that fell to black.
            near = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
            own = (labels[near] == label) | (cmap[near] == 0)
            shape = classify_shape(coverage(image[near], _NAMES[k]) * own)
            found.append(Detection(_NAMES[k], shape, (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
    return found


def _relation_holds(found: list[Detection], kinds: list[tuple[str, str]], relation: str) -> bool:
    """Whether the two detections that best match `kinds` (colour and shape agreeing count one
    each; the best pair must be unique) stand in `relation`, by the larger centre offset."""
    score = lambda d, kind: (d.colour == kind[0]) + (d.shape == kind[1])
    pairs = [(score(a, kinds[0]) + score(b, kinds[1]), a, b)
             for i, a in enumerate(found) for j, b in enumerate(found) if i != j]
    if not pairs:
        return False
    best = max(p[0] for p in pairs)
    top = [(a, b) for s, a, b in pairs if s == best]
    if len(top) != 1:
        return False  # no way to tell which object is which
    a, b = top[0]
    dy, dx = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    return along > (abs(dy) if relation in ("left of", "right of") else abs(dx))


def _validate(images: np.ndarray, captions) -> None:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3 and min(images.shape[1:3]) >= 8 and len(images) > 0):
        raise ValueError("the shapes checker needs uint8 RGB images [N, H, W, 3] with N >= 1 and "
                         "H, W >= 8, got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}.")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions.")


def per_image(images: np.ndarray, captions) -> dict[str, np.ndarray]:
    """uint8 `[N, H, W, 3]` and N captions (str or bytes) -> bool `[N]` arrays 'colour', 'count',
    'shape', 'relation' and 'reversed' (False for one-object captions), 'two_objects' (the caption
    names two) and 'all'. ValueError, naming it, for a caption outside the grammar."""
    _validate(images, captions)
    parsed = [parse_caption(c.decode() if isinstance(c, bytes) else c) for c in captions]
    keys = ("colour", "count", "shape", "relation", "reversed", "two_objects", "all")
    out = {k: np.zeros(len(images), bool) for k in keys}
    for i, (image, (kinds, relation)) in enumerate(zip(images, parsed)):
        found = detect(image)
        seen = sorted((d.colour, d.shape) for d in found)
        out["colour"][i] = {c for c, _ in seen} == {c for c, _ in kinds}
        out["count"][i] = len(found) == len(kinds)
        out["shape"][i] = sorted(s for _, s in seen) == sorted(s for _, s in kinds)
        out["two_objects"][i] = relation is not None
        out["relation"][i] = relation is not None and _relation_holds(found, kinds, relation)
        out["reversed"][i] = relation is not None and _relation_holds(found, kinds, OPPOSITE[relation])
        out["all"][i] = seen == sorted(kinds) and (relation is None or out["relation"][i])
    return out


def check(images: np.ndarray, captions) -> dict[str, float]:
    """Rates over the images of 'colour', 'count', 'shape', 'all', and 'relation' and 'reversed'
    over those with two-object captions (NaN if none)."""
    v = per_image(images, captions)
    rates = {k: float(v[k].mean()) for k in ("colour", "count", "shape", "all")}
    two = v["two_objects"]
    for k in ("relation", "reversed"):
        rates[k] = float(v[k][two].mean()) if two.any() else float("nan")
    return rates
