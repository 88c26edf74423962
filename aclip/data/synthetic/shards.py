"""The image-text shards: img2dataset-style training shards and CLIP_benchmark-style
classification (``eval_cls``, ``eval_colour``) and retrieval (``eval_ret``) sets, and the tar
writing and process-pool helpers the region sets share."""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from aclip.data.synthetic.scenes import (
    CLS_TEMPLATES,
    COLOUR_TEMPLATES,
    COLOURS,
    OBJECT_RADIUS,
    SHAPES,
    make_sample,
)


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
