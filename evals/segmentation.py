"""Training-free open-vocabulary semantic segmentation of an aclip run or an imported CLIP.

    python -m evals.segmentation --checkpoint RUN_OR_EXPORT --dataset voc21 --root DIR \\
        [--head clearclip|vanilla|maskclip|sclip|cliper|all|h1,h2] [--settings FILE] \\
        [--set key=value ...] [--limit N] [--json OUT] [--vis OUT.png] [--ema] [--model-name NAME]
        [--reduce-zero-label]

The model is read as every eval CLI reads it (``evals.common.load_model``): an aclip run (run dir,
checkpoints dir, tag dir) by ``aclip.interop.run.load_eval_model``; anything else (an open_clip
folder or checkpoint, an OpenAI release, an aclip export) by ``aclip.interop.load_clip``.
Settings: ``aclip.dense.settings.SegSettings`` defaults < the settings file (default
``configs/dense/<dataset>.yaml``) < ``--set``. Metrics (mmseg's ``IoUMetric`` counts): ``mIoU``,
``aAcc`` (pixel accuracy), ``mAcc``, per-class IoU, ``n`` images, and the ``precision`` the
model ran at (``--precision``: fp32 by default, as the trainer's ``eval.precision``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from aclip.data.sets.segmentation import DATASETS, SegmentationSet
from aclip.dense.evaluate import evaluate_heads, parse_heads, report, save_picture, table
from aclip.dense.heads import HEADS
from aclip.dense.settings import load_settings, resolve_templates
from aclip.eval.evaluate import resolve_eval_precision
from aclip.interop.safe_load import add_trust_argument
from aclip.tokenizer import Tokenizer
from evals.common import (  # noqa: F401 (is_aclip_run: re-exported)
    add_precision_arg,
    is_aclip_run,
    load_model,
)

SETTINGS_DIR = Path(__file__).resolve().parents[1] / "configs" / "dense"


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
    tokenizer = Tokenizer(model.context_length)
    computed, rows = evaluate_heads(
        model.clip, tokenizer, model.preprocess.mean, model.preprocess.std, data, settings,
        device=device, precision=precision, progress=progress, vis_count=vis_count if vis else 0,
    )  # fmt: skip
    if vis and rows:
        save_picture(rows, heads, vis, data.num_classes)
    return {h: report(computed[h], data, settings[h], settings_file)
            | {"precision": precision} for h in heads}  # fmt: skip


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
