"""Zero-shot classification, computed the way open_clip / CLIP_benchmark compute it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall
from tqdm import tqdm

from aclip.model.clip import CLIP


def _format(template: str, classname: str) -> str:
    return template.format(c=classname) if "{c}" in template else template.format(classname)


@torch.no_grad()
def zero_shot_classifier(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Class weights [embed_dim, num_classes]: per class, normalise each template's text
    embedding, average over templates, normalise again (as open_clip builds it)."""
    weights = []
    for name in tqdm(classnames, desc="classifier", disable=not progress):
        tokens = tokenizer([_format(t, name) for t in templates]).to(device)
        emb = model.encode_text(tokens, normalize=True).mean(dim=0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def classification_metrics(
    logits_BC: torch.Tensor, labels_B: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """top-1, top-5 (micro) accuracy and mean per-class recall, via torchmetrics."""
    top5 = min(5, num_classes)
    return {
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")(
            logits_BC, labels_B
        ).item(),
        f"top{top5}": MulticlassAccuracy(num_classes, top_k=top5, average="micro")(
            logits_BC, labels_B
        ).item(),
        "mean_per_class_recall": MulticlassRecall(num_classes, average="macro")(
            logits_BC, labels_B
        ).item(),
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


def zero_shot_on_wds(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot metrics of ``model`` on a CLIP_benchmark wds classification set at ``root``."""
    from torch.utils.data import DataLoader

    from aclip.data.evalsets import load_wds_classification
    from aclip.data.views import eval_transform

    dataset, classnames, templates = load_wds_classification(root, eval_transform(image_size))
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device, progress)
    loader = DataLoader(dataset, batch_size=batch_size)
    logits, labels = zero_shot_logits(model, classifier, loader, device, progress)
    return classification_metrics(logits, labels, len(classnames)) | {"n": len(labels)}


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
    from torch.utils.data import DataLoader

    from aclip.data.evalsets import load_wds_retrieval, retrieval_collate
    from aclip.data.views import eval_transform
    from aclip.retrieval import evaluate_retrieval

    dataset = load_wds_retrieval(root, eval_transform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=retrieval_collate)
    return evaluate_retrieval(model, tokenizer, loader, device, progress=progress)


def evaluate_sets(
    model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor], cfg, device
) -> dict[str, dict[str, float]]:
    """Every configured set: ``zeroshot/<set name>`` and ``retrieval/<set name>``."""
    was_training = model.training
    model.eval()
    results = {}
    for kind, roots, fn in (
        ("zeroshot", cfg.eval.zeroshot_sets, zero_shot_on_wds),
        ("retrieval", cfg.eval.retrieval_sets, retrieval_on_wds),
    ):
        for root in roots:
            name = root.rstrip("/").split("/")[-1]
            results[f"{kind}/{name}"] = fn(
                model, tokenizer, root, cfg.model.image_size, device, cfg.eval.batch_size
            )
    model.train(was_training)
    return results
