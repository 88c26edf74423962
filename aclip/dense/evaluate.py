"""A segmentation benchmark run: every head's segmenter over one dataset, the metrics per head
(:class:`aclip.dense.metric.SegMetric`), their report and table, and a picture of predictions.
The command line is ``python -m evals.segmentation``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from tqdm import tqdm

from aclip.data.sets.segmentation import IGNORE_INDEX, SegmentationSet
from aclip.dense.heads import HEADS
from aclip.dense.metric import SegMetric
from aclip.dense.segment import Segmenter
from aclip.dense.settings import SegSettings, resolve_classnames, resolve_templates
from aclip.eval.evaluate import eval_autocast
from aclip.model.clip import CLIP


def parse_heads(spec: str) -> list[str]:
    """``all``, one head, or a comma-separated list, each one of :data:`aclip.dense.heads.HEADS`."""
    heads = list(HEADS) if spec == "all" else [h.strip() for h in spec.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEADS]
    if bad or not heads:
        raise ValueError(f"--head: {bad or spec!r} not among {', '.join(HEADS)} (or all)")
    return heads


def evaluate_heads(
    clip: CLIP,
    tokenizer: Callable[[list[str]], Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    data: SegmentationSet,
    settings: dict[str, SegSettings],
    *,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    vis_count: int = 0,
) -> tuple[dict[str, dict[str, Any]], list[tuple]]:
    """Every head of ``settings`` over ``data``, the model run at ``precision``
    (``aclip.eval.evaluate.eval_autocast``): ``SegMetric.compute()`` per head, and the first
    ``vis_count`` images' ``(image, label, {head: prediction}, name)`` for :func:`save_picture`."""
    heads = list(settings)
    cache: dict = {}  # text embedded once for the heads that share names and templates
    metrics = {h: SegMetric(data.num_classes) for h in heads}
    rows = []
    with eval_autocast(precision, device):
        segmenters = {h: build_segmenter(clip, tokenizer, data, s, mean, std, device, cache)
                      for h, s in settings.items()}  # fmt: skip
        for i in tqdm(range(len(data)), desc="segmentation", disable=not progress):
            image, label, name = data[i]
            preds = {}
            for h, seg in segmenters.items():
                pred_HW, _ = seg.predict(image)
                preds[h] = pred_HW.cpu().numpy()
                metrics[h].update(preds[h], label)
            if vis_count and len(rows) < vis_count:
                rows.append((image, label, preds, name))
    return {h: metrics[h].compute() for h in heads}, rows


def build_segmenter(
    clip, tokenizer, data, settings: SegSettings, mean, std, device, cache
) -> Segmenter:
    """One head's :class:`Segmenter` for ``data`` (its class names, templates and background as
    ``settings`` pick them; the Stable Diffusion affinity where ``settings.refine`` asks)."""
    sd = None
    if settings.refine != "none":
        from aclip.dense.sd import SDAffinity

        sd = SDAffinity.from_folder(settings.sd_model, device, time_step=settings.sd_time_step,
                                    seed=settings.sd_seed)  # fmt: skip
    classnames = resolve_classnames(settings.classnames, data.dataset, data.classnames,
                                    data.background)  # fmt: skip
    templates = resolve_templates(settings.templates, data.templates)
    return Segmenter(clip, tokenizer, classnames, settings, templates, data.background, mean,
                     std, device, sd, cache)  # fmt: skip


def report(m: dict, data: SegmentationSet, settings: SegSettings, source) -> dict[str, Any]:
    """One head's metrics ``m`` as reported: per-class IoU by name, the settings used."""
    names = [n.split(",")[0].strip() for n in data.classnames]
    return {
        "dataset": data.dataset,
        "mIoU": m["mIoU"],
        "aAcc": m["aAcc"],
        "mAcc": m["mAcc"],
        "n": m["n"],
        "IoU": dict(zip(names, m["IoU"], strict=True)),
        "settings": asdict(settings),
        "settings_file": str(source) if source else None,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of mIoU / pixel accuracy / mAcc per head (in %)."""
    lines = ["| head | mIoU | pixel acc. | mAcc |", "|---|---|---|---|"]
    for head, m in results.items():
        lines.append(f"| {head} | {100 * m['mIoU']:.1f} | {100 * m['aAcc']:.1f} | "
                     f"{100 * m['mAcc']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def _palette(num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, size=(256, 3)).astype(np.uint8)
    colours[0] = (0, 0, 0)
    colours[IGNORE_INDEX] = (255, 255, 255)
    return colours


def save_picture(rows: list[tuple], heads: list[str], path: str | Path, num_classes: int) -> None:
    """One row per image: the image, its ground truth, then each head's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = _palette(num_classes)
    cols = 2 + len(heads)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.2 * len(rows)), squeeze=False)
    for r, (image, label, preds, name) in enumerate(rows):
        tiles = [np.asarray(image), palette[label]] + [palette[preds[h]] for h in heads]
        titles = [name, "ground truth"] + heads
        for c, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
            axes[r][c].imshow(tile)
            axes[r][c].set_title(title, fontsize=8)
            axes[r][c].axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
