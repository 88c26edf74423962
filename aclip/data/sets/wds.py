"""Readers for CLIP_benchmark-style webdataset evaluation sets.

Layout (as written by CLIP_benchmark's exporter and by `aclip.data.synthetic`):

    root/
      classnames.txt                          (classification: one class name per line)
      zeroshot_classification_templates.txt   (classification: one template per line, `{c}`)
      dataset_type.txt                        ("classification", "multilabel" or "retrieval";
                                               optional: CLIP_benchmark writes it for
                                               multilabel and retrieval sets only)
      test/nshards.txt                        (number of shards n)
      test/0.tar ... test/{n-1}.tar           (<key>.webp|png|jpg|jpeg + <key>.cls label,
                                               <key>.npy multi-hot label vector (multilabel),
                                               or <key>.txt with newline-separated captions)

:func:`check_eval_set` tells the kind of a set and checks its layout before any model is built.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from aclip.data.decode import check_pixels, open_image
from aclip.data.sets.registry import SetFormat, register_set_format
from aclip.data.tars import tarfile_to_samples
from aclip.data.views import to_rgb

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
Transform = Callable[[Image.Image], torch.Tensor]

# the member that carries each kind's label, as CLIP_benchmark's exporter writes it
LABEL_MEMBER = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}
# the kinds of set each evaluation task takes
TASK_KINDS = {"zeroshot": ("classification", "multilabel"), "retrieval": ("retrieval",)}
EXPECTED = {
    "zeroshot": "a zero-shot classification set (samples with a .cls label, or a .npy "
    "multi-hot vector for a multilabel set, beside classnames.txt)",
    "retrieval": "a retrieval set (samples with .txt captions, one per line)",
}


def _read_lines(path: Path, what: str = "") -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"evaluation set file missing: {path}{what}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def shard_paths(root: str | os.PathLike, split: str = "test") -> list[str]:
    """Paths of `root/split/{0..n-1}.tar` from `nshards.txt`, all checked to exist."""
    split_dir = Path(root) / split
    nshards_file = split_dir / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(f"evaluation set file missing: {nshards_file}")
    text = nshards_file.read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{nshards_file} must hold the number of shards (got {text!r})")
    n = int(text)
    paths = [split_dir / f"{i}.tar" for i in range(n)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"evaluation shard missing: {p} (nshards.txt says {n})")
    return [str(p) for p in paths]


def first_sample(shard: str) -> dict[str, bytes | str]:
    """The first sample of ``shard`` as webdataset yields it, undecoded: extension -> bytes,
    plus ``__key__`` and ``__url__``."""
    try:
        with tarfile.open(shard) as tar:
            return {**_first_members(tar), "__url__": shard}
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"cannot read evaluation shard {shard} as a tar file ({err})") from None


def _first_members(tar: tarfile.TarFile) -> dict[str, bytes | str]:
    """Members of the first key, webdataset's way: the key is the path up to the first dot of
    the file name, the extension what follows it."""
    key, members = None, {}
    for info in tar:
        folder, _, name = info.name.rpartition("/")
        if not info.isfile() or "." not in name:
            continue
        stem, ext = name.split(".", 1)
        if key is not None and f"{folder}/{stem}" != key:
            break
        key = f"{folder}/{stem}"
        members[ext.lower()] = tar.extractfile(info).read()
    if not members:
        raise ValueError(f"evaluation shard {tar.name} holds no sample")
    return {"__key__": key.lstrip("/"), **members}


def _members(sample: dict) -> list[str]:
    """The extensions of a sample's members (not its ``__key__`` / ``__url__``)."""
    return sorted(k for k in sample if not k.startswith("__"))


def _declared_kind(root: Path) -> str | None:
    """The kind dataset_type.txt names (CLIP_benchmark's file), None without the file."""
    path = root / "dataset_type.txt"
    if not path.is_file():
        return None
    kind = path.read_text().strip().lower()
    if kind not in LABEL_MEMBER:
        raise ValueError(f"{path} says {kind!r}; expected one of {', '.join(LABEL_MEMBER)}")
    return kind


def _kind_of_members(members: dict, task: str) -> str | None:
    """The kind a sample's members make it: the task's own kinds first, then the others."""
    for kind in TASK_KINDS[task] + tuple(k for k in LABEL_MEMBER if k not in TASK_KINDS[task]):
        if LABEL_MEMBER[kind] in members:
            return kind
    return None


def _kind_and_source(root: Path, shard: str, members: dict, task: str) -> tuple[str | None, str]:
    """The set's kind (None when unknown) and what says so: ``dataset_type.txt`` when present
    (as CLIP_benchmark reads it), else the label member of the first sample."""
    declared = _declared_kind(root)
    if declared is not None:
        return declared, f"{root / 'dataset_type.txt'} says {declared}"
    kind = _kind_of_members(members, task)
    if kind is None:
        return None, f"the first sample of {shard} has {_members(members)}, no .cls, .npy or .txt"
    return kind, f"the first sample of {shard} carries .{LABEL_MEMBER[kind]}"


def check_eval_set(root: str | os.PathLike, task: str, split: str = "test") -> str:
    """Check that ``root`` is a set ``task`` ("zeroshot" or "retrieval") can evaluate, and
    return its kind. Cheap: reads the metadata files and the first sample of the first shard.

    Raises FileNotFoundError (a missing directory, shard or metadata file) or ValueError (a set
    of the wrong kind, a first sample without an image or without the kind's label member,
    class names that the first label does not fit), each naming the set and what was expected.
    """
    root = Path(root)
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {', '.join(TASK_KINDS)} (got {task!r})")
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation set directory not found: {root}")
    shard = shard_paths(root, split)[0]
    members = first_sample(shard)
    kind, source = _kind_and_source(root, shard, members, task)
    if kind not in TASK_KINDS[task]:
        what = f"a {kind} set" if kind else "not an evaluation set aclip can read"
        raise ValueError(f"evaluation set {root} is {what} ({source}); expected {EXPECTED[task]}")
    _check_first_sample(root, shard, members, kind)
    return kind


def _check_first_sample(root: Path, shard: str, members: dict, kind: str) -> None:
    if not any(ext in members for ext in IMAGE_EXTS):
        raise ValueError(
            f"evaluation set {root}: the first sample of {shard} has no image "
            f"(.{', .'.join(IMAGE_EXTS)}); it has {_members(members)}"
        )
    label = LABEL_MEMBER[kind]
    if label not in members:
        raise ValueError(
            f"evaluation set {root} is a {kind} set, but the first sample of {shard} "
            f"has no .{label} member (it has {_members(members)})"
        )
    if kind == "retrieval":
        return
    classnames, _ = _names_and_templates(root)
    _LabelReader(kind, len(classnames))(members)


def _names_and_templates(root: Path) -> tuple[list[str], list[str]]:
    need = " (a zero-shot classification set needs it)"
    classnames = _read_lines(root / "classnames.txt", need)
    templates = _read_lines(root / "zeroshot_classification_templates.txt", need)
    if not classnames or not templates:
        empty = "classnames.txt" if not classnames else "zeroshot_classification_templates.txt"
        raise ValueError(f"evaluation set {root}: {empty} is empty")
    return classnames, templates


def _image(sample: dict) -> Image.Image:
    """The sample's image as RGB, read as the training images are (`open_image`: the image
    decoders only; `check_pixels`: a huge JPEG reduced at decode, another huge image refused
    before its pixels are decoded). Raises ValueError (`BadSample`) naming the sample."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    key, url = f"{sample.get('__key__')} in {sample.get('__url__')}", str(sample.get("__url__"))
    with open_image(sample[ext], ext, key, url) as img:
        check_pixels(img, key, url)
        img.load()
        return to_rgb(img)


class _LabelReader:
    """A sample's label: the class index (``.cls``) or the multi-hot float vector (``.npy``),
    checked against the number of classes."""

    def __init__(self, kind: str, num_classes: int) -> None:
        self.member, self.num_classes = LABEL_MEMBER[kind], num_classes

    def __call__(self, sample: dict) -> int | torch.Tensor:
        where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
        if self.member not in sample:
            raise ValueError(f"{where} has no .{self.member} label (it has {_members(sample)})")
        if self.member == "cls":
            text = sample["cls"].decode().strip()
            if not text.isdigit() or int(text) >= self.num_classes:
                raise ValueError(
                    f"{where}: label {text!r} is not a class index below "
                    f"{self.num_classes} (the classes of classnames.txt)"
                )
            return int(text)
        vector = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if vector.shape != (self.num_classes,):
            raise ValueError(
                f"{where}: multilabel vector of shape {vector.shape}, expected "
                f"({self.num_classes},) for the classes of classnames.txt"
            )
        return torch.from_numpy(vector.astype(np.float32))


class _Classification:
    def __init__(self, transform: Transform, label: _LabelReader) -> None:
        self.transform, self.label = transform, label

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int | torch.Tensor]:
        return self.transform(_image(sample)), self.label(sample)


class _Retrieval:
    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> tuple[torch.Tensor, list[str]]:
        if "txt" not in sample:
            raise ValueError(
                f"sample {sample.get('__key__')} in {sample.get('__url__')} has no .txt captions"
            )
        captions = [c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()]
        return self.transform(_image(sample)), captions


def _dataset(paths: list[str], fn: Callable) -> wds.DataPipeline:
    """Ordered, finite stream over the shards, split across DataLoader workers (not nodes)."""
    return wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.split_by_worker,
        tarfile_to_samples(),
        wds.map(fn),
    )


def load_wds_classification(
    root: str | os.PathLike, transform: Transform, split: str = "test"
) -> tuple[wds.DataPipeline, list[str], list[str]]:
    """Zero-shot classification set -> (IterableDataset of (image_tensor, label), classnames,
    templates). Templates use `{c}` for the class name (`t.format(c=name)`).

    The label is the class index, or for a multilabel set (CLIP_benchmark's ``.npy`` members,
    e.g. VOC2007 multilabel) the multi-hot float vector over the classes. The set is checked
    first (:func:`check_eval_set`).
    """
    root = Path(root)
    kind = check_eval_set(root, "zeroshot", split)
    classnames, templates = _names_and_templates(root)
    fn = _Classification(transform, _LabelReader(kind, len(classnames)))
    return _dataset(shard_paths(root, split), fn), classnames, templates


def load_wds_retrieval(
    root: str | os.PathLike, transform: Transform, split: str = "test"
) -> wds.DataPipeline:
    """Retrieval set -> IterableDataset of (image_tensor, list of captions), checked first."""
    check_eval_set(root, "retrieval", split)
    return _dataset(shard_paths(root, split), _Retrieval(transform))


def retrieval_collate(
    batch: list[tuple[torch.Tensor, list[str]]],
) -> tuple[torch.Tensor, list[list[str]]]:
    """DataLoader collate for retrieval: stacked images and the per-image caption lists."""
    return torch.stack([img for img, _ in batch]), [caps for _, caps in batch]


# --- the format, as the eval CLIs and the trainer find it (aclip.data.sets.registry) ----------

METADATA_FILES = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")


def claims_wds_set(path: Path) -> bool:
    """Whether ``path`` is laid out as a CLIP_benchmark wds set: a directory holding one of its
    metadata files, or a split folder with ``nshards.txt`` or ``*.tar`` shards."""
    if not path.is_dir():
        return False
    if any((path / name).is_file() for name in METADATA_FILES):
        return True
    return any(path.glob("*/nshards.txt")) or any(path.glob("*/*.tar"))


def _check_classification(root: str | os.PathLike, split: str = "test") -> None:
    check_eval_set(root, "zeroshot", split)


def _check_retrieval(root: str | os.PathLike, split: str = "test") -> None:
    check_eval_set(root, "retrieval", split)


WDS_LAYOUT = " in CLIP_benchmark's wds layout (root/test/nshards.txt, root/test/0.tar ...)"
register_set_format(
    SetFormat(
        "wds", "classification", EXPECTED["zeroshot"] + WDS_LAYOUT, claims_wds_set,
        _check_classification, load_wds_classification, ("split",),
    )
)  # fmt: skip
register_set_format(
    SetFormat(
        "wds", "retrieval", EXPECTED["retrieval"] + WDS_LAYOUT, claims_wds_set, _check_retrieval,
        load_wds_retrieval, ("split",),
    )
)  # fmt: skip
