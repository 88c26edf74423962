"""Zero-shot classification, computed the way open_clip / CLIP_benchmark compute it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassRecall,
    MultilabelAveragePrecision,
)
from tqdm import tqdm

from aclip.config import EVAL_PRECISIONS
from aclip.model.clip import CLIP

Template = str | Callable[[str], str]
AUTOCAST_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def resolve_eval_precision(precision: str, device: torch.device | str) -> str:
    """The precision an evaluation on ``device`` runs at, as results record it: ``amp``
    (CLIP_benchmark's default, ``torch.autocast(device)``'s own dtype) is ``amp_fp16`` on CUDA
    and ``amp_bf16`` elsewhere; ``fp32``, ``amp_bf16`` and ``amp_fp16`` are themselves.

    Raises:
        ValueError: ``precision`` is not one of ``aclip.config.EVAL_PRECISIONS``.
    """
    if precision not in EVAL_PRECISIONS:
        raise ValueError(
            f"eval precision must be one of {', '.join(EVAL_PRECISIONS)} (got {precision!r})"
        )
    if precision != "amp":
        return precision
    return "amp_fp16" if torch.device(device).type == "cuda" else "amp_bf16"


def eval_autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The arithmetic of an evaluation at ``precision`` (:func:`resolve_eval_precision`):
    ``fp32`` runs the fp32 weights with autocast off (also inside a caller's autocast);
    ``amp_bf16`` / ``amp_fp16`` autocast to that dtype on ``device`` (CPU or CUDA), as
    CLIP_benchmark's ``--amp`` (``torch.autocast``) does around both towers."""
    device_type = torch.device(device).type
    resolved = resolve_eval_precision(precision, device)
    if resolved == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[resolved])


def _format(template: Template, classname: str) -> str:
    """One prompt: a callable template, or a ``{c}`` / ``{}`` format string."""
    if callable(template):
        return template(classname)
    return template.format(c=classname) if "{c}" in template else template.format(classname)


@torch.no_grad()
def zero_shot_classifier(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
    progress: bool = False,
    prompts_per_batch: int = 256,
) -> torch.Tensor:
    """Class weights [embed_dim, num_classes]: per class, normalise each template's text
    embedding, average over templates, normalise again (as open_clip builds it).

    The text tower sees all templates of ``max(1, prompts_per_batch // len(templates))`` classes
    per forward; the result is the per-class one.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classifier needs at least one class name and one template")
    per_batch = max(1, prompts_per_batch // len(templates))
    chunks = [classnames[i : i + per_batch] for i in range(0, len(classnames), per_batch)]
    weights = []
    for chunk in tqdm(chunks, desc="classifier", disable=not progress):
        tokens = tokenizer([_format(t, name) for name in chunk for t in templates]).to(device)
        emb_CTD = model.encode_text(tokens, normalize=True).reshape(len(chunk), len(templates), -1)
        weights.append(F.normalize(emb_CTD.mean(dim=1), dim=-1))
    return torch.cat(weights).T.contiguous()


def mean_per_class_recall(pred_B: torch.Tensor, labels_B: torch.Tensor, num_classes: int) -> float:
    """Recall averaged over the classes present in ``labels_B`` (sklearn's balanced accuracy,
    which CLIP_benchmark reports): a predicted class with no sample does not count."""
    recall_C = MulticlassRecall(num_classes, average="none")(pred_B, labels_B)
    present_C = torch.bincount(labels_B, minlength=num_classes) > 0
    return recall_C[present_C].mean().item()


def mean_average_precision(logits_BC: torch.Tensor, targets_BC: torch.Tensor) -> float:
    """Multilabel mAP as CLIP_benchmark reports it (``mean_average_precision``): per class the
    non-interpolated average precision of the scores against the 0/1 targets, averaged over
    all classes, a class without positives counting 0 (CLIP_benchmark's
    ``average_precision_per_class``; tied scores are grouped here, as sklearn does)."""
    num_classes = logits_BC.shape[1]
    metric = MultilabelAveragePrecision(num_classes, average="none", thresholds=None)
    ap_C = metric(logits_BC.float(), targets_BC.round().long())
    return torch.nan_to_num(ap_C, nan=0.0).mean().item()


@torch.no_grad()
def classification_metrics(
    logits_BC: torch.Tensor, labels_B: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """top-1, top-5 (micro) accuracy and mean per-class recall (over classes with samples).

    The second key is always ``top5``; with fewer than 5 classes it is top-``num_classes``
    accuracy (1.0). Multi-hot ``labels_BC`` (a multilabel set) give
    ``{"mean_average_precision": ...}`` instead, as CLIP_benchmark reports such sets.
    """
    if labels_B.ndim == 2:
        return {"mean_average_precision": mean_average_precision(logits_BC, labels_B)}
    top5 = min(5, num_classes)
    return {
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")(
            logits_BC, labels_B
        ).item(),
        "top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro")(
            logits_BC, labels_B
        ).item(),
        "mean_per_class_recall": mean_per_class_recall(
            logits_BC.argmax(dim=1), labels_B, num_classes
        ),
    }


@torch.no_grad()
def zero_shot_logits(
    model: CLIP,
    classifier_DC: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    progress: bool = False,
    keep_idx_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and labels [N] over ``batches`` of (images, labels).

    ``keep_idx_fn(images)`` may return the patch indices to encode (eval-time token keeping).
    """
    all_logits, all_labels = [], []
    for images, labels in tqdm(batches, desc="zero-shot", disable=not progress):
        images = images.to(device)
        keep = keep_idx_fn(images) if keep_idx_fn is not None else None
        emb = model.encode_image(images, keep, normalize=True)
        all_logits.append((100.0 * emb @ classifier_DC).float().cpu())
        all_labels.append(torch.as_tensor(labels).cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def zero_shot_evaluate(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: Dataset | IterableDataset,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    workers: int = 0,
) -> dict[str, float]:
    """Zero-shot metrics of ``model`` on a dataset of (image tensor, label), plus its size."""
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device, progress)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    logits, labels = zero_shot_logits(model, classifier, loader, device, progress)
    return classification_metrics(logits, labels, len(classnames)) | {"n": len(labels)}


def zero_shot_on_set(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    workers: int = 0,
    set_format: str | None = None,
) -> dict[str, float]:
    """Zero-shot metrics of ``model`` on the classification set at ``root``, read by the
    registered format ``set_format`` or, when None, by the one that claims ``root``
    (``aclip.data.sets.registry``) with its default options."""
    from aclip.data.sets.registry import resolve_set_format
    from aclip.data.views import eval_transform

    fmt = resolve_set_format(root, "classification", set_format)
    dataset, classnames, templates = fmt.load(root, eval_transform(image_size))
    return zero_shot_evaluate(
        model, tokenizer, dataset, classnames, templates, device, batch_size, progress, workers
    )


def zero_shot_on_wds(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    workers: int = 0,
) -> dict[str, float]:
    """Zero-shot metrics of ``model`` on a CLIP_benchmark wds classification set at ``root``."""
    return zero_shot_on_set(
        model, tokenizer, root, image_size, device, batch_size, progress, workers, "wds"
    )


def retrieval_on_set(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    set_format: str | None = None,
) -> dict[str, float]:
    """Image<->text recall@1/5/10 of ``model`` on the retrieval set at ``root``, read by the
    registered format ``set_format`` or, when None, by the one that claims ``root``
    (``aclip.data.sets.registry``) with its default options."""
    from aclip.data.sets.registry import resolve_set_format
    from aclip.data.sets.wds import retrieval_collate
    from aclip.data.views import eval_transform
    from aclip.eval.retrieval import evaluate_retrieval

    fmt = resolve_set_format(root, "retrieval", set_format)
    dataset = fmt.load(root, eval_transform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=retrieval_collate)
    return evaluate_retrieval(model, tokenizer, loader, device, progress=progress)


def retrieval_on_wds(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Image<->text recall@1/5/10 of ``model`` on a CLIP_benchmark wds retrieval set."""
    return retrieval_on_set(model, tokenizer, root, image_size, device, batch_size, progress, "wds")


def evaluate_sets(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    zeroshot_sets: Sequence[str],
    retrieval_sets: Sequence[str],
    image_size: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    extra: Sequence[tuple[str, Sequence[str], Callable[..., dict]]] = (),
    precision: str = "fp32",
) -> dict[str, dict]:
    """Every set: ``zeroshot/<set name>`` and ``retrieval/<set name>`` -> its metrics and the
    ``precision`` they were computed at (:func:`eval_autocast`, as the eval CLIs'
    ``--precision``); each set is read by the registered format that claims its path
    (:func:`zero_shot_on_set`, :func:`retrieval_on_set`: a wds set, an ImageFolder tree, a
    Karpathy json, ...); ``extra`` adds kinds as (kind, sets, fn) with fn called like
    :func:`zero_shot_on_set`.

    A set whose evaluation raises gets ``{"error": "<type>: <message>"}`` (also printed on
    stderr) and the others still run: a failed evaluation never loses a trained run.
    """
    resolved = resolve_eval_precision(precision, device)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        for kind, roots, fn in (
            ("zeroshot", zeroshot_sets, zero_shot_on_set),
            ("retrieval", retrieval_sets, retrieval_on_set),
            *extra,
        ):
            for root in roots:
                name = f"{kind}/{str(root).rstrip('/').split('/')[-1]}"
                try:
                    with eval_autocast(resolved, device):
                        metrics = fn(model, tokenizer, root, image_size, device, batch_size)
                    results[name] = metrics | {"precision": resolved}
                except Exception as err:  # recorded; the other sets still run
                    results[name] = {"error": f"{type(err).__name__}: {err}"}
                    print(f"warning: evaluation {name} ({root}) failed: {err}", file=sys.stderr)
    finally:
        model.train(was_training)
    return results
