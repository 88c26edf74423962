"""What the evaluation command lines share: the model to evaluate, model options, the JSON report.

Every eval CLI evaluates any CLIP through :func:`load_model`: an aclip run (run directory, its
``checkpoints/``, a step directory or the model-states file; read by
``aclip.train.checkpoint.load_eval_model``, ``--ema`` for the teacher's image side) or anything
``aclip.interop.load_clip`` reads: an open_clip folder (``local-dir:DIR`` or a folder holding
``open_clip_config.json``, e.g. an aclip export), an open_clip checkpoint with ``--model-name``
(its registry name or its ``open_clip_config.json``), or an OpenAI release file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aclip.config import EVAL_PRECISIONS, Config
from aclip.interop import LOCAL_DIR, OPEN_CLIP_CONFIG, Preprocess, WeightsError, load_clip
from aclip.interop.safe_load import add_trust_argument
from aclip.model.clip import CLIP
from aclip.train.checkpoint import MODEL_STATES, find_checkpoint, load_eval_model

ACLIP_RUN = (
    f"a run directory, its checkpoints/ or a step directory holding {MODEL_STATES}, or that file"
)


@dataclass
class EvalModel:
    """A CLIP to evaluate (fp32, eval mode) with what its inputs need."""

    clip: CLIP
    context_length: int
    preprocess: Preprocess  # image size, normalisation, resize
    source: str  # aclip (a training run) | openai | open_clip
    run_config: Config | None = None  # the run's config (aclip runs)

    @property
    def transform(self) -> Callable:
        """The evaluation transform of a PIL image (aclip's for aclip runs; the model's own
        ``preprocess_cfg`` for an imported one)."""
        return self.preprocess.transform()

    @property
    def is_aclip_run(self) -> bool:
        """Whether the model is an aclip training run (which has an EMA teacher to select with)."""
        return self.source == "aclip"


def is_aclip_run(path: str | Path) -> bool:
    """Whether ``path`` is an aclip training checkpoint (run, checkpoints or tag directory, or
    the model-states file) rather than a file or folder for ``aclip.interop.load_clip``."""
    path = Path(path)
    if path.is_file():
        return path.name == MODEL_STATES
    try:
        find_checkpoint(path)
    except FileNotFoundError:
        return False
    return True


def check_model_source(checkpoint: str | Path) -> None:
    """Refuse a model path that does not exist (before any data or model is read)."""
    if not is_aclip_run(checkpoint) and not Path(str(checkpoint).removeprefix(LOCAL_DIR)).exists():
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint}: expected an aclip run ({ACLIP_RUN}), an open_clip "
            "folder, an open_clip checkpoint (with --model-name) or an OpenAI release file"
        )


def load_model(
    checkpoint: str | Path,
    model_name: str | None = None,
    use_ema: bool = False,
    device: str | torch.device = "cpu",
) -> EvalModel:
    """The CLIP at ``checkpoint``: an aclip run or any CLIP ``aclip.interop.load_clip`` reads.

    Raises:
        FileNotFoundError: nothing at ``checkpoint``.
        ValueError: ``use_ema`` or ``model_name`` where they do not apply; a file or folder that
            is neither an aclip checkpoint nor CLIP weights aclip.interop reads (with why).
    """
    if is_aclip_run(checkpoint):
        if model_name:
            raise ValueError(
                f"--model-name names the architecture of a bare weights file; {checkpoint} is an "
                "aclip run, which carries its own config"
            )
        clip, cfg = load_eval_model(checkpoint, use_ema=use_ema, device=device)
        preprocess = Preprocess(cfg.model.image_size)  # aclip's eval transform: OpenAI's stats
        return EvalModel(clip, cfg.model.context_length, preprocess, "aclip", cfg)
    check_model_source(checkpoint)
    folder = Path(str(checkpoint).removeprefix(LOCAL_DIR))
    if use_ema:
        raise ValueError(f"--ema takes the EMA teacher of an aclip run; {checkpoint} is not one")
    if model_name and (str(checkpoint).startswith(LOCAL_DIR) or folder.is_dir()):
        raise ValueError(
            f"--model-name is for a bare weights file; the folder {checkpoint} names its model in "
            f"its {OPEN_CLIP_CONFIG}"
        )
    try:
        weights = load_clip(checkpoint, model_name, device=device)
    except WeightsError as err:
        raise WeightsError(
            f"cannot evaluate {checkpoint}: not an aclip checkpoint ({ACLIP_RUN}), and "
            f"aclip.interop cannot read it as CLIP weights: {err}"
        ) from None
    clip, cfg, preprocess = weights
    source = "open_clip" if model_name or folder.is_dir() else "openai"
    return EvalModel(clip, cfg.context_length, preprocess, source)


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
        "export), open_clip checkpoint (with --model-name) or OpenAI release file",
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
