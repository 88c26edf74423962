"""Synthetic scenes: small coloured shapes on cluttered backgrounds, and their captions.

The vocabulary (``SHAPES``, ``COLOURS``, caption and prompt templates), the drawing of one scene
(:func:`render_scene`) and one seeded sample of the image-text sets (:func:`make_sample`). Every
sample is drawn from its own seeded RNG, so its bytes depend only on the seed and its index.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "hexagon",
    "ring",
    "arrow",
    "heart",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}
COLOUR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} object.",
    "a {c} shape.",
    "something {c} on a cluttered background.",
    "a drawing of a {c} thing.",
    "there is something {c} in the picture.",
)
CLS_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c} shape.",
    "a drawing of a {c}.",
    "a small {c} on a cluttered background.",
    "there is a {c} in the picture.",
)
ONE_OBJECT = (
    "a photo of {a}.",
    "{a} on a cluttered background",
    "a small {o}",
    "there is {a} in the picture",
    "an image showing {a}",
    "{a}",
    "a picture with {a} in it",
    "{a} among clutter",
)
TWO_OBJECTS = (
    "{a} and {b} on a cluttered background",
    "a photo of {a} next to {b}",
    "{a} and {b}",
    "an image with {a} and {b}",
    "there are {a} and {b} in the picture",
    "{a} near {b}",
)
JPEG_QUALITY = 90
_SALT = {"train": 0, "eval_cls": 1, "eval_ret": 2}
# eval_colour labels the eval_cls images by the colour of their object instead of its shape
_IMAGES_OF = {"eval_colour": "eval_cls"}


# ----------------------------------------------------------------------------- drawing


def _unit_outline(shape: str) -> np.ndarray:
    """Polygon [P, 2] of `shape` in a unit box centred at 0 (radius ~1), before rotation."""
    t = lambda n, off=0.0: np.linspace(0, 2 * np.pi, n, endpoint=False) + off
    circ = lambda n, r=1.0, off=0.0: np.stack([r * np.cos(t(n, off)), r * np.sin(t(n, off))], 1)
    if shape == "circle":
        return circ(32)
    if shape == "square":
        return circ(4, 1.0, np.pi / 4)
    if shape == "triangle":
        return circ(3, 1.0, -np.pi / 2)
    if shape == "hexagon":
        return circ(6)
    if shape == "diamond":
        return np.array([[0, -1.0], [0.55, 0], [0, 1.0], [-0.55, 0]])
    if shape == "star":
        radii = np.tile([1.0, 0.42], 5)[:, None]
        return circ(10, 1.0, -np.pi / 2) * radii
    if shape == "cross":
        a, b = 0.3, 0.95
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a]]
            + [[-b, a], [-b, -a], [-a, -a]]
        )
    if shape == "arrow":
        return np.array(
            [[-1, -0.25], [0.2, -0.25], [0.2, -0.65], [1, 0], [0.2, 0.65], [0.2, 0.25], [-1, 0.25]]
        )
    if shape == "heart":
        s = t(40)
        x = 16 * np.sin(s) ** 3
        y = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
        pts = np.stack([x, y], 1)
        pts -= (pts.min(0) + pts.max(0)) / 2
        return pts / np.abs(pts).max()
    if shape == "ring":
        return circ(32)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour, cx, cy, r, angle) -> None:
    """Draw one filled shape of radius r (pixels) centred at (cx, cy), rotated by angle."""
    if shape == "ring":
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, outline=colour, width=max(2, round(r * 0.38)))
        return
    pts = _unit_outline(shape)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T * r + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts.tolist()], fill=colour)


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.integers(70, 190)
    return tuple(int(np.clip(grey + d, 0, 255)) for d in rng.integers(-25, 26, size=3))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-saturation clutter: noise texture plus random rectangles, ellipses and lines."""
    base = np.array(_muted(rng), dtype=np.int16)
    noise = rng.integers(-18, 19, size=(size // 4, size // 4, 3), dtype=np.int16)
    small = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.integers(-size // 4, size, size=2)
        w, h = rng.integers(size // 10, size // 2, size=2)
        kind = int(rng.integers(3))
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        if kind == 0:
            draw.rectangle(box, fill=_muted(rng))
        elif kind == 1:
            draw.ellipse(box, fill=_muted(rng))
        else:
            draw.line(box, fill=_muted(rng), width=int(rng.integers(1, 4)))
    return img


OBJECT_RADIUS = (0.10, 0.18)  # of the image side: objects 20-36 % of the side across


def _place(
    rng: np.random.Generator, size: int, n: int, radius: tuple[float, float] = OBJECT_RADIUS
) -> list[tuple[float, float, float]]:
    """(cx, cy, r) for n objects of radius ``radius`` (fractions of the side; by default 20-36 %
    of the side across), not overlapping if possible."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        for _try in range(20):
            r = rng.uniform(*radius) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        placed.append((float(cx), float(cy), float(r)))
    return placed


def render_scene(
    rng: np.random.Generator,
    size: int,
    objects: list[tuple[str, str]],
    radius: tuple[float, float] = OBJECT_RADIUS,
) -> Image.Image:
    """Render (shape, colour) objects on a cluttered background."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    placed = _place(rng, size, len(objects), radius)
    for (shape, colour), (cx, cy, r) in zip(objects, placed, strict=True):
        angle = rng.uniform(-math.pi, math.pi)
        _draw_object(draw, shape, COLOURS[colour], cx, cy, r, angle)
    return img


# ----------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(rng: np.random.Generator, objects: list[tuple[str, str]]) -> str:
    """A caption naming the objects with varied phrasing."""
    names = [f"{colour} {shape}" for shape, colour in objects]
    if len(names) == 1:
        template = ONE_OBJECT[int(rng.integers(len(ONE_OBJECT)))]
        return template.format(a=_article(names[0]), o=names[0])
    template = TWO_OBJECTS[int(rng.integers(len(TWO_OBJECTS)))]
    return template.format(a=_article(names[0]), b=_article(names[1]))


def _sample_objects(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colours = rng.integers(len(COLOURS), size=n)
    names = list(COLOURS)
    return [(SHAPES[int(s)], names[int(c)]) for s, c in zip(shapes, colours, strict=True)]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def make_sample(
    seed: int, kind: str, index: int, size: int, radius: tuple[float, float] = OBJECT_RADIUS
) -> dict:
    """Draw sample `index` of `kind` ("train", "eval_cls", "eval_colour", "eval_ret"), objects
    of radius ``radius`` (fractions of the side)."""
    kind = _IMAGES_OF.get(kind, kind)
    rng = np.random.default_rng([seed, _SALT[kind], index])
    n_obj = 1 if kind == "eval_cls" else int(rng.integers(1, 3))
    objects = _sample_objects(rng, n_obj)
    out = {"jpg": _jpeg(render_scene(rng, size, objects, radius)), "objects": objects}
    if kind == "eval_ret":
        out["captions"] = _distinct_captions(rng, objects, 5)
    else:
        out["caption"] = caption(rng, objects)
    return out


def _distinct_captions(rng: np.random.Generator, objects, k: int) -> list[str]:
    caps: list[str] = []
    for _ in range(50):
        c = caption(rng, objects)
        if c not in caps:
            caps.append(c)
        if len(caps) == k:
            break
    while len(caps) < k:  # templates exhausted: repeat (never happens with >= 5 templates)
        caps.append(caps[len(caps) % len(caps)])
    return caps
