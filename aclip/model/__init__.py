"""Model: timm vision tower with token keep and relevance, CLIP text tower, SSL heads."""

from __future__ import annotations

from typing import Any

from aclip.config import LossConfig, ModelConfig
from aclip.model.clip import CLIP, ACLIPModel
from aclip.model.heads import byol_predictor, byol_projector, simclr_head
from aclip.model.text import TextTransformer
from aclip.model.vision import VisionTower, gather_tokens

__all__ = [
    "ACLIPModel",
    "CLIP",
    "TextTransformer",
    "VisionTower",
    "build_model",
    "compile_student",
    "gather_tokens",
]


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> ACLIPModel:
    """CLIP from ``model_cfg``; SimCLR head if ``w_simclr > 0``, BYOL heads if ``w_byol > 0``."""
    visual = VisionTower(
        model_cfg.vision_model,
        model_cfg.image_size,
        model_kwargs=dict(model_cfg.vision_kwargs),
        freeze_patch_embed=model_cfg.freeze_patch_embed,
    )
    text = TextTransformer(
        context_length=model_cfg.context_length,
        vocab_size=model_cfg.vocab_size,
        width=model_cfg.text_width,
        layers=model_cfg.text_layers,
        heads=model_cfg.text_heads,
        act=model_cfg.text_act,
    )
    clip = CLIP(visual, text, model_cfg.embed_dim)
    simclr = None
    if loss_cfg.w_simclr > 0:
        simclr = simclr_head(visual.width, loss_cfg.simclr_hidden, loss_cfg.simclr_out)
    projector = predictor = None
    if loss_cfg.w_byol > 0:
        projector = byol_projector(visual.width, loss_cfg.byol_hidden, loss_cfg.byol_out)
        predictor = byol_predictor(loss_cfg.byol_out, loss_cfg.byol_hidden)
    model = ACLIPModel(clip, simclr, projector, predictor)
    if model_cfg.grad_checkpointing:
        visual.set_grad_checkpointing(True)
        text.set_grad_checkpointing(True)
    if model_cfg.compile:
        compile_student(model)
    return model


def compile_student(model: ACLIPModel, **compile_kwargs: Any) -> ACLIPModel:
    """``torch.compile`` the student's forward in place (``nn.Module.compile``).

    In place, so parameter names and state dicts do not change (no ``_orig_mod.`` prefix) and
    the DeepSpeed engine wraps the module as usual. Only ``ACLIPModel.__call__`` is compiled:
    the EMA teacher, a deep copy of the vision tower, keeps the eager path that its relevance
    hooks need, and ``clip.encode_image`` / ``encode_text`` (evaluation) stay eager.
    """
    model.compile(**compile_kwargs)
    return model
