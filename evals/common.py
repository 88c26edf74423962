"""What the evaluation command lines share: model options and the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--ema, --batch-size, --workers, --device and --json, as every eval CLI takes them."""
    parser.add_argument("--ema", action="store_true", help="image side from the EMA teacher")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the metrics here")


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
