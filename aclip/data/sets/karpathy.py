"""Karpathy-split retrieval sets (Flickr30k, MS-COCO) from ``dataset_*.json`` + image folders.

The json (Karpathy & Fei-Fei's ``dataset_flickr30k.json`` / ``dataset_coco.json``) reads

    {"images": [{"filename": "1000092795.jpg", "filepath": "val2014" (COCO only),
                 "split": "train" | "val" | "test" | "restval",
                 "sentences": [{"raw": "Two young guys ...", ...}, ...]}, ...]}

and images lie at ``images_root/filepath/filename`` (``images_root/filename`` without a
filepath). The test splits hold 1000 (Flickr30k) and 5000 (COCO) images with 5 captions each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from aclip.data.decode import open_image_file
from aclip.data.sets.registry import SetFormat, register_set_format
from aclip.data.views import to_rgb

SPLITS = ("train", "val", "test", "restval")
MAX_MISSING_SHOWN = 5
Transform = Callable[[Image.Image], torch.Tensor]
Entry = tuple[Path, list[str]]


EXPECTED_LAYOUT = (
    'expected Karpathy\'s JSON {"images": [{"filename": ..., "split": "test", '
    '"sentences": [{"raw": ...}, ...]}, ...]} (dataset_flickr30k.json / dataset_coco.json)'
)


def _read_json(json_path: Path) -> list[dict]:
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split json missing: {json_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{json_path} is not JSON ({err}){_hint(json_path)}; {EXPECTED_LAYOUT}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{json_path} is not a Karpathy split json (no 'images' list); {EXPECTED_LAYOUT}"
        )
    return data["images"]


def _hint(json_path: Path) -> str:
    """What the file looks like, when it is a file met in practice in place of the json."""
    with json_path.open("rb") as f:
        head = f.readline().strip().lower()
    if head in (b"image,caption", b"image\tcaption"):  # CLIP_benchmark's flickr*_karpathy.txt
        return ": it looks like CLIP_benchmark's image,caption list (flickr30k_test_karpathy.txt)"
    return ""


def _entry(record: dict, images_root: Path, json_path: Path, index: int) -> Entry:
    try:
        path = images_root / record.get("filepath", "") / record["filename"]
        captions = [s["raw"].strip() for s in record.get("sentences", [])]
    except (KeyError, TypeError, AttributeError) as err:
        what = f"has no {err}" if isinstance(err, KeyError) else f"is malformed ({err})"
        raise ValueError(f"{json_path}: image record {index} {what}; {EXPECTED_LAYOUT}") from None
    return path, captions


def _check_images(entries: list[Entry], images_root: Path) -> None:
    missing = [str(path) for path, _ in entries if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:MAX_MISSING_SHOWN])
        more = (
            f" and {len(missing) - MAX_MISSING_SHOWN} more"
            if len(missing) > MAX_MISSING_SHOWN
            else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} of {len(entries)} images missing under {images_root}: {shown}{more}"
        )


def karpathy_entries(
    json_path: str | os.PathLike, images_root: str | os.PathLike, split: str = "test"
) -> list[Entry]:
    """(image path, captions) of every image of ``split``, in json order.

    Every image path is checked up front: a missing json or image raises FileNotFoundError
    naming it (the first few, when several are missing), before any image is decoded.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise FileNotFoundError(f"images folder missing: {images_root}")
    json_path = Path(json_path)
    records = _read_json(json_path)
    entries = [
        _entry(r, images_root, json_path, i)
        for i, r in enumerate(records)
        if isinstance(r, dict) and r.get("split") == split
    ]
    if not entries:
        raise ValueError(f"{json_path} has no images in split {split!r}")
    _check_images(entries, images_root)
    return entries


class KarpathyDataset(Dataset):
    """Map-style dataset of (image, captions); the image goes through ``transform`` if given."""

    def __init__(self, entries: list[Entry], transform: Transform | None = None) -> None:
        self.entries = entries
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, list[str]]:
        path, captions = self.entries[index]
        with open_image_file(path) as img:
            img.load()
            image = to_rgb(img)
        return (self.transform(image) if self.transform else image), list(captions)


def load_karpathy(
    json_path: str | os.PathLike,
    images_root: str | os.PathLike,
    split: str = "test",
    transform: Transform | None = None,
) -> KarpathyDataset:
    """Karpathy split ``split`` of ``json_path`` as a dataset of (image_tensor, captions).

    All captions of an image are kept. Raises FileNotFoundError naming a missing json, images
    folder or image (checked for every image before returning).
    """
    return KarpathyDataset(karpathy_entries(json_path, images_root, split), transform)


# --- the format, as the eval CLIs and the trainer find it (aclip.data.sets.registry) ----------


def claims_karpathy_json(path: Path) -> bool:
    """Whether ``path`` names a ``*.json`` file (whether or not it exists: a missing one is
    then named by the check)."""
    return path.suffix.lower() == ".json" and not path.is_dir()


def _images_root(json_path: str | os.PathLike, images: str | os.PathLike | None) -> Path:
    """The images folder: ``images``, or the json's own folder when not given."""
    return Path(images) if images is not None else Path(json_path).parent


def _check(
    json_path: str | os.PathLike, images: str | os.PathLike | None = None, split: str = "test"
) -> None:
    karpathy_entries(json_path, _images_root(json_path, images), split)


def _load(
    json_path: str | os.PathLike,
    transform: Transform,
    images: str | os.PathLike | None = None,
    split: str = "test",
) -> KarpathyDataset:
    return load_karpathy(json_path, _images_root(json_path, images), split, transform)


register_set_format(
    SetFormat(
        "karpathy", "retrieval", "a Karpathy split json (dataset_flickr30k.json, "
        "dataset_coco.json; options: images, the folder of its images (default: the json's "
        "folder), split)", claims_karpathy_json, _check, _load, ("images", "split"),
    )
)  # fmt: skip
