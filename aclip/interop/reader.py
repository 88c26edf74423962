"""The one reader of a model path: every entry point (the eval command lines, ``aclip.export``,
the demo report) loads a CLIP through :func:`load_model`, which decides what the path is with
:func:`aclip.interop.source.classify`: our run (read by :mod:`aclip.interop.run`, ``use_ema`` for
the teacher's image side), or anything :func:`aclip.interop.fit.load_clip` reads (an open_clip
folder, ``local-dir:DIR`` or ``hf-hub:org/name`` from the local cache, an open_clip file with its
model name, an OpenAI release file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aclip.config import Config
from aclip.interop.fit import load_clip
from aclip.interop.run import MODEL_STATES, load_eval_model
from aclip.interop.source import (
    ACLIP_RUN,
    HF_HUB,
    OPEN_CLIP_DIR,
    OPEN_CLIP_FILE,
    OPENAI_FILE,
    classify,
    hf_hub_folder,
    is_aclip_run,
)
from aclip.interop.weights import LOCAL_DIR, OPEN_CLIP_CONFIG, Preprocess, WeightsError
from aclip.model.clip import CLIP

RUN_PATHS = (
    f"a run directory, its checkpoints/ or a step directory holding {MODEL_STATES}, or that file"
)


@dataclass
class LoadedModel:
    """A CLIP (fp32, eval mode) with what its inputs need."""

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


EvalModel = LoadedModel  # its name in the eval command lines


def check_model_source(checkpoint: str | Path) -> None:
    """Refuse a model path that does not exist (before any data or model is read); an
    ``hf-hub:`` name that is not in the local Hugging Face cache (WeightsError)."""
    if str(checkpoint).startswith(HF_HUB):
        hf_hub_folder(str(checkpoint))
        return
    if not is_aclip_run(checkpoint) and not Path(str(checkpoint).removeprefix(LOCAL_DIR)).exists():
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint}: expected an aclip run ({RUN_PATHS}), an open_clip "
            "folder, an open_clip checkpoint (with --model-name) or an OpenAI release file"
        )


def load_model(
    checkpoint: str | Path,
    model_name: str | None = None,
    use_ema: bool = False,
    device: str | torch.device = "cpu",
    *,
    action: str = "evaluate",
) -> LoadedModel:
    """The CLIP at ``checkpoint``: an aclip run or any CLIP ``aclip.interop.load_clip`` reads.
    ``action`` names what the caller does with it in the refusal of an unreadable file.

    Raises:
        FileNotFoundError: nothing at ``checkpoint``.
        ValueError: ``use_ema`` or ``model_name`` where they do not apply; a file or folder that
            is neither an aclip checkpoint nor CLIP weights aclip.interop reads (with why).
    """
    check_model_source(checkpoint)
    source = classify(checkpoint, model_name)
    if source.kind == ACLIP_RUN:
        if model_name:
            raise ValueError(
                f"--model-name names the architecture of a bare weights file; {checkpoint} is an "
                "aclip run, which carries its own config"
            )
        clip, cfg = load_eval_model(checkpoint, use_ema=use_ema, device=device)
        preprocess = Preprocess(cfg.model.image_size)  # aclip's eval transform: OpenAI's stats
        return LoadedModel(clip, cfg.model.context_length, preprocess, "aclip", cfg)
    if use_ema:
        raise ValueError(f"--ema takes the EMA teacher of an aclip run; {checkpoint} is not one")
    if model_name and source.kind not in (OPEN_CLIP_FILE, OPENAI_FILE):
        raise ValueError(
            f"--model-name is for a bare weights file; the folder {checkpoint} names its model in "
            f"its {OPEN_CLIP_CONFIG}"
        )
    try:
        clip, cfg, preprocess = load_clip(checkpoint, model_name, device=device)
    except WeightsError as err:
        raise WeightsError(
            f"cannot {action} {checkpoint}: not an aclip checkpoint ({RUN_PATHS}), and "
            f"aclip.interop cannot read it as CLIP weights: {err}"
        ) from None
    kind = "open_clip" if source.kind in (OPEN_CLIP_DIR, OPEN_CLIP_FILE) else "openai"
    return LoadedModel(clip, cfg.context_length, preprocess, kind, None)
