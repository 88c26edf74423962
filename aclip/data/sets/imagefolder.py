"""Zero-shot classification on an ImageFolder tree (`root/<class dir>/<image>`), e.g. ImageNet val.

Class indices are torchvision's (class folders sorted by name). A tree of 1000 WordNet-id folders
(``n01440764`` ...) is ImageNet-1k: its sorted order is the standard ImageNet label order, and
its class names are open_clip's ``IMAGENET_CLASSNAMES``. Other trees take their class names from
the folder names (underscores read as spaces) or from a file with one name per line.

Templates: ``openai`` (CLIP's 80 ImageNet prompts), ``simple`` (open_clip's 7) or a file with one
template per line, ``{c}`` (or ``{}``) standing for the class name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from aclip.data.decode import load_image_file
from aclip.data.sets.registry import SetFormat, register_set_format

Template = str | Callable[[str], str]
TEMPLATE_SETS: dict[str, Sequence[Template]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
}
_WNID = re.compile(r"n\d{8}")


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{what} file is empty: {path}")
    return lines


def load_templates(spec: str | os.PathLike = "openai") -> list[Template]:
    """Prompt templates: ``openai`` (80), ``simple`` (7) or a file of ``{c}`` templates."""
    if str(spec) in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[str(spec)])
    return _read_lines(Path(spec), "templates")


def is_imagenet_tree(folders: Sequence[str]) -> bool:
    """Whether sorted class ``folders`` are the 1000 WordNet ids of ImageNet-1k."""
    return len(folders) == len(IMAGENET_CLASSNAMES) and all(_WNID.fullmatch(f) for f in folders)


def tree_classnames(
    folders: Sequence[str], classnames_file: str | os.PathLike | None = None
) -> list[str]:
    """Class names in folder order: from ``classnames_file``, ImageNet's for a wnid tree, or the
    folder names with underscores as spaces. A count that differs from the folders' is refused."""
    if classnames_file is not None:
        names = _read_lines(Path(classnames_file), "class names")
        if len(names) != len(folders):
            raise ValueError(
                f"{classnames_file} lists {len(names)} class names but the image tree has "
                f"{len(folders)} class folders"
            )
        return names
    if is_imagenet_tree(folders):
        return list(IMAGENET_CLASSNAMES)
    return [f.replace("_", " ") for f in folders]


def load_imagefolder_classification(
    root: str | os.PathLike,
    transform: Callable | None = None,
    classnames_file: str | os.PathLike | None = None,
    templates: str | os.PathLike = "openai",
) -> tuple[ImageFolder, list[str], list[Template]]:
    """ImageFolder set -> (dataset of (image, label), class names, templates).

    Every path is checked here; ``transform`` may be set later on ``dataset.transform``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    prompts = load_templates(templates)
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=load_image_file)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no class folders with images under {root}: {err}") from err
    return dataset, tree_classnames(dataset.classes, classnames_file), prompts


# --- the format, as the eval CLIs and the trainer find it (aclip.data.sets.registry) ----------


def claims_image_tree(path: Path) -> bool:
    """Whether ``path`` is an ImageFolder tree: a directory whose class folders hold images
    (an extension ImageFolder reads) and no ``*.tar`` shards (a wds set's split folder)."""
    if not path.is_dir() or any(path.glob("*/*.tar")):
        return False
    return any(
        f.suffix.lower() in IMG_EXTENSIONS for folder in path.iterdir() if folder.is_dir()
        for f in folder.iterdir()
    )  # fmt: skip


def _check(
    root: str | os.PathLike,
    classnames: str | os.PathLike | None = None,
    templates: str | os.PathLike = "openai",
) -> None:
    load_imagefolder_classification(root, None, classnames, templates)


def _load(
    root: str | os.PathLike,
    transform: Callable,
    classnames: str | os.PathLike | None = None,
    templates: str | os.PathLike = "openai",
) -> tuple[ImageFolder, list[str], list[Template]]:
    return load_imagefolder_classification(root, transform, classnames, templates)


register_set_format(
    SetFormat(
        "imagefolder", "classification", "an ImageFolder tree root/<class folder>/<image>, no "
        "*.tar (options: classnames, templates)", claims_image_tree, _check, _load,
        ("classnames", "templates"),
    )
)  # fmt: skip
