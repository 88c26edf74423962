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


# ------------------------------------------------------- CLIP_benchmark's own evaluation code
def _wds_loader(root: Path, transform, batch_size: int):
    """CLIP_benchmark's wds reader and loader, as its CLI builds them for a ``wds/`` set."""
    builder = clip_benchmark("datasets.builder")
    dataset = builder.build_wds_dataset(
        f"wds/{Path(root).name}", transform=transform, split="test", data_dir=str(root)
    )
    loader = torch.utils.data.DataLoader(
        dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0
    )
    return dataset, loader


def benchmark_zeroshot(model, transform, tokenizer, root: Path, batch_size: int = 8) -> dict:
    """CLIP_benchmark's zero-shot top-1 / top-5 of a CLIP-like model (``encode_image`` /
    ``encode_text``) on the wds set at ``root``: its reader, ``zero_shot_classifier``,
    ``run_classification`` and (see ``_accuracy``) ``accuracy``, as its ``evaluate`` computes
    acc1 / acc5 (its mean per-class recall is sklearn's, not installed here). Also the logits."""
    zc = clip_benchmark("metrics.zeroshot_classification")
    dataset, loader = _wds_loader(root, transform, batch_size)
    with torch.no_grad():
        classifier = zc.zero_shot_classifier(
            model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
        )
        logits, target = zc.run_classification(model, classifier, loader, "cpu", amp=False)
    topk = (1, 5) if len(dataset.classes) >= 5 else (1,)
    accs = _accuracy(logits, target, topk)
    return {"top1": accs[0], "top5": accs[-1] if len(topk) == 2 else None, "n": len(target),
            "logits": logits, "target": target}  # fmt: skip


def _accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy`` step for step, its last step with ``.item()``: it calls
    ``float()`` on a 1-element NumPy array, which NumPy 2 refuses (TypeError)."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def benchmark_retrieval(model, transform, tokenizer, root: Path, batch_size: int = 8) -> dict:
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate`` (recall@1/5/10 both ways) of a CLIP-like
    model on the wds retrieval set at ``root``, read by its own wds reader."""
    zr = clip_benchmark("metrics.zeroshot_retrieval")
    _, loader = _wds_loader(root, transform, batch_size)
    with torch.no_grad():
        return zr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
