"""Readers for semantic-segmentation evaluation sets in their standard layouts.

Each reader lists (image, label map) pairs and yields ``(PIL RGB image, int64 label [H, W],
name)``, label values in ``[0, num_classes)`` or 255 (ignored), after ``reduce_zero_label`` where
the benchmark uses it (label 0 -> 255, every other label minus 1, as mmseg's ``LoadAnnotations``).
Layouts and splits are mmseg's (as ClearCLIP and SCLIP read them); ``root`` is the folder named:

======================= ======================================================================
``voc21`` / ``voc20``   ``VOCdevkit/VOC2012``: ``JPEGImages/ID.jpg``, ``SegmentationClass/ID.png``,
                        ``ImageSets/Segmentation/val.txt``; voc20 reduces the zero label (its
                        background is ignored)
``context60`` / ``59``  ``VOCdevkit/VOC2010``: ``JPEGImages``, ``SegmentationClassContext/ID.png``,
                        ``ImageSets/SegmentationContext/val.txt``; context59 reduces the zero label
``coco_stuff``          COCO-Stuff-164k: ``images/val2017/ID.jpg``,
                        ``annotations/val2017/ID_labelTrainIds.png`` (171 classes)
``coco_object``         ``images/val2017/ID.jpg``, ``annotations/val2017/ID_instanceTrainIds.png``
                        (background + 80 things, written by ClearCLIP's ``cvt_coco_object.py``)
``ade20k``              ``ADEChallengeData2016``: ``images/validation/ID.jpg``,
                        ``annotations/validation/ID.png``; reduces the zero label (150 classes)
``cityscapes``          ``leftImg8bit/val/CITY/ID_leftImg8bit.png``,
                        ``gtFine/val/CITY/ID_gtFine_labelTrainIds.png`` (19 classes)
``generic``             ``images/NAME.(jpg|jpeg|png)``, ``masks/NAME.png`` (class indices, 255
                        ignored), ``classnames.txt`` (one class a line, several names separated
                        by commas; a first class named ``background`` is the background class),
                        optional ``templates.txt`` (one ``{}`` template a line)
======================= ======================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from aclip.data.decode import open_image_file
from aclip.data.sets import segclasses as names

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Pairs = list[tuple[Path, Path, str]]


@dataclass(frozen=True)
class SetSpec:
    """One benchmark: its class names, background class and how its files are found."""

    classnames: tuple[str, ...]
    background: int | None  # index of the background class, None when there is none
    reduce_zero_label: bool
    lister: Callable[[Path, str], Pairs]
    split: str
    description: str


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _split_ids(path: Path) -> list[str]:
    _need(path, "split file")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no images")
    return ids


def _voc_lister(seg_dir: str, split_dir: str) -> Callable[[Path, str], Pairs]:
    def pairs(root: Path, split: str) -> Pairs:
        ids = _split_ids(root / split_dir / f"{split}.txt")
        return [(root / "JPEGImages" / f"{i}.jpg", root / seg_dir / f"{i}.png", i) for i in ids]

    return pairs


def _suffix_lister(
    image_dir: str, label_dir: str, image_suffix: str, label_suffix: str, nested: bool = False
) -> Callable[[Path, str], Pairs]:
    """Every ``*image_suffix`` file under ``root/image_dir/split`` (one level of sub-folders when
    ``nested``), with its label at the same relative place under ``root/label_dir/split``."""

    def pairs(root: Path, split: str) -> Pairs:
        images = _need(root / image_dir / split, "image folder")
        found = sorted(images.glob(("*/*" if nested else "*") + image_suffix))
        out = []
        for path in found:
            stem = path.name[: -len(image_suffix)]
            rel = path.parent.relative_to(images)
            out.append((path, root / label_dir / split / rel / f"{stem}{label_suffix}", stem))
        return out

    return pairs


SETS: dict[str, SetSpec] = {
    "voc21": SetSpec(
        names.VOC21, 0, False, _voc_lister("SegmentationClass", "ImageSets/Segmentation"),
        "val", "Pascal VOC 2012 with background (21 classes)",
    ),
    "voc20": SetSpec(
        names.VOC20, None, True, _voc_lister("SegmentationClass", "ImageSets/Segmentation"),
        "val", "Pascal VOC 2012 without background (20 classes)",
    ),
    "context60": SetSpec(
        names.CONTEXT60, 0, False,
        _voc_lister("SegmentationClassContext", "ImageSets/SegmentationContext"),
        "val", "Pascal Context with background (60 classes)",
    ),
    "context59": SetSpec(
        names.CONTEXT59, None, True,
        _voc_lister("SegmentationClassContext", "ImageSets/SegmentationContext"),
        "val", "Pascal Context without background (59 classes)",
    ),
    "coco_stuff": SetSpec(
        names.COCO_STUFF, None, False,
        _suffix_lister("images", "annotations", ".jpg", "_labelTrainIds.png"),
        "val2017", "COCO-Stuff-164k (171 classes)",
    ),
    "coco_object": SetSpec(
        names.COCO_OBJECT, 0, False,
        _suffix_lister("images", "annotations", ".jpg", "_instanceTrainIds.png"),
        "val2017", "COCO-Object (background + 80 classes)",
    ),
    "ade20k": SetSpec(
        names.ADE20K, None, True, _suffix_lister("images", "annotations", ".jpg", ".png"),
        "validation", "ADE20K, ADEChallengeData2016 (150 classes)",
    ),
    "cityscapes": SetSpec(
        names.CITYSCAPES, None, False,
        _suffix_lister("leftImg8bit", "gtFine", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                       nested=True),
        "val", "Cityscapes, gtFine labelTrainIds (19 classes)",
    ),
}  # fmt: skip
DATASETS: tuple[str, ...] = (*SETS, "generic")


def split_names(entry: str) -> list[str]:
    """The names of one class entry (``"sky, wall"`` -> ``["sky", "wall"]``)."""
    out = [n.strip() for n in entry.split(",") if n.strip()]
    if not out:
        raise ValueError(f"empty class name entry {entry!r}")
    return out


def read_classnames(path: str | os.PathLike) -> tuple[str, ...]:
    """One class a line (several names separated by commas), blank lines skipped."""
    path = _need(Path(path), "class names file")
    entries = tuple(
        ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()
    )
    if not entries:
        raise ValueError(f"class names file {path} is empty")
    return entries


def _generic_pairs(root: Path, split: str) -> Pairs:
    images = _need(root / "images", "image folder")
    masks = _need(root / "masks", "mask folder")
    found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, masks / f"{p.stem}.png", p.stem) for p in found]


def _read_label(path: Path) -> np.ndarray:
    with open_image_file(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{path} is a {mask.mode} image; label maps must hold class indices "
                "(a palette or grey PNG, 255 = ignore)"
            )
        return np.asarray(mask, dtype=np.int64).copy()


def reduce_zero_label(label_HW: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), others minus 1, 255 stays 255."""
    out = label_HW.copy()
    out[label_HW == 0] = IGNORE_INDEX
    out[(label_HW != 0) & (label_HW != IGNORE_INDEX)] -= 1
    return out


class SegmentationSet(Dataset):
    """(image, label, name) triples of a segmentation set (see the module docstring).

    ``classnames``: one entry per class (several names separated by commas); ``background``: the
    background class index or None; ``templates``: the set's own templates (generic layout's
    ``templates.txt``) or None. ``reduce_zero_label`` (generic layout only; the benchmarks fix
    their own): drop class 0 and ignore its pixels, as mmseg does (e.g. VOC20 from VOC21).
    """

    def __init__(
        self,
        dataset: str,
        root: str | os.PathLike,
        split: str | None = None,
        limit: int | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        self.dataset, self.root = dataset, Path(root)
        _need(self.root, f"{dataset} root")
        self.templates: tuple[str, ...] | None = None
        if dataset == "generic":
            self.classnames = read_classnames(self.root / "classnames.txt")
            first = split_names(self.classnames[0])[0].lower()
            self.background = 0 if first == "background" else None
            self.reduce_zero_label = reduce_zero_label
            if reduce_zero_label:
                if len(self.classnames) < 2:
                    raise ValueError(f"{self.root}: reduce_zero_label needs at least 2 classes")
                self.classnames, self.background = self.classnames[1:], None
            if (self.root / "templates.txt").is_file():
                self.templates = read_classnames(self.root / "templates.txt")
            pairs = _generic_pairs(self.root, split or "")
        else:
            if reduce_zero_label:
                raise ValueError(f"{dataset} fixes its own reduce_zero_label (generic layout only)")
            spec = SETS[dataset]
            self.classnames, self.background = spec.classnames, spec.background
            self.reduce_zero_label = spec.reduce_zero_label
            pairs = spec.lister(self.root, split or spec.split)
        if not pairs:
            raise ValueError(f"no images found for {dataset} under {self.root}")
        self.pairs = pairs[:limit] if limit else pairs
        for _, label, _ in self.pairs:
            _need(label, "label map")

    @property
    def num_classes(self) -> int:
        """Number of classes (label values 0..num_classes-1)."""
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray, str]:
        image_path, label_path, name = self.pairs[index]
        with open_image_file(image_path) as img:
            image = img.convert("RGB")
        label = _read_label(label_path)
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"{label_path} is {label.shape[1]}x{label.shape[0]}, its image {image_path} "
                f"{image.width}x{image.height}"
            )
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"{label_path} holds label {int(label[bad].max())}, outside the {self.num_classes} "
                f"classes of {self.dataset} (and not {IGNORE_INDEX})"
            )
        return image, label, name
