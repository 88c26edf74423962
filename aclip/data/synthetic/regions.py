"""Alpha-CLIP's synthetic region data: scenes of 2-4 overlapping objects of different shapes
and colours, as ``train_region/`` img2dataset shards whose ``.json`` lists each object's region
and ``eval_region/``, a classification set (classes: the colours) with one object's mask per
sample as ``.mask.png``."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aclip.data.synthetic.scenes import (
    COLOURS,
    OBJECT_RADIUS,
    SHAPES,
    _article,
    _background,
    _draw_object,
    _jpeg,
    caption,
)
from aclip.data.synthetic.shards import _add, _run, _shards

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
