"""Procedural image-text shards for the demo: small coloured shapes on cluttered backgrounds.

Train shards follow img2dataset's layout (`train/00000.tar` with `key.jpg/.txt/.json`, plus
`00000_stats.json` and `sizes.json`); evaluation sets follow CLIP_benchmark's webdataset layout
(`eval_cls/` labelled by shape and `eval_colour/`, the same images labelled by the colour of
their one object, with `.cls` labels; `eval_ret/` with 5 newline-separated captions per image).
Every sample is drawn from its own seeded RNG, so the output bytes depend only on the seed.

    python -m aclip.data.synthetic --out DIR [--n-train N --n-eval-cls N --n-eval-ret N
                                   --image-size S --samples-per-shard M --seed K --workers W
                                   --object-radius LO HI]
                                   [--n-eval-seg N [--seg-only]]

``--n-eval-seg N`` also writes ``eval_seg/``: N scenes with per-pixel masks (background and one
class per colour) in the generic segmentation layout of ``aclip.data.sets.segmentation``.

``--n-train-region N`` / ``--n-eval-region N`` also write Alpha-CLIP's region data: scenes of
2-4 objects of different shapes and colours in an overlapping cluster, so that neither the whole
image nor a region's bounding box says which object is meant (the mask does);
``train_region/`` img2dataset shards whose ``.json`` lists each object's region (``caption``
naming it, ``mask`` as COCO RLE) beside the full caption in ``.txt``, and ``eval_region/``, a
CLIP_benchmark-style classification set (classes: the colours) with one object's mask per
sample as ``.mask.png``. ``--region-only`` writes only these.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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


# ----------------------------------------------------------------------------- writing


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_train_shard(path: Path, shard: int, start: int, n: int, size: int, seed: int,
                       radius: tuple[float, float] = OBJECT_RADIUS) -> int:  # fmt: skip
    """One img2dataset-style shard with samples start..start+n; returns the count written."""
    width = max(4, len(str(n - 1)))
    with tarfile.open(path / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            s = make_sample(seed, "train", start + i, size, radius)
            key = f"{shard:05d}{i:0{width}d}"
            meta = {"key": key, "caption": s["caption"], "url": f"synthetic://{start + i}"}
            meta.update(width=size, height=size, original_width=size, original_height=size)
            meta.update(status="success", error_message=None)
            _add(tar, f"{key}.jpg", s["jpg"])
            _add(tar, f"{key}.txt", s["caption"].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}
    stats["status_dict"] = {"success": n}
    (path / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=2))
    return n


def _write_eval_shard(path: Path, kind: str, shard: int, start: int, n: int, size: int, seed: int,
                      radius: tuple[float, float] = OBJECT_RADIUS):  # fmt: skip
    with tarfile.open(path / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, start + n):
            s = make_sample(seed, kind, i, size, radius)
            key = f"s{i:07d}"
            _add(tar, f"{key}.jpg", s["jpg"])
            if kind == "eval_cls":
                _add(tar, f"{key}.cls", str(SHAPES.index(s["objects"][0][0])).encode())
            elif kind == "eval_colour":
                _add(tar, f"{key}.cls", str(list(COLOURS).index(s["objects"][0][1])).encode())
            else:
                _add(tar, f"{key}.txt", "\n".join(s["captions"]).encode())
    return n


def _shards(n: int, per_shard: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample, count) covering n samples."""
    return [(k, s, min(per_shard, n - s)) for k, s in enumerate(range(0, n, per_shard))]


def _run(jobs: list[tuple], workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*args) for fn, *args in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in jobs]
        return [f.result() for f in futures]


def _eval_metadata(root: Path, kind: str, nshards: int) -> None:
    (root / "test" / "nshards.txt").write_text(f"{nshards}\n")
    classes = {
        "eval_cls": (SHAPES, CLS_TEMPLATES),
        "eval_colour": (tuple(COLOURS), COLOUR_TEMPLATES),
    }
    if kind in classes:
        names, templates = classes[kind]
        (root / "dataset_type.txt").write_text("classification\n")
        (root / "classnames.txt").write_text("\n".join(names) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    else:
        (root / "dataset_type.txt").write_text("retrieval\n")


def write_synthetic(
    out: str | os.PathLike,
    n_train: int = 6000,
    n_eval_cls: int = 500,
    n_eval_ret: int = 500,
    image_size: int = 96,
    samples_per_shard: int = 1000,
    seed: int = 0,
    workers: int = 1,
    object_radius: tuple[float, float] = OBJECT_RADIUS,
) -> dict[str, int]:
    """Write train shards (img2dataset layout) and CLIP_benchmark-style eval sets under `out`,
    objects of radius ``object_radius`` (fractions of the side).

    Returns the number of samples written per part. Output bytes depend only on the arguments
    other than `workers`.
    """
    lo, hi = object_radius
    if not 0 < lo <= hi <= 0.5:
        raise ValueError(f"object_radius must be 0 < lo <= hi <= 0.5, got {object_radius}")
    if min(n_train, n_eval_cls, n_eval_ret) < 0 or samples_per_shard < 1 or image_size < 16:
        raise ValueError("counts must be >= 0, samples_per_shard >= 1 and image_size >= 16")
    root = Path(out)
    train = root / "train"
    train.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple] = []
    train_shards = _shards(n_train, samples_per_shard)
    for k, s, n in train_shards:
        jobs.append((_write_train_shard, train, k, s, n, image_size, seed, object_radius))
    parts = (("eval_cls", n_eval_cls), ("eval_colour", n_eval_cls), ("eval_ret", n_eval_ret))
    for kind, count in parts:
        (root / kind / "test").mkdir(parents=True, exist_ok=True)
        shards = _shards(count, samples_per_shard)
        _eval_metadata(root / kind, kind, len(shards))
        for k, s, n in shards:
            jobs.append((_write_eval_shard, root / kind / "test", kind, k, s, n, image_size, seed,
                         object_radius))  # fmt: skip
    _run(jobs, workers)
    sizes = {f"{k:05d}.tar": n for k, _, n in train_shards}
    (train / "sizes.json").write_text(json.dumps(sizes, indent=2))
    return {
        "train": n_train,
        "eval_cls": n_eval_cls,
        "eval_colour": n_eval_cls,
        "eval_ret": n_eval_ret,
    }


# ----------------------------------------------------------------------------- segmentation

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


# ----------------------------------------------------------------------------- regions

REGION_SALT = {"train_region": 4, "eval_region": 5}
REGION_TEMPLATE = "a photo of a {c}."


def region_classnames() -> list[str]:
    """The region set's classes: the colours, as ``<colour> object`` (the demo model tells
    colours apart; a scene's objects differ in colour, so the whole image is ambiguous)."""
    return [f"{colour} object" for colour in COLOURS]


REGION_OVERLAP = (0.6, 0.95)  # centre distance / (r1 + r2) of an object and its neighbour
MIN_VISIBLE = 0.3  # an object is a region when at least this share of it is not covered


def _place_touching(
    rng: np.random.Generator, size: int, n: int
) -> list[tuple[float, float, float]]:
    """(cx, cy, r) for n objects in a cluster: each after the first overlaps a random earlier
    one (centre distance ``REGION_OVERLAP`` x the sum of the radii), so a region's bounding box
    also holds part of another object, as real regions' boxes do (ImageNet-S, COCO), and
    cropping to the box is not the answer by itself; the mask still is."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        r = rng.uniform(*OBJECT_RADIUS) * size
        if not placed:
            cx, cy = rng.uniform(r, size - r, size=2)
        else:
            x, y, q = placed[int(rng.integers(len(placed)))]
            d, angle = rng.uniform(*REGION_OVERLAP) * (r + q), rng.uniform(0, 2 * math.pi)
            cx = float(np.clip(x + d * math.cos(angle), r, size - r))
            cy = float(np.clip(y + d * math.sin(angle), r, size - r))
        placed.append((float(cx), float(cy), float(r)))
    return placed


def render_region_scene(
    rng: np.random.Generator, size: int, objects: list[tuple[str, str]]
) -> tuple[Image.Image, np.ndarray, list[int]]:
    """A scene of overlapping objects (:func:`_place_touching`) and its object map (uint8: 0
    background, i + 1 on the pixels object i shows; a later object covers an earlier one) and
    each object's area in pixels when unoccluded."""
    img = _background(rng, size)
    labels = Image.new("L", (size, size), 0)
    draw, label_draw = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    areas = []
    for i, ((shape, colour), (cx, cy, r)) in enumerate(
        zip(objects, _place_touching(rng, size, len(objects)), strict=True)
    ):
        angle = rng.uniform(-math.pi, math.pi)
        _draw_object(draw, shape, COLOURS[colour], cx, cy, r, angle)
        _draw_object(label_draw, shape, i + 1, cx, cy, r, angle)
        areas.append(int(np.count_nonzero(np.asarray(labels) == i + 1)))  # not covered yet
    return img, np.asarray(labels), areas


def _full_caption(objects: list[tuple[str, str]]) -> str:
    names = [_article(f"{colour} {shape}") for shape, colour in objects]
    return f"{', '.join(names[:-1])} and {names[-1]} on a cluttered background"


def make_region_sample(seed: int, kind: str, index: int, size: int) -> dict:
    """Region scene ``index`` of ``kind`` (``train_region`` / ``eval_region``): 2-4 objects of
    distinct shapes and distinct colours (the classes of ``eval_region``); the JPEG, the full
    caption, and per object at least ``MIN_VISIBLE`` visible its (shape, colour), region
    caption and mask (0/255)."""
    rng = np.random.default_rng([seed, REGION_SALT[kind], index])
    n = int(rng.integers(2, 5))
    shapes, colours = rng.choice(len(SHAPES), n, replace=False), rng.choice(len(COLOURS), n, False)
    objects = [
        (SHAPES[int(s)], list(COLOURS)[int(c)]) for s, c in zip(shapes, colours, strict=True)
    ]
    for _try in range(10):  # redraw a scene that shows fewer than two regions
        img, labels, areas = render_region_scene(rng, size, objects)
        masks = [(labels == i + 1).astype(np.uint8) * 255 for i in range(n)]
        shown = [i for i in range(n) if np.count_nonzero(masks[i]) >= MIN_VISIBLE * areas[i]]
        if len(shown) >= 2:
            break
    regions = [
        {"object": objects[i], "caption": caption(rng, [objects[i]]), "mask": masks[i]}
        for i in shown
    ]
    return {"jpg": _jpeg(img), "caption": _full_caption(objects), "regions": regions,
            "target": int(rng.integers(len(regions)))}  # fmt: skip


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def _write_region_train_shard(path: Path, shard: int, start: int, n: int, size: int,
                              seed: int) -> int:  # fmt: skip
    """One img2dataset-style shard of region scenes (``.json`` ``regions`` with RLE masks)."""
    from aclip.data.regions import rle_of

    width = max(4, len(str(n - 1)))
    with tarfile.open(path / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            s = make_region_sample(seed, "train_region", start + i, size)
            key = f"{shard:05d}{i:0{width}d}"
            regions = [{"caption": r["caption"], "mask": rle_of(r["mask"])} for r in s["regions"]]
            meta = {"key": key, "caption": s["caption"], "url": f"synthetic-region://{start + i}"}
            meta |= {"width": size, "height": size, "status": "success", "regions": regions}
            _add(tar, f"{key}.jpg", s["jpg"])
            _add(tar, f"{key}.txt", s["caption"].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}
    (path / f"{shard:05d}_stats.json").write_text(
        json.dumps(stats | {"status_dict": {"success": n}})
    )
    return n


def _write_region_eval_shard(path: Path, shard: int, start: int, n: int, size: int,
                             seed: int) -> int:  # fmt: skip
    with tarfile.open(path / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, start + n):
            s = make_region_sample(seed, "eval_region", i, size)
            target = s["regions"][s["target"]]
            key = f"s{i:07d}"
            _add(tar, f"{key}.jpg", s["jpg"])
            _add(tar, f"{key}.mask.png", _png(target["mask"]))
            _add(tar, f"{key}.cls", str(list(COLOURS).index(target["object"][1])).encode())
    return n


def write_region_sets(
    out: str | os.PathLike,
    n_train: int = 0,
    n_eval: int = 0,
    image_size: int = 96,
    samples_per_shard: int = 1000,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, int]:
    """Alpha-CLIP's synthetic region data under ``out``: ``train_region/`` (img2dataset shards
    with ``regions``) and ``eval_region/`` (wds classification set with ``.mask.png``); a part
    with count 0 is not written. Returns the counts."""
    if min(n_train, n_eval) < 0 or samples_per_shard < 1 or image_size < 16:
        raise ValueError("counts must be >= 0, samples_per_shard >= 1 and image_size >= 16")
    root, jobs = Path(out), []
    train_shards = _shards(n_train, samples_per_shard)
    if n_train:
        (root / "train_region").mkdir(parents=True, exist_ok=True)
        for k, s, n in train_shards:
            jobs.append((_write_region_train_shard, root / "train_region", k, s, n, image_size,
                         seed))  # fmt: skip
    if n_eval:
        eval_root = root / "eval_region"
        (eval_root / "test").mkdir(parents=True, exist_ok=True)
        shards = _shards(n_eval, samples_per_shard)
        (eval_root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
        (eval_root / "dataset_type.txt").write_text("classification\n")
        (eval_root / "classnames.txt").write_text("\n".join(region_classnames()) + "\n")
        (eval_root / "zeroshot_classification_templates.txt").write_text(REGION_TEMPLATE + "\n")
        for k, s, n in shards:
            jobs.append((_write_region_eval_shard, eval_root / "test", k, s, n, image_size, seed))
    _run(jobs, workers)
    if n_train:
        sizes = {f"{k:05d}.tar": n for k, _, n in train_shards}
        (root / "train_region" / "sizes.json").write_text(json.dumps(sizes, indent=2))
    return {"train_region": n_train, "eval_region": n_eval}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-eval-cls", type=int, default=500)
    p.add_argument("--n-eval-ret", type=int, default=500)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--object-radius", type=float, nargs=2, default=OBJECT_RADIUS,
                   metavar=("LO", "HI"), help="object radius range, fractions of the side "
                   f"(default {OBJECT_RADIUS[0]} {OBJECT_RADIUS[1]})")  # fmt: skip
    p.add_argument(
        "--n-eval-seg",
        type=int,
        default=0,
        help="also write N segmentation scenes with masks to OUT/eval_seg",
    )
    p.add_argument(
        "--seg-only",
        action="store_true",
        help="write only OUT/eval_seg (the other parts are left as they are)",
    )
    p.add_argument("--n-train-region", type=int, default=0,
                   help="also write N region scenes as shards to OUT/train_region")  # fmt: skip
    p.add_argument("--n-eval-region", type=int, default=0,
                   help="also write N region eval samples to OUT/eval_region")  # fmt: skip
    p.add_argument("--region-only", action="store_true",
                   help="write only the region parts (and eval_seg if asked)")  # fmt: skip
    a = p.parse_args(argv)
    if a.seg_only and a.n_eval_seg < 1:
        p.error("--seg-only needs --n-eval-seg N (N >= 1)")
    if a.region_only and a.n_train_region < 1 and a.n_eval_region < 1:
        p.error("--region-only needs --n-train-region N or --n-eval-region N (N >= 1)")
    t0 = time.perf_counter()
    if a.n_eval_seg > 0:
        write_segmentation_set(Path(a.out) / "eval_seg", a.n_eval_seg, a.image_size, a.seed)
        print(f"wrote {a.n_eval_seg} segmentation scenes to {Path(a.out) / 'eval_seg'}")
    if a.n_train_region > 0 or a.n_eval_region > 0:
        counts = write_region_sets(a.out, a.n_train_region, a.n_eval_region, a.image_size,
                                   a.samples_per_shard, a.seed, a.workers)  # fmt: skip
        print(f"wrote {counts} region samples to {a.out}")
    if a.seg_only or a.region_only:
        return
    counts = write_synthetic(
        a.out, a.n_train, a.n_eval_cls, a.n_eval_ret, a.image_size, a.samples_per_shard,
        a.seed, a.workers, tuple(a.object_radius),
    )  # fmt: skip
    dt = time.perf_counter() - t0
    total = sum(counts.values())
    print(f"wrote {counts} to {a.out} in {dt:.1f}s ({total / dt:.0f} images/s)")


if __name__ == "__main__":
    main()
