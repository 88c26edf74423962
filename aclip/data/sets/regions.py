"""Readers of region classification sets (image + region mask -> class) for ``evals.region``.

Two layouts:

- **ImageNet-S** as released (LUSSeg/ImageNet-S): ``ROOT/validation/<wnid>/<name>.JPEG`` and
  ``ROOT/validation-segmentation/<wnid>/<name>.png`` (ROOT is e.g. ``ImageNetS919``). A mask
  PNG is RGB and a pixel's class id is ``R + 256 * G`` (0: other category, 1000: ignored), the
  id of class *i* being 1 + its wnid's index among the sorted wnids (the ImageNet-S README).
  One sample per annotated image: the image's own class (its folder), its pixels as the
  region. An image whose mask has no pixel of its own class is left out and counted.
- a **CLIP_benchmark-style wds set** (``aclip.data.sets.wds``' classification layout) whose
  samples also hold a ``.mask.png`` (the region, the image's size; grey levels / 255, a palette
  image's non-zero indices as 1), as ``aclip.data.synthetic --n-eval-region`` writes it.

Both yield (RGB image, uint8 mask [H, W] in 0-255, class index).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from aclip.data.decode import open_image_file
from aclip.data.regions import MASK_MEMBER, _png_mask
from aclip.data.sets.wds import (
    _image,
    _LabelReader,
    _members,
    _names_and_templates,
    check_eval_set,
    first_sample,
    shard_paths,
)
from aclip.data.tars import tarfile_to_samples

IMAGENET_S_OTHER, IMAGENET_S_IGNORE = 0, 1000
IMAGE_SUFFIXES = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png")
RegionItem = tuple[Image.Image, np.ndarray, int]


def imagenet_s_class_ids(png: Image.Image) -> np.ndarray:
    """An ImageNet-S mask PNG's class id per pixel: R + 256 * G (int32 [H, W])."""
    rgb = np.asarray(png.convert("RGB"), dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1]


def imagenet_s_classnames(wnids: list[str], kind: str = "wordnet") -> list[str]:
    """Class names of ImageNet-S wnids: ``wordnet`` (the synset's first lemma, underscores
    kept, as the official Alpha-CLIP eval names them from nltk's WordNet; read from timm's
    ImageNet synset table), ``openai`` (open_clip's OpenAI ImageNet names) or a file with
    one name per line (in the sorted wnid order)."""
    if kind not in ("wordnet", "openai"):
        names = [line.strip() for line in Path(kind).read_text().splitlines() if line.strip()]
        if len(names) != len(wnids):
            raise ValueError(f"{kind} has {len(names)} class names for {len(wnids)} classes")
        return names
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    index = {wnid: i for i, wnid in enumerate(info.label_names())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"not ImageNet-1k wnids: {unknown[:5]} (give --classnames FILE)")
    if kind == "openai":
        from open_clip import IMAGENET_CLASSNAMES

        return [IMAGENET_CLASSNAMES[index[w]] for w in wnids]
    lemmas = info.label_descriptions()
    return [lemmas[index[w]].split(",")[0].strip().replace(" ", "_") for w in wnids]


class ImageNetS(torch.utils.data.Dataset):
    """ImageNet-S region samples (see the module docstring); ``split`` is ``validation`` or
    ``train-semi`` (the folders beside their ``-segmentation`` masks)."""

    def __init__(self, root: str | os.PathLike, split: str = "validation") -> None:
        root = Path(root)
        self.image_dir, self.mask_dir = root / split, root / f"{split}-segmentation"
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"ImageNet-S folder missing: {folder} (expected ROOT/{split} and "
                    f"ROOT/{split}-segmentation, ROOT e.g. ImageNetS919)"
                )
        self.wnids = sorted(p.name for p in self.mask_dir.iterdir() if p.is_dir())
        if not self.wnids:
            raise ValueError(f"{self.mask_dir} holds no class folders (<wnid>/<name>.png)")
        self.items = [
            (png, label) for label, wnid in enumerate(self.wnids)
            for png in sorted((self.mask_dir / wnid).glob("*.png"))
        ]  # fmt: skip
        if not self.items:
            raise ValueError(f"{self.mask_dir} holds no mask PNGs")

    def __len__(self) -> int:
        return len(self.items)

    def _image_path(self, png: Path) -> Path:
        folder = self.image_dir / png.parent.name
        for suffix in IMAGE_SUFFIXES:
            if (folder / (png.stem + suffix)).is_file():
                return folder / (png.stem + suffix)
        raise FileNotFoundError(f"no image for mask {png} in {folder} ({png.stem}.JPEG)")

    def __getitem__(self, i: int) -> RegionItem | None:
        png, label = self.items[i]
        with open_image_file(png) as img:
            ids = imagenet_s_class_ids(img)
        bad = (ids > len(self.wnids)) & (ids != IMAGENET_S_IGNORE)
        if bad.any():
            raise ValueError(
                f"{png}: class id {int(ids[bad][0])} is not one of the {len(self.wnids)} classes "
                f"of {self.mask_dir} (R + 256 G; 0 other, 1000 ignored)"
            )
        mask = (ids == label + 1).astype(np.uint8) * 255
        with open_image_file(self._image_path(png)) as img:
            image = img.convert("RGB")
        if image.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"{png} is {mask.shape[1]}x{mask.shape[0]}, its image {image.size}")
        return (image, mask, label) if mask.any() else None


class WdsRegionSet(torch.utils.data.IterableDataset):
    """A CLIP_benchmark-style classification set with a ``.mask.png`` per sample."""

    def __init__(self, root: str | os.PathLike, split: str = "test") -> None:
        root = Path(root)
        check_eval_set(root, "zeroshot", split)
        self.paths = shard_paths(root, split)
        first = first_sample(self.paths[0])
        if MASK_MEMBER not in first:
            raise ValueError(
                f"region set {root}: the first sample of {self.paths[0]} has no .{MASK_MEMBER} "
                f"region mask (it has {_members(first)})"
            )
        self.classnames, self.templates = _names_and_templates(root)
        self.label = _LabelReader("classification", len(self.classnames))

    def _decode(self, sample: dict) -> RegionItem:
        where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
        if MASK_MEMBER not in sample:
            raise ValueError(f"{where} has no .{MASK_MEMBER} (it has {_members(sample)})")
        image = _image(sample)
        try:
            mask = _png_mask(sample, sample[MASK_MEMBER], image.height, image.width)
        except OSError as err:
            raise ValueError(f"{where}: .{MASK_MEMBER} is not a PNG ({err})") from None
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{where}: mask {mask.shape[::-1]} is not the image's {image.size}")
        if not mask.any():
            raise ValueError(f"{where}: empty region mask")
        return image, mask, self.label(sample)

    def __iter__(self) -> Iterator[RegionItem]:
        pipe = wds.DataPipeline(
            wds.SimpleShardList(self.paths),
            wds.split_by_worker,
            tarfile_to_samples(),
            wds.map(self._decode),
        )
        return iter(pipe)


def png_bytes(mask_HW: np.ndarray) -> bytes:
    """A uint8 mask as ``L`` PNG bytes (the ``.mask.png`` member)."""
    buf = io.BytesIO()
    Image.fromarray(mask_HW.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
