"""The synthetic segmentation set: scenes with per-pixel masks (background and one class per
colour) in the generic layout of ``aclip.data.sets.segmentation``."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aclip.data.synthetic.scenes import (
    CLS_TEMPLATES,
    COLOURS,
    SHAPES,
    _background,
    _draw_object,
    _jpeg,
    _place,
    _sample_objects,
)

SEG_SALT = 3  # RNG stream of the segmentation scenes (beside _SALT's train / eval ones)
SEG_BACKGROUND = "background, cluttered background, clutter"


def seg_classnames() -> list[str]:
    """The segmentation set's classes: background, then one class per colour, each named
    ``<colour> object`` and by every shape of that colour (``red circle, red square, ...``)."""
    colours = [", ".join([f"{c} object"] + [f"{c} {s}" for s in SHAPES]) for c in COLOURS]
    return [SEG_BACKGROUND, *colours]


def render_seg_scene(
    rng: np.random.Generator, size: int, objects: list[tuple[str, str]]
) -> tuple[Image.Image, Image.Image]:
    """A scene as ``render_scene`` draws it, and its mask (``L``: 0 background, 1 + the colour's
    index on the object pixels; a later object covers an earlier one in both)."""
    img = _background(rng, size)
    mask = Image.new("L", (size, size), 0)
    draw, mask_draw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    names = list(COLOURS)
    for (shape, colour), (cx, cy, r) in zip(objects, _place(rng, size, len(objects)), strict=True):
        angle = rng.uniform(-math.pi, math.pi)
        _draw_object(draw, shape, COLOURS[colour], cx, cy, r, angle)
        _draw_object(mask_draw, shape, 1 + names.index(colour), cx, cy, r, angle)
    return img, mask


def make_seg_sample(seed: int, index: int, size: int) -> tuple[bytes, bytes]:
    """Segmentation scene ``index``: 1-3 objects of distinct shapes; JPEG image, PNG mask."""
    rng = np.random.default_rng([seed, SEG_SALT, index])
    objects = _sample_objects(rng, int(rng.integers(1, 4)))
    img, mask = render_seg_scene(rng, size, objects)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return _jpeg(img), buf.getvalue()


def write_segmentation_set(
    out: str | os.PathLike, n: int, image_size: int = 96, seed: int = 0
) -> Path:
    """``n`` scenes with per-pixel masks in the generic segmentation layout under ``out``
    (``images/sNNNNNNN.jpg``, ``masks/sNNNNNNN.png``, ``classnames.txt``, ``templates.txt``),
    as ``aclip.data.sets.segmentation`` reads it (``generic``). Returns ``out``."""
    if n < 1 or image_size < 16:
        raise ValueError("n must be >= 1 and image_size >= 16")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        jpg, png = make_seg_sample(seed, i, image_size)
        (root / "images" / f"s{i:07d}.jpg").write_bytes(jpg)
        (root / "masks" / f"s{i:07d}.png").write_bytes(png)
    (root / "classnames.txt").write_text("\n".join(seg_classnames()) + "\n")
    (root / "templates.txt").write_text("\n".join(CLS_TEMPLATES) + "\n")
    return root
