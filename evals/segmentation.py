"""Training-free open-vocabulary semantic segmentation of an aclip run or an imported CLIP.

    python -m evals.segmentation --checkpoint RUN_OR_EXPORT --dataset voc21 --root DIR \\
        [--head clearclip|vanilla|maskclip|sclip|cliper|all|h1,h2] [--settings FILE] \\
        [--set key=value ...] [--limit N] [--json OUT] [--vis OUT.png] [--ema] [--model-name NAME]
        [--reduce-zero-label]

The model is read as every eval CLI reads it (``evals.common.load_model``): an aclip run (run dir,
checkpoints dir, tag dir) by ``aclip.train.checkpoint.load_eval_model``; anything else (an open_clip
folder or checkpoint, an OpenAI release, an aclip export) by ``aclip.interop.load_clip``.
Settings: ``aclip.dense.segment.SegSettings`` defaults < the settings file (default
``configs/dense/<dataset>.yaml``) < ``--set``. Metrics (mmseg's ``IoUMetric`` counts): ``mIoU``,
``aAcc`` (pixel accuracy), ``mAcc``, per-class IoU, ``n`` images, and the ``precision`` the
model ran at (``--precision``: fp32 by default, as the trainer's ``eval.precision``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from aclip.data.sets.segmentation import DATASETS, IGNORE_INDEX, SegmentationSet
from aclip.dense.heads import HEADS
from aclip.dense.segment import (
    Segmenter,
    SegMetric,
    SegSettings,
    load_settings,
    resolve_classnames,
    resolve_templates,
)
from aclip.eval.evaluate import eval_autocast, resolve_eval_precision
from aclip.interop.safe_load import add_trust_argument
from aclip.tokenizer import Tokenizer
from evals.common import (  # noqa: F401 (is_aclip_run: re-exported)
    add_precision_arg,
    is_aclip_run,
    load_model,
)

SETTINGS_DIR = Path(__file__).resolve().parents[1] / "configs" / "dense"


def parse_heads(spec: str) -> list[str]:
    """``all``, one head, or a comma-separated list, each one of :data:`aclip.dense.heads.HEADS`."""
    heads = list(HEADS) if spec == "all" else [h.strip() for h in spec.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEADS]
    if bad or not heads:
        raise ValueError(f"--head: {bad or spec!r} not among {', '.join(HEADS)} (or all)")
    return heads


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, each value read as YAML (``true``, ``0.5``, ``[a, b]``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def default_settings_file(dataset: str) -> Path | None:
    """``configs/dense/<dataset>.yaml`` when it exists."""
    path = SETTINGS_DIR / f"{dataset}.yaml"
    return path if path.is_file() else None


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


def segmentation(
    checkpoint: str,
    dataset: str,
    root: str,
    heads: list[str] | str = "clearclip",
    settings_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    use_ema: bool = False,
    model_name: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    vis: str | None = None,
    vis_count: int = 4,
    reduce_zero_label: bool = False,
    precision: str = "fp32",
) -> dict[str, dict[str, Any]]:
    """Metrics per head (``{head: {mIoU, aAcc, mAcc, IoU, n, settings, precision, ...}}``) of
    ``checkpoint`` on the segmentation set ``dataset`` at ``root``, the model run at
    ``precision`` (``aclip.eval.evaluate.eval_autocast``). Paths and settings are checked first."""
    precision = resolve_eval_precision(precision, device)
    heads = parse_heads(heads) if isinstance(heads, str) else list(heads)
    settings_file = settings_file or default_settings_file(dataset)
    settings = {h: load_settings(settings_file, h, overrides) for h in heads}
    data = SegmentationSet(dataset, root, split, limit, reduce_zero_label)
    for s in settings.values():
        resolve_templates(s.templates, data.templates)
    model = load_model(checkpoint, model_name, use_ema, device)
    clip, mean, std = model.clip, model.preprocess.mean, model.preprocess.std
    tokenizer = Tokenizer(model.context_length)
    cache: dict = {}  # text embedded once for the heads that share names and templates
    metrics = {h: SegMetric(data.num_classes) for h in heads}
    rows = []
    with eval_autocast(precision, device):
        segmenters = {h: _segmenter(clip, tokenizer, data, s, mean, std, device, cache)
                      for h, s in settings.items()}  # fmt: skip
        for i in tqdm(range(len(data)), desc="segmentation", disable=not progress):
            image, label, name = data[i]
            preds = {}
            for h, seg in segmenters.items():
                pred_HW, _ = seg.predict(image)
                preds[h] = pred_HW.cpu().numpy()
                metrics[h].update(preds[h], label)
            if vis and len(rows) < vis_count:
                rows.append((image, label, preds, name))
    if vis and rows:
        save_picture(rows, heads, vis, data.num_classes)
    return {h: _report(metrics[h].compute(), data, settings[h], settings_file)
            | {"precision": precision} for h in heads}  # fmt: skip


def _segmenter(clip, tokenizer, data, settings: SegSettings, mean, std, device, cache) -> Segmenter:
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


def _report(m: dict, data: SegmentationSet, settings: SegSettings, source) -> dict[str, Any]:
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="aclip run, export or pretrained CLIP")
    p.add_argument("--model-name", help="open_clip model name or config for a weights file")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--root", required=True, help="the dataset's folder (see aclip.data.sets.segmentation)"
    )
    p.add_argument("--split", help="split (default: the benchmark's validation split)")
    p.add_argument("--head", default="clearclip", help=f"{', '.join(HEADS)}, all, or a list")
    p.add_argument("--settings", help="settings YAML (default configs/dense/<dataset>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (repeatable), e.g. --set slide_crop=0")  # fmt: skip
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument(
        "--reduce-zero-label",
        action="store_true",
        help="generic layout: drop class 0 and ignore its pixels (as VOC20 from VOC21)",
    )
    p.add_argument("--ema", action="store_true", help="image side from the EMA teacher")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_arg(p)
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--vis", help="write a picture (image / ground truth / predictions) here")
    p.add_argument("--vis-count", type=int, default=4, help="images in the picture")
    p.add_argument("--no-progress", action="store_true")
    add_trust_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: prints mIoU / aAcc / mAcc per head as JSON and as a table; --json
    writes everything (per-class IoU, the settings used)."""
    args = _parser().parse_args(argv)
    try:
        results = segmentation(
            args.checkpoint, args.dataset, args.root, args.head, args.settings,
            parse_sets(args.set), split=args.split, limit=args.limit, use_ema=args.ema,
            model_name=args.model_name, device=args.device, progress=not args.no_progress,
            vis=args.vis, vis_count=args.vis_count, reduce_zero_label=args.reduce_zero_label,
            precision=args.precision,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    summary = {h: {k: m[k] for k in ("mIoU", "aAcc", "mAcc", "n")} for h, m in results.items()}
    print(json.dumps(summary, indent=2))
    print(f"\n{args.dataset} ({next(iter(results.values()))['n']} images)\n{table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
