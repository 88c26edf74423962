"""Evaluation sets written by CLIP_benchmark 1.6.2's own exporter, and its metric functions.

clip-benchmark is installed with --no-deps (`make install`): its packages import `requests`
(the dataset builder) and `sklearn` (the classification metrics), which this environment lacks
and which the functions used here never call. Stand-ins for them exist only during the import.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

CLASSES = ["cat", "dog", "car"]
N_SAMPLES = 8


# the undeclared imports, and the names imported from them
UNDECLARED = {
    "requests": (),
    "sklearn": (),
    "sklearn.metrics": ("classification_report", "balanced_accuracy_score"),
}


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    """Empty modules for the UNDECLARED ones that cannot be imported, removed again on exit."""
    added = []
    for name, attrs in UNDECLARED.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            for attr in attrs:
                setattr(module, attr, None)
            sys.modules[name] = module
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def clip_benchmark(module: str) -> types.ModuleType:
    """``clip_benchmark.<module>``, imported with stand-ins for its undeclared dependencies."""
    with _stand_ins():
        return importlib.import_module(f"clip_benchmark.{module}")


def multilabel_target(i: int) -> list[float]:
    """The multi-hot label of sample ``i`` over CLASSES (each class present in some)."""
    return [float(i % 2), float((i // 2) % 2), float(1 - i % 2)]


class _Images(torch.utils.data.Dataset):
    """(PIL image, label) pairs as CLIP_benchmark's exporter takes them."""

    classes = CLASSES
    templates = ["a photo of a {c}.", "a {c}."]

    def __init__(self, label_fn) -> None:
        self.label_fn = label_fn

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int):
        image = Image.new("RGB", (40, 36), (30 * i, 255 - 30 * i, (70 * i) % 256))
        return image, self.label_fn(i)


def write_clip_benchmark_sets(root: Path) -> dict[str, Path]:
    """A single-label, a multilabel and a retrieval set under ``root``, written by
    CLIP_benchmark's ``convert_dataset`` / ``convert_retrieval_dataset``."""
    wb = clip_benchmark("webdataset_builder")
    sets = {k: root / k for k in ("cb_classification", "cb_multilabel", "cb_retrieval")}
    with warnings.catch_warnings():  # its DataLoader asks for 8 workers on any machine
        warnings.filterwarnings("ignore", message=".*worker processes in total")
        _write(wb, sets)
    return sets


def _write(wb: types.ModuleType, sets: dict[str, Path]) -> None:
    to_bytes = wb.PIL_to_bytes("webp")
    single = _Images(lambda i: i % len(CLASSES))
    multi = _Images(lambda i: torch.tensor(multilabel_target(i)))
    captions = _Images(lambda i: [f"picture number {i}", f"image {i} of {N_SAMPLES}"])
    wb.convert_dataset(single, "test", str(sets["cb_classification"]), transform=to_bytes,
                       verbose=False)  # fmt: skip
    wb.convert_dataset(multi, "test", str(sets["cb_multilabel"]), transform=to_bytes,
                       multilabel=True, verbose=False)  # fmt: skip
    wb.convert_retrieval_dataset(captions, "test", str(sets["cb_retrieval"]), transform=to_bytes,
                                 verbose=False)  # fmt: skip
