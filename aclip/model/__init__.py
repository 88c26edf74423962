"""Model: timm vision tower with token keep and relevance, CLIP text tower, SSL heads."""

from __future__ import annotations

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
    )
    clip = CLIP(visual, text, model_cfg.embed_dim)
    simclr = None
    if loss_cfg.w_simclr > 0:
        simclr = simclr_head(visual.width, loss_cfg.simclr_hidden, loss_cfg.simclr_out)
    projector = predictor = None
    if loss_cfg.w_byol > 0:
        projector = byol_projector(visual.width, loss_cfg.byol_hidden, loss_cfg.byol_out)
        predictor = byol_predictor(loss_cfg.byol_out, loss_cfg.byol_hidden)
    return ACLIPModel(clip, simclr, projector, predictor)
