"""Region zero-shot classification of a checkpoint: Alpha-CLIP's ImageNet-S protocol.

    python -m evals.region --checkpoint runs/x --data path/to/wds_region_set [--json out.json]
    python -m evals.region --checkpoint runs/x --imagenet-s ImageNetS919 \\
                           [--split validation] [--classnames wordnet|openai|FILE]

Rows (see ``aclip.eval.region``): full image without alpha, all-ones alpha, the region cropped to
its box, background blacked out, the region as alpha; each with mean per-class top-1 and top-5
(%). ``--checkpoint``: an aclip run or any CLIP ``evals.common`` reads (the one model reader,
``aclip.interop.reader``); a model without an alpha channel has no all-ones and alpha rows.
Prints a table and the metrics as JSON (``--json`` writes them; ``precision``: ``--precision``,
fp32 by default, as the trainer's ``eval.precision``); bad input exits 2 with ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aclip.data.sets.regions import ImageNetS, WdsRegionSet, imagenet_s_classnames
from aclip.eval.evaluate import eval_autocast, resolve_eval_precision
from aclip.eval.region import TEMPLATE, format_table, region_zeroshot
from aclip.tokenizer import Tokenizer
from evals.common import add_model_args, check_model_source, load_model


def region_eval(
    checkpoint: str,
    data: str | None = None,
    imagenet_s: str | None = None,
    *,
    split: str | None = None,
    classnames: str = "wordnet",
    template: str = TEMPLATE,
    use_ema: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    workers: int = 0,
    precision: str = "fp32",
    model_name: str | None = None,
) -> dict[str, object]:
    """The region rows of ``checkpoint`` on a wds region set ``data`` or an ImageNet-S root,
    at ``precision`` (``aclip.eval.evaluate.eval_autocast``, recorded in the result); the set is
    read and checked before the model loads."""
    precision = resolve_eval_precision(precision, device)
    if (data is None) == (imagenet_s is None):
        raise ValueError("give either a wds region set (--data) or an ImageNet-S root")
    check_model_source(checkpoint)
    if data is not None:
        dataset = WdsRegionSet(data, split or "test")
        names = dataset.classnames
    else:
        dataset = ImageNetS(imagenet_s, split or "validation")
        names = imagenet_s_classnames(dataset.wnids, classnames)
    model = load_model(checkpoint, model_name, use_ema, device)
    tokenizer = Tokenizer(model.context_length)
    with eval_autocast(precision, device):
        results = region_zeroshot(model.clip, tokenizer, dataset, names, model.preprocess.size,
                                  [template], device, batch_size, progress, workers)  # fmt: skip
    if isinstance(dataset, ImageNetS):
        results["left_out_no_region"] = len(dataset) - int(results["n"])
    alpha = model.clip.visual.alpha_conv is not None
    return results | {"template": template, "alpha_channel": alpha, "precision": precision}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="CLIP_benchmark-style wds set with .mask.png per sample")
    source.add_argument("--imagenet-s", help="ImageNet-S root (e.g. ImageNetS919)")
    parser.add_argument("--split", help="test (wds) / validation (ImageNet-S) by default")
    parser.add_argument(
        "--classnames", default="wordnet", help="ImageNet-S: wordnet (official), openai, or a file"
    )
    parser.add_argument("--template", default=TEMPLATE, help="prompt, {} for the class name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(parser)
    parser.set_defaults(batch_size=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: the table on stdout, then the metrics as JSON."""
    parser = _parser()
    args = parser.parse_args(argv)
    if "{}" not in args.template:
        print(f"error: --template must hold {{}} for the class name (got {args.template!r})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        results = region_eval(
            args.checkpoint, args.data, args.imagenet_s, split=args.split,
            classnames=args.classnames, template=args.template, use_ema=args.ema,
            model_name=args.model_name,
            batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
            workers=args.workers, precision=args.precision,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
