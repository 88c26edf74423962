"""What the evaluation command lines share: the model to evaluate, model options, the JSON report.

Every eval CLI evaluates any CLIP through :func:`load_model`, the one reader
(:func:`aclip.interop.reader.load_model`): an aclip run (run directory, its ``checkpoints/``, a
step directory or the model-states file; ``--ema`` for the teacher's image side) or anything
``aclip.interop.load_clip`` reads: an open_clip folder (``local-dir:DIR``, ``hf-hub:org/name``
from the local Hugging Face cache, or a folder holding ``open_clip_config.json``, e.g. an aclip
export), an open_clip checkpoint with ``--model-name`` (its registry name or its
``open_clip_config.json``), or an OpenAI release file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from aclip.config import EVAL_PRECISIONS
from aclip.interop.reader import EvalModel, LoadedModel, check_model_source, load_model
from aclip.interop.safe_load import add_trust_argument
from aclip.interop.source import is_aclip_run

__all__ = [
    "EvalModel",
    "LoadedModel",
    "add_model_args",
    "add_precision_arg",
    "check_model_source",
    "is_aclip_run",
    "load_model",
    "report",
]


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """--precision: the evaluation's arithmetic, the rule of the trainer's ``eval.precision``
    (``aclip.eval.evaluate.eval_autocast``); the results JSON records it."""
    parser.add_argument(
        "--precision",
        choices=EVAL_PRECISIONS,
        default="fp32",
        help="fp32 (default: the fp32 weights, exact), amp_bf16 / amp_fp16 (autocast), amp "
        "(CLIP_benchmark's default autocast: fp16 on CUDA, bf16 on CPU); as eval.precision",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --model-name, --ema, --batch-size, --workers, --device, --precision,
    --json and --trust-checkpoint, as every eval CLI takes them."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="aclip run (run dir, checkpoints dir or step dir), open_clip folder (e.g. an aclip "
        "export; local-dir:DIR, hf-hub:org/name from the local cache), open_clip checkpoint "
        "(with --model-name) or OpenAI release file",
    )
    parser.add_argument(
        "--model-name",
        help="open_clip model name (e.g. ViT-B-16) or open_clip_config.json of a weights file",
    )
    parser.add_argument("--ema", action="store_true", help="image side from the EMA teacher")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_arg(parser)
    parser.add_argument("--json", help="write the metrics here")
    add_trust_argument(parser)


def report(compute: Callable[[], dict], json_path: str | None) -> int:
    """Run ``compute``; print its metrics as JSON (and write them to ``json_path``).

    A missing path or bad input prints ``error: …`` on stderr and returns exit code 2.
    """
    try:
        metrics = compute()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text)
    return 0
