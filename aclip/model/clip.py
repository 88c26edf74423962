"""CLIP (two towers + projections + temperature) and the A-CLIP model with its SSL heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aclip.model.text import TextTransformer
from aclip.model.vision import VisionTower

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def _maybe_normalize(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=-1) if normalize else x


class CLIP(nn.Module):
    """Vision and text towers projected into a joint ``embed_dim`` space.

    ``logit_scale`` has shape (1,) (DeepSpeed refuses 0-dim parameters), initialised to
    ln(1/init_temperature) (CLIP: ln(1/0.07)). It is clamped to [0, ln 100] in place after each
    optimizer step (the trainer does it, as open_clip does), not in the forward pass: a forward
    clamp would cut its gradient above ln 100, where Adam's momentum could then leave it for
    good.

    ``init_logit_bias`` (SigLIP, ``loss.contrastive=siglip``) adds a learnable ``logit_bias`` of
    shape (1,) starting there (open_clip's ``init_logit_bias``); without it the model has none.
    """

    def __init__(
        self,
        visual: VisionTower,
        text: TextTransformer,
        embed_dim: int,
        init_temperature: float = 0.07,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        self.image_proj = nn.Linear(visual.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=visual.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width**-0.5)
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.logit_bias: nn.Parameter | None = None
        if init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((1,), float(init_logit_bias)))

    def project_image(self, pooled_BW: Tensor, normalize: bool = False) -> Tensor:
        """Joint-space embedding [B, embed_dim] of a vision tower's pooled output."""
        return _maybe_normalize(self.image_proj(pooled_BW), normalize)

    def encode_image(
        self,
        images: Tensor,
        keep_idx_BK: Tensor | None = None,
        normalize: bool = False,
        alpha: Tensor | None = None,
        use_alpha: bool = True,
    ) -> Tensor:
        """Image embeddings [B, embed_dim], encoding only ``keep_idx_BK`` patches if given;
        ``alpha`` [B, 1, H, W] normalised, for an alpha tower (see ``VisionTower.forward``)."""
        pooled_BW = self.visual(images, keep_idx_BK, alpha, use_alpha)
        return self.project_image(pooled_BW, normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Text embeddings [B, embed_dim] of token rows [B, L]."""
        return _maybe_normalize(self.text_proj(self.text(tokens)), normalize)

    def logit_scale_exp(self) -> Tensor:
        """exp(logit_scale), shape (1,) (the parameter is kept in [0, ln 100] by the trainer)."""
        return self.logit_scale.exp()


class ACLIPModel(nn.Module):
    """CLIP plus the optional SSL heads, which take the vision tower's pooled output (width).

    ``forward`` is the student pass of one training step (what the DeepSpeed engine calls).
    """

    def __init__(
        self,
        clip: CLIP,
        simclr_head: nn.Module | None,
        byol_projector: nn.Module | None,
        byol_predictor: nn.Module | None,
        bow_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (byol_projector is None) != (byol_predictor is None):
            raise ValueError("byol_projector and byol_predictor come together (both or neither)")
        self.clip = clip
        self.simclr_head = simclr_head
        self.byol_projector = byol_projector
        self.byol_predictor = byol_predictor
        self.bow_head = bow_head

    def forward(
        self,
        images_BCHW: Tensor,
        tokens_BL: Tensor,
        keep_idx_BK: Tensor | None = None,
        alpha_B1HW: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Student outputs for the loss; images are all views flattened ([B*V, C, H, W]), with
        their normalised alpha masks [B*V, 1, H, W] for an alpha tower (Alpha-CLIP).

        Returns ``image_emb`` [B*V, embed_dim] and ``text_emb`` [B, embed_dim] (both
        L2-normalised), ``logit_scale_exp`` (1,), ``logit_bias`` (1,) for a SigLIP model,
        ``pooled`` [B*V, width], and when the heads exist ``simclr_z`` [B*V, simclr_out] and
        ``byol_pred`` [B*V, byol_out] (raw).
        """
        pooled_BW = self.clip.visual(images_BCHW, keep_idx_BK, alpha_B1HW)
        image_BE = self.clip.project_image(pooled_BW)
        text_BE = self.clip.encode_text(tokens_BL)
        out = {
            "image_emb": F.normalize(image_BE, dim=-1),
            "text_emb": F.normalize(text_BE, dim=-1),
            "logit_scale_exp": self.clip.logit_scale_exp(),
            "pooled": pooled_BW,
        }
        if self.clip.logit_bias is not None:
            # a copy, not the Parameter: under no_grad (accumulation's cached pass) it must carry
            # no gradient, as the computed logit_scale_exp does not
            out["logit_bias"] = self.clip.logit_bias.clone()
        if self.bow_head is not None:
            out["image_bow"] = self.bow_head(image_BE)
            out["text_bow"] = self.bow_head(text_BE)
        if self.simclr_head is not None:
            out["simclr_z"] = self.simclr_head(pooled_BW)
        if self.byol_projector is not None and self.byol_predictor is not None:
            out["byol_pred"] = self.byol_predictor(self.byol_projector(pooled_BW))
        return out
