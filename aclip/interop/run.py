"""Our run, read for evaluation, export and interop: a training run's checkpoint found from any
of its paths and its CLIP read back, without running code and without the trainer.

A run's checkpoint is DeepSpeed's tag directory ``checkpoints/step_NNNNNNNN/`` (written by
:mod:`aclip.train.checkpoint`); its ``mp_rank_00_model_states.pt`` holds the student's weights
(``module``), the run's ``config`` (YAML) and the method's state (A-CLIP's EMA teacher as ``ema``).
A bf16/fp16 run's fp32 weights are the master weights its ZeRO optimizer states keep.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aclip.config import Config, config_from_yaml
from aclip.interop.safe_load import CheckpointError, UnsafeCheckpointError, deepspeed_reads_safe
from aclip.interop.safe_load import load as safe_load
from aclip.model import build_clip
from aclip.model.clip import CLIP

MODEL_STATES = "mp_rank_00_model_states.pt"
IMAGE_SIDE = ("visual", "image_proj")


def find_checkpoint(path: str | Path) -> Path:
    """The model-states file behind ``path``: a run dir, its checkpoints dir, a tag dir or the file.

    A directory holding a ``latest`` file (DeepSpeed's pointer) resolves to the tag it names.
    """
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoints", path):
        latest = candidate / "latest"
        if latest.is_file():
            path = candidate / latest.read_text().strip()
            break
    states = path / MODEL_STATES
    if not states.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (looked for {MODEL_STATES} or 'latest')")
    return states


def read_model_states(file: Path) -> dict:
    """The dict an aclip checkpoint's model-states file holds (``module``, ``config``, ...), read
    without running code (:mod:`aclip.interop.safe_load`). CheckpointError (a ValueError) naming
    ``file`` when it is not one (another project's checkpoint, a bare state dict, an image or
    other non-checkpoint file, said by its magic bytes) or holds types that could run code
    (UnsafeCheckpointError)."""
    try:
        states = safe_load(file)
    except UnsafeCheckpointError:
        raise  # names the file and the types it would build
    except CheckpointError as err:
        raise CheckpointError(
            f"not an aclip checkpoint: {err}; expected a run directory, its checkpoints/ or a "
            f"step directory holding {MODEL_STATES}"
        ) from None
    missing = [k for k in ("module", "config") if not isinstance(states, dict) or k not in states]
    if missing:
        found = sorted(states)[:8] if isinstance(states, dict) else type(states).__name__
        raise CheckpointError(
            f"{file} is not an aclip checkpoint: it lacks {' and '.join(map(repr, missing))} "
            f"(found {found}); expected the {MODEL_STATES} that aclip's trainer saves"
        )
    return states


def has_ema_teacher(path: str | Path) -> bool:
    """Whether the aclip checkpoint at ``path`` (run, checkpoints or step directory) holds an
    EMA teacher (a method without one, such as ``clip``, saves none)."""
    return read_model_states(find_checkpoint(path)).get("ema") is not None


def load_eval_model(
    path: str | Path, use_ema: bool = False, device: str | torch.device = "cpu"
) -> tuple[CLIP, Config]:
    """The CLIP model of a checkpoint, fp32, in eval mode, with the run's config. A bf16/fp16
    run's weights are the fp32 master weights its optimizer kept, not the rounded module copies.

    With ``use_ema`` the image side (vision tower and image projection) comes from the EMA
    teacher; the text side is always the online one.
    """
    states_file = find_checkpoint(path)
    states = read_model_states(states_file)
    cfg = config_from_yaml(states["config"])
    clip = build_clip(cfg.model, cfg.loss)
    module = _fp32_module(states["module"], states_file.parent)
    try:
        clip.load_state_dict({k[5:]: v.float() for k, v in module.items() if k.startswith("clip.")})
    except RuntimeError as err:  # missing, unexpected or misshapen keys: a damaged checkpoint
        raise ValueError(f"{states_file}: its weights do not fit the model its config "
                         f"describes ({str(err).splitlines()[0]} ...)") from None  # fmt: skip
    if use_ema:
        ema = states.get("ema")
        if ema is None:
            raise ValueError(f"checkpoint {path} holds no EMA teacher (trained without one)")
        image_side = {k: v.float() for k, v in ema.items() if k.split(".")[0] in IMAGE_SIDE}
        missing = clip.load_state_dict(image_side, strict=False).missing_keys
        if any(k.split(".")[0] in IMAGE_SIDE for k in missing):
            raise ValueError(f"EMA teacher in {path} lacks image-side weights: {missing[:3]}")
    return clip.float().eval().to(device), cfg


def _fp32_module(module: dict[str, torch.Tensor], tag_dir: Path) -> dict[str, torch.Tensor]:
    """The student's weights at full precision: as saved for an fp32 run; for a bf16/fp16 run
    (whose saved module holds rounded copies) the fp32 master weights the optimizer kept,
    merged from every rank's ZeRO shards by DeepSpeed's own ``zero_to_fp32``."""
    half = (torch.bfloat16, torch.float16)
    if not any(v.dtype in half for v in module.values() if torch.is_tensor(v)):
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with deepspeed_reads_safe():  # zero_to_fp32 unpickles without restriction otherwise
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except CheckpointError:
        raise
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise ValueError(
            f"{tag_dir} holds half-precision weights and its fp32 master weights (the ZeRO "
            f"optimizer states) cannot be read: {err}"
        ) from None
