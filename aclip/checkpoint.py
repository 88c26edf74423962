"""Reading training checkpoints outside the trainer (evaluation, studies)."""

from __future__ import annotations

from pathlib import Path

import torch

from aclip.config import Config, config_from_yaml
from aclip.model import build_model
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


def load_eval_model(
    path: str | Path, use_ema: bool = False, device: str | torch.device = "cpu"
) -> tuple[CLIP, Config]:
    """The CLIP model of a checkpoint, fp32, in eval mode, with the run's config.

    With ``use_ema`` the image side (vision tower and image projection) comes from the EMA
    teacher; the text side is always the online one.
    """
    states = torch.load(find_checkpoint(path), map_location="cpu", weights_only=False)
    cfg = config_from_yaml(states["config"])
    model = build_model(cfg.model, cfg.loss)
    model.load_state_dict({k: v.float() for k, v in states["module"].items()})
    clip = model.clip
    if use_ema:
        ema = states.get("ema")
        if ema is None:
            raise ValueError(f"checkpoint {path} holds no EMA teacher (trained without one)")
        image_side = {k: v.float() for k, v in ema.items() if k.split(".")[0] in IMAGE_SIDE}
        missing = clip.load_state_dict(image_side, strict=False).missing_keys
        if any(k.split(".")[0] in IMAGE_SIDE for k in missing):
            raise ValueError(f"EMA teacher in {path} lacks image-side weights: {missing[:3]}")
    return clip.float().eval().to(device), cfg
