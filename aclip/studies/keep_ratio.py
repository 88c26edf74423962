"""Eval-time token keep ratio of one model: zero-shot accuracy and speed per strategy and ratio.

Zero-shot top-1/top-5 and images/s (image tower, teacher pass included) per strategy and keep
ratio: ``attentive`` keeps the top-k patches by the EMA tower's relevance on the eval image,
``random`` a seeded random subset; keep ratio 1.0 is the all-tokens row ("none"). A model that
is not an aclip run (an open_clip or OpenAI CLIP) has no EMA teacher: its ``attentive``
relevance comes from the model's own vision tower (all tokens, on the same image), which the
rows say (``relevance_from``). ``python -m evals.keep_ratio checkpoint`` is its command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from aclip.data.sets.wds import load_wds_classification
from aclip.eval.evaluate import (
    classification_metrics,
    eval_autocast,
    resolve_eval_precision,
    zero_shot_classifier,
    zero_shot_logits,
)
from aclip.interop.reader import EvalModel, check_model_source, load_model
from aclip.interop.run import load_eval_model
from aclip.methods.tokens import num_keep, random_keep, topk_keep
from aclip.model.clip import CLIP
from aclip.model.vision import VisionTower
from aclip.tokenizer import Tokenizer

KeepFn = Callable[[torch.Tensor], torch.Tensor]


def eval_points(strategies: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float]]:
    """(strategy, keep ratio) to evaluate: all tokens ("none", 1.0) first, then every strategy
    at every ratio below 1, ratios descending."""
    if any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"keep ratios must be in (0, 1], got {list(ratios)}")
    below = sorted({r for r in ratios if r < 1.0}, reverse=True)
    return [("none", 1.0)] + [(s, r) for s in strategies for r in below]


def attentive_keep(teacher: VisionTower, images: torch.Tensor, k: int) -> torch.Tensor:
    """The k patches with the highest CLS relevance of ``teacher`` on ``images`` themselves.

    At eval time the EMA view is the eval image (its box is the whole image), so the relevance
    lies on the eval grid as it is: no box mapping is needed.
    """
    _, relevance_BN = teacher.forward_with_relevance(images)
    return topk_keep(relevance_BN, k, teacher.grid_hw)


def keep_fn(
    strategy: str,
    keep_ratio: float,
    grid_hw: tuple[int, int],
    teacher: VisionTower | None = None,
    seed: int = 0,
) -> KeepFn | None:
    """``images -> LongTensor[B, k]`` for ``strategy`` at ``keep_ratio``; None keeps all tokens.

    ``random`` draws from one CPU generator seeded with ``seed`` (same indices on any device);
    ``attentive`` needs the EMA ``teacher`` vision tower.
    """
    num_patches = grid_hw[0] * grid_hw[1]
    k = num_keep(num_patches, keep_ratio)
    if strategy == "none" or k == num_patches:
        return None
    if strategy == "random":
        gen = torch.Generator().manual_seed(seed)
        return lambda x: random_keep(
            len(x), num_patches, k, grid_hw, generator=gen, device=x.device
        )
    if strategy == "attentive":
        if teacher is None:
            raise ValueError("attentive selection needs the EMA teacher's vision tower")
        return lambda x: attentive_keep(teacher, x, k)
    raise ValueError(f"unknown strategy {strategy!r}; expected none, random or attentive")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedImageEncoder:
    """Stands in for the CLIP in ``zero_shot_logits``: selects the tokens of each batch (teacher
    pass included), encodes them and times both with ``time.perf_counter``."""

    def __init__(self, clip: CLIP, select: KeepFn | None) -> None:
        self.clip, self.select = clip, select
        self.seconds: list[float] = []
        self.images: list[int] = []

    def encode_image(
        self, images: torch.Tensor, keep_idx_BK: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """``clip.encode_image`` on the tokens ``select`` keeps (or ``keep_idx_BK``), timed."""
        _sync(images.device)
        start = time.perf_counter()
        keep = self.select(images) if self.select is not None else keep_idx_BK
        emb = self.clip.encode_image(images, keep, normalize)
        _sync(images.device)
        self.seconds.append(time.perf_counter() - start)
        self.images.append(len(images))
        return emb

    def images_per_s(self) -> float:
        """Encoded images per second, the first (warm-up) batch left out when there are more."""
        skip = 1 if len(self.seconds) > 1 else 0
        return sum(self.images[skip:]) / max(sum(self.seconds[skip:]), 1e-12)


def evaluate_point(
    clip: CLIP,
    classifier_DC: torch.Tensor,
    loader: Iterable,
    num_classes: int,
    select: KeepFn | None,
    device: torch.device,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 (%) and images/s of ``clip`` keeping the tokens ``select`` picks."""
    encoder = TimedImageEncoder(clip, select)
    logits, labels = zero_shot_logits(encoder, classifier_DC, loader, device)  # type: ignore[arg-type]
    metrics = classification_metrics(logits, labels, num_classes)
    return {
        "top1": 100.0 * metrics["top1"],
        "top5": 100.0 * metrics["top5"],
        "images_per_s": encoder.images_per_s(),
        "n": len(labels),
    }


def checkpoint_sweep(
    checkpoint: str | Path,
    data: str | Path,
    keep_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    strategies: Sequence[str] = ("attentive", "random"),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    workers: int = 0,
    model_name: str | None = None,
    precision: str = "fp32",
) -> list[dict]:
    """Zero-shot accuracy and speed of one model at each eval-time keep ratio and strategy,
    the towers run at ``precision`` (``aclip.eval.evaluate.eval_autocast``; each row records it).

    The online model is evaluated on the wds classification set at ``data``; ``attentive``
    keeps the patches the checkpoint's EMA vision tower finds most relevant on the same image
    (a model that is not an aclip run, e.g. an OpenAI or open_clip CLIP: its own vision tower).
    One row per (strategy, keep ratio) plus the all-tokens row ("none", 1.0), as dicts with
    strategy, keep_ratio, kept_tokens, top1, top5 (%), images_per_s, n, relevance_from
    (``ema_teacher`` / ``own_tower`` for attentive rows, empty otherwise) and precision.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from aclip.data.sets.wds import check_eval_set

    precision = resolve_eval_precision(precision, device)
    check_model_source(checkpoint)  # refuse missing paths before loading any model
    if check_eval_set(data, "zeroshot") == "multilabel":
        raise ValueError(f"{data} is a multilabel set; the keep-ratio sweep reports top-1/top-5 "
                         "and needs a single-label classification set")  # fmt: skip
    device = torch.device(device)
    model = load_model(checkpoint, model_name, device=device)
    clip, teacher, relevance_from = model.clip, None, ""
    if "attentive" in strategies:
        teacher, relevance_from = _relevance_tower(checkpoint, model, device)
    dataset, classnames, templates = load_wds_classification(data, model.transform)
    tokenizer = Tokenizer(model.context_length)
    with eval_autocast(precision, device):
        classifier = zero_shot_classifier(clip, tokenizer, classnames, templates, device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    grid_hw, rows = clip.visual.grid_hw, []
    for strategy, ratio in tqdm(eval_points(strategies, keep_ratios), desc="keep ratios"):
        select = keep_fn(strategy, ratio, grid_hw, teacher, seed)
        with eval_autocast(precision, device):
            result = evaluate_point(clip, classifier, loader, len(classnames), select, device)
        kept = num_keep(clip.visual.num_patches, ratio)
        source = relevance_from if strategy == "attentive" else ""
        rows.append({"strategy": strategy, "keep_ratio": ratio, "kept_tokens": kept} | result
                    | {"relevance_from": source, "precision": precision})  # fmt: skip
    return rows


def _relevance_tower(
    checkpoint: str | Path, model: EvalModel, device: torch.device
) -> tuple[VisionTower, str]:
    """The tower whose CLS relevance picks the attentive tokens: an aclip run's EMA teacher, or
    (for any other CLIP, which has none) the model's own vision tower."""
    if model.is_aclip_run:
        return load_eval_model(checkpoint, use_ema=True, device=device)[0].visual, "ema_teacher"
    return model.clip.visual, "own_tower"
