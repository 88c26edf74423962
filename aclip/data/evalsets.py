"""Readers for CLIP_benchmark-style webdataset evaluation sets.

Layout (as written by CLIP_benchmark's exporter and by `aclip.data.synthetic`):

    root/
      classnames.txt                          (classification: one class name per line)
      zeroshot_classification_templates.txt   (classification: one template per line, `{c}`)
      dataset_type.txt                        ("classification" or "retrieval"; optional)
      test/nshards.txt                        (number of shards n)
      test/0.tar ... test/{n-1}.tar           (<key>.webp|png|jpg|jpeg + <key>.cls label, or
                                               <key>.txt with newline-separated captions)
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from aclip.data.views import to_rgb

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
Transform = Callable[[Image.Image], torch.Tensor]


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"evaluation set file missing: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def shard_paths(root: str | os.PathLike, split: str = "test") -> list[str]:
    """Paths of `root/split/{0..n-1}.tar` from `nshards.txt`, all checked to exist."""
    split_dir = Path(root) / split
    nshards_file = split_dir / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(f"evaluation set file missing: {nshards_file}")
    n = int(nshards_file.read_text().strip())
    paths = [split_dir / f"{i}.tar" for i in range(n)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"evaluation shard missing: {p} (nshards.txt says {n})")
    return [str(p) for p in paths]


def _image(sample: dict) -> Image.Image:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    with Image.open(io.BytesIO(sample[ext])) as img:
        img.load()
        return to_rgb(img)


class _Classification:
    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        return self.transform(_image(sample)), int(sample["cls"].decode().strip())


class _Retrieval:
    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> tuple[torch.Tensor, list[str]]:
        captions = [c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()]
        return self.transform(_image(sample)), captions


def _dataset(paths: list[str], fn: Callable) -> wds.DataPipeline:
    """Ordered, finite stream over the shards, split across DataLoader workers (not nodes)."""
    return wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(fn),
    )


def load_wds_classification(
    root: str | os.PathLike, transform: Transform, split: str = "test"
) -> tuple[wds.DataPipeline, list[str], list[str]]:
    """Zero-shot classification set -> (IterableDataset of (image_tensor, label), classnames,
    templates). Templates use `{c}` for the class name (`t.format(c=name)`)."""
    root = Path(root)
    classnames = _read_lines(root / "classnames.txt")
    templates = _read_lines(root / "zeroshot_classification_templates.txt")
    return _dataset(shard_paths(root, split), _Classification(transform)), classnames, templates


def load_wds_retrieval(
    root: str | os.PathLike, transform: Transform, split: str = "test"
) -> wds.DataPipeline:
    """Retrieval set -> IterableDataset of (image_tensor, list of captions)."""
    return _dataset(shard_paths(root, split), _Retrieval(transform))


def retrieval_collate(
    batch: list[tuple[torch.Tensor, list[str]]],
) -> tuple[torch.Tensor, list[list[str]]]:
    """DataLoader collate for retrieval: stacked images and the per-image caption lists."""
    return torch.stack([img for img, _ in batch]), [caps for _, caps in batch]
