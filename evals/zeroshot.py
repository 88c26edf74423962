"""Zero-shot classification of a checkpoint on a CLIP_benchmark wds set.

python -m evals.zeroshot --checkpoint runs/x --data path/to/wds_set [--ema] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aclip.checkpoint import load_eval_model
from aclip.evaluation import zero_shot_on_wds
from aclip.tokenizer import Tokenizer


def zeroshot(
    checkpoint: str,
    data: str,
    use_ema: bool = False,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Top-1 / top-5 / mean per-class recall of ``checkpoint`` on the wds set ``data``."""
    model, cfg = load_eval_model(checkpoint, use_ema=use_ema, device=device)
    tokenizer = Tokenizer(cfg.model.context_length)
    return zero_shot_on_wds(
        model, tokenizer, data, cfg.model.image_size, device, batch_size, progress
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: prints the metrics as JSON, optionally writes them to a file."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or tag dir")
    parser.add_argument("--data", required=True, help="CLIP_benchmark wds classification set")
    parser.add_argument("--ema", action="store_true", help="image side from the EMA teacher")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the metrics here")
    args = parser.parse_args(argv)
    try:
        metrics = zeroshot(args.checkpoint, args.data, args.ema, args.batch_size, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
