"""Model: timm vision tower with token keep and relevance, CLIP text tower, SSL heads."""

from __future__ import annotations

from typing import Any

from torch import nn

from aclip.config import ConfigError, LossConfig, ModelConfig
from aclip.model.clip import CLIP, ACLIPModel
from aclip.model.heads import byol_predictor, byol_projector, simclr_head
from aclip.model.text import TextTransformer
from aclip.model.vision import ImageSizeError, VisionTower, gather_tokens, normalize_alpha

__all__ = [
    "ACLIPModel",
    "CLIP",
    "TextTransformer",
    "VisionTower",
    "build_clip",
    "build_model",
    "build_student",
    "build_vision",
    "compile_student",
    "gather_tokens",
    "normalize_alpha",
]


def build_vision(model_cfg: ModelConfig) -> VisionTower:
    """The vision tower of ``model_cfg`` (timm ViT, patch stem, alpha channel), randomly
    initialised. Raises ConfigError naming ``model.image_size`` when it is smaller than one
    patch or not a multiple of the patch size."""
    try:
        return VisionTower(
            model_cfg.vision_model,
            model_cfg.image_size,
            model_kwargs=dict(model_cfg.vision_kwargs),
            freeze_patch_embed=model_cfg.freeze_patch_embed,
            alpha_channel=model_cfg.alpha_channel,
            patch_stem=model_cfg.patch_stem,
        )
    except ImageSizeError as err:
        raise ConfigError(
            f"config key 'model.image_size': {err} of {model_cfg.vision_model} "
            f"(model.vision_kwargs: {dict(model_cfg.vision_kwargs)})"
        ) from None


def build_clip(model_cfg: ModelConfig, loss_cfg: LossConfig | None = None) -> CLIP:
    """The CLIP of ``model_cfg``: timm vision tower, CLIP text tower, projections, temperature;
    with ``loss_cfg.contrastive == "siglip"`` SigLIP's start (``loss.siglip_init_scale``) and a
    logit bias (``loss.siglip_init_bias``); without ``loss_cfg``: InfoNCE's model."""
    visual = build_vision(model_cfg)
    text = TextTransformer(
        context_length=model_cfg.context_length,
        vocab_size=model_cfg.vocab_size,
        width=model_cfg.text_width,
        layers=model_cfg.text_layers,
        heads=model_cfg.text_heads,
        act=model_cfg.text_act,
        token_drop=model_cfg.text_token_drop,
    )
    if loss_cfg is not None and loss_cfg.contrastive == "siglip":
        return CLIP(visual, text, model_cfg.embed_dim, 1.0 / loss_cfg.siglip_init_scale,
                    loss_cfg.siglip_init_bias)  # fmt: skip
    return CLIP(visual, text, model_cfg.embed_dim, model_cfg.init_temperature)


def build_student(
    clip: CLIP,
    model_cfg: ModelConfig,
    simclr: nn.Module | None = None,
    projector: nn.Module | None = None,
    predictor: nn.Module | None = None,
    bow_head: nn.Module | None = None,
) -> ACLIPModel:
    """The module a training method trains: ``clip`` and its optional SSL heads, with the
    runtime options of ``model_cfg`` (gradient checkpointing, ``torch.compile``)."""
    model = ACLIPModel(clip, simclr, projector, predictor, bow_head)
    if model_cfg.grad_checkpointing:
        clip.visual.set_grad_checkpointing(True)
        clip.text.set_grad_checkpointing(True)
    if model_cfg.compile:
        compile_student(model)
    return model


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> ACLIPModel:
    """A-CLIP's student: CLIP from ``model_cfg``, a SimCLR head if ``w_simclr > 0``, BYOL heads
    if ``w_byol > 0`` (built in this order: the same seed gives the same weights)."""
    clip = build_clip(model_cfg, loss_cfg)
    width = clip.visual.width
    simclr = None
    if loss_cfg.w_simclr > 0:
        simclr = simclr_head(width, loss_cfg.simclr_hidden, loss_cfg.simclr_out)
    projector = predictor = None
    if loss_cfg.w_byol > 0:
        projector = byol_projector(width, loss_cfg.byol_hidden, loss_cfg.byol_out)
        predictor = byol_predictor(loss_cfg.byol_out, loss_cfg.byol_hidden)
    bow = caption_word_head(model_cfg, loss_cfg)
    return build_student(clip, model_cfg, simclr, projector, predictor, bow)


def caption_word_head(model_cfg: ModelConfig, loss_cfg: LossConfig) -> nn.Linear | None:
    """The linear head from the joint space to the vocabulary that ``loss.w_caption_bow`` and
    ``loss.w_text_bow`` train (:func:`aclip.methods.losses.caption_word_losses`); None when both
    are 0."""
    if not loss_cfg.caption_words:
        return None
    return nn.Linear(model_cfg.embed_dim, model_cfg.vocab_size)


def compile_student(model: ACLIPModel, **compile_kwargs: Any) -> ACLIPModel:
    """``torch.compile`` the student's forward in place (``nn.Module.compile``).

    In place, so parameter names and state dicts do not change (no ``_orig_mod.`` prefix) and
    the DeepSpeed engine wraps the module as usual. Only ``ACLIPModel.__call__`` is compiled:
    the EMA teacher, a deep copy of the vision tower, keeps the eager path that its relevance
    hooks need, and ``clip.encode_image`` / ``encode_text`` (evaluation) stay eager.
    """
    model.compile(**compile_kwargs)
    return model
