"""Zero-shot classification of any CLIP, counted as open_clip / CLIP_benchmark count it.

    python -m evals.zeroshot --checkpoint runs/x --data path/to/wds_set [--ema] [--json out.json]
    python -m evals.zeroshot --checkpoint runs/x --imagefolder imagenet/val \\
                             [--classnames names.txt] [--templates openai|simple|FILE]
    python -m evals.zeroshot --checkpoint exports/x --data ...            (an open_clip folder)
    python -m evals.zeroshot --checkpoint ViT-B-16.pt --data ...          (an OpenAI release)
    python -m evals.zeroshot --checkpoint model.safetensors --model-name ViT-B-16 --data ...

``--checkpoint``: an aclip run, or any CLIP ``aclip.interop.load_clip`` reads (see
``evals.common``); an imported model is evaluated with its own preprocessing (``preprocess_cfg``).

``--data``: a set of any registered classification format, found by its layout
(``aclip.data.sets.registry``): a CLIP_benchmark wds set, an ImageFolder tree, ...;
``--imagefolder`` names the ImageFolder format explicitly.

``aclip-zeroshot`` (installed with the package) takes the same arguments.

An ImageFolder tree of the 1000 ImageNet WordNet-id folders takes open_clip's ImageNet class
names; any other tree takes its folder names (underscores as spaces) or ``--classnames``.
Metrics: top1, top5 (micro accuracy; top-min(5, C) with C < 5 classes, the key stays top5),
mean_per_class_recall, n (images evaluated) and precision (``--precision``: fp32 by default,
amp_bf16 / amp_fp16 / amp autocast; the rule of the trainer's ``eval.precision``). A
multilabel set (CLIP_benchmark's ``.npy`` labels, e.g. VOC2007 multilabel) gives
mean_average_precision, n and precision, as CLIP_benchmark does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from aclip.data.sets.registry import prepare_set
from aclip.eval.evaluate import eval_autocast, resolve_eval_precision, zero_shot_evaluate
from aclip.tokenizer import Tokenizer
from evals.common import add_model_args, check_model_source, load_model, report

# transform -> (dataset, class names, templates)
SetBuilder = Callable[[Callable], tuple]
DEFAULT_TEMPLATES = "openai"


def _set_builder(
    data: str | None, imagefolder: str | None, classnames: str | None, templates: str
) -> SetBuilder:
    """Check the evaluation set's paths now (before the model loads); return its builder.
    ``data``: any registered classification format (``aclip.data.sets.registry``), found by its
    layout; ``imagefolder``: an ImageFolder tree."""
    if (data is None) == (imagefolder is None):
        raise ValueError("give either an evaluation set (data) or an image folder (imagefolder)")
    path, format_name = (data, None) if data is not None else (imagefolder, "imagefolder")
    prompts = None if templates == DEFAULT_TEMPLATES else templates
    return prepare_set(
        path, "classification", format_name, classnames=classnames, templates=prompts
    )


def zeroshot(
    checkpoint: str,
    data: str | None = None,
    use_ema: bool = False,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    *,
    imagefolder: str | None = None,
    classnames: str | None = None,
    templates: str = "openai",
    workers: int = 0,
    model_name: str | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Top-1 / top-5 / mean per-class recall of ``checkpoint`` (an aclip run or any CLIP
    ``evals.common.load_model`` reads; ``model_name`` for an open_clip weights file) on the set
    ``data`` (any registered format) or the ImageFolder tree ``imagefolder``, plus the number
    of images and the ``precision`` (``aclip.eval.evaluate.eval_autocast``). Paths are checked
    first."""
    precision = resolve_eval_precision(precision, device)
    check_model_source(checkpoint)
    build_set = _set_builder(data, imagefolder, classnames, templates)
    model = load_model(checkpoint, model_name, use_ema, device)
    dataset, names, prompts = build_set(model.transform)
    tokenizer = Tokenizer(model.context_length)
    with eval_autocast(precision, device):
        metrics = zero_shot_evaluate(
            model.clip, tokenizer, dataset, names, prompts, device, batch_size, progress, workers
        )
    return metrics | {"precision": precision}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", help="evaluation set of any registered format: wds set, ImageFolder tree, ..."
    )
    source.add_argument("--imagefolder", help="ImageFolder tree root/<class>/<image>")
    parser.add_argument("--classnames", help="image folder: file with one class name per line")
    parser.add_argument(
        "--templates",
        default=DEFAULT_TEMPLATES,
        help="image folder: openai (80), simple (7) or a file",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: prints the metrics as JSON, optionally writes them to a file."""
    parser = _parser()
    args = parser.parse_args(argv)
    return report(
        lambda: zeroshot(
            args.checkpoint,
            args.data,
            args.ema,
            args.batch_size,
            args.device,
            not args.no_progress,
            imagefolder=args.imagefolder,
            classnames=args.classnames,
            templates=args.templates,
            workers=args.workers,
            model_name=args.model_name,
            precision=args.precision,
        ),  # fmt: skip
        args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
