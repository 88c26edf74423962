"""Class-name lists of the standard open-vocabulary segmentation benchmarks, read from the text
files in ``aclip/data/sets/classnames/`` (byte-for-byte copies of the methods' own files: their
sources, and how each method reads them, are in that folder's ``README.md``).

``VOC21`` ... ``CITYSCAPES``: ClearCLIP's lists (``<set>.clearclip.txt``), one entry per class in
label order; an entry may hold several names separated by commas (the prediction takes the max
over them); names as written there (e.g. ADE20K's ``chestofdrawers``). ``SCLIP_*``: SCLIP's where
they differ. :func:`cliper_classnames`: CLIPer's lists, whose entries are one query each.
"""

from __future__ import annotations

import re
from importlib.resources import files

ClassEntry = str | tuple[str, ...]  # a comma-separated entry, or its queries already split


def read_list(name: str) -> tuple[str, ...]:
    """The lines of ``classnames/<name>.txt``, stripped, blank ones skipped."""
    text = files(__package__).joinpath("classnames").joinpath(f"{name}.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


VOC21 = read_list("voc21.clearclip")
VOC20 = read_list("voc20.clearclip")
CONTEXT60 = read_list("context60.clearclip")
CONTEXT59 = read_list("context59.clearclip")
COCO_OBJECT = read_list("coco_object.clearclip")
COCO_STUFF = read_list("coco_stuff.clearclip")
ADE20K = read_list("ade20k.clearclip")
CITYSCAPES = read_list("cityscapes.clearclip")

# SCLIP's lists where they differ (a background made of stuff names, several person and tv names)
SCLIP_VOC21 = read_list("voc21.sclip")
SCLIP_VOC20 = read_list("voc20.sclip")
SCLIP_COCO_OBJECT = read_list("coco_object.sclip")

# CLIPer's file per benchmark (VOC20 and Context59 read the VOC21 and Context60 files, as
# cliper.code's scripts/config/vit-b-16/ovs_voc20.yaml and ovs_context59.yaml do)
CLIPER_FILES = {
    "voc21": "voc21", "voc20": "voc21", "context60": "context60", "context59": "context60",
    "coco_object": "coco_object", "coco_stuff": "coco_stuff", "ade20k": "ade20k",
    "cityscapes": "cityscapes",
}  # fmt: skip


def cliper_file(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(background names, class names) of CLIPer's ``<name>.cliper.txt`` as its dataset classes
    read them (cliper.code data/voc/voc_datasets.py:69-70): the first line split at spaces and
    commas, each other line one name, commas included."""
    lines = read_list(f"{name}.cliper")
    return tuple(n for n in re.split(r"[\s,]+", lines[0]) if n), lines[1:]


def cliper_classnames(dataset: str, with_background: bool) -> tuple[ClassEntry, ...] | None:
    """CLIPer's list for ``dataset`` (None where it has none), one entry per class, each entry
    its queries: the background names first when the set has a background class, then one
    single-query entry per class."""
    if dataset not in CLIPER_FILES:
        return None
    background, classes = cliper_file(CLIPER_FILES[dataset])
    entries = tuple((name,) for name in classes)
    return (background, *entries) if with_background else entries


# CLIPer's background names (the first line of data/voc/cls_voc21.txt and of
# data/coco14/cls_coco81.txt); its other datasets use the single name "background"
CLIPER_VOC_BACKGROUND = cliper_file("voc21")[0]
CLIPER_COCO_BACKGROUND = cliper_file("coco_object")[0]
# CLIPer's prompt set for most datasets (template/car_template.txt, 15 templates)
CLIPER_TEMPLATES = read_list("templates.cliper")
