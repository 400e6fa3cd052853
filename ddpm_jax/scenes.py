"""Scenes of the `shapes` dataset: one or two flat-coloured shapes on black, and their captions.

Plain numpy, no TensorFlow: the tfds builder (`datasets/shapes.py`), the checker
(`evaluation/shapes_checker.py`) and the tests share this one grammar, sampler and rasteriser.

A scene is a list of one or two `SceneObject`s. A box is (y0, x0, y1, x1) in pixels, half-open
(rows y0..y1-1, columns x0..x1-1) and square: its side y1 - y0 = x1 - x0 is MIN_SIDE..MAX_SIDE.
Captions: "a red circle", or "a red circle left of a blue square" (the first object is left of the
second). Every pixel of a render is black or exactly one of `COLOURS`, so renders can be checked
exactly.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
RELATIONS = ("left of", "right of", "above", "below")
MIN_SIDE, MAX_SIDE = 10, 14
# Two objects' boxes are at least GAP pixels apart along the relation's axis. 3 rather than 1: a
# whole black row/column then survives 2x2 averaging to 16x16, so the objects stay apart there too.
GAP = 3
# Along the relation's axis the centres are at least MARGIN pixels further apart than along the
# other axis, so the relation read from the centres is unambiguous.
MARGIN = 4


class SceneObject(NamedTuple):
    """One filled shape: `shape` in SHAPES, `colour` in COLOURS, `box` (y0, x0, y1, x1)."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """(y, x) of the box's centre, in pixels."""
        y0, x0, y1, x1 = self.box
        return (y0 + y1) / 2, (x0 + x1) / 2


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b` ("left of", ...), from the centres; ValueError if ambiguous."""
    dy, dx = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dx) - abs(dy) >= MARGIN:
        return "left of" if dx > 0 else "right of"
    if abs(dy) - abs(dx) >= MARGIN:
        return "above" if dy > 0 else "below"
    raise ValueError(f"objects at {a.box} and {b.box}: no relation is clear from their centres "
                     f"(offset dy={dy}, dx={dx} needs one axis to lead by {MARGIN} pixels).")


def caption(objects: list[SceneObject]) -> str:
    """"a red circle" or "a red circle left of a blue square"."""
    phrases = [f"a {o.colour} {o.shape}" for o in objects]
    if len(objects) == 1:
        return phrases[0]
    if len(objects) == 2:
        return f"{phrases[0]} {relation(*objects)} {phrases[1]}"
    raise ValueError(f"a caption describes one or two objects, got {len(objects)}.")


_PHRASE = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE})?")


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """"a red circle left of a blue square" -> ([("red", "circle"), ("blue", "square")], "left of").

    One-object captions give relation None. ValueError, naming the caption, for anything outside
    the grammar, including two objects of the same colour and shape (which one would be meant?).
    """
    m = _CAPTION.fullmatch(text)
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the shapes grammar: 'a COLOUR SHAPE' or 'a COLOUR SHAPE "
            f"RELATION a COLOUR SHAPE' with COLOUR in {list(COLOURS)}, SHAPE in {list(SHAPES)}, "
            f"RELATION in {list(RELATIONS)}.")
    c1, s1, rel, c2, s2 = m.groups()
    if rel is None:
        return [(c1, s1)], None
    if (c1, s1) == (c2, s2):
        raise ValueError(f"caption {text!r} names the same coloured shape twice; the two objects "
                         f"must differ in colour or shape.")
    return [(c1, s1), (c2, s2)], rel


def _pick_pair(rng: np.random.Generator, valid: np.ndarray) -> tuple[int, int]:
    """A uniformly drawn (i, j) with `valid[i, j]`."""
    return divmod(int(rng.choice(np.flatnonzero(valid))), valid.shape[1])


def random_scene(rng: np.random.Generator, num_objects: int | None = None) -> list[SceneObject]:
    """A random scene of `num_objects` (default: 1 or 2, even odds) objects of distinct
    (colour, shape); with two, a uniformly drawn relation, the gap and the margin hold."""
    n = int(rng.integers(1, 3)) if num_objects is None else num_objects
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.choice(len(kinds), size=n, replace=False)
    sides = [int(s) for s in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=n)]
    if n == 1:
        y0, x0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - sides[0] + 1, size=2))
        starts = [(y0, x0)]
    elif n == 2:
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        axis = 1 if rel in ("left of", "right of") else 0
        lo = 0 if rel in ("left of", "above") else 1  # the object with the smaller coordinate
        hi = 1 - lo
        # Along the axis: start a of `lo`, b of `hi`, the boxes GAP apart and inside the image.
        a = np.arange(IMAGE_SIZE - sides[lo] + 1)[:, None]
        b = np.arange(IMAGE_SIZE - sides[hi] + 1)[None, :]
        a, b = _pick_pair(rng, b - a >= sides[lo] + GAP)
        lead = (b + sides[hi] / 2) - (a + sides[lo] / 2)
        # Across it: starts u of object 0 and v of object 1 with centres within lead - MARGIN.
        u = np.arange(IMAGE_SIZE - sides[0] + 1)[:, None]
        v = np.arange(IMAGE_SIZE - sides[1] + 1)[None, :]
        u, v = _pick_pair(rng, np.abs((v + sides[1] / 2) - (u + sides[0] / 2)) <= lead - MARGIN)
        along, across = {lo: a, hi: b}, {0: u, 1: v}
        ys, xs = (along, across) if axis == 0 else (across, along)
        starts = [(ys[0], xs[0]), (ys[1], xs[1])]
    else:
        raise ValueError(f"a scene has 1 or 2 objects, got num_objects={num_objects}.")
    return [SceneObject(shape=kinds[k][1], colour=kinds[k][0], box=(y0, x0, y0 + s, x0 + s))
            for k, (y0, x0), s in zip(picks, starts, sides)]


# Pixel centres, so shapes are sampled where each pixel's colour is decided.
_PY, _PX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5


def object_mask(obj: SceneObject) -> np.ndarray:
    """bool `[32, 32]`: the pixels `obj` fills. Its bounding box is exactly `obj.box`."""
    y0, x0, y1, x1 = obj.box
    cy, cx = obj.centre
    inside = (y0 < _PY) & (y1 > _PY) & (x0 < _PX) & (x1 > _PX)
    if obj.shape == "square":
        return inside
    if obj.shape == "circle":
        return inside & ((_PY - cy) ** 2 + (_PX - cx) ** 2 <= ((y1 - y0) / 2) ** 2)
    if obj.shape == "triangle":
        # Row r of the box (0 at the apex) spans |x - cx| <= (r + 1) / 2: 1 or 2 pixels at the top
        # (odd or even side), the full side at the bottom.
        return inside & (np.abs(_PX - cx) <= (_PY - y0 + 0.5) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; known: {list(SHAPES)}.")


def render(objects: list[SceneObject]) -> np.ndarray:
    """uint8 `[32, 32, 3]`: the objects filled in their colours on black, no antialiasing."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for obj in objects:
        image[object_mask(obj)] = COLOURS[obj.colour]
    return image
