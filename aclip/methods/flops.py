"""Analytic FLOP counts of one training step, for model FLOPs utilisation (MFU).

Only matrix products are counted (as ``torch.utils.flop_counter.FlopCounterMode`` does): the
patch embedding, attention projections, the two attention products, MLPs, projections, SSL
heads and the loss logits; one multiply-add is 2 FLOPs. Attention is counted over the full
T×T square (causal text attention too, as FlopCounterMode and the usual MFU conventions do).

A trained pass costs 3× its forward (forward + backward of activations and weights); the EMA
teacher's pass is forward only. Model FLOPs, not hardware FLOPs: recomputation by gradient
checkpointing is not counted, so MFU stays comparable with and without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from torch import nn

from aclip.config import Config
from aclip.methods import get_method
from aclip.methods.base import Cost
from aclip.model import ACLIPModel, TextTransformer, VisionTower

BACKWARD_FACTOR = 3  # forward + backward = 3 forward passes of matmul FLOPs


@dataclass(frozen=True)
class ViTDims:
    """The sizes of a ViT that decide its FLOPs."""

    width: int
    depth: int
    mlp_hidden: int
    patch_embed_macs: int  # multiply-adds of the patch embedding per patch (any conv stem)
    num_patches: int
    num_prefix: int

    @classmethod
    def of(cls, tower: VisionTower) -> ViTDims:
        """Read the sizes off a built :class:`VisionTower`."""
        vit = tower.vit
        return cls(
            width=tower.width,
            depth=len(vit.blocks),
            mlp_hidden=vit.blocks[0].mlp.fc1.out_features,
            patch_embed_macs=patch_embed_macs(vit.patch_embed.proj, vit.patch_embed.patch_size),
            num_patches=tower.num_patches,
            num_prefix=tower.num_prefix_tokens,
        )


def patch_embed_macs(proj: nn.Module, patch_hw: tuple[int, int]) -> int:
    """Multiply-adds per patch of the convolutions in ``proj``, in order: the ViT's one patch
    conv (kernel = stride = patch) or a conv stem (``model.patch_stem=conv``), each layer
    producing (patch / its cumulative stride)^2 positions per patch."""
    macs, stride_h, stride_w = 0, 1, 1
    for conv in (m for m in proj.modules() if isinstance(m, nn.Conv2d)):
        stride_h, stride_w = stride_h * conv.stride[0], stride_w * conv.stride[1]
        positions = (patch_hw[0] // stride_h) * (patch_hw[1] // stride_w)
        kh, kw = conv.kernel_size
        macs += positions * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return macs


@dataclass(frozen=True)
class TextDims:
    """The sizes of a CLIP text transformer that decide its FLOPs."""

    width: int
    layers: int
    mlp_hidden: int
    context: int

    @classmethod
    def of(cls, text: TextTransformer) -> TextDims:
        """Read the sizes off a built :class:`TextTransformer`."""
        return cls(text.width, text.layers, text.blocks[0].fc1.out_features, text.context_length)


def transformer_block_flops(tokens: int, width: int, mlp_hidden: int) -> int:
    """One pre-LN block over ``tokens``: qkv, attention products, output projection, MLP."""
    projections = 2 * tokens * width * (3 * width + width)
    attention = 2 * 2 * tokens * tokens * width  # q·Kᵀ and probs·V, all heads together
    mlp = 2 * 2 * tokens * width * mlp_hidden
    return projections + attention + mlp


def vit_forward_flops(dims: ViTDims, kept: int | None = None, relevance: bool = False) -> int:
    """Forward FLOPs of one image keeping ``kept`` patches (None: all).

    The patch embedding runs on every patch (tokens are dropped after it); ``relevance`` adds
    the CLS-row product q_cls·Kᵀ of every layer.
    """
    tokens = dims.num_prefix + (dims.num_patches if kept is None else kept)
    flops = 2 * dims.num_patches * dims.patch_embed_macs
    flops += dims.depth * transformer_block_flops(tokens, dims.width, dims.mlp_hidden)
    if relevance:
        flops += dims.depth * 2 * tokens * dims.width
    return flops


def text_forward_flops(dims: TextDims) -> int:
    """Forward FLOPs of one caption (all ``context`` positions are computed)."""
    return dims.layers * transformer_block_flops(dims.context, dims.width, dims.mlp_hidden)


def linear_flops(module: nn.Module | None) -> int:
    """Forward FLOPs per sample of every ``nn.Linear`` in ``module`` (each applied once)."""
    if module is None:
        return 0
    return sum(
        2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)
    )


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step on one rank, split by part (forward FLOPs unless named)."""

    vision: int  # student vision tower, all views
    text: int
    projections: int  # image_proj and text_proj
    heads: int  # SimCLR head, BYOL projector and predictor; the caption-word head
    loss: int  # InfoNCE (or SigLIP) logits and NT-Xent similarities
    teacher: int  # EMA teacher pass (relevance + BYOL target), forward only
    batch: int

    @property
    def student_forward(self) -> int:
        """Forward FLOPs of everything that is trained."""
        return self.vision + self.text + self.projections + self.heads + self.loss

    @property
    def total(self) -> int:
        """Model FLOPs of the step: 3× the trained forward plus the teacher's forward."""
        return BACKWARD_FACTOR * self.student_forward + self.teacher

    @property
    def per_sample(self) -> float:
        """``total`` per training sample (image-caption pair)."""
        return self.total / self.batch

    def as_dict(self) -> dict[str, float]:
        """Every part plus the derived totals (for JSON reports)."""
        return asdict(self) | {
            "student_forward": self.student_forward,
            "total": self.total,
            "per_sample": self.per_sample,
        }


def _loss_flops(cost: Cost, cfg: Config, batch: int, global_batch: int, embed_dim: int) -> int:
    views = cost.num_views
    directions = 1 if cfg.loss.contrastive == "siglip" else 2  # SigLIP: image→text only
    flops = views * directions * (2 * batch * global_batch * embed_dim)
    if cost.simclr:
        pairs = views * (views - 1) // 2
        flops += pairs * 2 * (2 * batch) * (2 * global_batch) * cfg.loss.simclr_out
    return flops


def step_flops(model: ACLIPModel, cfg: Config, batch: int, world_size: int = 1) -> StepFlops:
    """Analytic FLOPs of one ``Trainer.train_step`` with ``batch`` samples on this rank, for the
    method ``cfg.method`` (its views, kept tokens, teacher and NT-Xent: ``Method.cost``)."""
    clip = model.clip
    vit = ViTDims.of(clip.visual)
    cost = get_method(cfg.method).cost(cfg, vit.num_patches)
    views = cost.num_views
    image_proj, text_proj = linear_flops(clip.image_proj), linear_flops(clip.text_proj)
    teacher = 0
    if cost.teacher:  # at ema.image_size: the same ViT on the teacher's (coarser) patch grid
        teacher_vit = replace(vit, num_patches=cost.teacher_patches or vit.num_patches)
        teacher = batch * vit_forward_flops(teacher_vit, None, relevance=True)
        teacher += batch * linear_flops(model.byol_projector)
    heads = sum(
        linear_flops(m) for m in (model.simclr_head, model.byol_projector, model.byol_predictor)
    )
    return StepFlops(
        vision=batch * views * vit_forward_flops(vit, cost.kept),
        text=batch * text_forward_flops(TextDims.of(clip.text)),
        projections=batch * views * image_proj + batch * text_proj,
        heads=batch * views * heads + batch * (views + 1) * linear_flops(model.bow_head),
        loss=_loss_flops(cost, cfg, batch, batch * world_size, clip.embed_dim),
        teacher=teacher,
        batch=batch,
    )


def config_step_flops(cfg: Config, batch: int | None = None, world_size: int = 1) -> StepFlops:
    """:func:`step_flops` of the model ``cfg`` describes, built on the meta device (sizes
    without memory or init time); ``batch`` defaults to the per-rank share of
    ``train.global_batch_size``."""
    import torch

    from aclip.model import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.loss)
    batch = batch or max(1, cfg.train.global_batch_size // world_size)
    return step_flops(model, cfg, batch, world_size)
